"""The engine in a process of its own (deployments.engine.process, deployments.engine.child): the same answers as in the
replica, errors and cancellation across the process boundary, and what happens when it dies.

Also that the child dies with its replica, kill -9 included, at any moment of its start
(deployments.engine.orphan_guard).

Real child processes, the real tiny model; no Ray here (tests/test_serving_engine_process.py
serves through Ray)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from plans import planned_entry
from ray_nodes import _running
from serve_support import wait_until

from deployments.engine.errors import InvalidRequest
from deployments.engine.generation import GenerationInput, SamplingParams
from deployments.engine.host import EngineOptions, build_engine
from deployments.engine.loading import ModelLoadError
from deployments.engine.orphan_guard import PARENT_GONE
from deployments.engine.process import EngineProcess, EngineProcessLost
from placement.config import ModelSpec
from placement.plan import PlanEntry

GREEDY = SamplingParams(max_tokens=12, temperature=0)
LONG = SamplingParams(max_tokens=200, temperature=0)


def _entry(spec: ModelSpec) -> PlanEntry:
    """The planner's CPU entry for `spec` (the pool holds the spec's full batch)."""
    return planned_entry(spec)


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
    submitted = remote.load_report()["pool_requests_submitted"]

    async def leave_early() -> None:
        deltas = await remote.open_stream(GenerationInput(params=LONG, prompt="Once upon a time"))
        async for _ in deltas:
            break
        await deltas.aclose()  # type: ignore[attr-defined]
        task = asyncio.create_task(remote.generate_async(GenerationInput(params=LONG, prompt="Far away")))
        # Cancelled once the child has handed it to its batch (the child's own count), not after a guess.
        deadline = time.monotonic() + 30
        while (await asyncio.to_thread(remote.load_report))["pool_requests_submitted"] < submitted + 2:
            assert time.monotonic() < deadline and not task.done(), "the call never reached the child's batch"
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

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
    assert 0 < kv["pool_bytes"] <= kv["built_bytes"]


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
    # What the replica process's exit does to its end of the socket. Shut down first: a bare close()
    # while the reader thread is blocked reading that descriptor would leave the socket open.
    with socket.socket(fileno=os.dup(engine._conn.fileno())) as ours:
        ours.shutdown(socket.SHUT_RDWR)
    engine._conn.close()
    child.wait(timeout=10)
    assert not child.is_running()


# -- no orphaned engine: the child dies with its replica, even while it loads (deployments.engine.orphan_guard)

# Test-only: the wrapper (EngineOptions.wrapper) runs in the child once the model is loaded and before
# it reports ready; this one writes its pid to a marker file and blocks forever, a load that never ends.
_SLOW_LOAD = """
import os, pathlib, threading

def never_ready(engine):
    pathlib.Path(os.environ["RAYFIT_TEST_LOADING_MARKER"]).write_text(str(os.getpid()))
    threading.Event().wait()
"""

# A replica-like parent: builds an EngineProcess for the pickled (spec, entry, options) and waits in the
# constructor.
_REPLICA = """
import pickle, sys
from deployments.engine.process import EngineProcess
spec, entry, options = pickle.loads(open(sys.argv[1], "rb").read())
EngineProcess(spec, entry, "orphan", options)
"""


def _wait_gone(pid: int, deadline: float) -> None:
    """Until `pid` is gone (exited: a zombie counts, only its reaper is left), polled finely until `deadline`."""
    while _running(pid):
        assert time.monotonic() < deadline, f"process {pid} still running"
        time.sleep(0.005)


@pytest.mark.parametrize("moment", ["starting", "loading"])
def test_the_child_dies_at_once_when_its_replica_is_killed(moment: str, spec: ModelSpec, tmp_path: Path) -> None:
    """kill -9 of the replica while its child still starts (interpreter, imports) or loads: the child goes
    at once, not after the load, when it would first touch the socket (here the load never ends)."""
    (tmp_path / "slow_load.py").write_text(_SLOW_LOAD)
    options = EngineOptions(wrapper="slow_load:never_ready")
    (tmp_path / "spec_entry.pkl").write_bytes(pickle.dumps((spec, _entry(spec), options)))
    marker = tmp_path / "loading"
    repo = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo), str(tmp_path)]),
        "RAYFIT_TEST_LOADING_MARKER": str(marker),
    }
    replica = subprocess.Popen([sys.executable, "-c", _REPLICA, str(tmp_path / "spec_entry.pkl")], env=env)
    child = 0
    try:
        if moment == "starting":  # as soon as it exists: the child may not even have set its signal yet
            wait_until(lambda: psutil.Process(replica.pid).children(), 60, "the replica starts its engine")
            child = psutil.Process(replica.pid).children()[0].pid
        else:  # the model is loaded, the child holds it and has not reported ready
            wait_until(marker.exists, 120, "the child loads the model")
            child = int(marker.read_text())
        killed = time.monotonic()
        replica.kill()
        _wait_gone(child, deadline=killed + 5)
        took = time.monotonic() - killed
    finally:
        replica.kill()
        replica.wait()
        if child and _running(child):  # the test failed: no orphan left behind by the test itself
            os.kill(child, signal.SIGKILL)
    print(f"the engine process exited {took * 1000:.0f} ms after kill -9 of its replica ({moment})")


def test_a_child_outlives_the_thread_that_built_it(spec: ModelSpec) -> None:
    """The parent-death signal fires when the forking *thread* exits: an EngineProcess built on a thread
    that then ends (an anyio worker thread running a Serve replica's sync method does) keeps serving."""
    built: list[EngineProcess | BaseException] = []

    def build() -> None:
        try:
            built.append(EngineProcess(spec, _entry(spec), "threaded"))
        except BaseException as exc:  # handed back: raised below
            built.append(exc)

    builder = threading.Thread(target=build, daemon=True)
    builder.start()
    builder.join(timeout=120)
    assert not builder.is_alive(), "the EngineProcess constructor did not return within 120 s"
    if isinstance(built[0], BaseException):
        raise built[0]
    # Gone from the kernel too (a thread's exit sends its children's parent-death signals before that).
    wait_until(lambda: not Path(f"/proc/self/task/{builder.native_id}").exists(), 10, "the builder thread exits")
    engine = built[0]
    assert isinstance(engine, EngineProcess)
    try:
        assert engine.load_report()["pool_slots_in_use"] == 0  # a round trip: the child is alive and answers
        assert _running(engine.pid)
    finally:
        engine.close()


def _guarded(parent_pid: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`python -m deployments.engine.orphan_guard <parent_pid> probe`, where probe reports the child's state."""
    (tmp_path / "probe.py").write_text(
        "import ctypes, sys\n"
        "signal = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(signal), 0, 0, 0)  # PR_GET_PDEATHSIG\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'deployments.engine.core') if m in sys.modules)\n"
        "print(signal.value, heavy, sys.argv[1:])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), str(tmp_path)])}
    command = [sys.executable, "-m", "deployments.engine.orphan_guard", str(parent_pid), "probe", "an", "argument"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_the_guard_arms_the_signal_before_any_heavy_import_and_exits_if_the_parent_is_gone(tmp_path: Path) -> None:
    armed = _guarded(os.getpid(), tmp_path)
    assert armed.returncode == 0, armed.stderr
    assert armed.stdout.split(maxsplit=1) == [str(int(signal.SIGKILL)), "[] ['an', 'argument']\n"]
    # The parent died before the signal was set (its pid is not the one passed): the child exits itself.
    orphaned = _guarded(os.getpid() + 1, tmp_path)
    assert (orphaned.returncode, orphaned.stdout) == (PARENT_GONE, "")
