"""benchmarks/gpu_check.py --cpu-smoke: the GPU proof script's every step, at tiny sizes on CPU.

The real run needs an H100/H200; this keeps the script working in CI. It starts
its own local Ray (in a subprocess, so this test process stays Ray-free), runs
the suite's GPU-marked tests (here all skipped, with the reason) and the peer
comparison on CPU (figures that must say they are not GPU figures).
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
        timeout=540,  # ~1.5-2.5 min alone on 2 cores: two Ray starts, the peer server, a pytest run
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
    markdown = (tmp_path / "gpu_check-cpu-smoke.md").read_text()
    assert markdown.startswith("GPU check on **CPU (smoke)**")
    # The GPU-marked tests ran and, torch seeing no GPU here, each was skipped with the reason.
    tests = report["gpu_tests"]
    assert {"tests/test_engine.py", "tests/test_serving.py"} <= set(tests["modules"]), tests
    assert tests["rc"] == 0 and tests["failed"] == 0 and tests["passed"] == 0 and tests["skipped"] >= 2, tests
    assert tests["skip_reasons"] == ["needs a CUDA GPU torch can see"], tests
    # The peer comparison measured both servers at c=1 and c=8, and says its figures are not a GPU's.
    peer = report["peer"]
    assert peer["gpu_figure"] is False and report["gpu_figures"] is False
    for cell in peer["cells"].values():
        assert cell["rayfit_tok_s"] > 0 and cell["peer_tok_s"] > 0 and cell["ratio"] > 0 and not cell["errors"], cell
    assert set(peer["cells"]) == {"c1", "c8"}
    assert "CPU SMOKE: not a GPU figure" in markdown and "no figure below is a GPU figure" in markdown
    assert report["skipped_steps"] == [] and set(report["step_seconds"]) == {"gpu tests", "peer", "4b", "27b", "serve"}
