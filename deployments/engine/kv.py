"""Admission and accounting for the KV cache of one replica.

The plan budgets a fixed number of sequences (placement.sizing.kv_budget):
the paged pool's batch and a few side slots. `SequenceSlots` is the one gate
every request passes before it may hold KV: a request that finds no free slot
waits (in the replica's queue, bounded by Serve's max_ongoing_requests and
max_queued_requests, beyond which callers get 503 + Retry-After) and never
allocates. `KvLedger` records the KV bytes really held, from the tensors
themselves, so tests and `/v1/placement` can hold them against the plan.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# How often a waiting request looks at its cancel flag.
_CANCEL_POLL_S = 0.05


class RequestCancelled(Exception):
    """The caller went away (client disconnect) while the request waited or decoded; nothing is left of it."""


class SequenceSlots:
    """At most `capacity` sequences hold KV at once; `hold(n)` waits for n free slots."""

    def __init__(self, capacity: int, name: str):
        if capacity < 1:
            raise ValueError(f"{name}: a slot gate needs capacity ≥ 1, got {capacity}")
        self.capacity = capacity
        self.name = name
        self._free = capacity
        self._changed = threading.Condition()
        self.peak_in_use = 0

    @property
    def in_use(self) -> int:
        with self._changed:
            return self.capacity - self._free

    def acquire(self, count: int = 1, cancel: threading.Event | None = None) -> None:
        """Wait for `count` free slots and take them all at once; RequestCancelled if `cancel` is set first."""
        if not 1 <= count <= self.capacity:
            raise ValueError(f"{self.name}: cannot hold {count} of {self.capacity} slots at once")
        with self._changed:
            while not self._changed.wait_for(lambda: self._free >= count, timeout=_CANCEL_POLL_S):
                if cancel is not None and cancel.is_set():
                    raise RequestCancelled(f"cancelled while waiting for a {self.name} slot")
            self._free -= count
            self.peak_in_use = max(self.peak_in_use, self.capacity - self._free)

    def release(self, count: int = 1) -> None:
        with self._changed:
            self._free = min(self.capacity, self._free + count)
            self._changed.notify_all()

    @contextmanager
    def hold(self, count: int = 1, cancel: threading.Event | None = None) -> Iterator[None]:
        self.acquire(count, cancel)
        try:
            yield
        finally:
            self.release(count)


def cache_tensor_bytes(cache: Any) -> int:
    """Bytes of K and V a transformers Cache (DynamicCache) holds right now."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class KvLedger:
    """KV bytes held by this replica: the pool's tensor (fixed) plus every live side cache.

    `peak_bytes` is the most held at any one time, measured each decode step.
    """

    def __init__(self, pool_bytes: int = 0):
        self.pool_bytes = pool_bytes
        self._live: dict[int, int] = {}
        self._lock = threading.Lock()
        self.peak_side_bytes = 0
        self.peak_bytes = pool_bytes

    def observe(self, key: int, cache: Any) -> None:
        """Record what side cache `key` holds now (called every step of its generate)."""
        held = cache_tensor_bytes(cache)
        with self._lock:
            self._live[key] = held
            side = sum(self._live.values())
            self.peak_side_bytes = max(self.peak_side_bytes, side)
            self.peak_bytes = max(self.peak_bytes, self.pool_bytes + side)

    def forget(self, key: int) -> None:
        with self._lock:
            self._live.pop(key, None)

    @property
    def side_bytes(self) -> int:
        with self._lock:
            return sum(self._live.values())
