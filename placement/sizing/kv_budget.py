"""The KV budget of one replica, in the bytes the engine really allocates.

A replica holds KV cache in two places (deployments.engine):

- the **paged pool** of transformers' continuous batching, for
  `batch_sequences` requests of up to `context_length` tokens each. It is
  one preallocated tensor, so its size is known before any request arrives;
- **side slots**: requests the pool cannot take (a fixed `seed`, images) run
  one `generate` each with their own cache, at most `side_sequences` at once.

Both are computed here with transformers' own cache classes, so the planner
budgets exactly what the engine builds. The pool geometry follows
`generation/continuous_batching/cache.py` (transformers 5.24): layers are
grouped by attention type, each group gets blocks of one page per layer, a
*sector* is the least common multiple of the groups' block sizes, and the
tensor holds the data sectors plus two trash sectors. Sliding-window layers
need only `ceil(window / page)` pages per request. transformers' `num_blocks`
setting is NOT a page count: it converts it to bytes as every layer at full
attention (`num_hidden_layers × full page`), so `PagedPool.num_blocks` is the
value that yields exactly `sectors` data sectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from transformers.generation.continuous_batching.cache import ATTN_TYPE_TO_ALLOCATOR, group_layers_by_attn_type
from transformers.generation.continuous_batching.cache_allocators import FullAttentionCacheAllocator
from transformers.generation.continuous_batching.utils import find_head_dim, find_num_key_value_heads

from placement.sizing.kv_cache import AttentionShape

# Tokens per KV page. transformers' default is 256; 64 wastes less on short requests.
PAGE_SIZE = 64
# Requests that bypass the pool (seeded sampling, images) run at most this many at once.
SIDE_SEQUENCES = 1
# The pool's two never-allocated trash sectors (padding reads and writes).
TRASH_SECTORS = 2
# transformers aligns sectors to this many bytes.
_SECTOR_ALIGNMENT = 128

_DTYPES = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32}


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


def config_from_shape(shape: AttentionShape) -> SimpleNamespace:
    """The fields transformers' cache classes read, from rayfit's AttentionShape.

    `layer_types` is written out in full: without it transformers treats a
    config that has a `sliding_window` as all sliding layers.
    """
    layer_types = list(shape.layer_types) or ["full_attention"] * shape.num_layers
    return SimpleNamespace(
        num_hidden_layers=shape.num_layers,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        sliding_window=shape.sliding_window,
        layer_types=layer_types if shape.sliding_window else ["full_attention"] * shape.num_layers,
    )


def _cache_dtype(dtype: torch.dtype | int) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else _DTYPES[dtype]


def paged_pool(
    config: Any, *, sequences: int, context_length: int, dtype: torch.dtype | int, page_size: int = PAGE_SIZE
) -> PagedPool:
    """The pool transformers builds to hold `sequences` requests of `context_length` tokens.

    `config`: a text config (or `config_from_shape(...)`); `dtype`: the cache
    dtype (the model's) or its size in bytes.
    """
    if sequences < 1 or context_length < 1:
        raise ValueError(f"a pool needs sequences ≥ 1 and context_length ≥ 1, got {sequences}, {context_length}")
    cache_dtype = _cache_dtype(dtype)
    kv_heads = find_num_key_value_heads(config)
    allocators = [
        ATTN_TYPE_TO_ALLOCATOR[kind](
            index=index,
            layer_indices=layers,
            config=config,
            num_key_value_heads=kv_heads,
            cache_dtype=cache_dtype,
            page_size=page_size,
            allow_block_sharing=False,
        )
        for index, (kind, layers) in enumerate(group_layers_by_attn_type(config).items())
    ]
    bytes_per_sector = math.lcm(*(a.bytes_per_block for a in allocators), _SECTOR_ALIGNMENT)
    # Each allocator takes whole sectors for itself: the worst case is every
    # request at full length, each group rounded up to its own sectors.
    sectors = 0
    for allocator in allocators:
        blocks = sequences * allocator._compute_blocks_needed(0, 0, context_length)
        sectors += math.ceil(blocks / (bytes_per_sector // allocator.bytes_per_block))
    # transformers: sectors = ceil(num_blocks × bytes_per_block / bytes_per_sector), the block at full attention.
    block_bytes = config.num_hidden_layers * FullAttentionCacheAllocator.get_bytes_per_page(
        kv_heads, find_head_dim(config), cache_dtype, page_size
    )
    num_blocks = max(1, sectors * bytes_per_sector // block_bytes)
    while math.ceil(num_blocks * block_bytes / bytes_per_sector) < sectors:
        num_blocks += 1
    actual_sectors = math.ceil(num_blocks * block_bytes / bytes_per_sector)
    return PagedPool(sequences, context_length, page_size, bytes_per_sector, actual_sectors, num_blocks)


def side_sequence_bytes(config: Any, *, context_length: int, dtype: torch.dtype | int) -> int:
    """Bytes of a `generate` DynamicCache holding one sequence of `context_length` tokens.

    Full-attention layers hold every token; sliding layers keep window − 1
    tokens plus the one being added (transformers' DynamicSlidingWindowLayer).
    """
    per_layer_token = 2 * find_num_key_value_heads(config) * find_head_dim(config) * _cache_dtype(dtype).itemsize
    tokens = 0
    for kind, layers in group_layers_by_attn_type(config).items():
        held = context_length if kind == "full_attention" else min(context_length, config.sliding_window)
        tokens += len(layers) * held
    return per_layer_token * tokens


def kv_budget(
    config: Any,
    *,
    batch_sequences: int,
    context_length: int,
    dtype: torch.dtype | int,
    continuous: bool = True,
    side_sequences: int = SIDE_SEQUENCES,
    page_size: int = PAGE_SIZE,
) -> KvBudget:
    """The whole KV budget of a replica serving `batch_sequences` requests at once (plus side slots)."""
    pool = (
        paged_pool(config, sequences=batch_sequences, context_length=context_length, dtype=dtype, page_size=page_size)
        if continuous
        else None
    )
    # Without the pool every request runs on the classic path: the batch itself becomes side slots.
    side = side_sequences if continuous else batch_sequences
    return KvBudget(pool, side, side_sequence_bytes(config, context_length=context_length, dtype=dtype))


def fit_budget(
    config: Any,
    *,
    planned_bytes: int | None,
    batch_sequences: int,
    context_length: int,
    dtype: torch.dtype | int,
    continuous: bool = True,
    page_size: int = PAGE_SIZE,
) -> KvBudget:
    """The largest budget (batch sequences ≤ `batch_sequences`) within `planned_bytes`.

    `planned_bytes=None` (a `memory_gb` override: KV not itemized) takes the
    full batch. When even one sequence does not fit, one is still returned:
    the replica reports actual > planned and `placement report` flags it.
    """
    for sequences in range(batch_sequences, 0, -1):
        budget = kv_budget(
            config,
            batch_sequences=sequences,
            context_length=context_length,
            dtype=dtype,
            continuous=continuous,
            page_size=page_size,
        )
        if planned_bytes is None or budget.total_bytes <= planned_bytes:
            return budget
    return budget
