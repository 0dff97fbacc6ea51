"""The per-GPU mode on a real multi-node Ray: one raylet per declared GPU, the real app served across them.

A GPU-less head (controller, proxy, ingress) and two GPU nodes started as `ray-start-args --per-gpu`
prints them (tests/ray_nodes.py `add_gpu_node`: CUDA_VISIBLE_DEVICES=<i>, --num-gpus=1, the labels and
the `rayfit_gpu_mib` resource of a 24 GiB GPU). The app plans from the running cluster (the GPU size
comes from the node's label) and Ray accounts for every GPU itself. Replicas load on CPU
(the app's allow_cpu_fallback, AppArgs); where Ray put them (node, GPU ids,
CUDA_VISIBLE_DEVICES) is still checked by each replica and by these tests.

The plan (default size rules: 10 GiB or more takes the last GPU), GPU capacity 22.8 GiB each, every
replica also charged its 0.5 GiB CUDA context:

    buffer_agent 15 GiB          → box-1                  (num_gpus 0.679)
    helper       2 GiB × 2       → box-0 and box-1        (num_gpus 0.109 each, one per GPU node)
    summarizer   3 GiB           → box-0                  (num_gpus 0.153)
    scaler       1 GiB, 1..2     → box-0, then box-1      (autoscaling; the plan reserves both)

GPU nodes declare 0 CPUs and models ask for none, so the ingress can only run on the head and HTTP
survives a GPU node leaving.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from ray import serve
from ray_nodes import LocalRayCluster, local_ray_cluster, ray_cli
from serve_support import ThreadGroup

from deployments.app import AppArgs, build_app
from deployments.model import ModelServer
from deployments.ports import free_port
from placement.estimate import MemoryEstimate
from placement.gpu_nodes import GPU_LABEL, GPU_MEMORY_RESOURCE
from placement.inventory import Inventory
from placement.plan import GpuSlot, PlanEntry
from placement.ray_options import deployment_options
from placement.units import GIB

BIG, SMALL, HELPER, SCALER = "buffer_agent", "summarizer", "helper", "scaler"
APP = "rayfit-gpus"
HOST = "box"
GPU_BYTES = 24 * GIB
GREEDY = {"temperature": 0, "max_tokens": 4}
TIMEOUT_S = 90.0
SCALE_UP_TIMEOUT_S = 240.0
# Long enough for Ray to have scheduled a feasible actor or task several times over.
PENDING_WAIT_S = 5.0
# A killed node is declared dead in ~3 s instead of Ray's ~15 s; Serve says within 2 s that a
# replica waits for resources (its default 30 s would outlast the test).
CLUSTER_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_SERVE_SLOW_STARTUP_WARNING_S": "2",
    "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S": "1",
}
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
}


@dataclass(frozen=True)
class Served:
    nodes: LocalRayCluster
    gpu_ports: dict[int, int]  # host GPU index → its node's node manager port (for kill_worker)
    url: str


def _alive(count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) == count:
            return alive
        time.sleep(0.5)
    raise AssertionError(f"expected {count} alive nodes, got {ray.nodes()}")


def _config(path: Path, model_dir: Path) -> Path:
    common = {"model": str(model_dir), "dtype": "float32", "num_cpus": 0}
    roles = {
        BIG: {**common, "memory_gb": 15},
        SMALL: {**common, "memory_gb": 3},
        HELPER: {**common, "memory_gb": 2, "replicas": 2},
        SCALER: {**common, "memory_gb": 1, "autoscaling": AUTOSCALING},
    }
    path.write_text(yaml.safe_dump(roles))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_text_model_dir: Path) -> Iterator[Served]:
    # This driver joins a token-auth cluster (as tests/test_multinode.py does).
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()
    with local_ray_cluster(CLUSTER_ENV) as nodes:
        nodes.start_head(0, {"rayfit-node": "head"}, num_cpus=1)
        ports = {index: nodes.add_gpu_node(HOST, index, GPU_BYTES, num_cpus=0) for index in (0, 1)}
        ray.init(address=nodes.address, log_to_driver=False)
        try:
            _alive(3)
            config = _config(tmp_path_factory.mktemp("gpus") / "models.yaml", tiny_text_model_dir)
            http_port = free_port()
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
            serve.run(build_app(AppArgs(model_config=str(config), allow_cpu_fallback=True)), name=APP, route_prefix="/")
            yield Served(nodes, ports, f"http://127.0.0.1:{http_port}")
        finally:
            # No serve.shutdown(): its graceful drain (~4.5 s) tests nothing, and the cluster is killed next.
            ray.shutdown()


def placement(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/placement", timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def complete(url: str, role: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": role, "prompt": "hello", **GREEDY, "max_tokens": max_tokens}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def running(role: str) -> int:
    return serve.status().applications[APP].deployments[role].replica_states.get("RUNNING", 0)


def wait_for(check: Any, what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.5)


def actor_options(role: str) -> dict[str, Any]:
    """The ray_actor_options Serve holds for `role` (the controller's own record)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return details["applications"][APP]["deployments"][role]["deployment_config"]["ray_actor_options"]


def ray_status_usage(address: str) -> dict[str, dict[str, float]]:
    """`ray status -v` per node: node id → resource → amount in use (GCS's accounting, as operators see it)."""
    done = subprocess.run(
        [ray_cli(), "status", "-v", f"--address={address}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    usage: dict[str, dict[str, float]] = {}
    for section in re.split(r"\nNode: ", done.stdout)[1:]:
        node_id = section.split()[0]
        usage[node_id] = {
            name: float(used) for used, name in re.findall(r"^\s+([\d.]+)/[\d.]+ (\S+)$", section, flags=re.MULTILINE)
        }
    return usage


@pytest.mark.slow
def test_roles_land_on_gpu_1_and_gpu_0_with_rays_own_gpu_ids(served: Served) -> None:
    models = placement(served.url)["models"]
    for role, label, index in ((BIG, "box-1", "1"), (SMALL, "box-0", "0")):
        entry = models[role]
        assert entry["status"] == "ok", entry
        assert entry["plan"]["gpu_labels"] == [label]
        actual = entry["replica"]["actual"]
        assert actual["gpu_label"] == label
        # Ray set these itself (num_gpus > 0 through the raylet's own CUDA_VISIBLE_DEVICES): no pin in runtime_env.
        assert actual["cuda_visible_devices"] == index
        assert actual["ray_gpu_ids"] == [index]
        options = actor_options(role)
        assert options["num_gpus"] == entry["plan"]["fraction"] > 0
        assert options["label_selector"] == {GPU_LABEL: label}
        assert "CUDA_VISIBLE_DEVICES" not in options["runtime_env"]["env_vars"]
    assert complete(served.url, BIG).status_code == 200
    assert complete(served.url, SMALL).status_code == 200


@pytest.mark.slow
def test_ray_status_shows_each_gpu_node_holding_its_replicas_shares(served: Served) -> None:
    body = placement(served.url)
    # What rayfit's replicas hold per GPU node: each RUNNING replica's num_gpus and MiB.
    expected: dict[str, dict[str, float]] = {}
    for role, entry in body["models"].items():
        options = actor_options(role)
        for replica in entry["replicas"]:
            if replica["state"] == "RUNNING":
                held = expected.setdefault(replica["node_id"], {"GPU": 0.0, GPU_MEMORY_RESOURCE: 0.0})
                held["GPU"] += options["num_gpus"]
                held[GPU_MEMORY_RESOURCE] += options["resources"][GPU_MEMORY_RESOURCE]
    assert len(expected) == 2  # both GPU nodes hold replicas
    usage = ray_status_usage(served.nodes.address)
    for node_id, held in expected.items():
        assert usage[node_id]["GPU"] == pytest.approx(held["GPU"], abs=1e-3), usage[node_id]
        assert usage[node_id][GPU_MEMORY_RESOURCE] == pytest.approx(held[GPU_MEMORY_RESOURCE]), usage[node_id]
    # box-1 holds the 15 GiB model, helper's second replica (and scaler's second only under load).
    box1 = next(n for n, h in expected.items() if h[GPU_MEMORY_RESOURCE] >= 15 * 1024)
    assert usage[box1]["GPU"] >= 0.672 + 0.089 - 1e-3


@pytest.mark.slow
def test_a_role_with_two_replicas_serves_from_both_gpus(served: Served) -> None:
    replicas = placement(served.url)["models"][HELPER]["replicas"]
    assert sorted((r["gpu_label"], r["gpu_indices"], r["state"]) for r in replicas) == [
        ("box-0", [0], "RUNNING"),
        ("box-1", [1], "RUNNING"),
    ]
    assert all(complete(served.url, HELPER).status_code == 200 for _ in range(6))
    handle = serve.get_deployment_handle(HELPER, app_name=APP)
    seen = {}
    for _ in range(40):
        actual = handle.placement.remote().result(timeout_s=30)["actual"]
        seen[actual["gpu_label"]] = (actual["cuda_visible_devices"], actual["ray_gpu_ids"])
        if len(seen) == 2:
            break
    assert seen == {"box-0": ("0", ["0"]), "box-1": ("1", ["1"])}

    # The report lists every replica of every role with its node and GPU, and finds nothing wrong.
    done = subprocess.run(
        [sys.executable, "-m", "placement", "report", "--url", served.url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(done.stdout)
    assert done.returncode == 0, report["findings"]
    rows = sorted((r["role"], r["gpu_label"]) for r in report["replicas"] if r["state"] == "RUNNING")
    # The scaler's one replica may run on either GPU the plan reserved for it.
    scaler = [row for row in rows if row[0] == SCALER]
    assert [row for row in rows if row[0] != SCALER] == [
        (BIG, "box-1"),
        (HELPER, "box-0"),
        (HELPER, "box-1"),
        (SMALL, "box-0"),
    ]
    assert len(scaler) == 1 and scaler[0][1] in ("box-0", "box-1")


@pytest.mark.slow
def test_a_whole_gpu_task_is_not_scheduled_onto_gpus_rayfit_fills(served: Served) -> None:
    @ray.remote(num_gpus=1, num_cpus=0, max_retries=0)
    def whole_gpu() -> tuple[list[str], str | None]:
        labels = ray.get_runtime_context().get_node_labels()
        return [str(g) for g in ray.get_gpu_ids()], labels.get(GPU_LABEL)

    task = whole_gpu.remote()
    # The thing under test is a duration: the task stays unscheduled for PENDING_WAIT_S, while Ray could
    # have placed a feasible one several times over.
    ready, _ = ray.wait([task], timeout=PENDING_WAIT_S)
    assert not ready, "a num_gpus=1 task ran on a GPU rayfit's replicas hold shares of"
    # A free GPU joins: the task runs there at once, never on box-0 or box-1.
    port = served.nodes.add_gpu_node(HOST, 2, GPU_BYTES, num_cpus=0)
    try:
        assert ray.get(task, timeout=60) == (["2"], "box-2")
    finally:
        served.nodes.kill_worker(port)


@pytest.mark.slow
def test_a_model_aimed_at_a_full_gpu_stays_pending_with_the_reason(served: Served) -> None:
    # Another app's model aimed at box-1, whose 24 GiB hold 17-18 GiB of rayfit's budgets: 8 GiB do not fit.
    box1 = placement(served.url)["models"][BIG]["replica"]["actual"]["node_id"]
    size = 8 * GIB
    entry = PlanEntry(
        role="intruder",
        model="org/intruder",
        device="gpu",
        node_id=box1,
        estimate=MemoryEstimate.lump(size, source="memory_gb", params=1_000_000),
        memory_budget_bytes=size,
        reason="aimed at a full GPU",
        gpu_indices=(1,),
        fraction=0.2,
        slots=(GpuSlot(gpu_label="box-1", node_id=box1, gpu_indices=(1,), fraction=0.2),),
        num_cpus=0,
    )
    options = deployment_options(entry, Inventory(nodes=()))  # a per-GPU entry carries all it needs
    app = ModelServer.options(name="intruder", **options).bind("intruder", {"model": "org/intruder"}, entry)
    serve._run(app, name="intruder", route_prefix=None, _blocking=False)

    def intruder_status() -> Any:
        app = serve.status().applications.get("intruder")
        return app.deployments.get("intruder") if app else None

    try:
        # Serve says why the replica waits (RAY_SERVE_SLOW_STARTUP_WARNING_S=2 in this cluster): polled, bounded.
        deadline = time.monotonic() + 30
        while (status := intruder_status()) is None or GPU_MEMORY_RESOURCE not in status.message:
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        # The thing under test is a duration: the replica stays pending (never RUNNING) for PENDING_WAIT_S,
        # while Ray could have scheduled a feasible one several times over.
        pending_until = time.monotonic() + PENDING_WAIT_S
        while time.monotonic() < pending_until:
            assert (status := intruder_status()).replica_states.get("RUNNING", 0) == 0, status
            time.sleep(0.5)
        # Serve's own words: the replica waits to be scheduled, and for what (8 GiB = 8192 MiB of GPU memory).
        assert "to be scheduled" in status.message, status.message
        assert re.search(r'"rayfit_gpu_mib": 8192(\.0)?\b', status.message), status.message
        assert placement(served.url)["models"][BIG]["status"] == "ok"
    finally:
        serve.delete("intruder", _blocking=False)
        wait_for(lambda: "intruder" not in serve.status().applications, "intruder deleted")


@pytest.mark.slow
def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(served: Served, threads: ThreadGroup) -> None:
    assert running(SCALER) == 1
    stop = threading.Event()
    codes: list[int] = []

    def load() -> None:
        while not stop.is_set():
            codes.append(complete(served.url, SCALER, max_tokens=48).status_code)

    threads.name = "load"
    for _ in range(4):
        threads.start(load)  # an error in a load thread (a timeout, a dropped connection) fails the test
    try:
        # Serve sees the load, waits its upscale delay, then a new replica loads the model: on 2 busy cores
        # (the other test worker) that took over 90 s once.
        wait_for(lambda: running(SCALER) == 2, "a second scaler replica under load", SCALE_UP_TIMEOUT_S)
        labels = sorted(r["gpu_label"] for r in placement(served.url)["models"][SCALER]["replicas"])
        assert labels == ["box-0", "box-1"]  # the second copy on the GPU the plan reserved it
    finally:
        stop.set()
        threads.join(120)
    assert codes and set(codes) == {200}
    wait_for(lambda: running(SCALER) == 1, "back to one scaler replica after the load")


@pytest.mark.slow
def test_a_gpu_node_restarted_with_the_same_labels_gets_its_replica_back(served: Served) -> None:
    before = placement(served.url)["models"][SMALL]["replica"]["actual"]["node_id"]
    served.nodes.kill_worker(served.gpu_ports[0])
    wait_for(lambda: placement(served.url)["models"][SMALL]["status"] == "unplaced", "box-0 gone")
    assert "box-0" in placement(served.url)["models"][SMALL]["reason"]

    served.nodes.add_gpu_node(HOST, 0, GPU_BYTES, num_cpus=0)  # the same labels, a new node id
    wait_for(lambda: placement(served.url)["models"][SMALL]["status"] == "ok", "summarizer back on box-0")
    actual = placement(served.url)["models"][SMALL]["replica"]["actual"]
    assert actual["node_id"] != before
    assert (actual["gpu_label"], actual["cuda_visible_devices"], actual["ray_gpu_ids"]) == ("box-0", "0", ["0"])
    assert complete(served.url, SMALL).status_code == 200
    wait_for(lambda: running(HELPER) == 2, "helper's box-0 replica back")
