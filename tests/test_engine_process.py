"""The engine in a process of its own (deployments.engine_process, deployments.engine.child): the same answers as in the
replica, errors and cancellation across the process boundary, and what happens when it dies.

Real child processes, the real tiny model; no Ray here (tests/test_serving_engine_process.py
serves through Ray)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path

import psutil
import pytest
from serve_support import wait_until

from deployments.engine.host import build_engine
from deployments.engine_process import EngineProcess, EngineProcessLost
from deployments.errors import InvalidRequest
from deployments.generation import GenerationInput, SamplingParams
from deployments.loading import ModelLoadError
from placement.config import ModelSpec
from placement.plan import PlanEntry
from placement.sizing import estimate_memory

GREEDY = SamplingParams(max_tokens=12, temperature=0)
LONG = SamplingParams(max_tokens=200, temperature=0)


def _entry(spec: ModelSpec) -> PlanEntry:
    """A CPU plan entry with the estimate's KV budget (the pool holds the spec's full batch)."""
    return PlanEntry(
        role="tiny",
        model=spec.model,
        device="cpu",
        node_id="node-abc123def456",
        estimate=estimate_memory(spec),
        memory_budget_bytes=1 << 30,
        reason="test",
    )


@pytest.fixture(scope="module")
def spec(tiny_text_model_dir: Path) -> ModelSpec:
    return ModelSpec(model=str(tiny_text_model_dir), dtype="float32", max_batch_size=4)


@pytest.fixture(scope="module")
def remote(spec: ModelSpec):
    engine = EngineProcess(spec, _entry(spec), "tiny")
    yield engine
    engine.close()


def test_the_child_answers_as_the_engine_in_this_process_does(remote: EngineProcess, spec: ModelSpec) -> None:
    local, facts = build_engine(spec, _entry(spec))
    try:
        requests = [GenerationInput(params=GREEDY, prompt=p) for p in ("Hello there", "The sky is")]
        expected = [out.text for out in local.generate_batch(requests)]

        async def over_the_wire() -> tuple[list[str], list[str], list[str]]:
            whole = [(await remote.generate_async(r)).text for r in requests]
            streamed = []
            for request in requests:
                deltas = await remote.open_stream(request)
                streamed.append("".join([d.text async for d in deltas]))
            return whole, streamed, [out.text for out in await asyncio.to_thread(remote.generate_batch, requests)]

        whole, streamed, batched = asyncio.run(over_the_wire())
    finally:
        local.close()
    assert whole == expected and streamed == expected and batched == expected
    assert any(expected), "the tiny model generated nothing to compare"
    assert dataclasses.replace(remote.facts, load_seconds=0) == dataclasses.replace(facts, load_seconds=0)
    assert remote.uses_pool(requests[0])


def test_a_bad_request_is_the_callers_error_before_any_delta(remote: EngineProcess) -> None:
    too_long = GenerationInput(params=GREEDY, prompt="word " * 5000)

    async def ask() -> None:
        with pytest.raises(InvalidRequest, match="context"):
            await remote.open_stream(too_long)
        with pytest.raises(InvalidRequest, match="context"):
            await remote.generate_async(too_long)

    asyncio.run(ask())
    assert remote.load_report()["pool_slots_in_use"] == 0


def test_a_stream_closed_early_and_a_cancelled_call_stop_in_the_child(remote: EngineProcess) -> None:
    async def leave_early() -> None:
        deltas = await remote.open_stream(GenerationInput(params=LONG, prompt="Once upon a time"))
        async for _ in deltas:
            break
        await deltas.aclose()  # type: ignore[attr-defined]
        task = asyncio.create_task(remote.generate_async(GenerationInput(params=LONG, prompt="Far away")))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    submitted = remote.load_report()["pool_requests_submitted"]
    asyncio.run(leave_early())
    wait_until(lambda: remote.load_report()["pool_requests_live"] == 0, 10, "the child drops both requests")
    report = remote.load_report()
    assert report["pool_requests_submitted"] == submitted + 2
    assert report["pool_slots_in_use"] == 0


def test_the_memory_reported_is_the_childs(remote: EngineProcess) -> None:
    memory, kv = remote.memory_report(), remote.kv_report()
    child_rss = psutil.Process(remote.pid).memory_info().rss
    assert remote.pid != os.getpid()
    assert memory["device"] == "cpu" and int(memory["weights_bytes"]) > 0
    # The child's RSS, not this process's (this test process holds no model of that size).
    assert abs(int(memory["rss_bytes"]) - child_rss) < 0.2 * child_rss
    assert 0 < kv["pool_bytes"] <= kv["kv_cache_bytes"]


def test_a_load_failure_is_raised_by_the_constructor(tmp_path: Path, spec: ModelSpec) -> None:
    missing = ModelSpec(model=str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="missing"):
        EngineProcess(missing, _entry(spec), "tiny")


def test_when_the_child_dies_calls_fail_retryably_and_liveness_raises(spec: ModelSpec) -> None:
    engine = EngineProcess(spec, _entry(spec), "doomed")

    async def stream_while_killed() -> None:
        deltas = await engine.open_stream(GenerationInput(params=LONG, prompt="Once upon a time"))
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineProcessLost):
            async for _ in deltas:
                pass

    asyncio.run(stream_while_killed())
    with pytest.raises(EngineProcessLost):
        _ = engine.last_progress
    with pytest.raises(EngineProcessLost):
        engine.generate_batch([GenerationInput(params=GREEDY, prompt="hi")])


def test_the_child_exits_when_its_replica_goes(spec: ModelSpec) -> None:
    engine = EngineProcess(spec, _entry(spec), "orphan")
    child = psutil.Process(engine.pid)
    engine._conn.close()  # what the replica process's exit does to its end of the socket
    child.wait(timeout=10)
    assert not child.is_running()
