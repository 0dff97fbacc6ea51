"""The KV budget of one replica, in the bytes the engine really allocates.

A replica holds KV cache in two places (deployments.engine):

- the **paged pool** of transformers' continuous batching, for
  `batch_sequences` requests of up to `context_length` tokens each. It is
  one preallocated tensor, so its size is known before any request arrives;
- **side slots**: requests the pool cannot take (a fixed `seed`, images) run
  one `generate` each with their own cache, at most `side_sequences` at once.

Both are computed here with transformers' own cache classes, so the planner
budgets exactly what the engine builds (their private parts are reached
through placement.hf_internals). The pool geometry follows
`generation/continuous_batching/cache.py` (transformers 5.25): layers are
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
from types import SimpleNamespace
from typing import Any

import torch

from placement import hf_internals
from placement.kv_geometry import KvBudget, PagedPool
from placement.sizing.kv_cache import AttentionShape

__all__ = ["KvBudget", "PagedPool", "fit_budget", "kv_budget", "paged_pool", "side_sequence_bytes"]

# Tokens per KV page. transformers' default is 256; 64 wastes less on short requests.
PAGE_SIZE = 64
# Requests that bypass the pool (seeded sampling, images) run at most this many at once.
SIDE_SEQUENCES = 1
_DTYPES = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32}


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
    allocators = hf_internals.cache_allocators(config, cache_dtype=cache_dtype, page_size=page_size)
    bytes_per_sector = hf_internals.sector_bytes(allocators)
    # Each allocator takes whole sectors for itself: the worst case is every
    # request at full length, each group rounded up to its own sectors.
    sectors = 0
    for allocator in allocators:
        blocks = sequences * hf_internals.blocks_per_request(allocator, context_length)
        sectors += math.ceil(blocks / (bytes_per_sector // hf_internals.block_bytes(allocator)))
    # transformers: sectors = ceil(num_blocks × bytes_per_block / bytes_per_sector), the block at full attention.
    block_bytes = config.num_hidden_layers * hf_internals.full_attention_page_bytes(
        config, cache_dtype=cache_dtype, page_size=page_size
    )
    num_blocks = max(1, sectors * bytes_per_sector // block_bytes)
    while math.ceil(num_blocks * block_bytes / bytes_per_sector) < sectors:
        num_blocks += 1
    actual_sectors = math.ceil(num_blocks * block_bytes / bytes_per_sector)
    return PagedPool(sequences, context_length, page_size, bytes_per_sector, actual_sectors, num_blocks)


# Prompt tokens per forward pass on the side path (deployments.engine.side prefills in passes of
# `min(SIDE_PREFILL_CHUNK, sliding_window)`; keep the two in step). A sliding layer's DynamicCache keeps a
# view over the whole last pass's K/V until the next step, so after a pass it holds window − 1 + chunk
# tokens. 256: within 1.25 windows for Gemma 3 (window 1024; 1.5 for the 270M's 512); a Gemma 3 image
# (256 tokens) fits one pass; and a pass reads each weight once per 256 tokens, near where a GPU's
# matmuls turn compute-bound. Never more than one window: a model with a small window (the tests' 64)
# prefills in passes of one window, holding at most 2 × window − 1.
SIDE_PREFILL_CHUNK = 256


def side_sequence_bytes(config: Any, *, context_length: int, dtype: torch.dtype | int) -> int:
    """The most bytes a side `generate` (DynamicCache) holds at once for one sequence of up to `context_length` tokens.

    - full-attention layers hold every token: `context_length`;
    - sliding layers, after a prefill pass of `chunk = min(SIDE_PREFILL_CHUNK, window)` tokens, hold that
      pass's whole K/V storage (the cache keeps a view of its last window − 1 tokens over it):
      `min(context_length, window − 1 + chunk)`; while decoding, `window`;
    - plus one layer more: DynamicCache grows a layer with torch.cat, which allocates the new storage while
      the old one is still held. Layers update one after another, so one layer at a time holds both: the
      largest layer's tokens once more. Priced rather than avoided: preallocating every full layer at
      `context_length` would hold the whole context for every short request and replace transformers'
      cache layers, for one layer's worth (27B at 4096: 32 MiB of 872).
    """
    per_layer_token = 2 * hf_internals.kv_heads(config) * hf_internals.head_dim(config) * _cache_dtype(dtype).itemsize
    tokens = largest = 0
    for kind, layers in hf_internals.layer_groups(config).items():
        if kind == "full_attention":
            held = context_length
        else:
            window = config.sliding_window
            held = min(context_length, window - 1 + min(SIDE_PREFILL_CHUNK, window))
        tokens += len(layers) * held
        largest = max(largest, held)
    return per_layer_token * (tokens + largest)


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
