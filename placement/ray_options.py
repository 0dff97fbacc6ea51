"""Plan entry → the Ray Serve options that put its replica on the planned GPU.

One pure function, `deployment_options`, derives everything; nothing else in
rayfit writes `ray_actor_options` by hand.

The scheme, and why (measured on Ray 2.60, see DESIGN.md):

- `num_gpus: 0`. Ray hands GPU replicas the lowest free GPU in creation order,
  so Ray's own GPU accounting cannot say "the 27B gets GPU 1". Worse, with a
  fractional `num_gpus` Ray first-fits fractions onto its internal GPU slots
  regardless of any pin: deploying 0.4@0, 0.4@1, 0.6@0, 0.6@1 in that order
  left the last one pending forever, and a replica restarted later lands
  wherever Ray has room. With `num_gpus: 0` there is no such hidden slot.
- `runtime_env.env_vars.CUDA_VISIBLE_DEVICES = "<i>"` (or "0,1" for a split)
  is what actually pins the replica to the planned GPU(s). CPU entries get
  `""` so a CPU model never grabs a GPU (with `num_gpus: 0` Ray 2.60 leaves
  the node's GPUs visible).
- GPU order: `CUDA_DEVICE_ORDER=PCI_BUS_ID` in every replica's env_vars (and
  in the inventory's probe tasks). The plan's GPU index is NVML's, which is
  PCI bus order; CUDA reads the indices in CUDA_VISIBLE_DEVICES in its own
  default FASTEST_FIRST order, so on a mixed box (24 GB + 48 GB) index 0
  could name the other card. With PCI_BUS_ID both agree. Chosen over pinning
  by UUID (`CUDA_VISIBLE_DEVICES=GPU-…`) because it is one rule for measured
  and declared GPUs alike (a declared GPU has no UUID), the pin stays the
  index the plan, the logs, the report and `PlanEntry.cuda_visible_devices`
  speak, and the start-up check still compares the visible card's UUID with
  the planned one (deployments.engine.verify), so a wrong card is refused either way.
- `RAYFIT_ROLE=<role>` in every replica's env_vars marks the process as a
  rayfit model replica: the inventory reads it from `/proc/<pid>/environ` of
  each process NVML lists on a GPU and counts that memory as the plan's own
  (placement.inventory), so a redeploy does not see its own models as
  strangers filling the GPUs.
- Every value here is a function of the plan entry alone (no free-memory
  figure, no time, no random id beyond the planned node): two builds of the
  same config on the same cluster give identical options, and Serve restarts
  a replica whenever its `ray_actor_options` change (deployments.versions).
- `resources: {"gpu_slot_<i>": fraction}` per GPU of the entry: one custom
  resource per GPU, declared when the node starts (`ray_start_args`), so Ray
  itself refuses to oversubscribe a GPU (a model aimed at a full GPU stays
  pending instead of running out of memory). Without it a third model aimed
  at a full GPU was started anyway.
  The cost: `ray.get_gpu_ids()` is empty inside the replica, and Ray's `GPU`
  count no longer protects these GPUs from other Ray workloads that ask for
  `num_gpus`; rayfit's deployments own the GPUs of a rayfit cluster.
- When the entry's node has no `gpu_slot_*` resources (e.g. `serve run`
  started its own Ray), the pin is kept but the slot resources are left out
  (asking for them would never schedule); `placement_warnings` says so.
- One Ray node per machine, holding all its GPUs: the pin replaces the node's
  own CUDA_VISIBLE_DEVICES, so GPU indices are host indices
  (`inventory_from_ray` refuses a node started with its own GPU subset, unless
  it is a labelled per-GPU node: then placement.gpu_node_options applies).
- Several nodes: the replica is sent to its planned node with
  `label_selector={"ray.io/node-id": <node id>}`. Ray 2.60 sets that label on
  every node by default (the only default label; measured), and a selector on
  it schedules actors there. A one-node inventory gets no selector: there is
  nothing to choose, and the plan then survives a Ray restart (new node id).
- `num_cpus` comes from the entry (0.5 by default): Serve's default of 1 CPU
  per replica keeps a router and two models from scheduling on a 2-core box.
- No `memory` request for CPU entries: Ray's `memory` resource is a logical
  share of RAM fixed at start; the planner already budgets against it.

This is the single-node mode: one Ray node per machine. When every GPU is its
own Ray node (placement.gpu_nodes), the planner gives each entry `slots` and
`placement.gpu_node_options` derives options where Ray accounts for the GPUs
itself (`num_gpus` > 0, a label_selector on the GPU's stable label, replicas
spread, autoscaling); `deployment_options` hands such entries over to it.
"""

from __future__ import annotations

import json
from typing import Any

from placement.gpu_node_options import gpu_node_options, replica_count_options
from placement.inventory import LOCAL_NODE, NODE_ID_LABEL, Inventory, Node
from placement.plan import PlanEntry

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
# CUDA numbers GPUs FASTEST_FIRST unless told otherwise; NVML (and so the plan) numbers them by PCI bus.
CUDA_DEVICE_ORDER = "CUDA_DEVICE_ORDER"
PCI_BUS_ID = "PCI_BUS_ID"
# Marks a process as a rayfit model replica (value: its role); read back by placement.ray_inventory.
ROLE_ENV = "RAYFIT_ROLE"
# One custom resource per GPU, `gpu_slot_0`, `gpu_slot_1`, ..., capacity 1 each.
GPU_SLOT_PREFIX = "gpu_slot_"


