"""The engine's own process (`engine_process: true`, the default): the child's side.

`python -m deployments.engine.child <fd>` is started by the replica
(deployments.engine.process.EngineProcess, whose docstring has the why). It
builds the engine with `build_engine` — the same GPU cap, load and KV budget as
in a replica — reports ready (or why not), then runs each call as a task on its
event loop and sends every turn's answers in one message, until the replica's
end of the socket closes. What crosses the socket is deployments.engine.messages
alone; each request type maps to one engine method here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from deployments.engine.errors import InvalidRequest, RetryableGenerationError
from deployments.engine.generation import GenerationInput
from deployments.engine.host import build_engine
from deployments.engine.kv import RequestCancelled
from deployments.engine.memory import is_out_of_memory, recover
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
    Report,
    Request,
    Result,
    Start,
    StartFailed,
    Stream,
)

logger = logging.getLogger("ray.serve")

# Threads the child gives requests waiting for a sequence slot (the replica's MAX_ONGOING_REQUESTS).
_SLOT_WAITERS = 32
# The child's exit status when the replica sent something that is not a request (the wire is broken).
WIRE_BROKEN = 3

# Modules whose exceptions the replica unpickles without loading torch or transformers (a call's error
# from any other module is sent as its nearest class from these: tests/test_cancellation.py).
_LIGHT_MODULES = frozenset(
    {"builtins", "deployments.engine.errors", "deployments.engine.process", "deployments.engine.verify"}
)

# What a request did wrong or was told to stop: answered without a traceback in the log.
_EXPECTED = (InvalidRequest, RequestCancelled, RetryableGenerationError)


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _light(exc: BaseException) -> BaseException:
    """`exc` as the replica can unpickle it without importing torch or transformers: its nearest class
    defined in a light module (BatchInterrupted → RetryableGenerationError), with the same message."""
    light = next(cls for cls in type(exc).__mro__ if cls.__module__ in _LIGHT_MODULES)
    if light is type(exc):
        return _portable(exc)
    try:
        return _portable(light(*exc.args))
    except Exception:
        return _portable(light(str(exc)))


class _EngineServer:
    """The child's event loop: each call a task, each loop turn's answers one message."""

    def __init__(self, conn: Connection, engine: Any, role: str):
        self.conn = conn
        self.role = role
        self.engine = engine
        self.send_lock = threading.Lock()
        self.outbox: list[Answer] = []
        self.tasks: dict[int, asyncio.Task[None]] = {}
        # Requests waiting for a sequence slot hold a thread each (the engine's `executor`).
        self.slot_waiters = ThreadPoolExecutor(max_workers=_SLOT_WAITERS, thread_name_prefix="engine-slot")

    async def run(self) -> None:
        """Serve until the replica's end closes (the reader thread then ends the process)."""
        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, name="engine-reader", daemon=True).start()
        await self.loop.create_future()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                # The replica exited or was killed: nothing is left to answer. No clean-up either:
                # a wedged generation thread must not keep the process (and its memory) alive.
                os._exit(0)
            except Exception:
                # Not unpicklable here: the two sides disagree on the wire, and no call can be answered.
                logger.exception("%s: unreadable message from the replica; the engine process exits", self.role)
                os._exit(WIRE_BROKEN)
            match message:
                case Report():
                    self._send([self._report(message)])
                case Generate() | Stream() | GenerateBatch() | Cancel():
                    self.loop.call_soon_threadsafe(self._dispatch, message)
                case Request(call_id=call_id):
                    refused = TypeError(f"the engine process serves no {type(message).__name__} request")
                    self._send([Failure(call_id, refused)])
                case _:
                    logger.error("%s: the replica sent %r, not a request; the engine process exits", self.role, message)
                    os._exit(WIRE_BROKEN)

    def _report(self, report: Report) -> Answer:
        """A report, read on the reader thread (the engine's reports are cheap and thread-safe)."""
        try:
            match report:
                case KvReport():
                    value: Any = self.engine.kv_report()
                case LoadReport():
                    value = self.engine.load_report()
                case MemoryReport():
                    value = self.engine.memory_report()
                case LastProgress():
                    value = self.engine.last_progress
                case _:
                    raise TypeError(f"the engine process serves no {type(report).__name__} report")
            return Result(report.call_id, value)
        except Exception as exc:
            return Failure(report.call_id, _light(exc))

    def _dispatch(self, request: Generate | Stream | GenerateBatch | Cancel) -> None:
        if isinstance(request, Cancel):
            task = self.tasks.get(request.call_id)
            if task is not None:
                task.cancel()
            return
        self.tasks[request.call_id] = self.loop.create_task(self._run(request))

    async def _run(self, request: Generate | Stream | GenerateBatch) -> None:
        call_id = request.call_id
        try:
            match request:
                case Generate(inp=inp):
                    self._post(Result(call_id, await self.engine.generate_async(inp, self.slot_waiters)))
                case Stream(inp=inp):
                    await self._stream(call_id, inp)
                case GenerateBatch(inputs=inputs):  # blocking: on a thread
                    self._post(Result(call_id, await asyncio.to_thread(self.engine.generate_batch, list(inputs))))
        except asyncio.CancelledError:
            pass  # withdrawn by the replica, which expects no answer
        except BaseException as exc:
            if is_out_of_memory(exc):
                exc = recover(self.role, exc)  # freed here, where the memory is; the replica answers the 503
            elif not isinstance(exc, _EXPECTED):
                logger.exception("engine call %s failed", type(request).__name__)
            self._post(Failure(call_id, _light(exc)))
        finally:
            self.tasks.pop(call_id, None)

    async def _stream(self, call_id: int, inp: GenerationInput) -> None:
        deltas = await self.engine.open_stream(inp, self.slot_waiters)
        self._post(Opened(call_id))
        try:
            async for delta in deltas:
                self._post(Item(call_id, delta))
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]  # stops generating when withdrawn
        self._post(End(call_id))

    def _post(self, answer: Answer) -> None:
        """Queue an answer; everything posted in one loop turn leaves in one message."""
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.append(answer)

    def _flush(self) -> None:
        batch, self.outbox = self.outbox, []
        self._send(batch)

    def _send(self, batch: list[Answer]) -> None:
        try:
            with self.send_lock:
                self.conn.send(batch)
        except OSError:
            pass  # the replica is gone; the reader ends the process


def main(fd: int) -> None:
    """The child: load, report ready (or why not), serve until the replica's end closes."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s engine[%(process)d] %(name)s: %(message)s"
    )
    conn = Connection(fd)
    start = conn.recv()
    if not isinstance(start, Start):
        logger.error("the replica began with %r, not a Start; the engine process exits", start)
        sys.exit(WIRE_BROKEN)
    role = start.role
    try:
        engine, facts = build_engine(start.spec, start.entry, start.options)
    except BaseException as exc:
        logger.exception("%s: the engine could not start", role)
        conn.send(StartFailed(_portable(exc)))
        return
    # As Serve does for a replica once it has started: the start-up objects (modules, the model)
    # live as long as the process, so later collections need not scan them.
    gc.collect()
    gc.freeze()
    conn.send(Ready(facts))
    logger.info("%s: engine serving in process %d", role, os.getpid())
    asyncio.run(_EngineServer(conn, engine, role).run())


if __name__ == "__main__":
    main(int(sys.argv[1]))
