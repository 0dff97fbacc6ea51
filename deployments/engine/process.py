"""A replica's engine in a process of its own (`engine_process: true`, the default): the replica's side.

Why: transformers' batching loop is a Python thread. Inside the replica it
shares one GIL with Ray Serve's per-token streaming (every streamed token is
a Serve item handed from the user-code loop to Serve's main loop, serialized
by Ray's executor, sent by the core worker). In a process of its own the loop
has a GIL to itself, and each turn of that process's event loop sends the
deltas of every stream in one message (the shape of vLLM's engine core).
Measured on the CPU demo: BENCHMARKS.md, "Latest runs".

`EngineProcess` starts `python -m deployments.engine.orphan_guard <pid> deployments.engine.child`
(the child: it loads the model and runs the engine, deployments.engine.child) on one end of
a socket pair, and offers what deployments.model calls on an engine:
generate_async, open_stream, generate_batch, kv_report,
load_report, memory_report, last_progress. This module imports neither torch
nor transformers: the replica does not need them to forward requests.

Wire: multiprocessing.connection over the socket pair, carrying only the typed
messages of deployments.engine.messages (its docstring has the exchange): a request
per call, each with its call id; a list of answers per turn of the child's loop.
Reports (`messages.Report`) are answered by the child's reader thread at once.

Lifetimes: the child exits when the replica's end of the socket closes (the
replica exited or was killed); while it still loads, and reads no socket, the
kernel kills it as the replica dies, SIGKILL included (deployments.engine.orphan_guard:
the parent-death signal, set before the child imports torch; `_spawn` forks it
from a thread that lives as long as the replica). When the child dies, every
open call fails with EngineProcessLost (a 503) and every later call too,
`last_progress` included, so the replica's health check fails and Serve
replaces it.

Memory: the weights and the KV cache live in the child; `memory_report` is
the child's (its RSS on CPU, its torch allocator on GPU).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor, Future, InvalidStateError
from multiprocessing.connection import Connection
from typing import Any

from deployments.engine.errors import RetryableGenerationError
from deployments.engine.generation import GenerationInput, GenerationOutput, ModelFacts, StreamDelta
from deployments.engine.host import EngineOptions
from deployments.engine.messages import (
    Answer,
    Cancel,
    End,
    Failure,
    Generate,
    GenerateBatch,
    Item,
    KvReport,
    LastProgress,
    LoadReport,
    MemoryReport,
    Opened,
    Ready,
    Request,
    Result,
    Start,
    StartFailed,
    Stream,
)
from deployments.engine.protocol import KvFigures, LoadFigures
from placement.config import ModelSpec
from placement.plan import PlanEntry

logger = logging.getLogger("ray.serve")

# The environment variable that `deployments.app.AppArgs.engine_process` defaults from (read there only):
# "1" or "0", every replica runs its engine in a child process, or in itself, whatever its spec says.
ENGINE_PROCESS_ENV = "RAYFIT_ENGINE_PROCESS"


class EngineProcessLost(RetryableGenerationError):
    """The engine's process exited: the request was lost (a 503) and Serve's health check replaces the replica."""


class _Inbox:
    """A stream's deltas as they arrive, on the event loop that reads them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Item | End | Failure] = asyncio.Queue()


