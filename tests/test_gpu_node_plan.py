"""The per-GPU mode without Ray: labels and start lines, the planner spreading replicas over GPU
nodes, and the Serve options Ray then accounts GPUs with (placement.gpu_nodes, gpu_node_options).

Sizes are round on purpose. A 24 GiB GPU's capacity is 24 - 1.2 (5% margin) = 22.8 GiB; a 48 GiB
one's 48 - 2.4 = 45.6 GiB. Each replica holds its budget plus a 0.5 GiB CUDA context (its engine
process's) on each GPU it uses. Fractions are those bytes over capacity in whole thousandths, rounded down.
"""

from __future__ import annotations

import pytest

from placement.box_start import box_commands
from placement.config import Autoscaling, ModelSpec
from placement.estimate import MemoryEstimate
from placement.gpu_nodes import (
    GPU_LABEL,
    GPU_MEMORY_RESOURCE,
    gpu_node_labels,
    gpu_node_of,
    gpu_node_start_args,
)
from placement.inventory import NODE_ID_LABEL, Gpu, Inventory, Node
from placement.plan import PlanError
from placement.planner import make_plan
from placement.ray_options import CUDA_VISIBLE_DEVICES, deployment_options, placement_warnings
from placement.units import GIB

HOST = "box"


def gpu_node(index: int, gib: int = 24, node_id: str | None = None) -> Node:
    """A per-GPU Ray node as inventory_from_ray reads it: one GPU under its host index, labelled."""
    labels = gpu_node_labels(HOST, [index], gib * GIB)
    return Node(node_id=node_id or f"n{index}" * 8, gpus=(Gpu(index, gib * GIB),), labels=labels)


def group_node(indices: tuple[int, ...], gib: int = 24) -> Node:
    labels = gpu_node_labels(HOST, indices, gib * GIB)
    return Node(node_id="g" * 16, gpus=tuple(Gpu(i, gib * GIB) for i in indices), labels=labels)


def head() -> Node:
    return Node(node_id="h" * 16, labels={"rayfit-node": "head"}, cpu_memory_bytes=8 * GIB)


def spec(**fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"model": "org/m", **fields})


def lump(gib: float) -> MemoryEstimate:
    return MemoryEstimate.lump(int(gib * GIB), source="memory_gb", params=1_000_000)


def test_labels_round_trip_and_the_start_line_declares_memory() -> None:
    labels = gpu_node_labels("gpu box.lan", [1], 24 * GIB, "NVIDIA GeForce RTX 3090")
    assert labels[GPU_LABEL] == "gpu-box.lan-1"  # a space is not allowed in a Ray label value
    info = gpu_node_of(labels)
    assert info is not None and info.indices == (1,) and info.memory_bytes == 24 * GIB and not info.is_group
    assert gpu_node_of({"rayfit-node": "head"}) is None

    args = gpu_node_start_args(HOST, [0, 1], 24 * GIB, address="10.0.0.1:6379")
    assert "--num-gpus=2" in args
    assert f'--resources={{"{GPU_MEMORY_RESOURCE}":49152}}' in args  # the group's two GPUs
    assert any(a.startswith("--labels=") and "rayfit.io/gpu=box-0_1" in a for a in args)


def test_box_lines_one_raylet_per_gpu_each_seeing_only_its_gpu() -> None:
    box = [Gpu(0, 24 * GIB), Gpu(1, 24 * GIB)]
    lines = [command.shell() for command in box_commands(box, host=HOST, address="127.0.0.1:6379")]
    assert lines[0] == "ray start --head --port=6379 --num-gpus=0"
    assert [line.split(" ray ")[0] for line in lines[1:]] == [
        "CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0",
        "CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=1",
    ]
    # Two raylets on one box: each needs its own dashboard agent port.
    ports = {part for line in lines[1:] for part in line.split() if part.startswith("--dashboard-agent-listen-port")}
    assert len(ports) == 2
    with pytest.raises(ValueError, match="overlap"):
        box_commands([Gpu(i, GIB) for i in range(3)], host=HOST, address="h:1", groups=[(0, 1), (1, 2)])


def test_users_case_lands_on_gpu_1_and_gpu_0_with_num_gpus() -> None:
    inventory = Inventory(nodes=(head(), gpu_node(0), gpu_node(1)))
    assert inventory.per_gpu_nodes
    plan = make_plan(
        {"buffer_agent": spec(), "summarizer": spec()},
        inventory,
        estimates={"buffer_agent": lump(15), "summarizer": lump(3)},
    )
    big, small = plan.entry("buffer_agent"), plan.entry("summarizer")
    assert [(s.gpu_label, s.gpu_indices) for s in big.slots] == [("box-1", (1,))]
    assert [(s.gpu_label, s.gpu_indices) for s in small.slots] == [("box-0", (0,))]

    actor = deployment_options(big, inventory)["ray_actor_options"]
    assert actor["num_gpus"] == 0.679  # 15 GiB + its 0.5 GiB context, of 22.8
    # Its budget and its engine process's CUDA context (0.5 GiB), in MiB.
    assert actor["resources"] == {GPU_MEMORY_RESOURCE: 15 * 1024 + 512}
    assert actor["label_selector"] == {GPU_LABEL: "box-1"}
    # Ray sets CUDA_VISIBLE_DEVICES itself; a node-id selector would not survive a replacement node.
    assert CUDA_VISIBLE_DEVICES not in actor["runtime_env"]["env_vars"]
    assert NODE_ID_LABEL not in actor["label_selector"]
    assert placement_warnings(big, inventory) == ()


