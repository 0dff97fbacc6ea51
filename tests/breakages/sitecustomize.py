"""Deliberate breakages, to show that the tests fail when the code is wrong (issue 23).

Inactive unless RAYFIT_BREAK=<name>[,<name>...] is set AND this directory is on
PYTHONPATH (`tests/breakages/run.py` sets both; nothing else does). Python imports
`sitecustomize` at start-up in every process that has it on its path — the test
process, Ray's workers (serve_support.local_serve passes PYTHONPATH on), engine
processes — and each named breakage patches its module right after that module
is imported, before anything binds names from it.

Each breakage below says what it breaks and which test must then fail; the table
of results is in README.md next to this file.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any


def stream_raises(pool: ModuleType) -> None:
    """A worker thread's stream raises after its first delta (PoolBackend.stream).

    Caught by test_continuous.py::test_batch_and_streams_match_the_classic_path: the streams run on
    threads of their own, and `run_threads` must hand the thread's exception back to the test."""
    original = pool.PoolBackend.stream

    def stream(self: Any, *args: Any, **kwargs: Any) -> Any:
        for i, delta in enumerate(original(self, *args, **kwargs)):
            if i == 1:
                raise RuntimeError("injected breakage: the stream fails mid-way")
            yield delta

    pool.PoolBackend.stream = stream


def answer_short(pool: ModuleType) -> None:
    """A pooled whole (non-streamed) answer loses its last token (PoolBackend.generate / agenerate).

    Caught by test_cancellation.py::test_streaming_disconnect_while_queued_never_starts: only its holder
    thread checks the answer's token count, so the thread's failed assertion must fail the test."""
    generate, agenerate = pool.PoolBackend.generate, pool.PoolBackend.agenerate

    def short_generate(self: Any, *args: Any, **kwargs: Any) -> list[list[int]]:
        return [tokens[:-1] for tokens in generate(self, *args, **kwargs)]

    async def short_agenerate(self: Any, *args: Any, **kwargs: Any) -> list[int]:
        return (await agenerate(self, *args, **kwargs))[:-1]

    pool.PoolBackend.generate, pool.PoolBackend.agenerate = short_generate, short_agenerate


def decode_hangs(pool: ModuleType) -> None:
    """A decode step with 3 or more rows never returns (the pool's sampler, _GreedyAwareSampler).

    Caught by test_continuous.py::test_a_short_request_is_not_stuck_behind_long_ones: its three long
    requests make such a step; the test's bounded waits (60 s for decode steps, 120 s for its threads)
    must fail it rather than let it hang until pytest-timeout."""
    original = pool._GreedyAwareSampler.__call__

    def call(self: Any, scores: Any, output_ids: Any) -> Any:
        if scores.shape[-2] >= 3:
            sys.stderr.write("injected breakage: decode step hangs\n")
            threading.Event().wait()
        return original(self, scores, output_ids)

    pool._GreedyAwareSampler.__call__ = call


def late_registration(pool: ModuleType) -> None:
    """A request waits for a live manager before it registers (ContinuousBatcher.submit), so a rebuild
    never answers it "retry" — the race the rebuild test must prove it hit.

    Caught by test_continuous.py::test_a_request_arriving_during_the_rebuild_is_served_not_told_to_retry
    (the retry is served either way; only its proof of the race can fail)."""
    original = pool.ContinuousBatcher.submit

    def submit(self: Any, *args: Any, **kwargs: Any) -> str:
        self._wait_for_live_manager()
        return original(self, *args, **kwargs)

    pool.ContinuousBatcher.submit = submit


def gguf_unlocked(loading: ModuleType) -> None:
    """GGUF conversion without its file lock (deployments.engine.loading.FileLock): callers that ask for one
    file at once each convert it.

    Caught by test_engine.py::test_gguf_conversion_is_cached: both of its concurrent callers converted."""
    loading.FileLock = contextlib.nullcontext  # FileLock(path) → nullcontext(path): holds nothing


def relay_uncancelled(ingress: ModuleType) -> None:
    """The ingress's relay of a replica's stream no longer cancels it when stopped (relay_stream gets a
    stream whose `cancel` does nothing): a client that leaves mid-stream leaves the replica decoding.

    Caught by test_cancellation.py::test_the_ingress_relay_cancels_the_replicas_stream_when_stopped."""
    original = ingress.relay_stream

    class Uncancellable:
        def __init__(self, deltas: Any) -> None:
            self.deltas = deltas

        def __aiter__(self) -> Any:
            return self.deltas.__aiter__()

        def cancel(self) -> None:
            pass

    ingress.relay_stream = lambda first, deltas, *rest, **named: original(first, Uncancellable(deltas), *rest, **named)


