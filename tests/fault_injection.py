"""Fault injection into a replica's generate path, for tests only.

`tests/serve_support.local_serve` names `FaultyEngine` in the replica's
RAYFIT_ENGINE_WRAPPER (deployments.model wraps its engine with it) and puts
this directory on the workers' PYTHONPATH. A request whose text contains a
marker then misbehaves:

- `<rayfit:oom>`: generation raises torch.cuda.OutOfMemoryError, as a real
  CUDA OOM would (CPU test boxes cannot run out of CUDA memory);
- `<rayfit:wedge>`: this and every later generation (health probes too) block
  forever, as a hung CUDA kernel would;
- `<rayfit:batch-oom>`: the model's next forward pass raises
  torch.cuda.OutOfMemoryError wherever it runs — for a pooled request inside
  transformers' continuous-batching loop, as a real OOM there would;
- `hold_marker(pid)`: the request blocks forever in the engine whose process
  is `pid` (the replica's `engine_pid` in /v1/placement), so it is certainly
  on that replica when the replica is killed; anywhere else (a retry on a new
  replica) it is served normally;
- `gate_marker(path)`: the request waits until the file `path` exists (the
  test opens the gate), at most GATE_LIMIT_S, then fails: a request the test
  knows to be in flight on the replica for as long as it needs.

The wrapper's `load_report` (the replica's `load` handle method) adds
`held` and `gated`: how many requests wait at a hold or a gate right now.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from deployments.engine.generation import GenerationInput, GenerationOutput, StreamDelta

# Importable on a replica once this directory is on its PYTHONPATH.
WRAPPER = "fault_injection:FaultyEngine"
OOM_MARKER = "<rayfit:oom>"
WEDGE_MARKER = "<rayfit:wedge>"
BATCH_OOM_MARKER = "<rayfit:batch-oom>"
_HOLD = re.compile(r"<rayfit:hold:(\d+)>")
_GATE = re.compile(r"<rayfit:gate:([^>]+)>")
# A gate never opened fails its request after this (a 500 the test sees) instead of hanging it.
GATE_LIMIT_S = 120.0


def hold_marker(pid: int) -> str:
    """Text that makes a request block forever in the engine process `pid`, and only there."""
    return f"<rayfit:hold:{pid}>"


def gate_marker(path: object) -> str:
    """Text that makes a request wait until the file `path` exists (the test's gate)."""
    return f"<rayfit:gate:{path}>"


def _text_of(request: GenerationInput) -> str:
    parts = [request.prompt or ""]
    for message in request.messages or ():
        parts.append(str(message.get("content", "")))
    return "\n".join(parts)


class FaultyEngine:
    """Wraps an Engine; everything but the generate path is passed through."""

    def __init__(self, engine: Any):
        self._engine = engine
        self._wedged = threading.Event()
        self._lock = threading.Lock()
        self._waiting = {"held": 0, "gated": 0}  # requests blocked at a hold or a gate right now

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def load_report(self) -> dict[str, int]:
        with self._lock:
            return {**self._engine.load_report(), **self._waiting}

    def _count(self, key: str, step: int) -> None:
        with self._lock:
            self._waiting[key] += step

    def _inject(self, requests: Sequence[GenerationInput]) -> None:
        texts = [_text_of(r) for r in requests]
        if any(int(pid) == os.getpid() for t in texts for pid in _HOLD.findall(t)):
            self._count("held", 1)
            threading.Event().wait()  # never returns: the request stays on this replica until it dies
        gates = [Path(path) for t in texts for path in _GATE.findall(t)]
        if gates:
            self._count("gated", 1)
            try:
                deadline = time.monotonic() + GATE_LIMIT_S
                while not all(gate.exists() for gate in gates):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"gate {gates} not opened within {GATE_LIMIT_S:.0f} s (injected fault)")
                    time.sleep(0.02)
            finally:
                self._count("gated", -1)
        if any(WEDGE_MARKER in t for t in texts):
            self._wedged.set()
        if self._wedged.is_set():
            threading.Event().wait()  # never returns: the replica is wedged
        if any(OOM_MARKER in t for t in texts):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected fault)")
        if any(BATCH_OOM_MARKER in t for t in texts):
            self._arm_forward_oom()

    def _arm_forward_oom(self) -> None:
        """One out-of-memory error from inside the model's next forward pass (then the hook is gone)."""
        model = self._engine.model

        def explode(module: Any, args: Any) -> None:
            handle.remove()
            raise torch.cuda.OutOfMemoryError("CUDA out of memory inside the batching loop (injected fault)")

        handle = model.register_forward_pre_hook(explode)

    def generate_batch(self, requests: Sequence[GenerationInput], cancel: Any = None) -> list[GenerationOutput]:
        self._inject(requests)
        return self._engine.generate_batch(requests, cancel)

    def stream(self, request: GenerationInput, cancel: Any = None) -> Iterator[StreamDelta]:
        # A generator: the fault fires in the thread that drains it, never on the replica's event loop.
        self._inject([request])
        yield from self._engine.stream(request, cancel)

    # The replica's calls (deployments.model): the fault fires in a worker thread, so a wedge
    # blocks that thread and the replica's event loop keeps running, as with a hung kernel.

    async def generate_async(self, request: GenerationInput, executor: Any = None) -> GenerationOutput:
        await asyncio.to_thread(self._inject, [request])
        return await self._engine.generate_async(request, executor)

    async def open_stream(self, request: GenerationInput, executor: Any = None) -> AsyncIterator[StreamDelta]:
        await asyncio.to_thread(self._inject, [request])
        return await self._engine.open_stream(request, executor)