def test_replicas_spread_one_per_gpu_node_each_budgeted() -> None:
    inventory = Inventory(nodes=(head(), gpu_node(0), gpu_node(1)))
    plan = make_plan({"helper": spec(replicas=2)}, inventory, estimates={"helper": lump(10)})
    entry = plan.entry("helper")
    assert entry.replicas == 2 and entry.gpu_labels == ("box-0", "box-1")
    # Each GPU holds one copy and its engine process's context: 10.5 GiB of its 22.8 = 0.460.
    assert [(g.index, g.planned_bytes, g.cuda_contexts, g.fraction_used) for g in plan.gpus] == [
        (0, 10 * GIB + GIB // 2, 1, 0.460),
        (1, 10 * GIB + GIB // 2, 1, 0.460),
    ]
    options = deployment_options(entry, inventory)
    assert options["num_replicas"] == 2 and options["max_replicas_per_node"] == 1
    assert options["ray_actor_options"]["label_selector"] == {GPU_LABEL: "in(box-0,box-1)"}

    # Three copies of 10 GiB on two GPUs: the third stacks where its rule prefers (10 GiB or more: the
    # last GPU); Serve may then put 2 on a node.
    entry = make_plan({"helper": spec(replicas=3)}, inventory, estimates={"helper": lump(10)}).entry("helper")
    assert [s.gpu_label for s in entry.slots] == ["box-1", "box-0", "box-1"]
    assert deployment_options(entry, inventory)["max_replicas_per_node"] == 2

    # Five copies fit nowhere: the role is refused whole, naming the replica without room.
    with pytest.raises(PlanError, match="replica 5 of 5 has no room"):
        make_plan({"helper": spec(replicas=5)}, inventory, estimates={"helper": lump(10)})


def test_a_failed_spread_gives_its_room_back() -> None:
    # "wide" (3 × 12 GiB) cannot be placed; its first two replicas must not keep 24 GiB from "late".
    inventory = Inventory(nodes=(head(), gpu_node(0), gpu_node(1)))
    with pytest.raises(PlanError) as failed:
        make_plan(
            {"wide": spec(replicas=3), "late": spec(gpu=0)},
            inventory,
            estimates={"wide": lump(12), "late": lump(20)},
        )
    assert [u.role for u in failed.value.unplaced] == ["wide"]


def test_heterogeneous_gpus_share_by_memory_not_by_fraction() -> None:
    inventory = Inventory(nodes=(head(), gpu_node(0, gib=24), gpu_node(1, gib=48)))
    entry = make_plan({"helper": spec(replicas=2)}, inventory, estimates={"helper": lump(10)}).entry("helper")
    fractions = {s.gpu_label: s.fraction for s in entry.slots}
    assert fractions == {"box-0": 0.460, "box-1": 0.230}  # 10 GiB + its context, of 22.8 and of 45.6
    actor = deployment_options(entry, inventory)["ray_actor_options"]
    # One option set for both replicas: the memory resource is exact on either card, the GPU share the smaller.
    assert actor["resources"] == {GPU_MEMORY_RESOURCE: 10 * 1024 + 512}
    assert actor["num_gpus"] == 0.230


def test_autoscaling_is_budgeted_at_its_max_and_bounded_by_it() -> None:
    inventory = Inventory(nodes=(head(), gpu_node(0), gpu_node(1)))
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0}
    plan = make_plan({"scaler": spec(autoscaling=scaling)}, inventory, estimates={"scaler": lump(4)})
    entry = plan.entry("scaler")
    assert entry.replicas == 2 and len(entry.slots) == 2
    options = deployment_options(entry, inventory)
    assert "num_replicas" not in options
    config = options["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"], config["target_ongoing_requests"]) == (1, 2, 1)
    with pytest.raises(ValueError, match="either `replicas` or `autoscaling`"):
        spec(replicas=2, autoscaling=scaling)
    with pytest.raises(ValueError, match="above max_replicas"):
        Autoscaling(min_replicas=3, max_replicas=2)


