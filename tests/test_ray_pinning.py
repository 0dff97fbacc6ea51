"""placement.ray_options against a real local Ray with declared GPUs.

The machine may have no GPU: Ray is told it has two (`num_gpus=2`) plus one
`gpu_slot_<i>` resource per GPU, exactly as `ray_start_args` declares them.
Replicas report what they were given: CUDA_VISIBLE_DEVICES, Ray's GPU ids
and their node id. One cluster (and one Serve instance, no HTTP proxy) serves
the whole module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve
from ray.serve.schema import ApplicationStatus
from ray_nodes import local_ray_cluster
from serve_support import init_local_ray

from placement.estimate import MemoryEstimate
from placement.inventory import Gpu, Inventory, InventoryError, Node
from placement.plan import PlanEntry
from placement.ray_inventory import inventory_from_ray
from placement.ray_options import NODE_ID_LABEL, deployment_options, gpu_slot_resource
from placement.units import GIB

ESTIMATE = MemoryEstimate.lump(GIB, params=1_000_000)
# Two cores on the test machine: replicas ask for a sliver so many fit at once.
REPLICA_CPUS = 0.1
# Long enough for Ray to have scheduled a feasible replica several times over.
PENDING_WAIT_S = 8.0
DEPLOY_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0
RESULT = "RESULT "


# Short shutdown: deleting an app whose replica never started otherwise waits the 20 s default;
# frequent health checks: the restart test waits for Serve to notice a killed replica.
@serve.deployment(graceful_shutdown_timeout_s=1, graceful_shutdown_wait_loop_s=0.1, health_check_period_s=1)
class Reporter:
    """Says where it landed."""

    def report(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_ids": ray.get_gpu_ids(),
            "node_id": ctx.get_node_id(),
            "actor_name": ctx.get_actor_name(),
            "actor_id": ctx.get_actor_id(),
        }


def plan_entry(role: str, gpu: int, fraction: float, node_id: str) -> PlanEntry:
    return PlanEntry(
        role=role,
        model=f"org/{role}",
        device="gpu",
        node_id=node_id,
        estimate=ESTIMATE,
        memory_budget_bytes=ESTIMATE.total_bytes,
        reason="test",
        gpu_indices=(gpu,),
        fraction=fraction,
        num_cpus=REPLICA_CPUS,
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Inventory]:
    """A fresh local Ray (never someone else's) with 2 declared GPUs and their slots."""
    slots = {gpu_slot_resource(i): 1.0 for i in range(2)}
    temp_dir = init_local_ray(num_cpus=2, num_gpus=2, resources=slots)
    serve.start(proxy_location="Disabled")
    node_id = ray.get_runtime_context().get_node_id()
    inventory = Inventory(nodes=(Node(node_id=node_id, gpus=(Gpu(0, 24 * GIB), Gpu(1, 24 * GIB)), has_gpu_slots=True),))
    try:
        yield inventory
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def deploy(entry: PlanEntry, inventory: Inventory, *, blocking: bool = True) -> None:
    app = Reporter.options(name=entry.role, **deployment_options(entry, inventory)).bind()
    if blocking:
        serve.run(app, name=entry.role, route_prefix=f"/{entry.role}")  # returns once RUNNING
    else:
        # serve.run always waits for RUNNING; the pending cases need to return at once.
        serve._run(app, name=entry.role, route_prefix=f"/{entry.role}", _blocking=False)


def report(app: str) -> dict[str, Any]:
    return serve.get_app_handle(app).report.remote().result(timeout_s=30)


def app_status(app: str) -> ApplicationStatus | None:
    status = serve.status().applications.get(app)
    return status.status if status else None


def wait_running(apps: list[str], timeout_s: float = DEPLOY_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = {app: app_status(app) for app in apps}
        if all(s == ApplicationStatus.RUNNING for s in statuses.values()):
            return statuses
        time.sleep(0.5)
    raise AssertionError(f"not all RUNNING after {timeout_s}s: {statuses}")


def _starting_not_running(app: str) -> bool:
    """The app's one deployment has a replica Serve started, and none RUNNING (pending in Ray)."""
    status = serve.status().applications.get(app)
    if status is None or app not in status.deployments:
        return False
    states = status.deployments[app].replica_states
    return states.get("RUNNING", 0) == 0 and states.get("STARTING", 0) >= 1


def delete_all(apps: list[str]) -> None:
    """Delete in parallel, then wait until all are gone (their GPU slots are free again)."""
    for app in apps:
        serve.delete(app, _blocking=False)
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while any(app_status(app) is not None for app in apps):
        assert time.monotonic() < deadline, f"apps not deleted: {apps}"
        time.sleep(0.2)


@pytest.mark.parametrize("order", [("big", "small"), ("small", "big")])
def test_each_model_lands_on_its_planned_gpu_whatever_the_order(cluster: Inventory, order: tuple[str, str]) -> None:
    node_id = cluster.nodes[0].node_id
    # Plain Ray would give the first-created replica GPU 0: "big" first is the adversarial order.
    entries = {"big": plan_entry("big", 1, 0.7, node_id), "small": plan_entry("small", 0, 0.2, node_id)}
    try:
        for role in order:
            deploy(entries[role], cluster)
        big, small = report("big"), report("small")
        assert big["cuda_visible_devices"] == "1"
        assert small["cuda_visible_devices"] == "0"
        assert big["node_id"] == small["node_id"] == node_id
        # num_gpus=0: Ray's own GPU ids stay out of it (the slot resource does the accounting).
        assert big["gpu_ids"] == small["gpu_ids"] == []
    finally:
        delete_all(list(order))


def test_fractions_in_adversarial_order_all_run(cluster: Inventory) -> None:
    """0.4@0, 0.4@1, 0.6@0, 0.6@1: with fractional num_gpus the last one stayed pending forever."""
    node_id = cluster.nodes[0].node_id
    entries = [
        plan_entry("a04g0", 0, 0.4, node_id),
        plan_entry("b04g1", 1, 0.4, node_id),
        plan_entry("c06g0", 0, 0.6, node_id),
        plan_entry("d06g1", 1, 0.6, node_id),
    ]
    apps = [e.role for e in entries]
    try:
        for entry in entries:
            deploy(entry, cluster, blocking=False)
        wait_running(apps)
        for entry in entries:
            assert report(entry.role)["cuda_visible_devices"] == str(entry.gpu_indices[0])
    finally:
        delete_all(apps)


def test_model_aimed_at_a_full_gpu_does_not_start(cluster: Inventory) -> None:
    node_id = cluster.nodes[0].node_id
    holder, late = plan_entry("holder", 0, 0.7, node_id), plan_entry("late", 0, 0.5, node_id)
    try:
        deploy(holder, cluster)
        deploy(late, cluster, blocking=False)
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while not _starting_not_running("late"):  # Serve created its replica; Ray has not placed it
            assert time.monotonic() < deadline, serve.status().applications.get("late")
            time.sleep(0.2)
        # The thing under test is a duration: the replica stays pending (never RUNNING) for PENDING_WAIT_S,
        # while Ray could have scheduled a feasible one several times over.
        pending_until = time.monotonic() + PENDING_WAIT_S
        while time.monotonic() < pending_until:
            status = serve.status().applications["late"]
            assert status.deployments["late"].replica_states.get("RUNNING", 0) == 0, status
            time.sleep(0.5)
        assert app_status("late") == ApplicationStatus.DEPLOYING
        deployment = serve.status().applications["late"].deployments["late"]
        assert deployment.status.value == "UPDATING", deployment
        # The holder keeps 0.7 of GPU 0's slot; the 0.5 asked for does not fit in what is left.
        assert ray.available_resources().get(gpu_slot_resource(0), 0) == pytest.approx(0.3)
    finally:
        delete_all(["late", "holder"])


def test_restarted_replica_comes_back_on_the_same_gpu(cluster: Inventory) -> None:
    node_id = cluster.nodes[0].node_id
    # "filler" takes GPU 0 first so a replica placed by lowest-free-GPU would differ.
    entries = [plan_entry("filler", 0, 0.5, node_id), plan_entry("moved", 1, 0.5, node_id)]
    try:
        for entry in entries:
            deploy(entry, cluster)
        before = report("moved")
        ray.kill(ray.get_actor(before["actor_name"], namespace="serve"), no_restart=True)
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        after, error = before, None
        while after["actor_id"] == before["actor_id"]:
            assert time.monotonic() < deadline, f"Serve did not restart the killed replica (last error: {error!r})"
            time.sleep(0.5)
            try:
                after = report("moved")
            except Exception as exc:  # the handle errors while the replica is down; named if it never comes back
                error = exc
        assert after["cuda_visible_devices"] == "1"
    finally:
        delete_all([e.role for e in entries])


def test_inventory_from_ray_reads_declared_gpus_and_slots(cluster: Inventory) -> None:
    inventory = inventory_from_ray(gpu_memory_bytes=24 * GIB)
    (node,) = inventory.nodes
    assert node.node_id == cluster.nodes[0].node_id
    assert [gpu.index for gpu in node.gpus] == [0, 1]
    assert all(gpu.total_bytes == 24 * GIB and gpu.free_bytes is None for gpu in node.gpus)
    assert node.has_gpu_slots
    assert node.labels[NODE_ID_LABEL] == node.node_id
    assert node.cpu_memory_bytes and node.cpu_memory_bytes > 0
    with pytest.raises(InventoryError, match="--gpu-memory"):
        inventory_from_ray()


def _run_driver(script: str, env: dict[str, str] | None = None, timeout: float = 120) -> dict[str, Any]:
    """Run a Python driver in its own process (one Ray connection per process); it prints `RESULT <json>`."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    # Ray forwards worker logs to the driver's stdout too: find our line among them.
    (line,) = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(line.removeprefix(RESULT))


def test_inventory_without_slot_resources() -> None:
    """Ray started without gpu_slot_* (e.g. by `serve run`): has_gpu_slots is False."""
    result = _run_driver(
        """
        import json, ray
        from placement.ray_inventory import inventory_from_ray
        ray.init(address="local", num_cpus=1, num_gpus=2, include_dashboard=False)
        (node,) = inventory_from_ray(gpu_memory_bytes=8 * 2**30).nodes
        print("RESULT", json.dumps({"gpus": len(node.gpus), "slots": node.has_gpu_slots}))
        ray.shutdown()
        """
    )
    assert result == {"gpus": 2, "slots": False}


@pytest.mark.slow
def test_entry_for_a_worker_node_runs_on_that_node() -> None:
    """Head + one worker via `ray start`, each with one declared GPU: label_selector sends the replica over."""
    with local_ray_cluster() as nodes:
        nodes.start_head(1, {"rayfit-node": "head"})
        nodes.add_worker(1, {"rayfit-node": "worker"})
        address = nodes.address
        result = _run_driver(
            f"""
            import json, time, ray
            from ray import serve
            from placement.estimate import MemoryEstimate
            from placement.ray_inventory import inventory_from_ray
            from placement.ray_options import deployment_options
            from test_ray_pinning import Reporter, plan_entry

            ray.init(address="{address}")
            deadline = time.monotonic() + 60
            while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            inventory = inventory_from_ray(gpu_memory_bytes=2**30)
            worker = next(n for n in inventory.nodes if n.labels.get("rayfit-node") == "worker")
            entry = plan_entry("remote", 0, 0.5, worker.node_id)
            options = deployment_options(entry, inventory)
            serve.start(proxy_location="Disabled")
            app = Reporter.options(name="remote", **options).bind()
            handle = serve.run(app, name="remote", route_prefix="/remote")
            got = handle.report.remote().result(timeout_s=30)
            print("RESULT", json.dumps({{"worker": worker.node_id, "got": got, "options": options,
                              "nodes": len(inventory.nodes), "slots": [n.has_gpu_slots for n in inventory.nodes]}}))
            """,
            env={"RAY_AUTH_MODE": "token", "RAY_ADDRESS": ""},
            timeout=180,
        )
        assert result["nodes"] == 2 and result["slots"] == [True, True]
        assert result["options"]["ray_actor_options"]["label_selector"] == {NODE_ID_LABEL: result["worker"]}
        assert result["got"]["node_id"] == result["worker"]
        assert result["got"]["cuda_visible_devices"] == "0"
