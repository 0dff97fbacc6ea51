"""The offline demo, served once end to end (`python -m deployments.demo`).

Runs the README's first command in a subprocess: it starts its own local Ray,
serves examples/demo/serve_config.yaml, asks a real question with the openai
SDK and prints the answer and the placement. Slow the first time on a machine
(the two GGUF files are converted once into ~/.cache/rayfit).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# First run converts both GGUF files (~1-2 min on 2 cores); later runs ~1 min.
DEMO_TIMEOUT_S = 480


@pytest.mark.slow
def test_demo_serves_and_answers() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # the demo starts its own local Ray
    result = subprocess.run(
        [sys.executable, "-m", "deployments.demo", "--port", "0", "--max-tokens", "16"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
    )
    out = result.stdout
    assert result.returncode == 0, f"demo failed:\n{out[-3000:]}\n{result.stderr[-3000:]}"
    assert "A (summarizer): " in out
    answer = out.split("A (summarizer): ", 1)[1].splitlines()[0].strip()
    assert answer, out
    assert "models: buffer_agent, summarizer" in out
    # The config names no host but 127.0.0.1: the proxy listens on loopback only, as the OS reports it.
    listening = out.split("listening on ", 1)[1].splitlines()[0]
    assert listening.startswith("127.0.0.1 port "), listening
    placement = out.split("Where each model runs", 1)[1]
    for role in ("summarizer", "buffer_agent"):
        assert role in placement
    # The KV contract on the demo: both roles show planned and engine KV bytes, the engine within the plan.
    kv_lines = [line for line in placement.splitlines() if "KV cache: planned" in line]
    assert len(kv_lines) == 2 and all("(within plan)" in line for line in kv_lines), placement
    import torch

    if not torch.cuda.is_available():
        # No GPU: the planner puts both on CPU, and they load there.
        assert placement.count("planned cpu") == 2 and placement.count("actual cpu") == 2
