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
  transformers' continuous-batching loop, as a real OOM there would.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import torch

from deployments.generation import GenerationInput, GenerationOutput, StreamDelta

# Importable on a replica once this directory is on its PYTHONPATH.
WRAPPER = "fault_injection:FaultyEngine"
OOM_MARKER = "<rayfit:oom>"
WEDGE_MARKER = "<rayfit:wedge>"
BATCH_OOM_MARKER = "<rayfit:batch-oom>"


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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _inject(self, requests: Sequence[GenerationInput]) -> None:
        texts = [_text_of(r) for r in requests]
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
