"""One box as Ray nodes and each GPU's card, without Ray: the `ray start` commands of a box, the share
of the machine each raylet declares, each GPU node's accelerator type, and `accelerator:` in the planner
and the Serve options (placement.box_start, placement.gpu_nodes, placement.planner).

The box is a plain list of GPUs, as `local_inventory` reads it: a mixed 2-GPU box, an RTX 3090 at
index 0 and an RTX A5000 at index 1, 24 GiB each. Ray names them 'GeForce-RTX-3090' and 'RTX-A5000'.
The machine: 8 CPUs, 30 GiB of Ray `memory`, 9 GiB of object store (what one `ray start` declares).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from placement.box_start import Machine, RayStart, box_commands, shares
from placement.config import ConfigError, ModelSpec, parse_model_configs
from placement.estimate import MemoryEstimate
from placement.gpu_nodes import (
    ACCELERATOR_TYPE_LABEL,
    GPU_LABEL,
    accelerator_type,
    gpu_node_labels,
    node_accelerator_type,
)
from placement.inventory import Gpu, Inventory, Node
from placement.plan import PlanError
from placement.planner import make_plan
from placement.ray_options import deployment_options
from placement.rules import SizeRule, SizeRules
from placement.units import GIB

HOST = "box"
RTX_3090, RTX_A5000 = "NVIDIA GeForce RTX 3090", "NVIDIA RTX A5000"
BOX = [Gpu(0, 24 * GIB, name=RTX_3090), Gpu(1, 24 * GIB, name=RTX_A5000)]
MACHINE = Machine(cpus=8, memory_bytes=30 * GIB, object_store_bytes=9 * GIB)


def flags(command: RayStart) -> dict[str, str]:
    """`--name=value` arguments of one `ray start`, by name."""
    return dict(arg[2:].split("=", 1) for arg in command.args if arg.startswith("--") and "=" in arg)


def labels_of(command: RayStart) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in flags(command)["labels"].split(","))


# Ray's own name for each card: what it would detect from NVML, were it reading the right GPU.
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        (RTX_3090, "GeForce-RTX-3090"),
        (RTX_A5000, "RTX-A5000"),
        ("A100", "A100"),  # a type already
    ],
)
def test_a_cards_accelerator_type_is_rays_name_for_it(name: str, expected: str) -> None:
    assert accelerator_type(name) == expected


def test_shares_sum_to_the_machine_and_the_head_takes_the_remainders() -> None:
    head, *gpus = shares(MACHINE, 3)
    assert sum(s.cpus for s in (head, *gpus)) == 8
    assert sum(s.memory_bytes for s in (head, *gpus)) == 30 * GIB
    assert sum(s.object_store_bytes for s in (head, *gpus)) == 9 * GIB
    assert (head.cpus, gpus[0].cpus, gpus[1].cpus) == (4, 2, 2)  # 8 // 3 = 2 each, the head the rest
    assert gpus[0] == gpus[1] and gpus[0].memory_bytes == 10 * GIB and gpus[0].object_store_bytes == 3 * GIB


def test_a_machine_with_fewer_cpus_than_raylets_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="2 CPU.* for 3 Ray nodes.*--num-cpus"):
        shares(Machine(cpus=2, memory_bytes=GIB, object_store_bytes=GIB), 3)
    with pytest.raises(ValueError, match="below Ray's minimum"):
        shares(Machine(cpus=3, memory_bytes=GIB, object_store_bytes=200 * 2**20), 3)


def test_the_box_starts_a_head_and_one_raylet_per_gpu_whose_totals_are_one_machine() -> None:
    commands = box_commands(BOX, host=HOST, address="127.0.0.1:6379", machine=MACHINE)
    head, gpu0, gpu1 = commands
    assert head.args[:3] == ("--head", "--port=6379", "--num-gpus=0") and head.env == ()
    for index, command in ((0, gpu0), (1, gpu1)):
        assert dict(command.env) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(index)}
        assert flags(command)["num-gpus"] == "1" and flags(command)["address"] == "127.0.0.1:6379"
        assert labels_of(command)[GPU_LABEL] == f"{HOST}-{index}"
    for resource, total in (("num-cpus", 8), ("memory", 30 * GIB), ("object-store-memory", 9 * GIB)):
        assert sum(int(flags(c)[resource]) for c in commands) == total, resource
    # Two raylets on one box: each its own dashboard agent port.
    assert flags(gpu0)["dashboard-agent-listen-port"] != flags(gpu1)["dashboard-agent-listen-port"]
    # A line a shell runs as is (the README's `ray-start-args --per-gpu | bash -e`).
    assert shlex.split(gpu1.shell())[:3] == ["CUDA_DEVICE_ORDER=PCI_BUS_ID", "CUDA_VISIBLE_DEVICES=1", "ray"]


def test_each_gpu_node_states_its_own_card_not_gpu_0s() -> None:
    _, gpu0, gpu1 = box_commands(BOX, host=HOST, address="h:6379", machine=MACHINE)
    for command, card in ((gpu0, "GeForce-RTX-3090"), (gpu1, "RTX-A5000")):
        # Ray's own label (given explicitly, it replaces the one Ray detects from NVML index 0) ...
        assert labels_of(command)[ACCELERATOR_TYPE_LABEL] == card
        # ... and Ray's own resource, as `accelerator_type=` in a task or actor asks for it.
        resources = json.loads(flags(command)["resources"])
        assert resources[f"accelerator_type:{card}"] == 1
        assert [r for r in resources if r.startswith("accelerator_type:")] == [f"accelerator_type:{card}"]


def test_a_group_of_two_different_cards_states_no_card_and_a_box_without_gpus_is_refused() -> None:
    head, group = box_commands(BOX, host=HOST, address="h:6379", machine=MACHINE, groups=[(0, 1)])
    assert dict(group.env)["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert ACCELERATOR_TYPE_LABEL not in labels_of(group)
    assert int(flags(head)["num-cpus"]) + int(flags(group)["num-cpus"]) == 8
    with pytest.raises(ValueError, match="no GPU"):
        box_commands([], host=HOST, address="h:6379", machine=MACHINE)


def test_a_worker_box_has_no_head_and_its_gpu_nodes_share_the_whole_machine() -> None:
    commands = box_commands(BOX, host=HOST, address="10.0.0.1:6379", machine=MACHINE, head=False)
    assert [dict(c.env)["CUDA_VISIBLE_DEVICES"] for c in commands] == ["0", "1"]
    assert [int(flags(c)["num-cpus"]) for c in commands] == [4, 4]


# The planner: a per-GPU inventory of the mixed box, as inventory_from_ray reads it.
def gpu_node(gpu: Gpu) -> Node:
    labels = gpu_node_labels(HOST, [gpu.index], gpu.total_bytes, gpu.name)
    return Node(node_id=f"n{gpu.index}" * 8, gpus=(gpu,), labels=labels)


PER_GPU = Inventory(nodes=(Node(node_id="h" * 16, cpu_memory_bytes=8 * GIB), *(gpu_node(g) for g in BOX)))


def spec(**fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"model": "org/m", **fields})


def lump(gib: float) -> MemoryEstimate:
    return MemoryEstimate.lump(int(gib * GIB), source="memory_gb", params=1_000_000)


def test_a_gpu_nodes_card_is_its_label_and_a_single_nodes_is_each_gpus_name() -> None:
    assert node_accelerator_type(PER_GPU.nodes[2].labels, None) == "RTX-A5000"
    assert node_accelerator_type({}, RTX_A5000) == "RTX-A5000"
    assert node_accelerator_type({ACCELERATOR_TYPE_LABEL: "GeForce-RTX-3090"}, RTX_A5000) == "RTX-A5000"


@pytest.mark.parametrize("asked", ["RTX-A5000", "rtx-a5000", RTX_A5000])
def test_accelerator_sends_a_small_model_to_the_card_it_names(asked: str) -> None:
    # 3 GiB: the default rules put it on the first GPU (the 3090); `accelerator:` overrides that.
    plan = make_plan(
        {"small": spec(accelerator=asked), "other": spec()},
        PER_GPU,
        estimates={
            "small": lump(3),
            "other": lump(3),
        },
    )
    small, other = plan.entry("small"), plan.entry("other")
    assert small.gpu_labels == (f"{HOST}-1",) and small.accelerator == "RTX-A5000"
    assert other.gpu_labels == (f"{HOST}-0",) and other.accelerator is None
    selector = deployment_options(small, PER_GPU)["ray_actor_options"]["label_selector"]
    assert selector == {GPU_LABEL: f"{HOST}-1", ACCELERATOR_TYPE_LABEL: "RTX-A5000"}
    assert ACCELERATOR_TYPE_LABEL not in deployment_options(other, PER_GPU)["ray_actor_options"]["label_selector"]


def test_replicas_of_a_role_asking_a_card_stay_on_that_card() -> None:
    plan = make_plan({"m": spec(accelerator="RTX-A5000", replicas=2)}, PER_GPU, estimates={"m": lump(3)})
    assert [slot.gpu_label for slot in plan.entry("m").slots] == [f"{HOST}-1", f"{HOST}-1"]


def test_a_card_no_gpu_is_leaves_the_model_unplaced_naming_the_cards() -> None:
    with pytest.raises(PlanError, match=r"accelerator: A100.*GeForce-RTX-3090, RTX-A5000") as caught:
        make_plan({"big": spec(accelerator="A100")}, PER_GPU, estimates={"big": lump(3)})
    assert [u.role for u in caught.value.unplaced] == ["big"]


def test_declared_gpus_without_a_card_match_no_accelerator() -> None:
    declared = Inventory(nodes=(Node(node_id="local", gpus=(Gpu(0, 24 * GIB),), has_gpu_slots=True),))
    with pytest.raises(PlanError, match="unknown"):
        make_plan({"m": spec(accelerator="A100")}, declared, estimates={"m": lump(3)})


def test_a_rule_can_ask_for_a_card_and_a_models_own_accelerator_wins() -> None:
    rules = SizeRules(rules=(SizeRule(name="big to the A5000", min_memory_gb=10, accelerator="RTX-A5000"),))
    plan = make_plan(
        {"big": spec(), "pinned": spec(accelerator="GeForce-RTX-3090")},
        PER_GPU,
        rules=rules,
        estimates={"big": lump(12), "pinned": lump(12)},
    )
    assert plan.entry("big").gpu_labels == (f"{HOST}-1",)
    assert plan.entry("pinned").gpu_labels == (f"{HOST}-0",)


def test_one_node_holding_both_cards_filters_by_each_gpus_name_without_a_selector() -> None:
    # The single-node mode: Ray's label on such a node names GPU 0's card only, so it is not selected on.
    node = Node(node_id="local", gpus=tuple(BOX), has_gpu_slots=True, cpu_memory_bytes=8 * GIB)
    inventory = Inventory(nodes=(node,))
    plan = make_plan({"m": spec(accelerator="RTX-A5000")}, inventory, estimates={"m": lump(3)})
    entry = plan.entry("m")
    assert entry.gpu_indices == (1,) and entry.accelerator == "RTX-A5000"
    assert "label_selector" not in deployment_options(entry, inventory)["ray_actor_options"]


def test_cpu_and_accelerator_together_are_refused_in_the_config() -> None:
    with pytest.raises(ConfigError, match="accelerator"):
        parse_model_configs("m:\n  model: org/m\n  cpu: true\n  accelerator: A100\n")
    assert parse_model_configs("m:\n  model: org/m\n  accelerator: A100\n").models["m"].accelerator == "A100"


# `python -m placement start-box`: what it would run (--dry-run), as a user calls it.
def start_box(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "placement", "start-box", "--dry-run", "--host", HOST, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_start_box_prints_the_per_gpu_box_by_default_and_the_single_node_behind_a_flag() -> None:
    declared = ["--gpus", "2", "--gpu-memory", "24GB", "--accelerator", RTX_A5000]
    done = start_box(*declared, "--num-cpus", "6", "--memory", "6GiB", "--object-store-memory", "384MiB")
    assert done.returncode == 0, done.stderr
    head, *gpus = [shlex.split(line) for line in done.stdout.splitlines()]
    assert head[1:4] == ["start", "--head", "--port=6379"] and "--num-gpus=0" in head
    assert [line[1] for line in gpus] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]
    assert all(f"{ACCELERATOR_TYPE_LABEL}=RTX-A5000" in " ".join(line) for line in gpus)
    cpus = [int(arg.split("=")[1]) for line in (head, *gpus) for arg in line if arg.startswith("--num-cpus=")]
    assert cpus == [2, 2, 2]

    single = start_box(*declared, "--single-node")
    assert single.returncode == 0, single.stderr
    (line,) = single.stdout.splitlines()
    assert '{"gpu_slot_0":1,"gpu_slot_1":1}' in line and "--num-gpus=2" in line and "CUDA_VISIBLE_DEVICES" not in line


def test_start_box_refuses_a_machine_too_small_for_its_raylets_with_exit_2() -> None:
    done = start_box("--gpus", "2", "--gpu-memory", "24GB", "--num-cpus", "2")
    assert done.returncode == 2
    assert "--num-cpus" in done.stderr and done.stdout == ""
