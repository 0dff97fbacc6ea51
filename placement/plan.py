"""The plan: where each model runs, with its memory budget and the reason."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from placement.config import Autoscaling
from placement.estimate import MemoryEstimate
from placement.replica import ReplicaPlan

if TYPE_CHECKING:
    from placement.advice import Advice, Suggestion


@dataclass(frozen=True)
class GpuSlot:
    """Where one replica of a role runs in the per-GPU mode (placement.gpu_nodes): a GPU node, named
    by its stable `rayfit.io/gpu` label, and that node's GPU(s) by host index."""

    gpu_label: str
    node_id: str  # the node carrying the label when planned; a replacement node has another id
    gpu_indices: tuple[int, ...]
    fraction: float  # this replica's share of each of those GPUs (of the largest, for a group)
    gpu_uuids: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class PlanEntry:
    """Where one model (role) runs.

    On a GPU: `gpu_indices` holds one index, or several when split;
    `gpu_fractions` is the share of each of those GPUs that the model's replica
    holds (Ray resource units), its CUDA context included, and `fraction` the
    largest of them (the one number to show); `max_memory` is a split's weights
    per GPU (what accelerate may place there), keyed by the index *inside* the
    replica (after CUDA_VISIBLE_DEVICES); `cuda_context_bytes` is the context
    each replica's engine process holds on each of its GPUs, outside
    `memory_budget_bytes` (the torch side: weights, KV, runtime).
    On CPU: `device == "cpu"`, no GPU indices.
    """

    role: str
    model: str
    device: Literal["gpu", "cpu"]
    node_id: str
    estimate: MemoryEstimate
    memory_budget_bytes: int
    reason: str
    gpu_indices: tuple[int, ...] = ()
    gpu_uuids: tuple[str | None, ...] = ()
    fraction: float = 0.0
    gpu_fractions: tuple[float, ...] = ()  # per replica
    max_memory: dict[int, int] = field(default_factory=dict, hash=False, compare=False)
    num_cpus: float = 0.5
    # Every replica gets the same options (pin, slots, fraction): the plan
    # budgets `replicas` copies of the model on the same device(s), or, in the
    # per-GPU mode, one copy per entry of `slots` (spread over GPU nodes).
    replicas: int = 1
    # Per-GPU mode only: where each of the `replicas` copies is budgeted (empty otherwise).
    slots: tuple[GpuSlot, ...] = ()
    # Serve autoscaling between its min_replicas and `replicas` (its max), or None: `replicas` fixed.
    autoscaling: Autoscaling | None = None
    # Every number each replica's engine builds with (placement.replica); the planner always sets it.
    replica: ReplicaPlan | None = field(default=None, compare=False)
    # The CUDA context each replica's engine process holds on each of its GPUs (0 on CPU): charged to
    # the GPU's planned bytes and to `gpu_fractions`, outside the allocator caps (it is not torch's).
    cuda_context_bytes: int = 0
    # The card the config asked for (`accelerator:`), as its GPUs state it (Ray's accelerator type); None: any.
    accelerator: str | None = None

    @property
    def gpu_labels(self) -> tuple[str, ...]:
        """The GPU nodes (by label) this role's replicas may run on, sorted; () outside the per-GPU mode."""
        return tuple(sorted({slot.gpu_label for slot in self.slots}))

    def on_gpu_node(self, gpu_label: str) -> PlanEntry:
        """The entry as seen by a replica on GPU node `gpu_label`: node, GPUs and fraction of that slot.

        Raises ValueError when the plan budgets no replica of this role there.
        """
        for slot in self.slots:
            if slot.gpu_label == gpu_label:
                return replace(
                    self,
                    node_id=slot.node_id,
                    gpu_indices=slot.gpu_indices,
                    gpu_uuids=slot.gpu_uuids,
                    fraction=slot.fraction,
                    gpu_fractions=(slot.fraction,) * len(slot.gpu_indices),
                )
        raise ValueError(
            f"{self.role}: runs on GPU node {gpu_label!r}, but the plan budgets its replicas on "
            f"{', '.join(self.gpu_labels) or 'no GPU node'}"
        )

    def fraction_of(self, gpu_index: int) -> float:
        """This model's share of GPU `gpu_index` (0.0 when it does not use that GPU)."""
        if gpu_index not in self.gpu_indices:
            return 0.0
        if not self.gpu_fractions:  # a hand-made entry: one fraction for every GPU
            return self.fraction
        return self.gpu_fractions[self.gpu_indices.index(gpu_index)]

    @property
    def cuda_visible_devices(self) -> str:
        """The CUDA_VISIBLE_DEVICES a replica of this entry runs with: '1', '0,1', or '' on CPU.
        Built here only: the Ray options pin it (single-node mode) and the replica checks it."""
        if self.device == "cpu":
            return ""
        return ",".join(str(i) for i in self.gpu_indices)

    def on_cpu(self) -> PlanEntry:
        """This entry as the CPU fallback loads it (dev/test): on CPU, no GPUs."""
        return replace(
            self,
            device="cpu",
            gpu_indices=(),
            gpu_uuids=(),
            fraction=0.0,
            gpu_fractions=(),
            max_memory={},
            replica=self.replica.on_cpu() if self.replica else None,
        )

    @property
    def kv_budget_bytes(self) -> int | None:
        """The KV bytes the plan gave each replica; None when the estimate does not itemize KV (`memory_gb`)."""
        if self.estimate.source == "memory_gb" and self.estimate.kv_cache_bytes == 0:
            return None
        return self.estimate.kv_cache_bytes

    def gpu_budget_bytes(self, local_index: int) -> int:
        """The bytes torch's allocator may hold for this replica on its local cuda:<local_index> (the replica
        plan's cap: a split's weights there, plus the KV and runtime on cuda:0; else the whole budget)."""
        if self.replica is not None and local_index < len(self.replica.gpu_budgets):
            return self.replica.gpu_budgets[local_index]
        return self.max_memory.get(local_index, self.memory_budget_bytes) if self.is_split else self.memory_budget_bytes

    @property
    def is_split(self) -> bool:
        return len(self.gpu_indices) > 1

    @property
    def device_label(self) -> str:
        """'cuda:1', 'cuda:0+1' or 'cpu' as the user sees it on the host."""
        if self.device == "cpu":
            return "cpu"
        return "cuda:" + "+".join(str(i) for i in self.gpu_indices)