def test_split_model_takes_a_gpu_group_node_whole() -> None:
    # GPUs 0 and 1 are one node (for split models); GPU 2 its own.
    inventory = Inventory(nodes=(head(), group_node((0, 1)), gpu_node(2)))
    plan = make_plan(
        {"huge": spec(split=True), "small": spec()},
        inventory,
        estimates={"huge": lump(30), "small": lump(3)},
    )
    huge, small = plan.entry("huge"), plan.entry("small")
    assert [(s.gpu_label, s.gpu_indices) for s in huge.slots] == [("box-0_1", (0, 1))]
    assert small.gpu_labels == ("box-2",)  # a single-GPU model never lands on the group node
    actor = deployment_options(huge, inventory)["ray_actor_options"]
    assert actor["num_gpus"] == 2 and actor["label_selector"] == {GPU_LABEL: "box-0_1"}
    assert actor["resources"] == {GPU_MEMORY_RESOURCE: 30 * 1024 + 2 * 512}  # a context on each of its GPUs
    assert huge.on_gpu_node("box-0_1").gpu_indices == (0, 1)
    with pytest.raises(ValueError, match="budgets its replicas on box-0_1"):
        huge.on_gpu_node("box-2")


def test_without_per_gpu_nodes_the_single_node_pin_stays() -> None:
    # A node holding two GPUs without labels (e.g. `serve run` started Ray): the old options and warning.
    plain = Node(node_id="p" * 16, gpus=(Gpu(0, 24 * GIB), Gpu(1, 24 * GIB)))
    inventory = Inventory(nodes=(plain,))
    assert not inventory.per_gpu_nodes
    entry = make_plan({"m": spec()}, inventory, estimates={"m": lump(3)}).entry("m")
    assert entry.slots == ()
    actor = deployment_options(entry, inventory)["ray_actor_options"]
    assert actor["num_gpus"] == 0 and actor["runtime_env"]["env_vars"][CUDA_VISIBLE_DEVICES] == "0"
    (warning,) = placement_warnings(entry, inventory)
    assert "--per-gpu" in warning and "gpu_slot_" in warning
    # A mix of labelled and unlabelled GPU nodes is not the per-GPU mode either, and the plan says so.
    mixed = Inventory(nodes=(plain, gpu_node(0)))
    assert not mixed.per_gpu_nodes
    plan = make_plan({"m": spec()}, mixed, estimates={"m": lump(3)})
    assert plan.entry("m").slots == ()
    assert any("single-node mode is used for all" in warning for warning in plan.warnings)


def test_the_plan_shows_every_replicas_gpu_node(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from rich.console import Console

    from placement.render import plan_to_dict, print_plan

    inventory = Inventory(nodes=(head(), gpu_node(0), gpu_node(1)))
    plan = make_plan({"scaler": spec(autoscaling={"max_replicas": 2})}, inventory, estimates={"scaler": lump(2)})
    (model,) = json.loads(json.dumps(plan_to_dict(plan)))["models"]  # JSON-able, autoscaling included
    assert [slot["gpu_label"] for slot in model["slots"]] == ["box-0", "box-1"]
    assert model["autoscaling"]["max_replicas"] == 2
    print_plan(plan, Console(width=200))
    table = capsys.readouterr().out
    assert "box-0" in table and "box-1" in table and "autoscaling 1..2" in table


def test_a_replica_is_judged_by_its_gpu_nodes_label_not_its_node_id() -> None:
    from deployments.placement_status import role_status
    from placement.report import check_replica

    plan = {
        "node_id": "old-node-id",
        "gpu_indices": [0],
        "cuda_visible_devices": "0",
        "gpu_labels": ["box-0", "box-1"],
        "slots": [
            {"gpu_label": "box-0", "node_id": "old-node-id", "gpu_indices": [0], "cuda_visible_devices": "0"},
            {"gpu_label": "box-1", "node_id": "n1", "gpu_indices": [1], "cuda_visible_devices": "1"},
        ],
    }

    def replica(label: str, visible: str) -> dict[str, object]:
        return {"actual": {"node_id": "new-node-id", "gpu_label": label, "cuda_visible_devices": visible}}

    # A replacement node (new id) carrying box-1's label, seeing GPU 1: where the plan allows.
    assert check_replica("m", plan, replica("box-1", "1")) == []
    assert role_status("m", plan, replica("box-1", "1"), alive={"new-node-id", "box-1"}) == ("ok", "")
    kinds = {f.kind for f in check_replica("m", plan, replica("box-2", "2"))}
    assert kinds == {"node", "gpu"}  # another GPU node, and not the GPU any slot names
    assert {f.kind for f in check_replica("m", plan, replica("box-1", "0"))} == {"gpu"}
    # Unplaced only while none of its GPU nodes is in the cluster.
    status, reason = role_status("m", plan, {"error": "no replica"}, alive={"head-id"})
    assert status == "unplaced" and "box-0, box-1" in reason


def test_a_dry_run_can_plan_a_spec_as_per_gpu_nodes() -> None:
    from placement.inventory import parse_gpu_spec

    inventory = parse_gpu_spec("24GB,48GB", cpu_memory_bytes=8 * GIB).as_gpu_nodes()
    assert inventory.per_gpu_nodes
    plan = make_plan({"big": spec()}, inventory, estimates={"big": lump(30)})  # only the 48 GB card holds 30 GiB
    assert [(s.gpu_label, s.gpu_indices) for s in plan.entry("big").slots] == [("local-1", (1,))]
    head_node = next(node for node in inventory.nodes if not node.gpus)
    assert head_node.cpu_memory_bytes == 8 * GIB  # the machine's RAM stays with its GPU-less node
