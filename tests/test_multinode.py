"""Two Ray nodes on this machine, the real app served across them, then one node leaves.

The head and a worker are started with `ray start` (tests/ray_nodes.py), each
declaring one 24 GB GPU and its `gpu_slot_0`, as `ray-start-args` does on a
one-GPU box. The config pins the "big" model to the worker's node and the
"small" one to the head's (the `node` field); the app plans from the running
cluster (`gpu_memory_gb`, since declared GPUs cannot be measured) and serves.
Replicas load on CPU (the app's allow_cpu_fallback, AppArgs);
the pin itself (node and CUDA_VISIBLE_DEVICES) is still checked.

The worker's CPUs are 0 and the big model asks for 0 CPUs, so the ingress
(0.1 CPU) can only run on the head and HTTP survives the worker leaving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve
from ray_nodes import LocalRayCluster, local_ray_cluster

from deployments.app import AppArgs, build_app
from deployments.ports import free_port
from placement.ray_options import gpu_slot_resource

BIG, SMALL = "buffer_agent", "summarizer"
APP = "rayfit-mn"
GREEDY = {"temperature": 0, "max_tokens": 4}
NODE_GONE_TIMEOUT_S = 60.0
# Long enough for Ray to have scheduled a feasible replacement several times over.
PENDING_WAIT_S = 5.0
# Ray's defaults take ~15 s to declare a killed node dead; the test's cluster checks every second.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@dataclass(frozen=True)
class Served:
    nodes: LocalRayCluster
    worker_port: int
    head_id: str
    worker_id: str
    url: str


def _node_ids_by_label() -> dict[str, str]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) == 2:
            return {n["Labels"]["rayfit-node"]: n["NodeID"] for n in alive}
        time.sleep(0.5)
    raise AssertionError(f"expected 2 alive nodes, got {ray.nodes()}")


def _config(path: Path, model_dir: Path, head_id: str, worker_id: str) -> Path:
    path.write_text(
        f"{BIG}:\n  model: {model_dir}\n  memory_gb: 15\n  dtype: float32\n  node: {worker_id}\n  num_cpus: 0\n"
        f"{SMALL}:\n  model: {model_dir}\n  memory_gb: 3\n  dtype: float32\n  node: {head_id}\n  num_cpus: 0.2\n"
    )
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_text_model_dir: Path) -> Iterator[Served]:
    # This driver joins a token-auth cluster. Ray reads the mode once per process, so
    # switch it the way a local `ray.init()` does by default in 2.60 (env + config refresh).
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()
    with local_ray_cluster(FAST_NODE_DEATH) as nodes:
        nodes.start_head(1, {"rayfit-node": "head"}, num_cpus=2)
        worker_port = nodes.add_worker(1, {"rayfit-node": "worker"}, num_cpus=0)
        ray.init(address=nodes.address, log_to_driver=False)
        try:
            ids = _node_ids_by_label()
            config = _config(
                tmp_path_factory.mktemp("mn") / "models.yaml", tiny_text_model_dir, ids["head"], ids["worker"]
            )
            http_port = free_port()
            # HeadOnly: both nodes share this machine's ports, one proxy only.
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
            serve.run(
                build_app(AppArgs(model_config=str(config), allow_cpu_fallback=True, gpu_memory_gb=24)),
                name=APP,
                route_prefix="/",
            )
            yield Served(nodes, worker_port, ids["head"], ids["worker"], f"http://127.0.0.1:{http_port}")
        finally:
            # No serve.shutdown(): its graceful drain (~4.5 s) tests nothing, and the cluster is killed next.
            ray.shutdown()


@pytest.mark.slow
@pytest.mark.cpu_only(reason="sizes declared GPUs that no NVML sees (--gpu-memory); a GPU box measures its cards")
def test_plan_command_reads_the_running_cluster(served: Served, tmp_path: Path, tiny_text_model_dir: Path) -> None:
    # No node hints: the planner itself spreads a 15 GiB and a 3 GiB model over the two nodes' GPUs.
    config = tmp_path / "models.yaml"
    config.write_text(
        f"{BIG}:\n  model: {tiny_text_model_dir}\n  memory_gb: 15\n"
        f"{SMALL}:\n  model: {tiny_text_model_dir}\n  memory_gb: 12\n"
    )
    command = [sys.executable, "-m", "placement", "plan", str(config), "--address", served.nodes.address]
    done = subprocess.run(
        [*command, "--gpu-memory", "24GB", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout)
    assert {(g["node_id"], g["index"]) for g in plan["gpus"]} == {(served.head_id, 0), (served.worker_id, 0)}
    nodes = {m["role"]: m["node_id"] for m in plan["models"]}
    # 15 + 12 GiB fit no single 24 GB GPU together: one model per node.
    assert set(nodes.values()) == {served.head_id, served.worker_id}

    # Without --gpu-memory the declared GPUs cannot be sized: a clear error, exit 2.
    done = subprocess.run(
        [*command, "--json"], capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "token"}
    )
    assert done.returncode == 2
    assert "--gpu-memory" in done.stdout + done.stderr


def placement(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/placement", timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def run_report(url: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "placement", "report", "--url", url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, json.loads(done.stdout)


def complete(url: str, role: str) -> httpx.Response:
    body = {"model": role, "prompt": "hello", **GREEDY}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


@pytest.mark.slow
@pytest.mark.cpu_only(reason="both nodes' replicas load on CPU here (the fallback findings); on a GPU box they load")
def test_each_model_runs_on_its_planned_node_and_gpu(served: Served) -> None:
    models = placement(served.url)["models"]
    for role, node in ((BIG, served.worker_id), (SMALL, served.head_id)):
        entry = models[role]
        assert entry["status"] == "ok", entry
        assert entry["plan"]["node_id"] == node and entry["plan"]["gpu_indices"] == [0]
        actual = entry["replica"]["actual"]
        assert actual["node_id"] == node
        assert actual["cuda_visible_devices"] == "0"
    assert complete(served.url, BIG).status_code == 200

    code, report = run_report(served.url)
    assert code == 0, report["findings"]
    assert {(g["node_id"], g["index"]) for g in report["gpus"]} == {(served.head_id, 0), (served.worker_id, 0)}
    # CPU fallback on this machine: reported, as a warning only.
    assert {(f["role"], f["kind"]) for f in report["findings"]} == {(BIG, "fallback"), (SMALL, "fallback")}


def _pending_replacement(deployment: Any) -> bool:
    """A replica of the deployment exists and is starting (waiting to be scheduled), none RUNNING."""
    states = deployment.replica_states
    return states.get("RUNNING", 0) == 0 and states.get("STARTING", 0) >= 1


@pytest.mark.slow
def test_node_leaving_leaves_its_model_unplaced_not_moved(served: Served) -> None:
    small_fraction = placement(served.url)["models"][SMALL]["plan"]["fraction"]
    served.nodes.kill_worker(served.worker_port)

    deadline = time.monotonic() + NODE_GONE_TIMEOUT_S
    while (models := placement(served.url)["models"])[BIG]["status"] != "unplaced":
        assert time.monotonic() < deadline, models[BIG]
        time.sleep(1.0)
    assert served.worker_id[:12] in models[BIG]["reason"]
    assert models[SMALL]["status"] == "ok"

    health = httpx.get(f"{served.url}/health", timeout=30).json()
    assert health["status"] == "degraded" and BIG in health["unavailable"] and SMALL not in health["unavailable"]

    # Serve notices the replica died and starts a replacement, whose label_selector
    # names the dead node: it stays pending, never RUNNING on the head's GPU.
    deadline = time.monotonic() + NODE_GONE_TIMEOUT_S
    while not _pending_replacement(deployment := serve.status().applications[APP].deployments[BIG]):
        assert time.monotonic() < deadline, deployment
        time.sleep(0.5)
    # The thing under test is a duration: the replacement exists and stays pending (never RUNNING)
    # for PENDING_WAIT_S, while Ray could have scheduled a feasible one several times over.
    pending_until = time.monotonic() + PENDING_WAIT_S
    while time.monotonic() < pending_until:
        deployment = serve.status().applications[APP].deployments[BIG]
        assert deployment.replica_states.get("RUNNING", 0) == 0, deployment
        time.sleep(0.5)
    assert ray.available_resources().get(gpu_slot_resource(0), 0) == pytest.approx(1 - small_fraction)
    assert complete(served.url, SMALL).status_code == 200

    code, report = run_report(served.url)
    assert code == 1
    assert {(f["role"], f["kind"]) for f in report["findings"] if f["severity"] == "error"} == {(BIG, "unavailable")}
    assert next(m for m in report["models"] if m["role"] == BIG)["status"] == "unplaced"