class EngineProcess:
    """The engine of one replica, running in a child process; the same calls as `Engine`."""

    def __init__(self, spec: ModelSpec, entry: PlanEntry, role: str, options: EngineOptions | None = None):
        """Start the child and wait until it has loaded the model (minutes for a large one); `options`
        reach its `build_engine` in the Start message. Raises what the load raised (ModelLoadError), or
        ModelLoadError if the child died."""
        ours, theirs = socket.socketpair()
        # The replica's import path (Ray's working_dir, the tests' helpers) for the child too.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        # The child dies with this process, SIGKILL included, even while it loads (deployments.engine.orphan_guard).
        command = [sys.executable, "-m", "deployments.engine.orphan_guard", str(os.getpid())]
        self.process = _spawn([*command, "deployments.engine.child", str(theirs.fileno())], theirs.fileno(), env)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._calls_lock = threading.Lock()
        self._closing = False  # close() was asked: the child's exit is expected, not an error
        self._ids = itertools.count(1)
        self._futures: dict[int, Future[Any]] = {}
        self._inboxes: dict[int, _Inbox] = {}
        self._lost: EngineProcessLost | None = None
        self.facts = self._start(Start(spec, entry, role, options or EngineOptions()))
        self.pid = self.process.pid
        threading.Thread(target=self._read, name=f"{role}-engine-reader", daemon=True).start()

    def _start(self, start: Start) -> ModelFacts:
        role, spec = start.role, start.spec
        try:
            self._conn.send(start)
            reply = self._conn.recv()
        except (EOFError, OSError) as exc:
            from deployments.engine.loading import ModelLoadError  # transformers: only on this failure

            code = self.process.wait()
            raise ModelLoadError(
                f"{role}: the engine process exited (code {code}) before loading {spec.model}; "
                "its log is in this replica's log"
            ) from exc
        match reply:
            case Ready(facts=facts):
                return facts
            case StartFailed(error=error):
                self.process.wait()
                raise error
            case _:
                self.close()
                raise TypeError(f"{role}: the engine process answered its start with {type(reply).__name__}")

    # -- calls

    def _open(self, request: Callable[[int], Request], inbox: _Inbox | None = None) -> tuple[int, Future[Any]]:
        """Send one request, built for its new call id; its future resolves with the answer (a stream's:
        when it opened)."""
        call_id, future = next(self._ids), Future()
        with self._calls_lock:
            if self._lost is not None:
                raise self._lost
            self._futures[call_id] = future
            if inbox is not None:
                self._inboxes[call_id] = inbox
        self._send(request(call_id))
        return call_id, future

    def _send(self, message: Request) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:
            raise self._lost or EngineProcessLost("the engine process is gone") from None

    def _withdraw(self, call_id: int) -> None:
        """The caller went away: the child cancels the call (the engine stops it within a step)."""
        with self._calls_lock:
            self._futures.pop(call_id, None)
            self._inboxes.pop(call_id, None)
            if self._lost is not None:
                return
        try:
            self._send(Cancel(call_id))
        except EngineProcessLost:
            pass

    def _wait(self, request: Callable[[int], Request]) -> Any:
        """A blocking call: a report (the child's reader thread answers it), or a batch."""
        return self._open(request)[1].result()

    async def generate_async(self, inp: GenerationInput, executor: Executor | None = None) -> GenerationOutput:
        """Engine.generate_async in the child; cancelling the caller withdraws the request there."""
        call_id, future = self._open(lambda call_id: Generate(call_id, inp))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self._withdraw(call_id)
            raise

    async def open_stream(self, inp: GenerationInput, executor: Executor | None = None) -> AsyncIterator[StreamDelta]:
        """Engine.open_stream in the child: awaiting it checks the request (InvalidRequest before any
        delta); closing the iterator stops generation there."""
        inbox = _Inbox(asyncio.get_running_loop())
        call_id, opened = self._open(lambda call_id: Stream(call_id, inp), inbox)
        try:
            await asyncio.wrap_future(opened)
        except BaseException:
            self._withdraw(call_id)
            raise
        return self._deltas(call_id, inbox)

    async def _deltas(self, call_id: int, inbox: _Inbox) -> AsyncIterator[StreamDelta]:
        finished = False
        try:
            while True:
                match await inbox.queue.get():
                    case Item(delta=delta):
                        yield delta
                    case Failure(error=error):
                        finished = True
                        raise error
                    case End():
                        finished = True
                        return
        finally:
            if not finished:
                self._withdraw(call_id)

    def generate_batch(self, inputs: Sequence[GenerationInput]) -> list[GenerationOutput]:
        batch = tuple(inputs)
        return self._wait(lambda call_id: GenerateBatch(call_id, batch))

    def kv_report(self) -> KvFigures:
        return self._wait(KvReport)

    def load_report(self) -> LoadFigures:
        return self._wait(LoadReport)

    def memory_report(self) -> dict[str, int | str]:
        return self._wait(MemoryReport)

    @property
    def last_progress(self) -> float:
        """The child's last token time (CLOCK_MONOTONIC is one clock for both processes).
        Raises EngineProcessLost once the child is gone: the health check then fails."""
        return self._wait(LastProgress)

    # -- answers

    def _read(self) -> None:
        """The reader thread: every answer batch from the child, until it exits."""
        try:
            while True:
                self._deliver(self._conn.recv())
        except (EOFError, OSError):
            pass
        try:
            code: int | None = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        if self._closing:
            logger.info("the engine process %s stopped (code %s)", self.pid, code)
        else:
            logger.error("the engine process %s exited (code %s); the replica fails its health check", self.pid, code)
        self._fail_all(EngineProcessLost(f"the engine process exited (code {code}); the replica is being replaced"))

    def _deliver(self, batch: list[Answer]) -> None:
        """Resolve futures here; hand stream items to their loops, one wake-up per loop per batch."""
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Inbox, Item | End | Failure]]] = {}
        with self._calls_lock:
            for answer in batch:
                call_id = answer.call_id
                future = self._futures.get(call_id)
                if future is not None and isinstance(answer, Result | Failure | Opened):
                    del self._futures[call_id]
                    match answer:
                        case Result(value=value):
                            _settle(future, value, failed=False)
                        case Failure(error=error):
                            self._inboxes.pop(call_id, None)
                            _settle(future, error, failed=True)
                        case Opened():
                            _settle(future, None, failed=False)
                    continue
                inbox = self._inboxes.get(call_id)
                if inbox is None:
                    continue  # withdrawn: its last items are dropped
                if not isinstance(answer, Item | End | Failure):
                    logger.error("the engine process answered stream %d with %r (dropped)", call_id, answer)
                    continue
                if not isinstance(answer, Item):
                    del self._inboxes[call_id]
                per_loop.setdefault(inbox.loop, []).append((inbox, answer))
        for loop, items in per_loop.items():
            loop.call_soon_threadsafe(_put, items)

    def _fail_all(self, error: EngineProcessLost) -> None:
        with self._calls_lock:
            self._lost = error
            futures, self._futures = self._futures, {}
            inboxes, self._inboxes = self._inboxes, {}
        for future in futures.values():
            _settle(future, error, failed=True)
        for call_id, inbox in inboxes.items():
            inbox.loop.call_soon_threadsafe(_put, [(inbox, Failure(call_id, error))])

    def close(self) -> None:
        """Stop the child (it would also exit on its own once this process is gone)."""
        self._closing = True
        self._conn.close()
        self.process.terminate()


