"""Load time of each offline demo model: GGUF conversion (cold) vs cached reload,
plus a short greedy generation, printed as a table.

    python benchmarks/bench_load.py                 # both demo models, CPU
    python benchmarks/bench_load.py --models smollm2 --tokens 64

The cold run converts into a fresh temporary cache (so an existing
~/.cache/rayfit conversion does not hide the cost); the warm run reloads the
same cache, which is what every replica start after the first sees.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch  # noqa: E402

from deployments.engine.core import Engine  # noqa: E402
from deployments.engine.generation import GenerationInput, SamplingParams  # noqa: E402
from deployments.engine.loading import load_model  # noqa: E402
from placement.config import ModelSpec  # noqa: E402
from placement.demo_models import gemma3_270m_gguf, smollm2_gguf  # noqa: E402
from placement.inventory import parse_gpu_spec  # noqa: E402
from placement.planner import make_plan  # noqa: E402


def _smollm2_spec(dtype: str) -> ModelSpec:
    directory, name = smollm2_gguf()
    return ModelSpec(model=str(directory), gguf_file=name, dtype=dtype)


def _gemma3_spec(dtype: str) -> ModelSpec:
    return ModelSpec(model=str(gemma3_270m_gguf()), dtype=dtype)


DEMOS: dict[str, Callable[[str], ModelSpec]] = {"smollm2": _smollm2_spec, "gemma3": _gemma3_spec}


@dataclass(frozen=True)
class Row:
    model: str
    cold_s: float | None
    warm_s: float
    batch: int
    tokens: int
    generate_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.tokens / self.generate_s


def bench(name: str, tokens: int, batch: int, cold: bool, dtype: str) -> Row:
    spec = DEMOS[name](dtype)
    entry = make_plan({name: spec}, parse_gpu_spec("none")).entry(name).replica
    assert entry is not None
    cold_s = None
    if cold:
        started = time.perf_counter()
        load_model(spec, entry)  # converts into the (fresh) cache
        cold_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = load_model(spec, entry)
    warm_s = time.perf_counter() - started
    engine = Engine(loaded, entry)
    # min_tokens is not exposed: a base model may stop early on <eos>; the table counts what was generated.
    params = SamplingParams(max_tokens=tokens, temperature=0)
    # Chat messages: SmolLM2 uses its template, Gemma 3 270M (base) the engine's fallback.
    inputs = [
        GenerationInput(params=params, messages=({"role": "user", "content": f"Question {i}: what does a GPU do?"},))
        for i in range(batch)
    ]
    engine.generate_batch(inputs[:1])  # warm-up
    started = time.perf_counter()
    outputs = engine.generate_batch(inputs)
    generate_s = time.perf_counter() - started
    generated = max(o.completion_tokens for o in outputs)
    return Row(name, cold_s, warm_s, batch, generated, generate_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEMOS), help=f"comma list of {', '.join(DEMOS)}")
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens per request")
    parser.add_argument("--batch", type=int, default=4, help="requests in the timed batch")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-cold", action="store_true", help="skip the conversion (use the existing cache)")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="rayfit-bench-") as scratch:
        if not args.no_cold:
            os.environ["RAYFIT_CACHE"] = scratch  # a fresh cache: the first load converts
        for name in names:
            rows.append(bench(name, args.tokens, args.batch, cold=not args.no_cold, dtype=args.dtype))
    print(f"dtype {args.dtype}, CPU threads {torch.get_num_threads()}")
    header = ("model", "convert+load s", "cached load s", "batch", "tokens", "gen s", "tok/s")
    print(
        f"{header[0]:<10} {header[1]:>15} {header[2]:>14} {header[3]:>6} {header[4]:>7} {header[5]:>7} {header[6]:>7}"
    )
    for r in rows:
        cold = f"{r.cold_s:.1f}" if r.cold_s is not None else "-"
        print(
            f"{r.model:<10} {cold:>15} {r.warm_s:>14.1f} {r.batch:>6} {r.tokens:>7} "
            f"{r.generate_s:>7.2f} {r.tokens_per_s:>7.1f}"
        )


if __name__ == "__main__":
    main()