def gpu_slot_resource(index: int) -> str:
    """The custom Ray resource standing for GPU `index` of a node: 'gpu_slot_1'."""
    if index < 0:
        raise ValueError(f"GPU index must be >= 0, got {index}")
    return f"{GPU_SLOT_PREFIX}{index}"


def _node_of(entry: PlanEntry, inventory: Inventory) -> Node:
    for node in inventory.nodes:
        if node.node_id == entry.node_id:
            return node
    known = ", ".join(node.node_id for node in inventory.nodes) or "none"
    raise ValueError(
        f"model {entry.role!r} is planned on node {entry.node_id!r}, which is not in the inventory "
        f"(nodes: {known}); plan and inventory must come from the same cluster"
    )


def _needs_node_selector(entry: PlanEntry, inventory: Inventory) -> bool:
    # A spec/local inventory names its node LOCAL_NODE, not a Ray node id.
    return len(inventory.nodes) > 1 and entry.node_id != LOCAL_NODE


def deployment_options(entry: PlanEntry, inventory: Inventory) -> dict[str, Any]:
    """Serve deployment options for one plan entry: `{"ray_actor_options": {...}, "num_replicas": n}`.

    Pass the result to `Deployment.options(**result)`. Raises ValueError when
    the entry's node or GPUs are not in `inventory`. Conditions worth telling
    the user about (no slot resources on the node) come from
    `placement_warnings(entry, inventory)`; the options are valid either way.
    """
    if entry.slots:
        # Per-GPU mode: Ray sets CUDA_VISIBLE_DEVICES itself; the replica's node id may change (self-healing).
        return gpu_node_options(entry, {CUDA_DEVICE_ORDER: PCI_BUS_ID, ROLE_ENV: entry.role})
    node = _node_of(entry, inventory)
    actor: dict[str, Any] = {"num_cpus": entry.num_cpus, "num_gpus": 0}

    if entry.device == "gpu":
        if not entry.gpu_indices:
            raise ValueError(f"model {entry.role!r} is planned on a GPU but names no GPU index")
        if not 0 < entry.fraction <= 1:
            raise ValueError(f"model {entry.role!r}: GPU fraction must be in (0, 1], got {entry.fraction}")
        present = {gpu.index for gpu in node.gpus}
        missing = [i for i in entry.gpu_indices if i not in present]
        if missing:
            raise ValueError(
                f"model {entry.role!r} is planned on GPU {missing} of node {node.node_id!r}, "
                f"which has GPUs {sorted(present)}"
            )
        if node.has_gpu_slots:
            actor["resources"] = {gpu_slot_resource(i): entry.fraction_of(i) for i in entry.gpu_indices}

    actor["runtime_env"] = {
        "env_vars": {
            CUDA_VISIBLE_DEVICES: entry.cuda_visible_devices,
            CUDA_DEVICE_ORDER: PCI_BUS_ID,
            ROLE_ENV: entry.role,
        }
    }
    if _needs_node_selector(entry, inventory):
        actor["label_selector"] = {NODE_ID_LABEL: entry.node_id}
    # The plan budgeted exactly this many copies (autoscaling's max) on the planned device(s).
    return {"ray_actor_options": actor, **replica_count_options(entry)}


def placement_warnings(entry: PlanEntry, inventory: Inventory) -> tuple[str, ...]:
    """What `deployment_options` could not guarantee for this entry, as messages."""
    if entry.slots:
        return ()  # per-GPU mode: Ray's own GPU accounting guards every GPU
    node = _node_of(entry, inventory)
    if entry.device != "gpu" or node.has_gpu_slots:
        return ()
    start = " ".join(ray_start_args(max(len(node.gpus), max(entry.gpu_indices, default=0) + 1)))
    return (
        f"model {entry.role!r} is pinned to {entry.device_label} on node {node.node_id!r}, but that node has "
        f"no {GPU_SLOT_PREFIX}* resources, so Ray will not stop another replica from filling the same GPU. "
        f"Start Ray with `ray start {start}` (or one Ray node per GPU, Ray counting each: `python -m placement "
        "start-box`, the lines of `ray-start-args --per-gpu`) and deploy with --address/RAY_ADDRESS.",
    )


def ray_start_args(gpu_count: int, *, node_labels: dict[str, str] | None = None, head: bool = True) -> list[str]:
    """Arguments for `ray start` that declare `gpu_count` GPUs and their slots.

    e.g. `['--head', '--num-gpus=2', '--resources={"gpu_slot_0":1,"gpu_slot_1":1}']`.
    A worker node (`head=False`) still needs `--address=<head>` from the caller.
    """
    if gpu_count < 0:
        raise ValueError(f"gpu_count must be >= 0, got {gpu_count}")
    args = ["--head"] if head else []
    args.append(f"--num-gpus={gpu_count}")
    if gpu_count:
        slots = {gpu_slot_resource(i): 1 for i in range(gpu_count)}
        args.append("--resources=" + json.dumps(slots, separators=(",", ":")))
    if node_labels:
        for key, value in node_labels.items():
            # Ray's `--labels k=v,k2=v2` format cannot carry these characters.
            if any(ch in f"{key}{value}" for ch in ",= "):
                raise ValueError(f"node label {key}={value!r} must not contain ',', '=' or spaces")
        args.append("--labels=" + ",".join(f"{k}={v}" for k, v in sorted(node_labels.items())))
    return args
