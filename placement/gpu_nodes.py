"""One Ray node per GPU: the labels and resources such a node declares, and its `ray start` line.

The per-GPU mode (README "Which placement mode when"): each GPU of a box is its
own raylet, started with only that GPU visible (`CUDA_VISIBLE_DEVICES=<i>`) and
`--num-gpus=1`. Ray then accounts for every GPU itself: a replica asks for
`num_gpus: <fraction>` plus a `label_selector` naming the GPU node(s) the plan
allows, Ray sets the replica's CUDA_VISIBLE_DEVICES (mapped through the
raylet's own, so the replica sees host index `<i>` and `ray.get_gpu_ids()`
returns `['<i>']`; measured on Ray 2.60), `ray status` shows the GPU in use,
and a Ray task asking for a whole GPU is never scheduled onto one rayfit
holds a share of.

What a GPU node declares (all read back by placement.ray_inventory):

- label `rayfit.io/gpu=<host>-<index>`: the GPU's stable name. Replicas select
  on it, never on `ray.io/node-id`, so a replacement node started with the
  same labels (the box restarted, a KubeRay pod recreated) gets its models back.
- labels `rayfit.io/host`, `rayfit.io/gpu-index`, `rayfit.io/gpu-memory-mib`:
  what the planner needs without probing (the GPU's host index and size;
  declared GPUs on a CPU box have nothing to probe).
- Ray's own label `ray.io/accelerator-type=<T>` and resource
  `accelerator_type:<T>` for the card this node owns, given explicitly: Ray
  2.60 detects a node's type from NVML index 0 whatever CUDA_VISIBLE_DEVICES
  says, so on a mixed box GPU 1's raylet would advertise GPU 0's card. A label
  given to `ray start` overrides Ray's detected one; the detected *resource*
  cannot be removed, so on a mixed box a node carries its own type's resource
  and GPU 0's too. rayfit's replicas select on the label (placement.gpu_node_options),
  which is always right; `<T>` is Ray's name for the card ('A100', 'GeForce-RTX-3090').
- resource `rayfit_gpu_mib: <the GPU's MiB>`: a per-GPU memory resource.
  A replica asks for its planned bytes in MiB, so Ray's accounting is
  memory-correct on mixed GPUs: a 0.5 share of a 48 GB card is not a 0.5
  share of a 24 GB one, but 10000 MiB is 10000 MiB on either.

A split model (one that fits no single GPU) needs a node that owns its GPU
group: a raylet started with `CUDA_VISIBLE_DEVICES=0,1 --num-gpus=2`, labelled
`rayfit.io/gpu=<host>-0_1` and `rayfit.io/gpu-index=0_1` (`gpu_group_start_line`).
The planner puts only split models there, and a split replica asks for the
group's GPUs whole (`num_gpus: 2`; Ray refuses fractions above 1), so a group
node holds one split model and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from placement.units import MIB

GPU_LABEL = "rayfit.io/gpu"
HOST_LABEL = "rayfit.io/host"
GPU_INDEX_LABEL = "rayfit.io/gpu-index"
GPU_MEMORY_LABEL = "rayfit.io/gpu-memory-mib"
# Ray's own label and resource prefix for a node's accelerator type (Ray 2.60).
ACCELERATOR_TYPE_LABEL = "ray.io/accelerator-type"
ACCELERATOR_RESOURCE_PREFIX = "accelerator_type:"
# Custom resource: the GPU's memory in MiB (a group node: the sum over its GPUs).
GPU_MEMORY_RESOURCE = "rayfit_gpu_mib"
# Joins a group's indices in label values ('0_1'): Ray label values allow [A-Za-z0-9._-] only.
GROUP_JOIN = "_"
# Ray label values: up to 63 characters, alphanumeric at both ends, `-_.` inside.
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass(frozen=True)
class GpuNodeInfo:
    """What a per-GPU (or GPU group) node says about itself in its labels."""

    gpu_label: str
    host: str
    indices: tuple[int, ...]  # host GPU indices (PCI bus order), one unless a group
    memory_bytes: int | None  # each GPU's total, when labelled

    @property
    def is_group(self) -> bool:
        return len(self.indices) > 1


def label_value(text: str) -> str:
    """`text` as a valid Ray label value: other characters become '-', trimmed to 63."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", text).strip("-_.")[:63].strip("-_.")
    if not cleaned:
        raise ValueError(f"{text!r} has no character usable in a Ray label value")
    return cleaned


