"""The engine's own process (`engine_process: true`, the default): the child's side.

`python -m deployments.engine.child <fd>` is started by the replica
(deployments.engine.process.EngineProcess, whose docstring has the why and
the wire). It builds the engine with `build_engine` — the same GPU cap, load
and KV budget as in a replica — reports ready (or why not), then runs each
call as a task on its event loop and sends every turn's answers in one
message, until the replica's end of the socket closes.
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

logger = logging.getLogger("ray.serve")

# Threads the child gives requests waiting for a sequence slot (the replica's MAX_ONGOING_REQUESTS).
_SLOT_WAITERS = 32

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
        self.outbox: list[tuple[str, int, Any]] = []
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
            kind, call_id, payload = message
            if kind == "quick":
                self._answer_now(call_id, *payload)
            else:
                self.loop.call_soon_threadsafe(self._dispatch, kind, call_id, payload)

    def _answer_now(self, call_id: int, name: str, args: tuple[Any, ...]) -> None:
        try:
            value = getattr(self.engine, name)  # last_progress is a property, the others methods
            answer = ("result", call_id, value(*args) if callable(value) else value)
        except Exception as exc:
            answer = ("error", call_id, _light(exc))
        self._send([answer])

    def _dispatch(self, kind: str, call_id: int, payload: Any) -> None:
        if kind == "cancel":
            task = self.tasks.get(call_id)
            if task is not None:
                task.cancel()
            return
        self.tasks[call_id] = self.loop.create_task(self._run(kind, call_id, payload))

    async def _run(self, kind: str, call_id: int, payload: Any) -> None:
        try:
            if kind == "generate":
                self._post("result", call_id, await self.engine.generate_async(payload, self.slot_waiters))
            elif kind == "stream":
                await self._stream(call_id, payload)
            else:  # "call": a blocking engine method
                name, args = payload
                self._post("result", call_id, await asyncio.to_thread(getattr(self.engine, name), *args))
        except asyncio.CancelledError:
            pass  # withdrawn by the replica, which expects no answer
        except BaseException as exc:
            if is_out_of_memory(exc):
                exc = recover(self.role, exc)  # freed here, where the memory is; the replica answers the 503
            elif not isinstance(exc, _EXPECTED):
                logger.exception("engine call %s failed", kind)
            self._post("error", call_id, _light(exc))
        finally:
            self.tasks.pop(call_id, None)

    async def _stream(self, call_id: int, inp: GenerationInput) -> None:
        deltas = await self.engine.open_stream(inp, self.slot_waiters)
        self._post("opened", call_id, None)
        try:
            async for delta in deltas:
                self._post("item", call_id, delta)
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]  # stops generating when withdrawn
        self._post("end", call_id, None)

    def _post(self, kind: str, call_id: int, payload: Any) -> None:
        """Queue an answer; everything posted in one loop turn leaves in one message."""
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.append((kind, call_id, payload))

    def _flush(self) -> None:
        batch, self.outbox = self.outbox, []
        self._send(batch)

    def _send(self, batch: list[tuple[str, int, Any]]) -> None:
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
    spec, entry, role = conn.recv()
    try:
        engine, facts = build_engine(spec, entry)
    except BaseException as exc:
        logger.exception("%s: the engine could not start", role)
        conn.send(("failed", _portable(exc)))
        return
    # As Serve does for a replica once it has started: the start-up objects (modules, the model)
    # live as long as the process, so later collections need not scan them.
    gc.collect()
    gc.freeze()
    conn.send(("ready", (facts, getattr(engine, "pool", None) is not None)))
    logger.info("%s: engine serving in process %d", role, os.getpid())
    asyncio.run(_EngineServer(conn, engine, role).run())


if __name__ == "__main__":
    main(int(sys.argv[1]))