# A child to start: (its Popen, once started; command; the fd it inherits; environment).
_SpawnRequest = tuple[Future[subprocess.Popen[bytes]], list[str], int, dict[str, str]]
_spawner_lock = threading.Lock()
_spawner: queue.SimpleQueue[_SpawnRequest] | None = None


def _spawn(command: list[str], fd: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Popen on a thread that lives as long as this process. The child's parent-death signal fires when
    the *thread* that forked it exits (prctl(2)), not only the process. Serve 2.60 runs a replica's
    constructor on its user-code event loop thread (replica.py, `initialize_callable`: "Always run the
    constructor on the main user code thread"), a daemon running that loop for the replica's life, or,
    with RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, on the actor's own loop: both live as long as
    the replica. But its *sync methods* run on anyio worker threads, which exit when idle, and a later
    Serve or a caller's thread may differ: forking here keeps a live replica's child from being killed
    by one of the replica's threads ending, whichever thread builds the EngineProcess."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = queue.SimpleQueue()
            threading.Thread(target=_fork_forever, args=(_spawner,), name="engine-spawner", daemon=True).start()
    future: Future[subprocess.Popen[bytes]] = Future()
    _spawner.put((future, command, fd, env))
    return future.result()


def _fork_forever(requests: queue.SimpleQueue[_SpawnRequest]) -> None:
    """The spawner thread: never returns (a daemon, it ends only with the process)."""
    while True:
        future, command, fd, env = requests.get()
        try:
            future.set_result(subprocess.Popen(command, pass_fds=(fd,), env=env))
        except BaseException as exc:
            future.set_exception(exc)


def _forget_spawner() -> None:
    """In a forked copy of this process the spawner thread does not exist: the next `_spawn` starts one."""
    global _spawner, _spawner_lock
    _spawner, _spawner_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_spawner)


def _settle(future: Future[Any], value: Any, *, failed: bool) -> None:
    try:
        if failed:
            future.set_exception(value)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass  # the caller cancelled it meanwhile


def _put(items: list[tuple[_Inbox, Item | End | Failure]]) -> None:
    """On the streams' loop: each answer into its stream's queue, in order."""
    for inbox, answer in items:
        inbox.queue.put_nowait(answer)
