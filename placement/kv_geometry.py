"""The KV cache a replica holds, as plain numbers: the plan's side of the contract.

`placement.sizing.kv_budget` computes these from a model's attention shape with
transformers' own cache classes; the engine (deployments.engine) receives them
in its replica plan and builds exactly this — it computes none of them itself.
Kept free of torch and transformers so a plan can be read, pickled and shown
anywhere (the CLI, the ingress, a replica whose engine runs apart).
"""

from __future__ import annotations

from dataclasses import dataclass

# The pool's two never-allocated trash sectors (transformers: padding reads and writes).
TRASH_SECTORS = 2


@dataclass(frozen=True)
class PagedPool:
    """The continuous-batching cache tensor for `sequences` requests of `context_length` tokens."""

    sequences: int
    context_length: int
    page_size: int
    bytes_per_sector: int
    sectors: int  # data sectors, trash excluded
    num_blocks: int  # the `ContinuousBatchingConfig.num_blocks` that yields `sectors`

    @property
    def cache_bytes(self) -> int:
        """Bytes of the one cache tensor transformers allocates (data + trash sectors)."""
        return (self.sectors + TRASH_SECTORS) * self.bytes_per_sector


@dataclass(frozen=True)
class KvBudget:
    """Every KV byte one replica may hold: the pool (None when continuous batching is off) plus side slots."""

    pool: PagedPool | None
    side_sequences: int
    side_bytes_per_sequence: int

    @property
    def pool_bytes(self) -> int:
        return self.pool.cache_bytes if self.pool else 0

    @property
    def side_bytes(self) -> int:
        return self.side_sequences * self.side_bytes_per_sequence

    @property
    def total_bytes(self) -> int:
        return self.pool_bytes + self.side_bytes

    @property
    def sequences(self) -> int:
        """Requests that may hold KV at once: the pool's batch plus the side slots."""
        return (self.pool.sequences if self.pool else 0) + self.side_sequences

    def describe(self) -> str:
        """'paged pool 4 × 4096 tokens (25 sectors of 130 MiB) + 1 side sequence'."""
        side = f"{self.side_sequences} side sequence(s) for seeded/image requests"
        if self.pool is None:
            return side
        sector_mib = self.pool.bytes_per_sector / 2**20
        return (
            f"paged pool {self.pool.sequences} × {self.pool.context_length} tokens "
            f"({self.pool.sectors}+{TRASH_SECTORS} sectors of {sector_mib:.1f} MiB) + {side}"
        )
