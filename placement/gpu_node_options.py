"""Per-GPU mode: a plan entry → Serve options that let Ray itself account for the GPUs.

Used by `placement.ray_options.deployment_options` for entries the planner
placed on per-GPU nodes (`PlanEntry.slots`, placement.gpu_nodes). Why each
option (measured on Ray 2.60 with one raylet per declared GPU):

- `num_gpus: <fraction>`: the replica's share of its GPU. Each node has one
  GPU, so Ray's first-fit of fractions onto its internal GPU slots (the hazard
  that made the single-node mode use `num_gpus: 0`) has only one slot to pick.
  Ray sets CUDA_VISIBLE_DEVICES itself (the raylet's own index: host GPU
  `<i>`), `ray.get_gpu_ids()` returns `['<i>']`, `ray status` and the
  dashboard show the share in use, and a task asking for `num_gpus=1` is not
  scheduled onto a GPU rayfit holds any of. With replicas on GPUs of different
  sizes the smallest fraction is asked (a 48 GB card's share), so the
  fractions on any GPU never sum past 1; memory is guarded by the next item.
- `resources: {"rayfit_gpu_mib": <budget MiB>}`: the replica's memory budget
  and its engine process's CUDA context(s) against the node's declared GPU memory. This is what keeps a model from
  being started on a GPU without room for it, exactly, on mixed GPUs too.
- `label_selector: {"rayfit.io/gpu": "<label>" | "in(<a>,<b>)"}`: the GPU
  node(s) the plan budgeted a replica on, by stable label, never by
  `ray.io/node-id`: a node restarted (or a KubeRay pod recreated) with the same
  labels gets its replicas back; until then they stay pending. A role whose
  config asks for a card (`accelerator: A100`) also selects Ray's own
  `ray.io/accelerator-type` label, which each GPU node states for its own card
  (placement.gpu_nodes), so a node restarted with another card keeps it pending.
- `max_replicas_per_node`: the most replicas the plan put on one GPU node (1
  when spread), so Serve places copies of a role on different GPUs as planned
  rather than two on the first GPU with room.
- `num_replicas`, or `autoscaling_config` bounded by the replicas the plan
  reserved (`max_replicas` = `entry.replicas`): every replica Serve adds
  has a budgeted place.
- No CUDA_VISIBLE_DEVICES in `runtime_env` (Ray sets it); CUDA_DEVICE_ORDER and
  RAYFIT_ROLE as in the single-node mode.
- A split entry (its slot names a GPU group node) asks for the group's GPUs
  whole (`num_gpus: <k>`): Ray refuses fractions above 1, and the planner
  gives a group node to one split model only.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from placement.gpu_nodes import ACCELERATOR_TYPE_LABEL, GPU_LABEL, GPU_MEMORY_RESOURCE
from placement.plan import PlanEntry
from placement.units import MIB


def gpu_selector(labels: tuple[str, ...], accelerator: str | None = None) -> dict[str, str]:
    """Ray's label_selector for GPU nodes `labels`: one value, or `in(a,b)`; and, when the config asked
    for a card, Ray's own `ray.io/accelerator-type` label too."""
    if not labels:
        raise ValueError("a per-GPU entry names at least one GPU node")
    selector = {GPU_LABEL: labels[0] if len(labels) == 1 else f"in({','.join(labels)})"}
    if accelerator is not None:
        selector[ACCELERATOR_TYPE_LABEL] = accelerator
    return selector


def memory_mib(entry: PlanEntry) -> int:
    """The replica's memory in whole MiB, rounded up (the unit of `rayfit_gpu_mib`): its budget plus the CUDA
    context its engine process holds on each of its GPUs (outside the budget, but on the card all the same)."""
    return math.ceil((entry.memory_budget_bytes + entry.cuda_context_bytes * len(entry.gpu_indices)) / MIB)


def replica_count_options(entry: PlanEntry) -> dict[str, Any]:
    """`num_replicas`, or an `autoscaling_config` whose max is the replicas the plan budgeted."""
    scaling = entry.autoscaling
    if scaling is None:
        return {"num_replicas": entry.replicas}
    return {
        "autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": max(scaling.min_replicas, 1),
            "max_replicas": entry.replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "metrics_interval_s": scaling.metrics_interval_s,
            "look_back_period_s": scaling.look_back_period_s,
        }
    }


def gpu_node_options(entry: PlanEntry, env_vars: dict[str, str]) -> dict[str, Any]:
    """Serve deployment options for a per-GPU entry (`entry.slots` set); `env_vars` go to runtime_env."""
    if not entry.slots:
        raise ValueError(f"model {entry.role!r} has no per-GPU slots: use placement.ray_options")
    if entry.is_split:
        num_gpus: float = len(entry.gpu_indices)  # the group's GPUs, whole
    else:
        num_gpus = min(slot.fraction for slot in entry.slots)
        if not 0 < num_gpus <= 1:
            raise ValueError(f"model {entry.role!r}: GPU fraction must be in (0, 1], got {num_gpus}")
    actor: dict[str, Any] = {
        "num_cpus": entry.num_cpus,
        "num_gpus": num_gpus,
        "resources": {GPU_MEMORY_RESOURCE: memory_mib(entry)},
        "label_selector": gpu_selector(entry.gpu_labels, entry.accelerator),
        "runtime_env": {"env_vars": dict(env_vars)},
    }
    per_node = max(Counter(slot.gpu_label for slot in entry.slots).values())
    return {"ray_actor_options": actor, "max_replicas_per_node": per_node, **replica_count_options(entry)}