def replica_500_once(fault_injection: ModuleType) -> None:
    """Each replica's first request fails with an unexpected error: a 500 once (FaultyEngine.generate_async,
    which wraps every replica's engine in the tests).

    Caught by test_faults.py::test_load_failures_are_reported_and_the_rest_serves (its first requests)."""
    original = fault_injection.FaultyEngine.generate_async
    failed: list[bool] = []

    async def generate_async(self: Any, request: Any, executor: Any = None) -> Any:
        if not failed:
            failed.append(True)
            raise RuntimeError("injected breakage: the first request fails")
        return await original(self, request, executor)

    fault_injection.FaultyEngine.generate_async = generate_async


def death_is_500(errors: ModuleType) -> None:
    """A replica that dies with the request on it answers 500 instead of 503 + Retry-After (errors.classify).

    Caught by test_faults.py::test_killed_replica_is_restarted_and_no_request_hangs."""
    from ray.exceptions import RayActorError

    original = errors.classify

    def classify(exc: BaseException, role: str) -> Any:
        if isinstance(errors._cause(exc), RayActorError):
            return errors.ServerError(f"model {role!r}: replica died")
        return original(exc, role)

    errors.classify = classify


def engine_loss_is_500(engine_process: ModuleType) -> None:
    """A request lost with its engine process answers 500 instead of 503 + Retry-After (EngineProcessLost
    made a plain error, no longer retryable).

    Caught by test_cancellation.py::test_a_killed_model_holding_process_is_replaced[engine process]: it
    counts every answer until the replica serves again, so one 500 among the 503s fails it."""
    engine_process.EngineProcessLost = type("EngineProcessLost", (RuntimeError,), {})


def never_reaches(fault_injection: ModuleType) -> None:
    """The test's held requests never reach the replica it kills (hold_marker names another process),
    so they are served normally and nothing shows a request was lost with the replica.

    Caught by test_faults.py::test_killed_replica_is_restarted_and_no_request_hangs (it waits, bounded,
    for both held requests to be in the replica before it kills it)."""
    original = fault_injection.hold_marker
    fault_injection.hold_marker = lambda pid: original(pid + 100000)


def gate_ignored(fault_injection: ModuleType) -> None:
    """Gated requests run at once, so they are not in flight when the test redeploys (no gate matches).

    Caught by test_faults.py::test_redeploy_with_the_same_plan_keeps_serving (it waits, bounded, for both
    gated requests to be on alpha's replica)."""
    fault_injection._GATE = __import__("re").compile(r"(?!)")


# name -> (the module it patches, the patch)
BREAKAGES: dict[str, tuple[str, Callable[[ModuleType], None]]] = {
    "stream_raises": ("deployments.engine.pool", stream_raises),
    "answer_short": ("deployments.engine.pool", answer_short),
    "decode_hangs": ("deployments.engine.pool", decode_hangs),
    "late_registration": ("deployments.engine.pool", late_registration),
    "gguf_unlocked": ("deployments.engine.loading", gguf_unlocked),
    "relay_uncancelled": ("deployments.ingress", relay_uncancelled),
    "replica_500_once": ("fault_injection", replica_500_once),
    "death_is_500": ("deployments.engine.errors", death_is_500),
    "engine_loss_is_500": ("deployments.engine.process", engine_loss_is_500),
    "never_reaches": ("fault_injection", never_reaches),
    "gate_ignored": ("fault_injection", gate_ignored),
}


class _Patcher(importlib.abc.MetaPathFinder):
    """Finds the named modules through the normal finders, then patches each right after it executes."""

    def __init__(self, patches: dict[str, list[Callable[[ModuleType], None]]]):
        self.patches = patches  # module name -> its patches (removed once applied)
        self.busy: set[str] = set()

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self.patches or name in self.busy:
            return None
        self.busy.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy.discard(name)
        if spec is None or spec.loader is None:
            return spec
        loader, patches = spec.loader, self.patches.pop(name)
        exec_module = loader.exec_module

        def patched(module: ModuleType) -> None:
            exec_module(module)
            for patch in patches:
                patch(module)

        loader.exec_module = patched  # type: ignore[method-assign]
        return spec


def _install() -> None:
    names = [name for name in os.environ.get("RAYFIT_BREAK", "").split(",") if name]
    if not names:
        return
    patches: dict[str, list[Callable[[ModuleType], None]]] = {}
    for name in names:
        module, patch = BREAKAGES[name]  # an unknown name fails every process loudly
        patches.setdefault(module, []).append(patch)
    sys.meta_path.insert(0, _Patcher(patches))


_install()
