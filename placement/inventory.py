"""What GPUs exist: nodes, their GPUs, and the memory usable on each.

An inventory is a plain value. It comes from a CLI spec (`--gpus 2x24GB`),
from a running Ray cluster (`placement.ray_inventory`), or from a test. The
planner only ever sees this value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from placement.units import GIB, MIB, parse_size

# CUDA context, cuBLAS workspace and the allocator's first blocks take about
# this much on every GPU a process touches, before any weight is loaded.
CUDA_CONTEXT_BYTES = 512 * MIB
# Keep this share of each GPU free: fragmentation and peaks the estimate misses.
DEFAULT_SAFETY_MARGIN = 0.05
# The head node's name when the inventory comes from a spec rather than Ray.
LOCAL_NODE = "local"


class InventoryError(RuntimeError):
    """The GPUs cannot be described as asked (unmeasurable, inconsistent); the message says what to pass."""


@dataclass(frozen=True)
class Gpu:
    """One GPU as its node sees it (index = position in the node's CUDA_VISIBLE_DEVICES order)."""

    index: int
    total_bytes: int
    free_bytes: int | None = None  # None when unknown (declared, not measured)
    name: str | None = None
    uuid: str | None = None


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


@dataclass(frozen=True)
class Reserve:
    """What is held back on every GPU before planning."""

    cuda_context_bytes: int = CUDA_CONTEXT_BYTES
    safety_margin: float = DEFAULT_SAFETY_MARGIN

    def usable_bytes(self, gpu: Gpu) -> int:
        """Memory a plan may fill on `gpu`: free (or total) less context and margin."""
        available = gpu.total_bytes if gpu.free_bytes is None else min(gpu.free_bytes, gpu.total_bytes)
        usable = available - self.cuda_context_bytes - int(self.safety_margin * gpu.total_bytes)
        return max(usable, 0)


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[Node, ...]

    @property
    def gpu_count(self) -> int:
        return sum(len(node.gpus) for node in self.nodes)

    def sorted_nodes(self) -> tuple[Node, ...]:
        """Nodes in a stable order: the planner never depends on discovery order."""
        return tuple(sorted(self.nodes, key=lambda node: node.node_id))


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
