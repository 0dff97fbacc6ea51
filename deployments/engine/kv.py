"""Admission and accounting for the KV cache of one replica.

The plan budgets a fixed number of sequences (placement.sizing.kv_budget):
the paged pool's batch and a few side slots. `SequenceSlots` is the one gate
every request passes before it may hold KV: a request that finds no free slot
waits (in the replica's queue, bounded by Serve's max_ongoing_requests and
max_queued_requests, beyond which callers get 503 + Retry-After) and never
allocates. `KvLedger` records the KV bytes really held, counted as the
storages behind the tensors (a view holds its whole storage): `SideCache`
measures a side call's DynamicCache as it grows, so tests and
`/v1/placement` can hold them against the plan.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import DynamicCache

from placement.hf_internals import NoKvCacheLayer

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


def _layer_tensors(layer: Any) -> Iterator[torch.Tensor]:
    for name in ("keys", "values"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor):
            yield tensor


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a view counts its whole storage, once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def cache_storage_bytes(cache: Any) -> int:
    """Bytes of K and V a transformers Cache (DynamicCache) holds right now: its storages, not its elements.

    A sliding-window layer keeps a VIEW of its last window − 1 tokens over the storage of the whole last
    forward pass (transformers 5.25, DynamicSlidingWindowLayer.update: `self.keys = cat(...)[:, :, -w+1:]`),
    so after a prefill pass the layer holds the pass's K/V until the next step; numel × element size
    would count only the window.
    """
    return _storage_bytes(tensor for layer in getattr(cache, "layers", ()) for tensor in _layer_tensors(layer))


class SideCache(DynamicCache):
    """A DynamicCache that measures its storage as it grows, for the KV ledger.

    transformers grows a layer with `torch.cat`, which allocates the layer's new storage while the old one
    is still held; layers update one after another, so for a moment one layer holds both. `update` notes
    that moment (`peak`: everything held plus the layer's new storage) and, after each forward pass (the
    last layer's update), hands `on_forward(held, peak)` the bytes held now and the most held during the pass.
    """

    def __init__(self, config: Any, on_forward: Callable[[int, int], None] | None = None):
        super().__init__(config=config)
        self.on_forward = on_forward
        self.held = 0  # storage bytes after the last update
        self.peak = 0  # the most held at one moment since the last report
        self._layer_bytes: dict[int, int] = {}
        # Layers that hold no KV (shared-KV models) are never updated: a pass ends at the last one that is.
        kept = [i for i, layer in enumerate(self.layers) if not isinstance(layer, NoKvCacheLayer)]
        self._last_layer = kept[-1] if kept else None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        result = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        new = _storage_bytes(_layer_tensors(self.layers[layer_idx]))
        # The cat that made `new` ran while this layer's old storage (in `held`) was still alive.
        self.peak = max(self.peak, self.held + new)
        self.held += new - self._layer_bytes.get(layer_idx, 0)
        self._layer_bytes[layer_idx] = new
        if self._last_layer is None or layer_idx == self._last_layer:
            self.held = cache_storage_bytes(self)  # exact (distinct storages) once per pass
            self.report()
        return result

    def report(self) -> None:
        """Hand `on_forward` what is held now and the most held since the last report."""
        self.peak = max(self.peak, self.held)
        if self.on_forward is not None:
            self.on_forward(self.held, self.peak)
        self.peak = self.held


class KvLedger:
    """KV bytes held by this replica: the pool's tensor (fixed) plus every live side cache.

    `peak_bytes` is the most held at any one time: side caches report after every forward pass (prefill
    chunk or decode step) their storage and the most they held during the pass (a layer's growth holds its
    old and new storage at once).
    """

    def __init__(self, pool_bytes: int = 0):
        self.pool_bytes = pool_bytes
        self._live: dict[int, int] = {}
        self._lock = threading.Lock()
        self.peak_side_bytes = 0
        self.peak_bytes = pool_bytes

    def observe(self, key: int, held: int, peak: int | None = None) -> None:
        """Side cache `key` holds `held` bytes now and held at most `peak` (≥ held) since its last report."""
        with self._lock:
            self._live[key] = held
            side = sum(self._live.values()) - held + max(held, peak or 0)
            self.peak_side_bytes = max(self.peak_side_bytes, side)
            self.peak_bytes = max(self.peak_bytes, self.pool_bytes + side)

    def forget(self, key: int) -> None:
        with self._lock:
            self._live.pop(key, None)

    @property
    def side_bytes(self) -> int:
        with self._lock:
            return sum(self._live.values())
