"""Side requests that arrive together, run as one `generate_batch` call.

The running batch (the pool) takes requests one by one as they come. Everything
else runs on the side backend (seeded sampling, images, prompt scoring, and every
request when continuous batching is off), whose `generate_batch` decodes a list of
requests together. `SideBatches` gathers the requests that arrive within `wait_s`
of each other, up to `size` (the plan's batch_sequences), and runs one batch at a
time. So the engine alone decides how a request runs, and the Serve replica has one
request path whichever backend takes it.

A bad request must not fail its batch mates: on InvalidRequest, a batch of several
runs again one request at a time. Any other error is every request's (the batch's
memory was shared). A caller that goes away leaves its batch; when every caller of
the running batch has gone, decoding stops within a step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from deployments.engine.errors import InvalidRequest
from deployments.engine.generation import GenerationInput, GenerationOutput

# How long the first request of a batch waits for mates (the replica's @serve.batch waited as long).
SIDE_BATCH_WAIT_S = 0.01

RunBatch = Callable[[Sequence[GenerationInput], threading.Event], list[GenerationOutput]]


@dataclass(eq=False)
class _Waiter:
    request: GenerationInput
    answer: asyncio.Future[GenerationOutput]
    gone: bool = False  # its caller was cancelled
    batch: list[_Waiter] = field(default_factory=list)  # the batch it runs in, once taken
    cancel: threading.Event | None = None  # that batch's stop switch


class SideBatches:
    """One engine's side requests, batched (see the module's docstring)."""

    def __init__(self, run_batch: RunBatch, size: int, wait_s: float = SIDE_BATCH_WAIT_S):
        self._run_batch = run_batch
        self.size = max(1, size)
        self.wait_s = wait_s
        self._waiting: list[_Waiter] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the lock and the event below belong to
        self._turn: asyncio.Lock | None = None  # held while a batch runs: one at a time
        self._full: asyncio.Event | None = None  # set when `size` requests wait

    async def generate(self, request: GenerationInput) -> GenerationOutput:
        """`request`'s output, decoded in a batch with the side requests that arrive with it."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # asyncio's locks and events belong to the loop they first wait on
            self._loop, self._turn, self._full = loop, asyncio.Lock(), asyncio.Event()
        waiter = _Waiter(request, loop.create_future())
        self._waiting.append(waiter)
        if len(self._waiting) >= self.size:
            self._full.set()  # type: ignore[union-attr]
        try:
            while not waiter.answer.done():
                await self._turn.acquire()
                if waiter.answer.done():  # an earlier batch took it
                    self._turn.release()
                    break
                # The batch runs as a task of its own, which releases the turn when it ends, so that a
                # caller who goes away neither orphans its mates' answers nor lets a second batch start.
                running = asyncio.create_task(self._next_batch())
                running.add_done_callback(self._batch_done)
                await asyncio.shield(running)
            return await waiter.answer
        except asyncio.CancelledError:
            self._leave(waiter)
            raise

    def _batch_done(self, running: asyncio.Task[None]) -> None:
        assert self._turn is not None
        self._turn.release()
        if not running.cancelled():
            running.exception()  # read here too: its callers have it as their answer, even if they left

    def _leave(self, waiter: _Waiter) -> None:
        """The caller went away: out of the queue, or out of its running batch (stopped once all have left)."""
        waiter.gone = True
        if waiter in self._waiting:
            self._waiting.remove(waiter)
        if waiter.cancel is not None and all(mate.gone for mate in waiter.batch):
            waiter.cancel.set()

    async def _next_batch(self) -> None:
        """Waits up to `wait_s` for mates, then runs the oldest `size` waiting requests."""
        assert self._full is not None
        if len(self._waiting) < self.size:
            try:
                await asyncio.wait_for(self._full.wait(), self.wait_s)
            except TimeoutError:
                pass  # the window closed: the batch runs with whoever came
        batch, self._waiting = self._waiting[: self.size], self._waiting[self.size :]
        if len(self._waiting) < self.size:
            self._full.clear()
        if not batch:
            return
        cancel = threading.Event()
        for waiter in batch:
            waiter.batch, waiter.cancel = batch, cancel
        try:
            await self._run(batch, cancel)
        finally:
            # Whatever ended the run (a bug here, the loop shutting down), no caller waits forever.
            for waiter in batch:
                self._answer(waiter, RuntimeError("the side batch ended without an answer for this request"))

    async def _run(self, batch: list[_Waiter], cancel: threading.Event) -> None:
        try:
            outputs = await asyncio.to_thread(self._run_batch, [w.request for w in batch], cancel)
        except InvalidRequest as exc:
            if len(batch) == 1:
                self._answer(batch[0], exc)
            else:
                await self._one_by_one(batch, cancel)
            return
        except Exception as exc:
            for waiter in batch:
                self._answer(waiter, exc)
            return
        if len(outputs) != len(batch):  # which answer is whose is unknown: nobody gets another's
            error = RuntimeError(f"the side batch gave {len(outputs)} answers for {len(batch)} requests")
            for waiter in batch:
                self._answer(waiter, error)
            return
        for waiter, output in zip(batch, outputs, strict=True):
            self._answer(waiter, output)

    async def _one_by_one(self, batch: list[_Waiter], cancel: threading.Event) -> None:
        """A batch with a bad request in it, again one request at a time: each gets its own answer."""
        for waiter in batch:
            if waiter.gone:
                continue
            try:
                (output,) = await asyncio.to_thread(self._run_batch, [waiter.request], cancel)
            except Exception as exc:
                self._answer(waiter, exc)
            else:
                self._answer(waiter, output)

    @staticmethod
    def _answer(waiter: _Waiter, answer: GenerationOutput | BaseException) -> None:
        """`answer` to the waiter's caller, unless it has gone or already has its answer."""
        if waiter.gone or waiter.answer.done():
            return
        if isinstance(answer, BaseException):
            waiter.answer.set_exception(answer)
        else:
            waiter.answer.set_result(answer)
