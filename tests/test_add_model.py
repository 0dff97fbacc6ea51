"""One more model on the running demo, and the calibration round trip (issue 26, parts 3 and 4).

One served cluster for the module: a local Ray of its own (no GPU: the
planner puts both demo models on CPU) serving examples/demo/model_configs.yaml
with the app's own builder, the two real GGUF demo models loaded. The CLI runs
as the user runs it (`python -m placement ...` in a subprocess, connected to
this Ray by its GCS address); the ingress answers over real HTTP.

Expected figures: a model given `memory_gb: 4096` on CPU needs 4096 GiB plus
its process's 1 GiB (placement.planner.CPU_PROCESS_BYTES) = 4097 GiB, which no
node of this machine has. A model at context 512 and batch 1 is smaller than
both demo models (2048 × 16 each), so the planner places it last and no running
entry changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve
from serve_support import local_serve

from deployments.app import AppArgs, build_app
from placement.add_model import parse_addition
from placement.calibration import CPU_KIND, load_measurements
from placement.config import ConfigError
from placement.planner import CPU_PROCESS_BYTES
from placement.units import GIB

pytestmark = pytest.mark.slow  # starts a Ray cluster of its own

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "examples" / "demo" / "model_configs.yaml"
ROLES = ("buffer_agent", "summarizer")
APP = "rayfit"
# A fresh interpreter imports Ray, torch and transformers and sizes three models (2 shared cores).
CLI_TIMEOUT_S = 240
SMALL = "{extra: {model: 'demo:smollm2-135m-instruct', context_length: 512, max_batch_size: 1}}"
HUGE = "{huge: {model: 'demo:smollm2-135m-instruct', memory_gb: 4096}}"


@dataclass(frozen=True)
class Demo:
    url: str
    address: str  # the GCS address `--address` connects to


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    with local_serve(num_cpus=4, env={"HF_HUB_OFFLINE": "1"}) as port:
        serve.run(build_app(AppArgs(model_config=str(DEMO_CONFIG))), name=APP, route_prefix="/")
        yield Demo(url=f"http://127.0.0.1:{port}", address=ray.get_runtime_context().gcs_address)
        serve.delete(APP)


def placement(demo: Demo) -> dict[str, Any]:
    response = httpx.get(f"{demo.url}/v1/placement", timeout=60)
    response.raise_for_status()
    body = response.json()
    assert all(body["models"][role]["status"] == "ok" for role in ROLES), body
    return body


def pids(demo: Demo) -> dict[str, tuple[int, int]]:
    """Each role's replica pid and its engine process's pid."""
    models = placement(demo)["models"]
    return {
        role: (models[role]["replica"]["actual"]["pid"], models[role]["replica"]["actual"]["engine_pid"])
        for role in ROLES
    }


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}  # the table unwrapped
    return subprocess.run(
        [sys.executable, "-m", "placement", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def test_the_forms_of_a_new_model() -> None:
    assert parse_addition("org/Some.Model-7B") == (
        "some-model-7b",
        parse_addition("some-model-7b=org/Some.Model-7B")[1],
    )
    role, spec = parse_addition("extra=demo:gemma-3-270m")
    assert (role, spec.model) == ("extra", "demo:gemma-3-270m")
    role, spec = parse_addition(HUGE)
    assert (role, spec.model, spec.memory_gb) == ("huge", "demo:smollm2-135m-instruct", 4096)
    with pytest.raises(ConfigError, match="one role expected, found 2"):
        parse_addition("{a: {model: x}, b: {model: y}}")
    with pytest.raises(ConfigError, match="unknown field"):
        parse_addition("{a: {model: x, colour: red}}")


def test_add_a_model_that_fits_moves_nothing(demo: Demo) -> None:
    before = pids(demo)
    running = placement(demo)["models"]
    done = cli("plan", str(DEMO_CONFIG), "--address", demo.address, "--add", SMALL, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout)
    assert answer["verdict"] == "fits" and answer["moved"] == []
    # On CPU, on the node the running models use (this Ray has one).
    assert answer["device"] == "cpu" and answer["node_id"] == running["summarizer"]["plan"]["node_id"]
    assert "no running model moves" in answer["answer"]
    assert pids(demo) == before


def test_add_a_model_that_does_not_fit(demo: Demo) -> None:
    before = pids(demo)
    done = cli("plan", str(DEMO_CONFIG), "--address", demo.address, "--add", HUGE, "--json")
    assert done.returncode == 1, done.stderr[-3000:]
    answer = json.loads(done.stdout)
    assert answer["verdict"] == "no_room" and answer["device"] is None
    assert answer["needed_bytes"] == 4096 * GIB + CPU_PROCESS_BYTES
    assert "huge needs 4097.00 GiB" in answer["error"]
    # The text form says the same; a bad entry is a CLI error (2), not an answer.
    text = cli("plan", str(DEMO_CONFIG), "--address", demo.address, "--add", HUGE)
    assert text.returncode == 1 and "does not fit the running cluster now" in text.stdout + text.stderr
    bad = cli("plan", str(DEMO_CONFIG), "--address", demo.address, "--add", "{x: {model: m, colour: red}}")
    assert bad.returncode == 2 and "unknown field" in bad.stdout + bad.stderr
    assert pids(demo) == before


def test_the_ingress_answers_the_same_read_only(demo: Demo) -> None:
    before = pids(demo)
    url = f"{demo.url}/v1/placement/add"
    fits = httpx.post(url, json={"add": SMALL}, timeout=300)
    assert fits.status_code == 200, fits.text
    assert fits.json()["verdict"] == "fits" and fits.json()["device"] == "cpu"
    huge = httpx.post(url, json={"add": HUGE}, timeout=300)
    assert huge.status_code == 200 and huge.json()["needed_bytes"] == 4096 * GIB + CPU_PROCESS_BYTES
    taken = httpx.post(url, json={"add": "summarizer=demo:gemma-3-270m"}, timeout=300)
    assert taken.status_code == 400 and "already in the config" in taken.json()["error"]["message"]
    # Read-only: nothing was deployed, nothing restarted.
    assert sorted(placement(demo)["models"]) == list(ROLES)
    assert pids(demo) == before


def _peaks(demo: Demo) -> dict[str, int]:
    return {
        role: item["replica"]["actual"]["memory"]["peak_rss_bytes"] for role, item in placement(demo)["models"].items()
    }


def test_calibration_round_trip(demo: Demo, tmp_path: Path) -> None:
    # The largest requests these replicas serve here.
    chat = {"model": "summarizer", "messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 32}
    assert httpx.post(f"{demo.url}/v1/chat/completions", json=chat, timeout=120).status_code == 200
    text = {"model": "buffer_agent", "prompt": "The capital of France is", "max_tokens": 32}
    assert httpx.post(f"{demo.url}/v1/completions", json=text, timeout=120).status_code == 200

    file = tmp_path / "calibration.json"
    low = _peaks(demo)
    done = cli("calibrate", str(DEMO_CONFIG), "--url", demo.url, "--file", str(file), "--json")
    high = _peaks(demo)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = {m.role: m for m in load_measurements(file).values()}
    assert sorted(stored) == list(ROLES)
    for role, m in stored.items():
        # What the replica's engine process held at its peak (a peak only grows: bracketed by two reads).
        assert low[role] <= m.peak_bytes <= high[role]
        assert (m.key.model, m.key.context_length, m.key.device_kind) == (
            {"summarizer": "demo:smollm2-135m-instruct", "buffer_agent": "demo:gemma-3-270m"}[role],
            2048,
            CPU_KIND,
        )

    estimated = cli(
        "plan", str(DEMO_CONFIG), "--address", demo.address, "--calibration", str(file), "--estimated", "--json"
    )
    measured = cli("plan", str(DEMO_CONFIG), "--address", demo.address, "--calibration", str(file), "--json")
    assert estimated.returncode == 0 and measured.returncode == 0, measured.stderr[-3000:]
    before = {m["role"]: m["estimate"] for m in json.loads(estimated.stdout)["models"]}
    after = {m["role"]: m["estimate"] for m in json.loads(measured.stdout)["models"]}
    for role in ROLES:
        assert not before[role]["source_label"].startswith("measured")
        assert after[role]["source_label"] == f"measured ({before[role]['source']})"
        # The measured total is what the replica held at its peak (its process included, on CPU).
        assert after[role]["total_bytes"] == after[role]["measured_peak_bytes"] == stored[role].peak_bytes
        assert after[role]["weights_bytes"] == stored[role].weights_bytes
        assert after[role]["kv_cache_bytes"] == before[role]["kv_cache_bytes"]  # the engine builds the plan's KV
    # The table says so in its source column.
    table = cli("plan", str(DEMO_CONFIG), "--address", demo.address, "--calibration", str(file))
    assert table.returncode == 0 and table.stdout.count("measured (gguf)") == 2, table.stdout
    print({role: (before[role]["total_bytes"] + CPU_PROCESS_BYTES, stored[role].peak_bytes) for role in ROLES})
