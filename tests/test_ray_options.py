"""placement.ray_options: plan entry → Ray Serve options (pure, no Ray)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from placement.estimate import MemoryEstimate
from placement.inventory import LOCAL_NODE, Gpu, Inventory, InventoryError, Node
from placement.plan import PlanEntry
from placement.ray_inventory import _node_gpus, local_inventory
from placement.ray_options import (
    CUDA_DEVICE_ORDER,
    CUDA_VISIBLE_DEVICES,
    GPU_SLOT_PREFIX,
    NODE_ID_LABEL,
    PCI_BUS_ID,
    ROLE_ENV,
    deployment_options,
    gpu_slot_resource,
    placement_warnings,
    ray_start_args,
)
from placement.units import GIB

ESTIMATE = MemoryEstimate(
    source="memory_gb",
    params=1_000_000,
    weights_bytes=2 * GIB,
    quant_overhead_bytes=0,
    kv_cache_bytes=GIB,
    runtime_bytes=GIB,
    quantization="none",
    context_length=4096,
    batch_size=1,
)


def entry(role: str, gpus: tuple[int, ...] = (), fraction: float = 0.5, node: str = LOCAL_NODE) -> PlanEntry:
    """A hand-made plan entry: on GPUs `gpus` of `node`, or on CPU when `gpus` is empty."""
    return PlanEntry(
        role=role,
        model=f"org/{role}",
        device="gpu" if gpus else "cpu",
        node_id=node,
        estimate=ESTIMATE,
        memory_budget_bytes=ESTIMATE.total_bytes,
        reason="test",
        gpu_indices=gpus,
        fraction=fraction if gpus else 0.0,
        num_cpus=0.25,
    )


def node(node_id: str = LOCAL_NODE, gpus: int = 2, slots: bool = True) -> Node:
    return Node(node_id=node_id, gpus=tuple(Gpu(i, 24 * GIB) for i in range(gpus)), has_gpu_slots=slots)


TWO_GPUS = Inventory(nodes=(node(),))


def test_single_gpu_entry_pins_and_holds_its_slot() -> None:
    options = deployment_options(entry("big", (1,), 0.7), TWO_GPUS)
    assert options == {
        "ray_actor_options": {
            "num_cpus": 0.25,
            "num_gpus": 0,
            "resources": {"gpu_slot_1": 0.7},
            "runtime_env": {
                "env_vars": {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "RAYFIT_ROLE": "big"}
            },
        },
        "num_replicas": 1,
    }


def test_split_entry_holds_a_fraction_of_each_gpu() -> None:
    actor = deployment_options(entry("huge", (0, 1), 1.0), TWO_GPUS)["ray_actor_options"]
    assert actor["resources"] == {"gpu_slot_0": 1.0, "gpu_slot_1": 1.0}
    assert actor["runtime_env"]["env_vars"][CUDA_VISIBLE_DEVICES] == "0,1"
    assert actor["num_gpus"] == 0


def test_uneven_split_asks_each_gpu_for_its_own_share() -> None:
    planned = dataclasses.replace(entry("huge", (0, 1), 0.9), gpu_fractions=(0.9, 0.25))
    actor = deployment_options(planned, TWO_GPUS)["ray_actor_options"]
    assert actor["resources"] == {"gpu_slot_0": 0.9, "gpu_slot_1": 0.25}


def test_cpu_entry_hides_every_gpu() -> None:
    actor = deployment_options(entry("tiny"), TWO_GPUS)["ray_actor_options"]
    env = {CUDA_VISIBLE_DEVICES: "", CUDA_DEVICE_ORDER: PCI_BUS_ID, ROLE_ENV: "tiny"}
    assert actor == {"num_cpus": 0.25, "num_gpus": 0, "runtime_env": {"env_vars": env}}
    assert placement_warnings(entry("tiny"), TWO_GPUS) == ()


@pytest.mark.parametrize(
    ("planned", "inventory"),
    [
        (entry("big", (1,), 0.7), TWO_GPUS),
        (entry("huge", (0, 1), 1.0), TWO_GPUS),
        (entry("tiny"), TWO_GPUS),
        (entry("big", (1,), 0.7), Inventory(nodes=(node(slots=False),))),
    ],
)
def test_every_replica_reads_gpu_indices_in_pci_order_and_is_marked(planned: PlanEntry, inventory: Inventory) -> None:
    """The plan's indices are NVML's (PCI bus order); CUDA's default FASTEST_FIRST could name another card."""
    env = deployment_options(planned, inventory)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env[CUDA_DEVICE_ORDER] == PCI_BUS_ID
    # The marker the inventory reads back to count this replica's memory as the plan's own.
    assert env[ROLE_ENV] == planned.role
    # The pin itself is the host index the start-up check expects (both read PlanEntry.cuda_visible_devices).
    assert env[CUDA_VISIBLE_DEVICES] == planned.cuda_visible_devices == ",".join(map(str, planned.gpu_indices))


