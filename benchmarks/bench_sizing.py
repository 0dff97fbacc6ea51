"""Time sizing the Gemma 3 27B text config (MedGemma 27B text) and the Gemma 3 4B image+text config.

Target: < 2 s for the 27B. The first call pays transformers' lazy import of the
model's modeling module; later calls only build the meta-device model.

    .venv/bin/python benchmarks/bench_sizing.py
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from placement.sizing import estimate_from_config  # noqa: E402
from placement.sizing.reference_configs import MEDGEMMA_4B, MEDGEMMA_27B_TEXT  # noqa: E402
from placement.units import gib  # noqa: E402

TARGET_S = 2.0


CASES: tuple[tuple[str, dict[str, Any], str, tuple[str, ...]], ...] = (
    ("gemma3-27b-text", MEDGEMMA_27B_TEXT, "nf4", ()),
    ("gemma3-27b-text", MEDGEMMA_27B_TEXT, "none", ()),
    ("gemma3-4b-it", MEDGEMMA_4B, "nf4", ()),
    ("gemma3-4b-it", MEDGEMMA_4B, "nf4", ("model.vision_tower", "model.multi_modal_projector")),  # tower kept bf16
    ("gemma3-4b-it", MEDGEMMA_4B, "none", ()),
)


def main() -> None:
    # Building a model class imports its modeling module (and torch.distributed.tensor through
    # transformers) once per process; time that apart from the estimate itself.
    started = time.perf_counter()
    importlib.import_module("transformers.models.gemma3.modeling_gemma3")
    import_s = time.perf_counter() - started
    print(f"{'model':<16} {'quant':<5} {'skip':<5} {'1st s':>6} {'again s':>7} {'params':>8} {'weights':>10} "
          f"{'quant+':>9} {'KV':>9} {'runtime':>9} {'total':>10}")  # fmt: skip
    worst_27b = 0.0
    for name, config, quantization, skips in CASES:
        times = []
        for _ in range(2):
            started = time.perf_counter()
            e = estimate_from_config(config, quantization=quantization, skip_modules=skips)
            times.append(time.perf_counter() - started)
        if name == "gemma3-27b-text":
            worst_27b = max(worst_27b, *times)
        print(
            f"{name:<16} {quantization:<5} {'tower' if skips else '-':<5} {times[0]:>6.3f} {times[1]:>7.3f} "
            f"{e.params / 1e9:>7.3f}B {gib(e.weights_bytes):>10} {gib(e.quant_overhead_bytes):>9} "
            f"{gib(e.kv_cache_bytes):>9} {gib(e.runtime_bytes):>9} {gib(e.total_bytes):>10}"
        )
    verdict = "OK" if worst_27b < TARGET_S else "OVER TARGET"
    print(f"\n27B estimate worst {worst_27b:.3f} s (target < {TARGET_S} s): {verdict}")
    print(f"one-off import of the Gemma 3 modeling module before that: {import_s:.3f} s (first 27B sizing in a")
    print(f"fresh process ≈ {import_s + worst_27b:.2f} s). KV: 4096 tokens × batch 4 (the defaults).")


if __name__ == "__main__":
    main()