def gpu_label_value(host: str, indices: Sequence[int]) -> str:
    """The `rayfit.io/gpu` value of GPU(s) `indices` on `host`: 'box-1', 'box-0_1'."""
    if not indices or any(i < 0 for i in indices):
        raise ValueError(f"GPU indices must be non-negative and not empty, got {list(indices)}")
    return label_value(f"{host}-{GROUP_JOIN.join(str(i) for i in indices)}")


def gpu_node_labels(
    host: str, indices: Sequence[int], memory_bytes: int, accelerator: str | None = None
) -> dict[str, str]:
    """Labels of the node owning GPU(s) `indices` of `host`, each GPU `memory_bytes`."""
    if memory_bytes <= 0:
        raise ValueError(f"GPU memory must be positive, got {memory_bytes}")
    labels = {
        GPU_LABEL: gpu_label_value(host, indices),
        HOST_LABEL: label_value(host),
        GPU_INDEX_LABEL: GROUP_JOIN.join(str(i) for i in indices),
        GPU_MEMORY_LABEL: str(memory_bytes // MIB),
    }
    if accelerator:
        labels[ACCELERATOR_TYPE_LABEL] = accelerator_type(accelerator)
    return labels


def accelerator_type(gpu_name: str) -> str:
    """Ray's accelerator type for a GPU's NVML name, as Ray derives it for its own label and resource:
    'NVIDIA A100-SXM4-40GB' → 'A100', 'NVIDIA GeForce RTX 3090' → 'GeForce-RTX-3090'. A name that is
    already a type ('A100') maps to itself."""
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    derived = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(gpu_name.strip())
    return label_value(derived or gpu_name)


def node_accelerator_type(labels: dict[str, str], gpu_name: str | None) -> str | None:
    """The accelerator type of a GPU on a node: a per-GPU node's `ray.io/accelerator-type` label (what a
    replica's selector matches), else the GPU's own name (a single node's label names only GPU 0's card)."""
    if gpu_node_of(labels) is not None and labels.get(ACCELERATOR_TYPE_LABEL):
        return labels[ACCELERATOR_TYPE_LABEL]
    return accelerator_type(gpu_name) if gpu_name else None


def gpu_node_of(labels: dict[str, str]) -> GpuNodeInfo | None:
    """A node's per-GPU identity from its labels; None for a node not started this way."""
    label = labels.get(GPU_LABEL)
    if not label:
        return None
    index_text = labels.get(GPU_INDEX_LABEL, "")
    try:
        indices = tuple(int(part) for part in index_text.split(GROUP_JOIN))
    except ValueError:
        raise ValueError(
            f"node {GPU_LABEL}={label}: {GPU_INDEX_LABEL}={index_text!r} is not '<i>' or '<i>_<j>'"
        ) from None
    memory = labels.get(GPU_MEMORY_LABEL)
    return GpuNodeInfo(
        gpu_label=label,
        host=labels.get(HOST_LABEL, ""),
        indices=indices,
        memory_bytes=int(memory) * MIB if memory and memory.isdigit() else None,
    )


def gpu_node_start_args(
    host: str,
    indices: Sequence[int],
    memory_bytes: int,
    *,
    address: str,
    accelerator: str | None = None,
    agent_port: int | None = None,
) -> list[str]:
    """`ray start` arguments of the worker owning GPU(s) `indices` (run it with CUDA_VISIBLE_DEVICES set)."""
    labels = gpu_node_labels(host, indices, memory_bytes, accelerator)
    for value in labels.values():
        if not _LABEL_VALUE.match(value):
            raise ValueError(f"label value {value!r} is not a valid Ray label value")
    resources: dict[str, int] = {GPU_MEMORY_RESOURCE: (memory_bytes // MIB) * len(indices)}
    if ACCELERATOR_TYPE_LABEL in labels:
        resources[ACCELERATOR_RESOURCE_PREFIX + labels[ACCELERATOR_TYPE_LABEL]] = 1
    args = [
        f"--address={address}",
        f"--num-gpus={len(indices)}",
        "--resources=" + json.dumps(resources, separators=(",", ":")),
        "--labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
    ]
    if agent_port is not None:
        args.append(f"--dashboard-agent-listen-port={agent_port}")
    return args
