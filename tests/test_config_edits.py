"""An edited model_configs.yaml takes effect on the next deploy of the same serve_config.yaml, and only
the edited role restarts.

Real local Ray with two declared GPUs and their gpu_slot resources, real Serve, the tiny text model
(loaded on CPU: RAYFIT_ALLOW_CPU_FALLBACK=1; each replica still checks its pin). The first deploy is
the command's own `deploy` run from this test's driver; the redeploy after the edit is the user's
command, `python -m deployments.deploy serve_config.yaml`, run as its own process against this cluster
(a new driver, as a user's shell would be; a fresh interpreter costs ~25 s on 2 busy cores, so only
the deploy under test pays it). Replica pids come from each replica's own report (`ModelServer.placement`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from ray import serve
from serve_support import model_config
from shared_cluster import shared_serve

from deployments.deploy import DeployConfigError, deploy, load_serve_config, main

APP = "rayfit"
BIG, SMALL = "buffer_agent", "summarizer"
REPO_ROOT = Path(__file__).resolve().parent.parent
# A fresh interpreter imports Ray, torch and transformers, plans, and waits for the app (2 shared cores).
DEPLOY_TIMEOUT_S = 300


# On the session's shared Ray (tests/shared_cluster.py): CPU, 2 declared GPUs with slots, the CPU fallback.
pytestmark = pytest.mark.shared_serve


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with shared_serve() as port:
        yield port


def _serve_config(path: Path, models: Path, port: int) -> Path:
    """serve_config.yaml as the README's, pointing at `models` and this test's HTTP port."""
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "deployments.app:build_app",
                "args": {"model_config": str(models), "gpu_memory_gb": 24},
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _deploy(serve_config: Path) -> None:
    """The user's command, against this test's cluster."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, "-m", "deployments.deploy", str(serve_config), "--address", address],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=DEPLOY_TIMEOUT_S,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"deployed {APP} from {serve_config}" in done.stdout


def _reports() -> dict[str, dict[str, Any]]:
    """Each role's replica's own report: its pid, the model it loaded, its batch size."""
    reports = {}
    for role in (BIG, SMALL):
        handle = serve.get_deployment_handle(role, APP)
        reports[role] = {
            **handle.placement.remote().result(timeout_s=60),
            "info": handle.info.remote().result(timeout_s=60),
        }
    return reports


def _roles(model_dir: Path, small_dir: Path, small_batch: int) -> dict[str, dict[str, Any]]:
    common = {"dtype": "float32", "num_cpus": 0.2}
    return {
        SMALL: {**common, "model": small_dir, "memory_gb": 3, "max_batch_size": small_batch},
        BIG: {**common, "model": model_dir, "memory_gb": 15},
    }


@pytest.mark.slow
def test_edited_role_restarts_alone(port: int, tmp_path: Path, tiny_text_model_dir: Path) -> None:
    models = tmp_path / "model_configs.yaml"
    serve_config = _serve_config(tmp_path / "serve_config.yaml", models, port)
    model_config(models, _roles(tiny_text_model_dir, tiny_text_model_dir, small_batch=4))
    deploy(load_serve_config(serve_config))  # what the command runs once connected
    first = _reports()
    assert first[SMALL]["model"] == str(tiny_text_model_dir) and first[SMALL]["info"]["max_batch_size"] == 4
    # Each on its planned GPU (the pin reached it; CPU fallback on this box).
    assert {role: r["actual"]["cuda_visible_devices"] for role, r in first.items()} == {BIG: "1", SMALL: "0"}

    # The user edits one role's entry: another model (the same weights under another path) and its batch.
    other_model = shutil.copytree(tiny_text_model_dir, tmp_path / "another-tiny-model")
    model_config(models, _roles(tiny_text_model_dir, other_model, small_batch=2))
    _deploy(serve_config)  # the same serve_config.yaml, unchanged
    after = _reports()

    # The untouched role: the same replica process, same place.
    assert after[BIG]["actual"]["pid"] == first[BIG]["actual"]["pid"]
    assert after[BIG]["planned"] == first[BIG]["planned"]
    # The edited role: a new replica, serving the new entry.
    assert after[SMALL]["actual"]["pid"] != first[SMALL]["actual"]["pid"]
    assert after[SMALL]["model"] == str(other_model)
    assert after[SMALL]["info"]["max_batch_size"] == 2
    assert after[SMALL]["actual"]["cuda_visible_devices"] == "0"

    # Over HTTP too: the ingress lists the new model and the edited role answers.
    url = f"http://127.0.0.1:{port}"
    listed = httpx.get(f"{url}/v1/models", timeout=60).json()["data"]
    assert {card["id"]: card["root"] for card in listed} == {BIG: str(tiny_text_model_dir), SMALL: str(other_model)}
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    # Asked by the new model's id, which only the edited entry names.
    reply = httpx.post(f"{url}/v1/chat/completions", json={**request, "model": str(other_model)}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert _reports()[SMALL]["actual"]["pid"] == after[SMALL]["actual"]["pid"]
    serve.delete(APP)


def test_fields_the_command_cannot_apply_are_refused(tmp_path: Path) -> None:
    """Per-deployment overrides and a runtime env are not silently dropped: the command names them."""
    # The shipped serve_config.yaml is one the command takes.
    assert [app.name for app in load_serve_config(REPO_ROOT / "serve_config.yaml").applications] == [APP]
    path = tmp_path / "serve_config.yaml"
    app = {"name": APP, "import_path": "deployments.app:build_app", "args": {"model_config": "m.yaml"}}
    path.write_text(yaml.safe_dump({"applications": [app]}))
    assert load_serve_config(path).applications[0].args == {"model_config": "m.yaml"}

    app.update(deployments=[{"name": SMALL, "num_replicas": 2}], runtime_env={"pip": ["x"]})
    path.write_text(yaml.safe_dump({"applications": [app]}))
    with pytest.raises(DeployConfigError) as raised:
        load_serve_config(path)
    assert f"`{APP}.deployments`" in str(raised.value) and f"`{APP}.runtime_env`" in str(raised.value)

    path.write_text("applications: [{name: x}]\n")  # no import_path: Serve's own schema refuses it
    with pytest.raises(DeployConfigError, match="not a Serve config"):
        load_serve_config(path)
    # The command says so and exits 2 before it connects to any Ray.
    assert main([str(path)]) == 2
    assert main([str(tmp_path / "missing.yaml")]) == 2
