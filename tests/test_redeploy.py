"""Redeploying while the app runs: same placement, and Serve restarts no unchanged replica.

Real local Ray with two declared GPUs and their gpu_slot resources, real
Serve, the tiny text model (loaded on CPU: RAYFIT_ALLOW_CPU_FALLBACK=1; each
replica still checks its pin). The first deploy plans from the running Ray
(`build_app`). For the redeploys the GPUs are described as NVML would
describe them while the app runs (`bind_app(args, inventory)`): free memory
is down by what each replica holds, plus a foreign process and the driver's
own reservation. Only those figures are simulated (this box has no GPU): the
processes are real (the replicas' pids, a real foreign process), and
`gpu_processes` attributes them the production way, from each process's
environment (RAYFIT_ROLE, set by placement.ray_options).
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve
from serve_support import model_config
from shared_cluster import shared_serve

from deployments.app import AppArgs, bind_app, build_app, plan_app
from placement.inventory import Gpu, Inventory
from placement.ray_inventory import gpu_processes, inventory_from_ray
from placement.ray_options import CUDA_DEVICE_ORDER, PCI_BUS_ID, ROLE_ENV
from placement.units import GIB, MIB

APP = "redeploy"
BIG, SMALL, EXTRA = "buffer_agent", "summarizer", "extra"
TOTAL = 24 * GIB
DRIVER = 300 * MIB
FOREIGN = 2 * GIB


# On the session's shared Ray (tests/shared_cluster.py): CPU, 2 declared GPUs with slots, the CPU fallback.
pytestmark = pytest.mark.shared_serve


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with shared_serve() as port:
        yield port


@pytest.fixture(scope="module")
def foreign_pid() -> Iterator[int]:
    """A process that is not rayfit's (no RAYFIT_ROLE in its environment)."""
    proc = subprocess.Popen(["sleep", "600"], env={"PATH": "/usr/bin:/bin"})
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _roles(model_dir: Path, extra: bool = False) -> dict[str, dict[str, Any]]:
    common = {"model": model_dir, "dtype": "float32", "num_cpus": 0.2}
    roles = {SMALL: {**common, "memory_gb": 3}, BIG: {**common, "memory_gb": 15}}
    return {**roles, EXTRA: {**common, "memory_gb": 1}} if extra else roles


def _placements(roles: list[str]) -> dict[str, dict[str, Any]]:
    return {role: serve.get_deployment_handle(role, APP).placement.remote().result(timeout_s=60) for role in roles}


def _environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in items if b"=" in item)


def _while_running(pids: dict[str, int], foreign_pid: int, *, attributed: bool = True) -> Inventory:
    """The running Ray's inventory, its GPUs measured as NVML reports them while the app holds them.

    BIG's replica holds 15 GiB on GPU 1, SMALL's 3 GiB on GPU 0, a foreign process 2 GiB on GPU 0.
    `attributed=False`: the same bytes, but as processes nobody can name (what a free-memory plan sees).
    """
    (node,) = inventory_from_ray(gpu_memory_bytes=TOTAL).nodes
    held = {0: [(pids[SMALL], 3 * GIB), (foreign_pid, FOREIGN)], 1: [(pids[BIG], 15 * GIB)]}
    gpus = []
    for gpu in node.gpus:
        listed = held[gpu.index] if attributed else [(foreign_pid, sum(b for _, b in held[gpu.index]))]
        used = DRIVER + sum(b for _, b in listed)
        gpus.append(Gpu(gpu.index, TOTAL, free_bytes=TOTAL - used, processes=gpu_processes(listed)))
    return Inventory(nodes=(dataclasses.replace(node, gpus=tuple(gpus)),))


@pytest.mark.slow
@pytest.mark.cpu_only(
    reason="declares 2 GPUs and simulates NVML's figures for them: on a GPU machine the first plan would measure "
    "the real cards (a one-GPU box refuses 2 declared) and the replicas would not all fall back to CPU"
)
def test_redeploy_keeps_every_unchanged_replica(
    port: int, foreign_pid: int, tmp_path: Path, tiny_text_model_dir: Path
) -> None:
    config = model_config(tmp_path / "models.yaml", _roles(tiny_text_model_dir))
    args = AppArgs(model_config=str(config), gpu_memory_gb=24)
    serve.run(build_app(args), name=APP, route_prefix="/")
    first = _placements([BIG, SMALL])
    pids = {role: p["actual"]["pid"] for role, p in first.items()}
    # The pin reached each replica and its start-up pin check passed (CPU fallback on this box).
    assert {role: p["actual"]["cuda_visible_devices"] for role, p in first.items()} == {BIG: "1", SMALL: "0"}
    assert all(p["actual"]["cpu_fallback"] for p in first.values())
    for role, pid in pids.items():
        env = _environ(pid)
        assert env[CUDA_DEVICE_ORDER] == PCI_BUS_ID and env[ROLE_ENV] == role

    running = _while_running(pids, foreign_pid)
    gpu1 = running.nodes[0].gpus[1]
    assert gpu1.free_bytes < 9 * GIB and gpu1.rayfit_bytes == 15 * GIB  # GPU 1 looks full, but it is ours
    # What a plan from free memory alone would do with those figures: swap the two models.
    _, _, _, naive = plan_app(args, _while_running(pids, foreign_pid, attributed=False))
    assert (naive.entry(BIG).gpu_indices, naive.entry(SMALL).gpu_indices) == ((0,), (1,))

    # 1. The same config again, planned while the app holds its GPUs: same plan, no restart.
    assert plan_app(args, running)[3].entries == plan_app(args)[3].entries
    serve.run(bind_app(args, running), name=APP, route_prefix="/")
    again = _placements([BIG, SMALL])
    assert {role: p["actual"]["pid"] for role, p in again.items()} == pids
    assert {role: p["planned"] for role, p in again.items()} == {role: p["planned"] for role, p in first.items()}

    # 2. An edit that touches neither model: an API key, and a third model placed beside them.
    edited = AppArgs(
        model_config=str(model_config(tmp_path / "edited.yaml", _roles(tiny_text_model_dir, extra=True))),
        gpu_memory_gb=24,
        api_key="rotated-key",
    )
    serve.run(bind_app(edited, running), name=APP, route_prefix="/")
    after = _placements([BIG, SMALL, EXTRA])
    assert {role: after[role]["actual"]["pid"] for role in (BIG, SMALL)} == pids
    assert after[EXTRA]["actual"]["cuda_visible_devices"] == "0"
    # The edit took effect where it belongs: the (restarted) ingress now wants the key.
    url = f"http://127.0.0.1:{port}/v1/models"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer rotated-key"}, timeout=30).status_code == 200
    serve.delete(APP)