def test_options_are_identical_for_identical_entries() -> None:
    """Two builds of the same plan give equal options, so Serve has no reason to restart a replica."""
    first = deployment_options(entry("big", (1,), 0.7), TWO_GPUS)
    assert deployment_options(entry("big", (1,), 0.7), Inventory(nodes=(node(),))) == first


def test_node_without_slots_still_pins_but_warns() -> None:
    inventory = Inventory(nodes=(node(slots=False),))
    planned = entry("big", (1,), 0.7)
    actor = deployment_options(planned, inventory)["ray_actor_options"]
    assert "resources" not in actor  # asking for absent resources would never schedule
    assert actor["runtime_env"]["env_vars"][CUDA_VISIBLE_DEVICES] == "1"
    (warning,) = placement_warnings(planned, inventory)
    assert "'big'" in warning and "cuda:1" in warning and GPU_SLOT_PREFIX in warning
    assert "--num-gpus=2" in warning
    assert placement_warnings(planned, TWO_GPUS) == ()


def test_multi_node_entry_selects_its_node_by_label() -> None:
    inventory = Inventory(nodes=(node("aa" * 28), node("bb" * 28, gpus=1)))
    actor = deployment_options(entry("small", (0,), 0.3, node="bb" * 28), inventory)["ray_actor_options"]
    assert actor["label_selector"] == {NODE_ID_LABEL: "bb" * 28}
    # One node: nothing to select, and the options survive a Ray restart.
    assert "label_selector" not in deployment_options(entry("small", (0,)), TWO_GPUS)["ray_actor_options"]


@pytest.mark.parametrize(
    ("planned", "message"),
    [
        (entry("lost", (0,), node="elsewhere"), "not in the inventory"),
        (entry("far", (3,)), "GPU [3]"),
        (entry("greedy", (0,), fraction=1.5), "fraction"),
    ],
)
def test_inconsistent_entries_are_refused(planned: PlanEntry, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        deployment_options(planned, TWO_GPUS)


def test_gpu_slot_resource_names() -> None:
    assert gpu_slot_resource(0) == "gpu_slot_0"
    assert gpu_slot_resource(7) == GPU_SLOT_PREFIX + "7"
    with pytest.raises(ValueError):
        gpu_slot_resource(-1)


def test_ray_start_args_declare_gpus_slots_and_labels() -> None:
    args = ray_start_args(2, node_labels={"gpu-index": "1", "rack": "a"})
    assert args[:2] == ["--head", "--num-gpus=2"]
    resources = args[2].removeprefix("--resources=")
    assert json.loads(resources) == {"gpu_slot_0": 1, "gpu_slot_1": 1}
    assert args[3] == "--labels=gpu-index=1,rack=a"
    assert ray_start_args(1, head=False) == ["--num-gpus=1", '--resources={"gpu_slot_0":1}']
    assert ray_start_args(0) == ["--head", "--num-gpus=0"]
    with pytest.raises(ValueError):
        ray_start_args(1, node_labels={"bad": "a,b"})


def test_local_inventory_reads_this_machine_without_ray() -> None:
    # Works on a GPU box and a CPU box alike: indices follow CUDA_VISIBLE_DEVICES order from 0.
    (local,) = local_inventory().nodes
    assert local.node_id == LOCAL_NODE and local.has_gpu_slots
    assert [gpu.index for gpu in local.gpus] == list(range(len(local.gpus)))
    assert all(gpu.total_bytes > 0 and gpu.free_bytes is not None for gpu in local.gpus)
    assert local.cpu_memory_bytes and local.cpu_memory_bytes > 0


def test_node_started_on_a_gpu_subset_is_refused() -> None:
    """`CUDA_VISIBLE_DEVICES=1 ray start ...`: the replica pin "0" would mean host GPU 0, so refuse it."""
    seen = [Gpu(0, 24 * GIB, free_bytes=24 * GIB)]
    with pytest.raises(InventoryError, match="CUDA_VISIBLE_DEVICES='1'"):
        _node_gpus("n1", 1, seen, "1", None)
    assert _node_gpus("n1", 1, seen, "0", None) == tuple(seen)
    assert _node_gpus("n1", 1, seen, None, None) == tuple(seen)
    # Declared GPUs nobody can see: sized by --gpu-memory, or a clear error.
    assert _node_gpus("n1", 2, [], None, 8 * GIB) == (Gpu(0, 8 * GIB), Gpu(1, 8 * GIB))
    with pytest.raises(InventoryError, match="--gpu-memory"):
        _node_gpus("n1", 2, [], None, None)
