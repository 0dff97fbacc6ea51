"""rayfit's own GPU memory told from foreign memory where NVML's pids mean nothing (inside a container).

NVML lists host pids; in a KubeRay pod `/proc/<host pid>` does not exist (or is another process), so the
pid path (`gpu_processes`, from each process's environment) attributes nothing. The replicas' own reports
(placement.held_memory: per GPU UUID, what torch holds there and the cap) then say which NVML processes
are rayfit's. The GPUs are described as NVML would describe them (figures simulated: no GPU here); the
attribution, the planner and the report files are the production code, the report files written for and
read against real processes.

Sizes as in tests/test_stable_plan.py: two 24 GiB GPUs (22.8 GiB capacity each after the 5% margin), the
driver's 300 MiB on each, a 4B (3.5 GiB budget) and a 27B (17 GiB budget), each replica charged a 0.5 GiB
CUDA context; a foreign process holds 2 GiB of GPU 0 throughout. The redeploy must plan what the first
deploy planned, to the byte.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from placement.config import ModelSpec
from placement.estimate import MemoryEstimate
from placement.held_memory import (
    OUTSIDE_ALLOCATOR_MAX_BYTES,
    HeldGpu,
    HeldReport,
    attribute_held,
    held_by_engine,
    read_held,
    with_held,
    write_held,
)
from placement.inventory import Gpu, Inventory, Node
from placement.plan import PlanError
from placement.planner import make_plan
from placement.ray_inventory import gpu_processes
from placement.ray_options import ROLE_ENV
from placement.units import GIB, MIB

TOTAL = 24 * GIB
DRIVER = 300 * MIB
CONTEXT = 450 * MIB  # what NVML adds to torch's reserved bytes for one process (its CUDA context)
FOREIGN = 2 * GIB
UUIDS = ("GPU-0a0a0a0a-0000-0000-0000-000000000000", "GPU-1b1b1b1b-0000-0000-0000-000000000000")
MODELS = {"summarizer": ModelSpec(model="org/medgemma-4b"), "buffer_agent": ModelSpec(model="org/medgemma-27b")}
ESTIMATES = {
    "summarizer": MemoryEstimate.lump(int(3.5 * GIB), source="params_b", params=4_300_000_000),
    "buffer_agent": MemoryEstimate.lump(17 * GIB, source="params_b", params=27_000_000_000),
}
# What each replica's torch holds once loaded: most of its budget (weights + KV pool + some activations).
RESERVED = {"summarizer": int(3.2 * GIB), "buffer_agent": int(16.4 * GIB)}
# The replicas' engine pids inside the pod: small numbers, unrelated to NVML's host pids.
POD_PID = {"summarizer": 57, "buffer_agent": 58}


def host_pids(count: int) -> list[int]:
    """Pids no process of this machine can have (above the kernel's pid_max): as host pids look in a pod."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return [pid_max + 1 + i for i in range(count)]


def box(listed: dict[int, list[tuple[int, int]]]) -> Inventory:
    """Two 24 GiB GPUs as NVML reports them: `listed` is each GPU's (pid, used bytes); the processes are
    attributed the production way (gpu_processes reads each pid's environment)."""
    gpus = []
    for index, uuid in enumerate(UUIDS):
        used = DRIVER + sum(b for _, b in listed.get(index, []))
        processes = gpu_processes(listed.get(index, []))
        gpus.append(Gpu(index, TOTAL, free_bytes=TOTAL - used, name="RTX 3090", uuid=uuid, processes=processes))
    return Inventory(nodes=(Node(node_id="a" * 56, gpus=tuple(gpus), has_gpu_slots=True),))


def reports(plan_gpus: dict[str, int]) -> tuple[HeldReport, ...]:
    """What each running replica reports: its pod pid, and torch's reserved bytes on its planned GPU."""
    return tuple(
        HeldReport(role, POD_PID[role], (HeldGpu(UUIDS[gpu], RESERVED[role], cap_bytes=ESTIMATES[role].total_bytes),))
        for role, gpu in plan_gpus.items()
    )


def running_in_a_pod(plan_gpus: dict[str, int]) -> dict[int, list[tuple[int, int]]]:
    """NVML's lists while the app runs where `plan_gpus` put it, plus a foreign process on GPU 0: every
    pid a host pid this namespace cannot read."""
    pids = iter(host_pids(3))
    listed: dict[int, list[tuple[int, int]]] = {0: [(next(pids), FOREIGN)]}
    for role, gpu in plan_gpus.items():
        listed.setdefault(gpu, []).append((next(pids), RESERVED[role] + CONTEXT))
    return listed


def test_a_redeploy_in_a_pod_plans_what_the_first_deploy_planned() -> None:
    first_box = box({0: [(host_pids(1)[0], FOREIGN)]})  # before the app: the driver and a foreign process
    first = make_plan(MODELS, first_box, estimates=ESTIMATES)
    placed = {e.role: e.gpu_indices[0] for e in first.entries}
    assert placed == {"buffer_agent": 1, "summarizer": 0}  # the 27B takes the GPU without the foreign process

    listed = running_in_a_pod(placed)
    unattributed = box(listed)
    # The pid path attributes nothing here: every replica looks foreign (what a redeploy in a pod saw).
    assert all(p.rayfit_role is None for gpu in unattributed.nodes[0].gpus for p in gpu.processes)
    # ... and the 27B finds no room (the box): GPU 1 looks full, GPU 0 holds the foreign process.
    with pytest.raises(PlanError) as refused:
        make_plan(MODELS, unattributed, estimates=ESTIMATES)
    assert [u.role for u in refused.value.unplaced] == ["buffer_agent"]

    (node,) = unattributed.nodes
    attributed = Inventory(
        nodes=(Node(node.node_id, tuple(with_held(node.gpus, reports(placed))), has_gpu_slots=True),)
    )
    gpu0, gpu1 = attributed.nodes[0].gpus
    # Each replica's NVML figure (torch's bytes + its context) is rayfit's; the foreign process stays foreign.
    assert gpu1.rayfit_bytes == RESERVED["buffer_agent"] + CONTEXT and gpu1.foreign_bytes == DRIVER
    assert gpu0.rayfit_bytes == RESERVED["summarizer"] + CONTEXT and gpu0.foreign_bytes == DRIVER + FOREIGN
    again = make_plan(MODELS, attributed, estimates=ESTIMATES)
    assert again.entries == first.entries
    assert again.gpus == first.gpus  # the same room on every GPU, to the byte


def test_on_the_host_the_pid_path_decides_and_reports_add_nothing(tmp_path: Path) -> None:
    """A replica whose pid NVML lists and whose environment names its role: its report claims nothing more,
    so a foreign process of about its size stays foreign."""
    # The child says it runs before its pid is read: until exec has set up its environment, the
    # kernel shows /proc/<pid>/environ empty (seen on a busy machine right after Popen returned).
    replica = subprocess.Popen(
        [sys.executable, "-c", "print('up', flush=True); import time; time.sleep(60)"],
        env={"PATH": "/usr/bin:/bin", ROLE_ENV: "summarizer"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert replica.stdout is not None and replica.stdout.readline() == "up\n"
        (foreign,) = host_pids(1)
        used = RESERVED["summarizer"] + CONTEXT
        gpu = box({0: [(replica.pid, used), (foreign, used)]}).nodes[0].gpus[0]
        assert [p.rayfit_role for p in gpu.processes] == ["summarizer", None]
        report = HeldReport("summarizer", replica.pid, (HeldGpu(UUIDS[0], RESERVED["summarizer"]),))
        assert attribute_held(gpu, [report]) == gpu
    finally:
        replica.kill()
        replica.wait()


def test_a_report_explains_one_process_of_its_size_on_its_own_card() -> None:
    reserved = 10 * GIB
    small, near, huge = host_pids(3)
    listed = [(small, 1 * GIB), (near, reserved + CONTEXT), (huge, reserved + OUTSIDE_ALLOCATOR_MAX_BYTES + GIB)]
    gpu0, gpu1 = box({0: listed, 1: listed}).nodes[0].gpus
    report = HeldReport("writer", 7, (HeldGpu(UUIDS[0].removeprefix("GPU-"), reserved, cap_bytes=reserved),))
    # torch names the card without NVML's "GPU-" prefix: the same card.
    roles = {p.pid: p.rayfit_role for p in attribute_held(gpu0, [report]).processes}
    assert roles == {small: None, near: "writer", huge: None}
    # Another card's report explains nothing here.
    assert attribute_held(gpu1, [report]) == gpu1
    # Two reports never take one process: the second finds none of its size left.
    twice = attribute_held(gpu0, [report, HeldReport("copy", 8, report.gpus)])
    assert twice.rayfit_bytes == reserved + CONTEXT
    assert sum(p.rayfit_role is not None for p in twice.processes) == 1


def test_held_by_engine_maps_local_indices_to_cards() -> None:
    memory = {"cuda:0_reserved_bytes": 5 * GIB, "cuda:1_reserved_bytes": 7 * GIB, "cuda:0_allocated_bytes": GIB}
    held = held_by_engine("split", 99, UUIDS, memory, {0: 6 * GIB, 1: 8 * GIB})
    assert held == HeldReport("split", 99, (HeldGpu(UUIDS[0], 5 * GIB, 6 * GIB), HeldGpu(UUIDS[1], 7 * GIB, 8 * GIB)))


@pytest.fixture
def engine() -> Iterator[subprocess.Popen]:
    """A process standing for a replica's engine: its environment names its role, as the replica's does."""
    proc = subprocess.Popen(["sleep", "60"], env={"PATH": "/usr/bin:/bin", ROLE_ENV: "summarizer"})
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_reports_count_while_their_process_lives(tmp_path: Path, engine: subprocess.Popen) -> None:
    stranger = subprocess.Popen(["sleep", "60"], env={"PATH": "/usr/bin:/bin"})
    try:
        mine = HeldReport("summarizer", engine.pid, (HeldGpu(UUIDS[0], 3 * GIB, 4 * GIB),))
        write_held(mine, tmp_path)
        # A pid that now belongs to a process without the role (a reused pid): its file is ignored.
        write_held(HeldReport("summarizer", stranger.pid, mine.gpus), tmp_path)
        (tmp_path / "junk.json").write_text("{not json")
        assert read_held(tmp_path) == (mine,)
        # Rewritten as the engine's memory changes: the newest figures count.
        grown = HeldReport("summarizer", engine.pid, (HeldGpu(UUIDS[0], 3 * GIB + 512 * MIB, 4 * GIB),))
        write_held(grown, tmp_path)
        assert read_held(tmp_path) == (grown,)
    finally:
        stranger.kill()
        stranger.wait()
    engine.kill()
    engine.wait()
    assert read_held(tmp_path) == ()  # the replica is gone: what it held is no longer rayfit's
    assert read_held(tmp_path / "missing") == ()
