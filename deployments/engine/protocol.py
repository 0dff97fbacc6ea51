"""The engine's face: what the Serve replica (deployments.model) may call, declared once.

Two implementations keep it: `core.Engine` (the model in the replica's process) and
`process.EngineProcess` (the proxy to the engine's own process, the default). The replica
holds an `EngineProtocol` and never asks which one it has; tests/test_engine_rooms.py checks
that both implement every member with the same parameters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from typing import Protocol, TypedDict, runtime_checkable

from deployments.engine.generation import GenerationInput, GenerationOutput, StreamDelta


class KvFigures(TypedDict):
    """`kv_report`: the plan's KV bytes against what this engine built and has used."""

    built_bytes: int  # the worst case over all paths: the pool as allocated + the side slots at full context
    planned_bytes: int  # what the plan budgets; built_bytes must stay at or under it
    pool_bytes: int
    pool_sequences: int
    side_sequences: int
    side_bytes_worst: int
    peak_kv_bytes: int  # measured
    peak_side_bytes: int  # measured
    context_length: int


class LoadFigures(TypedDict):
    """`load_report`: what the engine holds right now."""

    pool_slots_in_use: int
    side_slots_in_use: int
    pool_requests_live: int
    pool_requests_submitted: int
    batcher_restarts: int


@runtime_checkable
class EngineProtocol(Protocol):
    async def generate_async(self, inp: GenerationInput, executor: Executor | None = None) -> GenerationOutput:
        """One whole answer; cancelling the caller withdraws the request."""
        ...

    async def open_stream(self, inp: GenerationInput, executor: Executor | None = None) -> AsyncIterator[StreamDelta]:
        """Checks the request (InvalidRequest before any delta), then the deltas; closing the
        iterator stops generation."""
        ...

    def generate_batch(self, inputs: Sequence[GenerationInput]) -> list[GenerationOutput]:
        """Whole answers in input order, decoded together (the health probe's call; `generate_async`
        batches side requests through it)."""
        ...

    def kv_report(self) -> KvFigures:
        """The plan's KV bytes, what was built and the side caches' peak."""
        ...

    def load_report(self) -> LoadFigures:
        """What the engine holds now: slots and live requests."""
        ...

    def memory_report(self) -> dict[str, int | str]:
        """The model's memory: device, weights, KV built, process figures."""
        ...

    @property
    def last_progress(self) -> float:
        """CLOCK_MONOTONIC of the last token (the health check's liveness)."""
        ...

    def close(self) -> None: ...
