"""The same cases against both keepers of deployments.engine.protocol: the in-process `Engine` and the
process proxy `EngineProcess` (its child speaks only deployments.engine.messages).

Both are built from the same planner entry on the tiny offline text model; sampling is greedy, answers
short. No Ray here."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import get_type_hints

import pytest
from plans import planned_entry
from serve_support import wait_until

from deployments.engine.errors import InvalidRequest
from deployments.engine.generation import GenerationInput, SamplingParams
from deployments.engine.host import build_engine
from deployments.engine.messages import Report, Request
from deployments.engine.process import EngineProcess
from deployments.engine.protocol import EngineProtocol, KvFigures, LoadFigures
from placement.config import ModelSpec

GREEDY = SamplingParams(max_tokens=8, temperature=0)
# Long enough that a stream read for a step or two is still generating when it is left.
LONG = SamplingParams(max_tokens=200, temperature=0)
PROMPTS = ("Hello there", "The sky is")
IN_PROCESS, PROCESS = "in-process", "process"


@pytest.fixture(scope="module")
def engines(tiny_text_model_dir: Path) -> Iterator[dict[str, EngineProtocol]]:
    """Both implementations on one spec and one planner entry (the pool holds 4 sequences)."""
    spec = ModelSpec(model=str(tiny_text_model_dir), dtype="float32", max_batch_size=4)
    # The child loads while this process does (its start is most of this module's time).
    with ThreadPoolExecutor(max_workers=1) as starter:
        starting = starter.submit(EngineProcess, spec, planned_entry(spec), "tiny")
        local, _ = build_engine(spec, planned_entry(spec))
        try:
            remote = starting.result(timeout=300)
        except BaseException:
            local.close()
            raise
    yield {IN_PROCESS: local, PROCESS: remote}
    local.close()
    remote.close()


@pytest.fixture(params=[IN_PROCESS, PROCESS])
def engine(request: pytest.FixtureRequest, engines: dict[str, EngineProtocol]) -> EngineProtocol:
    return engines[request.param]


def _idle(engine: EngineProtocol) -> bool:
    load = engine.load_report()
    return load["pool_slots_in_use"] == 0 and load["side_slots_in_use"] == 0 and load["pool_requests_live"] == 0


def test_both_keep_the_protocol(engines: dict[str, EngineProtocol]) -> None:
    assert all(isinstance(engine, EngineProtocol) for engine in engines.values())


def test_greedy_answers_are_the_same_from_both(engines: dict[str, EngineProtocol]) -> None:
    requests = [GenerationInput(params=GREEDY, prompt=prompt) for prompt in PROMPTS]

    async def answers(engine: EngineProtocol) -> list[tuple[str, int, int, str | None]]:
        outputs = [await engine.generate_async(request) for request in requests]
        outputs += await asyncio.to_thread(engine.generate_batch, requests)
        return [(out.text, out.prompt_tokens, out.completion_tokens, out.finish_reason) for out in outputs]

    got = {name: asyncio.run(answers(engine)) for name, engine in engines.items()}
    assert got[IN_PROCESS] == got[PROCESS]
    # One call or a batch: the same answers; and something to compare.
    assert got[IN_PROCESS][:2] == got[IN_PROCESS][2:]
    assert all(text for text, *_ in got[IN_PROCESS]), "the tiny model generated nothing to compare"


def test_a_streams_deltas_join_to_the_generated_text(engine: EngineProtocol) -> None:
    request = GenerationInput(params=GREEDY, prompt=PROMPTS[0])

    async def both() -> tuple[str, list[str], str | None]:
        whole = await engine.generate_async(request)
        deltas = [delta async for delta in await engine.open_stream(request)]
        return whole.text, [delta.text for delta in deltas], deltas[-1].finish_reason

    whole, pieces, finish_reason = asyncio.run(both())
    assert whole and "".join(pieces) == whole
    assert finish_reason in ("length", "stop")


def test_leaving_a_stream_midway_frees_its_slot(engine: EngineProtocol) -> None:
    submitted = engine.load_report()["pool_requests_submitted"]

    async def leave_after_two_deltas() -> dict[str, int]:
        deltas = await engine.open_stream(GenerationInput(params=LONG, prompt="Once upon a time"))
        read = 0
        async for _ in deltas:
            read += 1
            if read == 2:
                break
        held = engine.load_report()  # still generating: the slot is the stream's
        await deltas.aclose()  # type: ignore[attr-defined]
        return held

    held = asyncio.run(leave_after_two_deltas())
    assert held["pool_slots_in_use"] == 1 and held["pool_requests_live"] == 1
    wait_until(lambda: _idle(engine), 10, "the stream left midway gives its slot back", interval_s=0.01)
    assert engine.load_report()["pool_requests_submitted"] == submitted + 1


def _cancel_once(engine: EngineProtocol, request: GenerationInput, started: Callable[[LoadFigures], bool]) -> None:
    """Sends `request` and cancels its caller once the engine's own load report says `started`
    (bounded), not after a guessed delay; the caller sees CancelledError."""

    async def cancel_when_started() -> None:
        task = asyncio.create_task(engine.generate_async(request))
        deadline = time.monotonic() + 30
        while not started(await asyncio.to_thread(engine.load_report)):
            assert time.monotonic() < deadline and not task.done(), "the request never started"
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_when_started())


def test_cancelling_a_generate_midway_frees_its_slot(engine: EngineProtocol) -> None:
    submitted = engine.load_report()["pool_requests_submitted"]
    request = GenerationInput(params=LONG, prompt="Far away")
    _cancel_once(engine, request, lambda load: load["pool_requests_submitted"] > submitted)  # in the batch
    wait_until(lambda: _idle(engine), 10, "the cancelled request gives its slot back", interval_s=0.01)


def test_cancelling_a_side_request_midway_stops_its_batch_and_frees_its_slot(engine: EngineProtocol) -> None:
    """A seeded request runs on the side backend, in a batch of side requests (engine.side_batches):
    its caller gone, the batch (it alone) stops and its side slot comes back."""
    seeded = GenerationInput(params=dataclasses.replace(LONG, temperature=0.7, seed=1), prompt="Far away")
    _cancel_once(engine, seeded, lambda load: load["side_slots_in_use"] > 0)  # decoding on its slot
    wait_until(lambda: _idle(engine), 10, "the cancelled side request gives its slot back", interval_s=0.01)


def test_reports_have_the_same_keys_and_types_from_both(engines: dict[str, EngineProtocol]) -> None:
    local, remote = engines[IN_PROCESS], engines[PROCESS]
    for report in ("kv_report", "load_report", "memory_report"):
        here, there = getattr(local, report)(), getattr(remote, report)()
        assert {key: type(value) for key, value in here.items()} == {
            key: type(value) for key, value in there.items()
        }, report
    # Both keep the declared shape of the fixed reports (deployments.engine.protocol).
    for report, declared in (("kv_report", KvFigures), ("load_report", LoadFigures)):
        hints = get_type_hints(declared)
        for engine in (local, remote):
            figures = getattr(engine, report)()
            assert {key: type(value) for key, value in figures.items()} == hints, report
    # The same plan built the same KV either way.
    planned = ("built_bytes", "planned_bytes", "pool_bytes", "pool_sequences", "side_sequences", "context_length")
    assert {key: local.kv_report()[key] for key in planned} == {key: remote.kv_report()[key] for key in planned}
    assert local.kv_report()["pool_bytes"] > 0
    assert isinstance(local.last_progress, float) and isinstance(remote.last_progress, float)


def test_a_request_over_the_context_is_the_same_invalid_request(engine: EngineProtocol) -> None:
    too_long = GenerationInput(params=GREEDY, prompt="word " * 5000)

    async def ask() -> list[type[BaseException]]:
        raised = []
        for call in (engine.generate_async, engine.open_stream):
            with pytest.raises(InvalidRequest, match="context") as caught:
                await call(too_long)
            raised.append(caught.type)
        with pytest.raises(InvalidRequest, match="context") as caught:
            await asyncio.to_thread(engine.generate_batch, [too_long])
        return [*raised, caught.type]

    assert asyncio.run(ask()) == [InvalidRequest] * 3
    assert _idle(engine)


@pytest.mark.parametrize("unknown", [Request, Report], ids=["request", "report"])
def test_the_child_refuses_a_request_it_does_not_know(engines: dict[str, EngineProtocol], unknown: type) -> None:
    """A request type with no engine method behind it (here the bare base classes) is answered with an
    error naming it, not dropped (the caller would wait forever); the child goes on serving."""
    remote = engines[PROCESS]
    assert isinstance(remote, EngineProcess)
    _, answer = remote._open(unknown)
    with pytest.raises(TypeError, match=f"serves no {unknown.__name__} "):
        answer.result(timeout=10)
    assert _idle(remote)