def placement_log_line(role: str, node_id: str, entry: PlanEntry) -> str:
    """The one line every log uses to say where a model goes.

    'buffer_agent → node abc123, cuda:1 (planned 15.20 GiB)'
    """
    planned = entry.memory_budget_bytes / 2**30
    return f"{role} → node {short_node_id(node_id)}, {entry.device_label} (planned {planned:.2f} GiB)"


def short_node_id(node_id: str) -> str:
    """A Ray node id's first 12 hex digits, as people read it ('local' stays 'local')."""
    return node_id[:12] if node_id else "?"


@dataclass(frozen=True)
class GpuUsage:
    """One GPU after planning: what it holds and what is left."""

    node_id: str
    index: int
    name: str | None
    uuid: str | None
    total_bytes: int
    usable_bytes: int
    planned_bytes: int  # every replica's budget here plus their CUDA contexts
    roles: tuple[str, ...]
    fraction_used: float
    cuda_contexts: int = 0  # replicas (engine processes) using this GPU: one CUDA context each
    cuda_context_bytes: int = 0  # of planned_bytes: those contexts

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.planned_bytes


@dataclass(frozen=True)
class Plan:
    entries: tuple[PlanEntry, ...]  # sorted by role
    gpus: tuple[GpuUsage, ...]  # sorted by (node, index)
    warnings: tuple[str, ...] = ()

    def entry(self, role: str) -> PlanEntry:
        for entry in self.entries:
            if entry.role == role:
                return entry
        raise KeyError(f"no model {role!r} in the plan; roles: {', '.join(e.role for e in self.entries)}")


@dataclass(frozen=True)
class Unplaced:
    role: str
    needed_bytes: int
    why: str
    # On a GPU, beside `needed_bytes` (the budgets): the CUDA contexts of its replicas' engine processes.
    context_bytes: int = 0
    contexts: int = 0


class PlanError(RuntimeError):
    """No feasible plan. The message names every model that does not fit,
    what it needs, and what each GPU has free; with `advice` (placement.advice),
    also the changes that make the plan feasible."""

    def __init__(self, message: str, unplaced: tuple[Unplaced, ...], advice: Advice | None = None):
        super().__init__(message)
        self.unplaced = unplaced
        self.advice = advice

    @property
    def suggestions(self) -> tuple[Suggestion, ...]:
        """The changes after which the whole plan is feasible, least change first; () when not computed."""
        return self.advice.suggestions if self.advice else ()
