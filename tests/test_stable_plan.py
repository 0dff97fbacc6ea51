"""Stable plans: the same config on the same cluster plans the same, field for field, while the app runs.

GPUs here are "measured" the way NVML reports them (free memory plus the
processes on each GPU with their usage), so the tests can say exactly who
holds what: rayfit's own replicas (their environment carries RAYFIT_ROLE),
a foreign process, the driver's own reservation, and a few MiB of noise.
Sizes in GiB; a 24 GiB GPU has 22.8 GiB of capacity (5% margin held back), and
each replica is charged its engine process's 0.5 GiB CUDA context beside its budget.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator

import pytest

from placement.config import ModelSpec
from placement.estimate import MemoryEstimate
from placement.inventory import MEMORY_GRAIN, Gpu, GpuProcess, Inventory, Node, Reserve
from placement.plan import PlanError
from placement.planner import FRACTION_GRAIN, make_plan
from placement.ray_inventory import gpu_processes, rayfit_role
from placement.ray_options import NODE_ID_LABEL, ROLE_ENV, deployment_options
from placement.units import GIB, MIB

TOTAL = 24 * GIB
DRIVER = 300 * MIB  # what NVML shows as used on an idle GPU, attributed to no process
MODELS = {"summarizer": ModelSpec(model="org/medgemma-4b"), "buffer_agent": ModelSpec(model="org/medgemma-27b")}
ESTIMATES = {
    "summarizer": MemoryEstimate.lump(int(3.5 * GIB), source="params_b", params=4_300_000_000),
    "buffer_agent": MemoryEstimate.lump(17 * GIB, source="params_b", params=27_000_000_000),
}
OWN_PID = {"summarizer": 4101, "buffer_agent": 4102}
FOREIGN_PID = 777


def measured(*held: tuple[int, int, str | None], noise: int = 0) -> tuple[Gpu, Gpu]:
    """Two 24 GiB GPUs as NVML reports them: (gpu, bytes, rayfit role or None for a foreign pid) per process."""
    gpus = []
    for index in (0, 1):
        procs = [(b, role) for gpu, b, role in held if gpu == index]
        used = DRIVER + sum(b for b, _ in procs) + noise * (index + 1)
        processes = tuple(
            GpuProcess(pid=OWN_PID[role] if role else FOREIGN_PID + index, used_bytes=b, rayfit_role=role)
            for b, role in procs
        )
        gpus.append(
            Gpu(index, TOTAL, free_bytes=TOTAL - used, name="RTX 3090", uuid=f"GPU-{index}", processes=processes)
        )
    return gpus[0], gpus[1]


def one_node(gpus: tuple[Gpu, ...]) -> Inventory:
    return Inventory(nodes=(Node(node_id="a" * 56, gpus=gpus, has_gpu_slots=True),))


def options(plan, inventory: Inventory) -> dict[str, dict]:
    return {e.role: deployment_options(e, inventory) for e in plan.entries}


# What the running app holds after the first plan: the 27B on GPU 1, the 4B on GPU 0 (each its budget).
RUNNING = ((1, 17 * GIB, "buffer_agent"), (0, int(3.5 * GIB), "summarizer"))


def test_plan_identical_under_a_few_mib_of_free_memory_noise() -> None:
    rng = random.Random(3)
    base = one_node(measured(*RUNNING, (0, 2 * GIB, None)))
    first = make_plan(MODELS, base, estimates=ESTIMATES)
    for _ in range(50):
        noisy = one_node(measured(*RUNNING, (0, 2 * GIB, None), noise=rng.randint(-8 * MIB, 8 * MIB)))
        plan = make_plan(MODELS, noisy, estimates=ESTIMATES)
        assert plan.entries == first.entries
        assert plan.gpus == first.gpus  # usable memory too: the noise is inside one MEMORY_GRAIN
        assert options(plan, noisy) == options(first, base)


def test_fractions_come_from_planned_bytes_not_from_free_memory() -> None:
    idle = make_plan(MODELS, one_node(measured()), estimates=ESTIMATES)
    busy = make_plan(MODELS, one_node(measured((0, 5 * GIB, None), (1, 3 * GIB, None))), estimates=ESTIMATES)
    capacity = Reserve().capacity_bytes(Gpu(0, TOTAL))
    context = Reserve().cuda_context_bytes
    for plan in (idle, busy):
        big = plan.entry("buffer_agent")
        assert big.fraction == ((17 * GIB + context) * FRACTION_GRAIN // capacity) / FRACTION_GRAIN == 0.767
        assert plan.entry("summarizer").fraction == 0.175
    assert idle.entries == busy.entries


def test_own_replicas_memory_counts_as_available() -> None:
    fresh = make_plan(MODELS, one_node(measured()), estimates=ESTIMATES)
    assert (fresh.entry("buffer_agent").gpu_indices, fresh.entry("summarizer").gpu_indices) == ((1,), (0,))
    # Redeploy while the app runs: GPU 1 has only ~6 GiB free, yet the plan is the same.
    running = one_node(measured(*RUNNING))
    assert running.nodes[0].gpus[1].free_bytes < 7 * GIB
    assert make_plan(MODELS, running, estimates=ESTIMATES) == fresh


def test_the_same_usage_by_a_foreign_process_is_subtracted() -> None:
    # Had those 17 + 3.5 GiB been someone else's, the 27B no longer fits GPU 1: the models swap.
    foreign = one_node(measured(*((gpu, b, None) for gpu, b, _ in RUNNING)))
    plan = make_plan(MODELS, foreign, estimates=ESTIMATES)
    assert (plan.entry("buffer_agent").gpu_indices, plan.entry("summarizer").gpu_indices) == ((0,), (1,))
    # Held by others, rounded up to the grain: 17 GiB + 300 MiB -> 17.5 GiB off GPU 1's capacity
    # (and the 17 GiB budget + its 0.5 GiB context no longer fit the 5.3 GiB left).
    capacity = Reserve().capacity_bytes(Gpu(1, TOTAL))
    assert plan.gpus[1].usable_bytes == capacity - 17 * GIB - 2 * MEMORY_GRAIN
    # A foreign process beside the running app is subtracted too: 6.5 GiB of others on GPU 1 leave
    # 16.3 GiB usable there, so the 27B moves to GPU 0 (its own 17 GiB on GPU 1 still count as available).
    crowded = one_node(measured(*RUNNING, (1, 6 * GIB, None)))
    assert make_plan(MODELS, crowded, estimates=ESTIMATES).entry("buffer_agent").gpu_indices == (0,)


def test_process_whose_usage_nvml_does_not_report_counts_as_foreign() -> None:
    gpu = Gpu(0, TOTAL, free_bytes=TOTAL - DRIVER - 4 * GIB, processes=(GpuProcess(1, None, "summarizer"),))
    assert gpu.rayfit_bytes == 0 and gpu.foreign_bytes == DRIVER + 4 * GIB


def _labelled(ids: tuple[str, str]) -> Inventory:
    """Two one-GPU nodes that keep their labels and host names; Ray gives them new random ids on a restart."""
    a = Node(
        node_id=ids[0],
        gpus=(Gpu(0, TOTAL),),
        address="10.0.0.1",
        hostname="gpu-a",
        labels={"rayfit-node": "head", NODE_ID_LABEL: ids[0]},
        has_gpu_slots=True,
    )
    b = Node(
        node_id=ids[1],
        gpus=(Gpu(0, TOTAL),),
        address="10.0.0.2",
        hostname="gpu-b",
        labels={"rayfit-node": "worker", NODE_ID_LABEL: ids[1]},
        has_gpu_slots=True,
    )
    return Inventory(nodes=(b, a))


def test_node_order_survives_new_node_ids() -> None:
    before = make_plan(MODELS, _labelled(("1" * 56, "f" * 56)), estimates=ESTIMATES)
    after = make_plan(MODELS, _labelled(("e" * 56, "2" * 56)), estimates=ESTIMATES)  # ids now sort the other way

    def hosts(plan, inventory: Inventory) -> dict[str, str | None]:
        by_id = {n.node_id: n.hostname for n in inventory.nodes}
        return {e.role: by_id[e.node_id] for e in plan.entries}

    # The 27B takes the last GPU (the worker's), the 4B the first (the head's), whatever the ids.
    expected = {"buffer_agent": "gpu-b", "summarizer": "gpu-a"}
    assert hosts(before, _labelled(("1" * 56, "f" * 56))) == hosts(after, _labelled(("e" * 56, "2" * 56))) == expected
    assert [e.reason for e in before.entries] == [e.reason for e in after.entries]


def test_unlabelled_nodes_order_by_host_name_then_address() -> None:
    nodes = (
        Node(node_id="0" * 56, address="10.0.0.9", hostname="zeta"),
        Node(node_id="9" * 56, address="10.0.0.1", hostname="alpha"),
        Node(node_id="5" * 56, address="10.0.0.2", hostname="alpha"),
    )
    ordered = Inventory(nodes=nodes).sorted_nodes()
    assert [(n.hostname, n.address) for n in ordered] == [
        ("alpha", "10.0.0.1"),
        ("alpha", "10.0.0.2"),
        ("zeta", "10.0.0.9"),
    ]


def test_fractions_on_a_gpu_never_sum_past_one_even_with_minimum_grains() -> None:
    # No CUDA context charged here: the grains alone are under test.
    no_context = Reserve(cuda_context_bytes=0)
    capacity = no_context.capacity_bytes(Gpu(0, TOTAL))
    models = {name: ModelSpec(model=f"org/{name}") for name in ("big", "tiny1", "tiny2")}
    estimates = {
        "big": MemoryEstimate.lump(capacity * 999 // 1000 + 1),  # exactly 999 grains
        "tiny1": MemoryEstimate.lump(capacity * 3 // 10_000),
        "tiny2": MemoryEstimate.lump(capacity * 3 // 10_000),
    }
    # In bytes all three fit (99.96%); in grains big + tiny1 take 999 + 1: tiny2 has no grain left.
    with pytest.raises(PlanError) as raised:
        make_plan(models, one_node((Gpu(0, TOTAL),)), estimates=estimates, reserve=no_context)
    assert [u.role for u in raised.value.unplaced] == ["tiny2"]
    plan = make_plan(models, one_node(measured()), estimates={**estimates, "big": MemoryEstimate.lump(10 * GIB)})
    for usage in plan.gpus:
        assert usage.fraction_used <= 1.0
    for entry in plan.entries:
        assert entry.fraction * FRACTION_GRAIN == round(entry.fraction * FRACTION_GRAIN)  # whole grains


@pytest.fixture
def processes() -> Iterator[tuple[int, int]]:
    """Two real processes: one marked as a rayfit replica (as deployment_options marks them), one not."""
    env = {key: value for key, value in os.environ.items() if key != ROLE_ENV}
    marked = subprocess.Popen(["sleep", "60"], env={**env, ROLE_ENV: "summarizer"})
    plain = subprocess.Popen(["sleep", "60"], env=env)
    try:
        yield marked.pid, plain.pid
    finally:
        for proc in (marked, plain):
            proc.kill()
            proc.wait()


def test_gpu_processes_are_attributed_from_the_process_environment(processes: tuple[int, int]) -> None:
    marked, plain = processes
    assert rayfit_role(marked) == "summarizer" and rayfit_role(plain) is None
    # NVML lists a process once per kind (compute, graphics); order does not matter.
    listed = [(plain, 2 * GIB), (marked, 3 * GIB), (marked, 3 * GIB), (2**22 + 1, GIB)]
    found = gpu_processes(listed)
    assert [p.pid for p in found] == sorted({plain, marked, 2**22 + 1})
    roles = {p.pid: p.rayfit_role for p in found}
    assert roles == {marked: "summarizer", plain: None, 2**22 + 1: None}  # a pid not in /proc: foreign
    gpu = Gpu(0, TOTAL, free_bytes=TOTAL - DRIVER - 6 * GIB, processes=found)
    assert gpu.rayfit_bytes == 3 * GIB and gpu.foreign_bytes == DRIVER + 3 * GIB
    assert gpu_processes(reversed(listed)) == found
