"""What GPUs exist: nodes, their GPUs, and the memory usable on each.

An inventory is a plain value. It comes from a CLI spec (`--gpus 2x24GB`),
from a running Ray cluster (`placement.ray_inventory`), or from a test. The
planner only ever sees this value.

Memory a plan may use on a GPU (`Reserve.usable_bytes`) is the GPU's total
less what OTHER processes hold, never plain free memory: a redeploy plans
while the app's own replicas still hold their GPUs, and that memory is the new
plan's to give again (Serve stops a replica before it starts its successor:
`max_surge_percent` is 0 by default; the `gpu_slot_<i>` resources keep a
successor pending until the old replica has gone). The rule, per GPU:

    foreign   = (total - free) - memory of rayfit model replicas (NVML per-process usage)
    available = total - foreign, foreign rounded UP to MEMORY_GRAIN

`total - free` includes what NVML cannot attribute (the driver's own
reservation, processes in other PID namespaces, a process whose usage NVML
does not report): all of that counts as foreign, so the rule errs towards
less room. Rounding to a coarse grain keeps a few MiB of noise from changing
the plan. Declared GPUs (no free figure) are all available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from placement.gpu_nodes import GpuNodeInfo, gpu_node_labels, gpu_node_of
from placement.units import GIB, MIB, parse_size

# CUDA context, cuBLAS workspace and the allocator's first blocks take about
# this much on every GPU a process touches, before any weight is loaded
# (measured 0.3-0.6 GiB, growing as kernels load). The planner charges one per
# replica on each GPU it uses: each replica's engine process (or, with
# `engine_process: false`, the replica itself) holds its own.
CUDA_CONTEXT_BYTES = 512 * MIB
# Keep this share of each GPU free: fragmentation and peaks the estimate misses.
DEFAULT_SAFETY_MARGIN = 0.05
# The head node's name when the inventory comes from a spec rather than Ray.
LOCAL_NODE = "local"
# Memory held by other processes is rounded up to this before planning: free
# memory drifts by a few MiB, and the plan must not drift with it.
MEMORY_GRAIN = 256 * MIB
# Set by Ray 2.60 on every node, with the node's (random, per start) hex id as value.
NODE_ID_LABEL = "ray.io/node-id"


class InventoryError(RuntimeError):
    """The GPUs cannot be described as asked (unmeasurable, inconsistent); the message says what to pass."""


@dataclass(frozen=True)
class GpuProcess:
    """One process holding memory on a GPU, as the driver (NVML) lists it."""

    pid: int
    used_bytes: int | None  # None when the driver does not say (then it cannot be counted as rayfit's)
    # The model role when the process is a rayfit model replica (its environment
    # carries placement.ray_options.ROLE_ENV), else None: a foreign process.
    rayfit_role: str | None = None


@dataclass(frozen=True)
class Gpu:
    """One GPU as its node sees it (index = NVML's, i.e. PCI bus order; see placement.ray_options)."""

    index: int
    total_bytes: int
    free_bytes: int | None = None  # None when unknown (declared, not measured)
    name: str | None = None
    uuid: str | None = None
    # Every process NVML lists on this GPU; () when not measured.
    processes: tuple[GpuProcess, ...] = ()

    @property
    def rayfit_bytes(self) -> int:
        """Memory rayfit's own model replicas hold here (what NVML reports for them)."""
        return sum(p.used_bytes or 0 for p in self.processes if p.rayfit_role is not None)

    @property
    def foreign_bytes(self) -> int:
        """Memory held by anything but rayfit's model replicas: used less rayfit's (0 when not measured)."""
        if self.free_bytes is None:
            return 0
        used = self.total_bytes - min(self.free_bytes, self.total_bytes)
        return max(used - self.rayfit_bytes, 0)


@dataclass(frozen=True)
class Node:
    """One Ray node (or the local machine)."""

    node_id: str
    gpus: tuple[Gpu, ...] = ()
    cpu_memory_bytes: int | None = None  # RAM available for CPU-placed models
    address: str | None = None
    # True when the node was started with one `gpu_slot_<i>` resource per GPU,
    # so Ray itself refuses to oversubscribe a GPU (see placement.ray_options).
    has_gpu_slots: bool = False
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    hostname: str | None = None

    @property
    def gpu_node(self) -> GpuNodeInfo | None:
        """Its per-GPU identity (`rayfit.io/gpu` and friends, placement.gpu_nodes), or None."""
        return gpu_node_of(self.labels)

    def sort_key(self) -> tuple[tuple[tuple[str, str], ...], str, str, str]:
        """A key that survives a Ray restart: the node's own labels (not Ray's node id label), then
        host name, then address; the random node id only breaks what is still tied."""
        labels = tuple(sorted((k, v) for k, v in self.labels.items() if k != NODE_ID_LABEL))
        gpu_node = self.gpu_node
        if gpu_node is not None:  # per-GPU nodes: by host, then host GPU index as a number (GPU 10 after GPU 9)
            labels = (("host", gpu_node.host), ("gpu", f"{min(gpu_node.indices):06d}"))
        return labels, self.hostname or "", self.address or "", self.node_id


@dataclass(frozen=True)
class Reserve:
    """What a plan holds back: a safety margin on every GPU, and a CUDA context per process using one.

    `cuda_context_bytes` is charged by the planner per replica on each GPU that replica uses (every
    engine process opens its own context, outside torch's allocator and so outside its cap), not once
    per GPU: two models, or two replicas, on one GPU are two contexts. No per-GPU context is held back
    here, because no other rayfit process opens one: a replica whose engine runs apart never imports
    torch, and Ray's processes and the planner read GPUs through NVML, which opens none. What the
    driver or a foreign process holds is subtracted from a measured GPU (`usable_bytes`); on a declared
    one the margin covers it.
    """

    cuda_context_bytes: int = CUDA_CONTEXT_BYTES
    safety_margin: float = DEFAULT_SAFETY_MARGIN

    def capacity_bytes(self, gpu: Gpu) -> int:
        """What a plan could fill on `gpu` (its replicas' budgets and contexts) if nothing else held memory:
        total less the margin.

        Fixed per GPU model, so GPU fractions measured against it never drift with free memory.
        """
        return max(gpu.total_bytes - int(self.safety_margin * gpu.total_bytes), 0)

    def usable_bytes(self, gpu: Gpu) -> int:
        """Memory a plan may fill on `gpu`: its capacity less what other processes hold (module docstring)."""
        foreign = math.ceil(gpu.foreign_bytes / MEMORY_GRAIN) * MEMORY_GRAIN
        return max(self.capacity_bytes(gpu) - foreign, 0)


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[Node, ...]

    @property
    def gpu_count(self) -> int:
        return sum(len(node.gpus) for node in self.nodes)

    @property
    def per_gpu_nodes(self) -> bool:
        """True when every node holding GPUs is a per-GPU (or GPU group) node: Ray accounts for each GPU
        itself (placement.gpu_nodes), so replicas ask for `num_gpus` and select GPU nodes by label."""
        gpu_nodes = [node for node in self.nodes if node.gpus]
        return bool(gpu_nodes) and all(node.gpu_node is not None for node in gpu_nodes)

    def as_gpu_nodes(self) -> Inventory:
        """The same machines started in the per-GPU mode (placement.gpu_nodes): each node's GPUs become
        one labelled node each, and the node itself a GPU-less one keeping its RAM. For dry-run plans."""
        nodes: list[Node] = []
        for node in self.nodes:
            nodes.append(replace(node, gpus=()))
            host = node.hostname or node.node_id[:12]
            for gpu in node.gpus:
                labels = gpu_node_labels(host, [gpu.index], gpu.total_bytes, gpu.name)
                nodes.append(Node(node_id=labels["rayfit.io/gpu"], gpus=(gpu,), labels=labels, hostname=node.hostname))
        return Inventory(nodes=tuple(nodes))

    def sorted_nodes(self) -> tuple[Node, ...]:
        """Nodes in a stable order (`Node.sort_key`): neither discovery order nor Ray's random node
        ids decide which node is "first", so a plan survives a cluster restart."""
        return tuple(sorted(self.nodes, key=Node.sort_key))


def parse_gpu_spec(spec: str, *, cpu_memory_bytes: int | None = None) -> Inventory:
    """An inventory of one local node from `2x24GB`, `24GB,48GB`, `1x80GiB` or `none`.

    The GPUs are declared, not measured: free memory is taken as their total.
    """
    text = spec.strip().lower()
    if text in {"none", "0", "cpu", ""}:
        gpus: list[Gpu] = []
    else:
        sizes: list[int] = []
        for part in text.split(","):
            count_text, sep, size_text = part.strip().partition("x")
            if sep and count_text.strip().isdigit():
                count, size = int(count_text), parse_size(size_text)
            else:
                count, size = 1, parse_size(part)
            if count < 1 or size <= 0:
                raise ValueError(f"GPU spec {spec!r}: each part needs a positive count and size, e.g. 2x24GB")
            sizes.extend([size] * count)
        gpus = [Gpu(index=i, total_bytes=size) for i, size in enumerate(sizes)]
    return Inventory(
        nodes=(Node(node_id=LOCAL_NODE, gpus=tuple(gpus), cpu_memory_bytes=cpu_memory_bytes, has_gpu_slots=True),)
    )


def describe_gpu(gpu: Gpu) -> str:
    """'GPU 1 (NVIDIA RTX 3090, 24.00 GiB)' for messages."""
    name = f"{gpu.name}, " if gpu.name else ""
    return f"GPU {gpu.index} ({name}{gpu.total_bytes / GIB:.2f} GiB)"
