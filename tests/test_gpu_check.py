"""benchmarks/gpu_check.py --cpu-smoke: the GPU proof script's every step, at tiny sizes on CPU.

The real run needs an H100/H200; this keeps the script working in CI. It starts
its own local Ray (in a subprocess, so this test process stays Ray-free).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check-cpu-smoke.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["medgemma-4b-it (image+text)", "medgemma-27b-text"]
    for model in report["models"]:
        # Same shapes, same NF4 rules: the estimate's weights match what was built.
        assert abs(model["weights_error_pct"]) < 5, model
        assert all("tok_s" in v for v in model["decode"].values()), model["decode"]
        # The KV contract step: the engine's pool, built for the planned batch, is the planned pool.
        assert model["kv"]["within_plan"] is True and model["kv"]["generated_tokens"] > 0, model["kv"]
        assert model["kv"]["pool_tensor_mib"] == model["kv"]["planned_pool_mib"], model["kv"]
    served = report["served"]["replicas"]
    assert set(served) == {"summarizer", "buffer_agent"}
    assert all(r["planned"] == "cuda:0" and r["http_status"] == 200 for r in served.values()), served
    assert all(0 < r["kv_engine_mib"] <= r["kv_planned_mib"] for r in served.values()), served
    assert (tmp_path / "gpu_check-cpu-smoke.md").read_text().startswith("GPU check on **CPU (smoke)**")
