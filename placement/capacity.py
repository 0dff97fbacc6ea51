"""What each placed role can hold: sequences and tokens its KV budget takes, and the room left beside it.

Read off the plan, never recomputed: the sequences and tokens come from the
replica plan's KV geometry (`ReplicaPlan.kv`, the pool and side slots the
engine builds exactly), the headroom from the planned GPUs (`GpuUsage`). Kept
free of torch and transformers: the CLI, the renderer and the ingress use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from placement.plan import GpuUsage, Plan, PlanEntry


@dataclass(frozen=True)
class GpuHeadroom:
    """Room a plan leaves on one GPU a role uses: usable bytes less every replica's budget and context there."""

    node_id: str
    index: int
    headroom_bytes: int


@dataclass(frozen=True)
class Capacity:
    """One replica's KV capacity, from its plan's geometry, and the room left on its GPUs.

    `sequences`: requests that may hold KV at once at `context_length` tokens each, the continuous
    batching pool's plus the side slots (seeded and image requests). `tokens_at_batch_1`: the pool's
    tokens (`pool_sequences × context_length`), all of which one sequence could use at batch 1
    (a model with sliding-window layers needs fewer pages for one long sequence than for many short
    ones, so for it this is a lower bound); without a pool, the side slots' tokens. A replica still
    caps each request at `context_length`: a longer one needs the spec's context raised. The fields
    are None where the plan has no KV geometry (a `memory_gb` lump, or a shape known only at load).
    """

    role: str
    context_length: int
    sequences: int | None
    pool_sequences: int | None
    side_sequences: int | None
    tokens_at_batch_1: int | None
    kv_bytes: int | None
    replicas: int
    gpus: tuple[GpuHeadroom, ...] = ()  # every GPU its replicas use, in (node, index) order; () on CPU

    @property
    def headroom_bytes(self) -> int | None:
        """The least room left on any of its GPUs (what one more sequence or model there must fit); None on CPU."""
        return min((g.headroom_bytes for g in self.gpus), default=None)

    def describe(self) -> str:
        """'4 × 4096 tok + 1 side; 16384 tok at batch 1' for the plan table."""
        if self.sequences is None:
            return f"KV not itemized (context {self.context_length})"
        if self.pool_sequences:
            held = f"{self.pool_sequences} × {self.context_length} tok + {self.side_sequences} side"
        else:
            held = f"{self.side_sequences} × {self.context_length} tok (no pool)"
        return f"{held}; {self.tokens_at_batch_1} tok at batch 1"

    def as_dict(self) -> dict[str, Any]:
        return {
            "context_length": self.context_length,
            "sequences": self.sequences,
            "pool_sequences": self.pool_sequences,
            "side_sequences": self.side_sequences,
            "tokens_at_batch_1": self.tokens_at_batch_1,
            "kv_bytes": self.kv_bytes,
            "replicas": self.replicas,
            "headroom_bytes": self.headroom_bytes,
            "gpus": [{"node_id": g.node_id, "index": g.index, "headroom_bytes": g.headroom_bytes} for g in self.gpus],
        }


def _gpus_of(entry: PlanEntry) -> tuple[tuple[str, int], ...]:
    """(node id, host index) of every GPU the entry's replicas use, sorted."""
    if entry.device != "gpu":
        return ()
    if entry.slots:
        places = {(slot.node_id, index) for slot in entry.slots for index in slot.gpu_indices}
    else:
        places = {(entry.node_id, index) for index in entry.gpu_indices}
    return tuple(sorted(places))


def entry_capacity(entry: PlanEntry, gpus: tuple[GpuUsage, ...] = ()) -> Capacity:
    """The capacity of one plan entry; `gpus`: the plan's GPUs, for the headroom (none: no headroom listed)."""
    usage = {(g.node_id, g.index): g for g in gpus}
    headroom = tuple(
        GpuHeadroom(node, index, usage[(node, index)].headroom_bytes)
        for node, index in _gpus_of(entry)
        if (node, index) in usage
    )
    replica = entry.replica
    context = replica.context_length if replica else entry.estimate.context_length
    kv = replica.kv if replica else None
    if kv is None:
        return Capacity(entry.role, context, None, None, None, None, entry.kv_budget_bytes, entry.replicas, headroom)
    pool = kv.pool
    pool_sequences = pool.sequences if pool else 0
    tokens = (pool.sequences * pool.context_length) if pool else kv.side_sequences * context
    return Capacity(
        role=entry.role,
        context_length=pool.context_length if pool else context,
        sequences=kv.sequences,
        pool_sequences=pool_sequences,
        side_sequences=kv.side_sequences,
        tokens_at_batch_1=tokens,
        kv_bytes=kv.total_bytes,
        replicas=entry.replicas,
        gpus=headroom,
    )


def plan_capacity(plan: Plan) -> dict[str, Capacity]:
    """role → its capacity, for every entry of `plan`."""
    return {entry.role: entry_capacity(entry, plan.gpus) for entry in plan.entries}
