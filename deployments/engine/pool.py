"""The pool backend: transformers' continuous batching, fed per request.

`Engine` (deployments.engine) sends unseeded text requests here, greedy or
sampled, streamed or not, when continuous batching is on. Requests join the
running batch at the next decode step instead of waiting for a static batch
to finish.

`ContinuousBatcher` is built on `model.init_continuous_batching()`
(transformers 5): a paged KV cache and a background generation thread. It
adds what a server needs on top: one queue per request (a pump thread routes
the manager's shared output queue), cancellation, recovery when the batching
loop dies, and a KV cache of exactly the pool the plan budgets
(`placement.sizing.kv_budget.PagedPool`), not "90% of free memory". Admission
is by sequence slots: at most `pool.sequences` requests hold pages at once, so
the pool (sized for that many requests at full context) never runs short and
the manager never preempts or offloads; later requests wait in `submit`.

`PoolBackend` is what the engine calls: whole answers for several rows
(submitted together so they decode in one batch), and streams.

Greedy and sampled requests share one running batch: the manager samples
(`do_sample` is one global switch) with transformers' per-request
temperature and top-p processors, and a greedy request asks for top-p 0,
which keeps only the most likely token — argmax, decided per row. Seeds do
not exist per request in the manager, so seeded and image requests take the
side backend (deployments.engine.side).

Logprobs: transformers' own `return_logprobs` gives only the chosen token's
logprob, taken after temperature and top-p (a greedy row's top-p 0 makes it
always 0), and no alternatives. So a request that asks for logprobs carries a
`LogprobRecorder` in its `RowLogits` instead: the first processor of the
batch, it sees the model's raw scores (deployments.engine.logprobs).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, PreTrainedModel

from deployments.engine.errors import RetryableGenerationError
from deployments.engine.generation import SamplingParams, StreamDelta
from deployments.engine.kv import RequestCancelled, SequenceSlots
from deployments.engine.logprobs import LogprobRecorder
from deployments.engine.prompts import PreparedPrompt
from deployments.engine.row_logits import ROW_KEY, BatchRowsProcessor, RowFactory, install_batch_rows
from deployments.engine.text import IncrementalText, StopHoldBack, TextRules
from placement import hf_internals
from placement.sizing.kv_budget import PagedPool

logger = logging.getLogger(__name__)

# Tokens per forward pass (decode rows + prefill chunk; longer prompts are split
# across steps by the scheduler). Small on purpose: the sdpa path builds a dense
# mask of max_batch_tokens × (cached + batch tokens) every step. Measured on the
# CPU demo (SmolLM2-135M, 1 thread): 256 → 27 tok/s single stream, 167 at 16;
# 2064 → 3 tok/s single stream.
MAX_BATCH_TOKENS = 256
# How long the pump waits on the manager's queue before checking whether it should stop.
_POLL_S = 0.1
# The manager builds its cache on its own thread; start-up waits this long for it.
_CACHE_WAIT_S = 60.0
# Placeholders that make transformers build its temperature and top-p
# processors (a value of 1.0 builds none); every request sends its own.
_PROCESSOR_TEMPERATURE = 0.5
_PROCESSOR_TOP_P = 0.5
# Top-p 0 keeps only the highest-scoring token (at least one token is always
# kept): greedy decoding inside a sampling batch.
_GREEDY = {"temperature": 1.0, "top_p": 0.0}


def sampling_kwargs(params: SamplingParams) -> dict[str, float]:
    """`params` as the manager's `add_request` takes them (the pool's one translation of SamplingParams)."""
    if params.greedy:
        return _GREEDY
    return {"temperature": float(params.temperature), "top_p": float(params.top_p)}


class ContinuousBatchingError(RuntimeError):
    """The continuous-batching manager failed a request or stopped."""


class BatchInterrupted(ContinuousBatchingError, RetryableGenerationError):
    """The running batch failed (e.g. out of memory inside the batching loop) and the batcher
    restarted: the request was lost, the replica serves again (a 503 + Retry-After)."""


@dataclass(frozen=True)
class TokenUpdate:
    """All tokens generated so far for one request (cumulative), and whether it is done."""

    tokens: tuple[int, ...]
    finished: bool


class _CheapTopP(hf_internals.CBTopPWarper):
    """transformers' per-request top-p, without its vocabulary sort where none is needed.

    Profiled on the demo at 8 concurrent greedy requests, the stock warper's
    sort over the whole vocabulary took a fifth of every decode step, for
    rows where it changes nothing. Here a greedy row (top-p 0) keeps its argmax
    (one max, no sort), a top-p 1 row (OpenAI's default) is left alone, and
    only rows with 0 < top-p < 1 go through the stock sort.

    Once `_GreedyAwareSampler` takes every greedy row's argmax itself
    (`sampler_picks_greedy`), cutting those rows to their argmax here is
    work nobody reads (an argmax, a mask and a copy of the scores each step):
    it is skipped, and only the greedy rows are noted for the sampler.
    """

    # This step's greedy rows [rows] (bool), for `_GreedyAwareSampler`; None once it has read them.
    greedy_rows: torch.Tensor | None = None
    # Set while the runner's sampling step is a `_GreedyAwareSampler` that argmaxes greedy rows itself.
    sampler_picks_greedy: bool = False

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)  # [rows]
        greedy, untouched = top_p <= 0, top_p >= 1
        self.greedy_rows = greedy
        out = scores
        if not self.sampler_picks_greedy and bool(greedy.any()):
            best = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.argmax(dim=-1, keepdim=True), True)
            out = scores.masked_fill(greedy.unsqueeze(-1) & ~best, self.filter_value)
        nucleus = ~(greedy | untouched)
        if bool(nucleus.any()):
            rows = nucleus.nonzero().squeeze(1)
            out = out.clone() if out is scores else out
            out[rows] = super().__call__(scores[rows], tensor_arg[: scores.size(0)][rows])
        return out


class _GreedyAwareSampler:
    """The model runner's sampling step, without softmax and multinomial for greedy rows.

    The manager samples every row (`do_sample` is one switch): softmax over the
    vocabulary, then a multinomial draw, also for greedy rows (profiled: ~9% of
    a decode step). Here every row takes its argmax, and only sampled rows go
    through softmax + multinomial. A greedy row gets the token greedy decoding
    gives; sampled rows draw from the same distribution (their random draws
    differ, none is seeded). With log probabilities asked for (the runner's
    `return_logprobs`, fixed when the manager is built) the stock step runs, and
    `_CheapTopP` then cuts greedy rows to their argmax itself; with no greedy
    row in the step it runs too (nothing to skip). A step whose greedy rows the
    warper did not note fails rather than sample them.
    """

    def __init__(self, stock: hf_internals.SampleStep, returns_logprobs: bool, top_p: _CheapTopP):
        self.stock = stock
        self.returns_logprobs = returns_logprobs
        self.top_p = top_p
        # The stock step (logprobs asked for) needs greedy rows cut to their argmax by the warper.
        top_p.sampler_picks_greedy = not returns_logprobs

    def __call__(self, scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        logits = scores[0]  # [rows, vocab]
        greedy, self.top_p.greedy_rows = self.top_p.greedy_rows, None
        if self.returns_logprobs:
            return self.stock(scores, output_ids)  # the warper cut greedy rows to their argmax
        if greedy is None or greedy.numel() != logits.size(0):
            # The warper did not see these rows, so which of them are greedy is unknown, and the stock
            # step would sample temperature-0 requests. Fail the step instead: the batcher restarts and
            # its requests are answered "retry" (a 503), never with silently sampled text.
            raise RuntimeError(
                f"greedy rows unknown for this step ({'none noted' if greedy is None else greedy.numel()} "
                f"for {logits.size(0)} rows): the top-p warper did not run before sampling"
            )
        if not bool(greedy.any()):
            return self.stock(scores, output_ids)  # every row samples: nothing to skip
        next_tokens = logits.argmax(dim=-1)  # [rows]
        sampled = ~greedy
        if bool(sampled.any()):
            rows = sampled.nonzero().squeeze(1)
            probs = torch.nn.functional.softmax(logits[rows], dim=-1)  # [sampled rows, vocab]
            next_tokens[rows] = torch.multinomial(probs, num_samples=1).squeeze(-1)
        output_ids[0, : next_tokens.size(0)].copy_(next_tokens)
        return None


def _update_of(output: Any) -> TokenUpdate | BaseException:
    """One manager output as a request's reader sees it."""
    if output.error:
        return BatchInterrupted(f"the running batch failed ({output.error}); retry")
    return TokenUpdate(tuple(output.generated_tokens), output.is_finished())


class LoopSink:
    """A request's updates, delivered onto an asyncio event loop (the replica's).

    transformers' output router calls `on_output` on the loop itself: one
    `call_soon_threadsafe` per decode step for every such request together,
    and no thread between the batch and the caller. `put` is for the pump
    and a failing batcher, from any thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: asyncio.Queue[TokenUpdate | BaseException] = asyncio.Queue()

    def put(self, item: TokenUpdate | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    def on_output(self, output: Any) -> None:
        self.items.put_nowait(_update_of(output))

    def renew(self) -> None:
        """Forget what was delivered so far (a retried request starts clean)."""
        self.items = asyncio.Queue()


# Where one request's updates go: a thread-side queue, or an event loop.
_Target = queue.Queue | LoopSink


class ContinuousBatcher:
    """One transformers continuous-batching manager plus per-request delivery."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        pool: PagedPool,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        rows: RowFactory | None = None,
    ):
        """`rows`: builds the logits rules of requests that carry any (grammars, penalties, ...)."""
        config = ContinuousBatchingConfig(
            page_size=pool.page_size,
            num_blocks=pool.num_blocks,
            max_requests_per_batch=pool.sequences,
            max_batch_tokens=max(pool.sequences, MAX_BATCH_TOKENS),
            allow_block_sharing=False,
            auto_switch_to_flash=False,
            per_request_processors=True,
            # Per-row rules (BatchRowsProcessor) run Python per step: no captured graphs, and each
            # step's rows see the tokens of the step before (no asynchronous look-ahead).
            use_cuda_graph=False,
            use_async_batching=False,
        )
        generation = GenerationConfig(
            do_sample=True,
            temperature=_PROCESSOR_TEMPERATURE,
            top_p=_PROCESSOR_TOP_P,
            top_k=None,
            eos_token_id=list(eos_token_ids) or None,
            pad_token_id=pad_token_id,
            max_new_tokens=pool.context_length,
        )
        self.pool = pool
        self.slots = SequenceSlots(pool.sequences, "continuous batching")
        self.eos_token_ids = list(eos_token_ids)
        self._model, self._config, self._generation = model, config, generation
        self._queues: dict[str, _Target] = {}
        self._rows, self._row_keys = rows, {}  # request id → its key in `row_processor`
        self.row_processor = BatchRowsProcessor()  # one for every manager this batcher builds
        self._lock = threading.Lock()
        self._counter = 0
        self._stopping = threading.Event()
        # Times the batching loop died and was rebuilt, and the last time it delivered tokens
        # (the replica's liveness: a busy batcher is alive while tokens flow).
        self.restarts = 0
        self._progress_time = time.monotonic()
        self._progress_step = -1
        self._ready = threading.Event()  # cleared while the manager is being rebuilt
        self._manager = self._start_manager()
        self.cache_bytes = self._wait_for_cache()
        self._ready.set()
        self._pump = threading.Thread(target=self._route, name="rayfit-cb-pump", daemon=True)
        self._pump.start()
        logger.info(
            "continuous batching on: %d requests × %d tokens, KV pool %d bytes (planned %d)",
            pool.sequences,
            pool.context_length,
            self.cache_bytes,
            pool.cache_bytes,
        )

    def _wait_for_live_manager(self) -> bool:
        """Wait until a manager is running: one whose loop just died is rebuilt by the pump first."""
        deadline = time.monotonic() + _CACHE_WAIT_S
        while time.monotonic() < deadline and not self._stopping.is_set():
            manager = self._manager
            if self._ready.is_set() and manager is not None and manager.is_running():
                return True
            time.sleep(_POLL_S / 10)
        return False

    def _start_manager(self) -> Any:
        manager = self._model.init_continuous_batching(
            generation_config=self._generation, continuous_batching_config=self._config
        )
        # Before start(): the loop thread builds its batch processor from this list.
        # Swap the manager's top-p warper for `_CheapTopP` (same settings).
        self._top_p = hf_internals.swap_top_p_warper(manager, _CheapTopP)
        install_batch_rows(manager, self.row_processor)
        manager.start()
        return manager

    def _wait_for_cache(self) -> int:
        """Bytes of the KV pool tensor, read off the manager once its thread has built it."""
        deadline = time.monotonic() + _CACHE_WAIT_S
        while time.monotonic() < deadline:
            processor = hf_internals.built_batch_processor(self._manager)
            if processor is not None:
                # Before any request is admitted (`_ready` is still clear): every step samples this way.
                if self._top_p is not None:
                    hf_internals.wrap_sampler(processor, functools.partial(_GreedyAwareSampler, top_p=self._top_p))
                return hf_internals.kv_cache_bytes(processor)
            if not self._manager.is_running():
                break
            time.sleep(0.01)
        self._manager.stop(block=True, timeout=10)
        raise ContinuousBatchingError("the continuous-batching manager did not build its KV cache")

    # ---- delivery -----------------------------------------------------------------

    def _route(self) -> None:
        """Move the manager's outputs to each request's own queue; rebuild the manager if its loop dies."""
        while not self._stopping.is_set():
            output = self._manager.get_result(timeout=_POLL_S)
            if output is None:
                if not self._manager.is_running() and not self._stopping.is_set():
                    self._recover()
                continue
            self._progress_time = time.monotonic()
            with self._lock:
                target = self._queues.get(output.request_id)
            if target is None:
                continue  # cancelled: nobody waits for it
            target.put(_update_of(output))

    def _recover(self) -> None:
        """The batching loop died (an exception inside transformers' loop, e.g. CUDA out of memory):
        answer every waiting request with a retryable error, free the old pool, start a new manager."""
        fatal = hf_internals.loop_fatal_error(self._manager)
        logger.warning("continuous batching stopped (%s); failing in-flight requests and restarting", fatal)
        self._fail_all(BatchInterrupted(f"the running batch failed ({fatal or 'batching loop stopped'}); retry"))
        self._manager.stop(block=True, timeout=10)
        # Free the old KV pool before the new one exists: the plan holds room for one.
        self._ready.clear()
        self._manager = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._manager = self._start_manager()
        self._wait_for_cache()
        self.restarts += 1
        self._progress_time = time.monotonic()
        self._ready.set()

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            waiting = list(self._queues.values())
        for target in waiting:
            target.put(error)

    # ---- requests -----------------------------------------------------------------

    def submit(
        self,
        input_ids: Sequence[int],
        params: SamplingParams,
        *,
        slot_held: bool = False,
        cancel: threading.Event | None = None,
        streaming: bool = True,
        recorder: LogprobRecorder | None = None,
        sink: LoopSink | None = None,
    ) -> str:
        """Queue one request once a sequence slot is free; read its tokens with `updates(request_id)`
        (or, with a `sink`, on its event loop: `asubmit` / `aupdates`).

        Up to `params.max_tokens` new tokens; greedy, or sampled at
        `params`' temperature and top-p, next to greedy rows in the same batch.
        `slot_held`: the caller already took this request's slot with
        `slots.acquire(n)` (several rows at once, so two callers never each
        hold part of what they need and wait on each other). `streaming=False`:
        only the final update is delivered (no per-token wake-ups for a caller
        that needs the whole answer anyway). `recorder`: where the request's logprobs go.

        Blocks while `pool.sequences` requests hold the pool. Every id returned
        holds a slot until `release(request_id)`.
        """
        if not slot_held:
            self.slots.acquire(cancel=cancel)
        with self._lock:
            request_id = f"rayfit-{self._counter}"
            self._counter += 1
            self._queues[request_id] = sink if sink is not None else queue.Queue()
        sampling: dict[str, Any] = dict(sampling_kwargs(params))
        added = None
        try:
            row = self._rows.row(params.rules, input_ids, recorder) if self._rows is not None else None
            if row is not None:
                sampling[ROW_KEY] = self._row_keys[request_id] = self.row_processor.register(row)
            # A manager whose loop just died refuses requests until the pump has rebuilt it: wait, then retry once.
            for _ in range(2):
                if not self._wait_for_live_manager():
                    break
                # A rebuild while this request waited answered every registered request with "retry",
                # this one's too, but it never reached the old batch: it starts clean on this manager.
                if sink is not None:
                    sink.renew()
                else:
                    with self._lock:
                        self._queues[request_id] = queue.Queue()
                manager = self._manager
                if sink is not None:  # outputs straight onto the sink's loop; undone by `release`
                    hf_internals.deliver_on_loop(manager, request_id, sink.on_output, sink.loop)
                added = manager.add_request(
                    list(input_ids),
                    request_id=request_id,
                    max_new_tokens=params.max_tokens,
                    streaming=streaming,
                    eos_token_id=self.eos_token_ids or None,
                    **sampling,
                )
                if added is not None:
                    break
                while self._manager is manager and manager.is_running() and not self._stopping.is_set():
                    time.sleep(_POLL_S / 10)  # refused by a dying manager: let the pump notice
        except BaseException:
            self.release(request_id)
            raise
        if added is None:
            self.release(request_id)
            raise BatchInterrupted("the continuous batcher is restarting; retry")
        return request_id

    async def asubmit(
        self,
        input_ids: Sequence[int],
        params: SamplingParams,
        *,
        executor: Executor | None = None,
        streaming: bool = True,
        recorder: LogprobRecorder | None = None,
    ) -> tuple[str, LoopSink]:
        """`submit` for a caller on an event loop; its updates come on that loop (`aupdates`).

        The wait for a slot runs on `executor` (None: the loop's default). A
        caller cancelled meanwhile withdraws the request, whether it was still
        waiting or had just been submitted.
        """
        loop = asyncio.get_running_loop()
        sink = LoopSink(loop)
        cancel = threading.Event()
        submitted = loop.run_in_executor(
            executor,
            lambda: self.submit(input_ids, params, cancel=cancel, streaming=streaming, recorder=recorder, sink=sink),
        )
        try:
            return await asyncio.shield(submitted), sink
        except asyncio.CancelledError:
            cancel.set()
            submitted.add_done_callback(self._withdraw)
            raise

    def _withdraw(self, submitted: asyncio.Future[str]) -> None:
        """Cancel a request whose caller left while it was being submitted."""
        if not submitted.cancelled() and submitted.exception() is None:
            self.release(submitted.result(), cancel=True)

    async def aupdates(self, request_id: str, sink: LoopSink) -> AsyncIterator[TokenUpdate]:
        """`updates` on the event loop: cumulative token updates until the request finishes;
        raises its error, if any. The caller releases the request (also when cancelled)."""
        while True:
            item = await sink.items.get()
            # Updates are cumulative: a reader several steps behind (a busy loop) needs only the
            # newest, so it decodes and sends one delta for them all instead of one per step.
            while not isinstance(item, BaseException) and not item.finished and not sink.items.empty():
                item = sink.items.get_nowait()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def updates(self, request_id: str, cancel: threading.Event | None = None) -> Iterator[TokenUpdate]:
        """Cumulative token updates until the request finishes; raises its error, if any.

        Raises RequestCancelled within a poll interval of `cancel` being set
        (the caller then releases the request with `cancel=True`).
        """
        with self._lock:
            source = self._queues[request_id]
        while True:
            try:
                item = source.get(timeout=_POLL_S)
            except queue.Empty:
                item = None
            if cancel is not None and cancel.is_set():
                raise RequestCancelled(f"request {request_id} cancelled")
            if item is None:
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    @property
    def last_progress(self) -> float:
        """Monotonic time the batch last moved: an output delivered, or a decode step taken
        (the manager's step counter; non-streamed requests deliver only at their end)."""
        step = hf_internals.decode_step(self._manager)
        if step is not None and step != self._progress_step:
            self._progress_step, self._progress_time = step, time.monotonic()
        return self._progress_time

    @property
    def live_requests(self) -> int:
        """Requests submitted and not yet released."""
        with self._lock:
            return len(self._queues)

    @property
    def submitted(self) -> int:
        """Requests handed to the manager since start."""
        with self._lock:
            return self._counter

    def release(self, request_id: str, *, cancel: bool = False) -> None:
        """Forget a request and free its slot (and stop generating for it when `cancel`)."""
        with self._lock:
            held = self._queues.pop(request_id, None) is not None
            key = self._row_keys.pop(request_id, None)
        if key is not None:
            self.row_processor.forget(key)
        if held:
            self.slots.release()
        manager = self._manager  # None while a failed batcher is being rebuilt: nothing to cancel then
        if manager is None:
            return
        hf_internals.drop_loop_delivery(manager, request_id)
        if cancel:
            manager.cancel_request(request_id)

    def generate(self, input_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """All tokens of one request (blocking)."""
        request_id = self.submit(input_ids, params)
        try:
            last: tuple[int, ...] = ()
            for update in self.updates(request_id):
                last = update.tokens
            return list(last)
        finally:
            self.release(request_id)

    def close(self) -> None:
        self._stopping.set()
        self._manager.stop(block=True, timeout=10)
        self._pump.join(timeout=2)


class PoolBackend:
    """The engine's calls into one `ContinuousBatcher`: rows in, token ids or stream deltas out."""

    def __init__(self, batcher: ContinuousBatcher, text: TextRules):
        self.batcher = batcher
        self.text = text

    def generate(
        self,
        prompts: Sequence[PreparedPrompt],
        params: Sequence[SamplingParams],
        cancel: threading.Event | None = None,
        recorders: Sequence[LogprobRecorder | None] | None = None,
    ) -> list[list[int]]:
        """New token ids per row, in input order; rows beyond the pool's capacity run in later waves.
        `recorders`: per row, where its logprobs go (None: not asked)."""
        recorders = recorders or [None] * len(prompts)
        tokens: list[list[int]] = []
        capacity = self.batcher.slots.capacity
        for start in range(0, len(prompts), capacity):
            wave = range(start, min(start + capacity, len(prompts)))
            # All of a wave's slots at once, then every row submitted before waiting on any,
            # so they decode in one batch; a failed submit withdraws the rows already in.
            self.batcher.slots.acquire(len(wave), cancel)
            ids: dict[int, str] = {}
            try:
                for n, i in enumerate(wave):
                    try:
                        # Whole answers only: per-token updates just to watch for stop strings.
                        streaming = bool(params[i].stop)
                        ids[i] = self.batcher.submit(
                            prompts[i].input_ids,
                            params[i],
                            slot_held=True,
                            streaming=streaming,
                            recorder=recorders[i],
                        )
                    except BaseException:
                        self.batcher.slots.release(len(wave) - n - 1)  # the slots of rows never submitted
                        raise
                for i in wave:
                    tokens.append(self._collect(ids.pop(i), params[i], cancel))
            finally:
                for request_id in ids.values():
                    self.batcher.release(request_id, cancel=True)
        return tokens

    def stream(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        cancel: threading.Event | None = None,
        recorder: LogprobRecorder | None = None,
    ) -> Iterator[StreamDelta]:
        """Deltas of one request as the batch produces them, holding back possible stop strings.

        Detokenized incrementally (one `DecodeStream` step per new token, not
        the whole sequence again for every token). `recorder` has every token's
        logprob by the last delta."""
        request_id = self.batcher.submit(prompt.input_ids, params, cancel=cancel, recorder=recorder)
        reader = _StreamedText(self.text, params)
        try:
            for update in self.batcher.updates(request_id, cancel):
                text = reader.feed(update)
                if text:
                    yield StreamDelta(text=text)
                if reader.stopped:
                    break
        finally:
            self.batcher.release(request_id, cancel=not reader.finished)
        yield reader.last_delta(prompt, recorder)

    async def astream(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        recorder: LogprobRecorder | None = None,
        executor: Executor | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """`stream` on the caller's event loop: the batch hands each step's tokens to the loop
        directly. Closing it (or cancelling the task reading it) cancels the request."""
        request_id, sink = await self.batcher.asubmit(prompt.input_ids, params, executor=executor, recorder=recorder)
        reader = _StreamedText(self.text, params)
        try:
            async for update in self.batcher.aupdates(request_id, sink):
                text = reader.feed(update)
                if text:
                    yield StreamDelta(text=text)
                if reader.stopped:
                    break
        finally:
            self.batcher.release(request_id, cancel=not reader.finished)
        yield reader.last_delta(prompt, recorder)

    async def agenerate(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        recorder: LogprobRecorder | None = None,
        executor: Executor | None = None,
    ) -> list[int]:
        """One row's new token ids, waited for on the caller's event loop (no thread per request)."""
        request_id, sink = await self.batcher.asubmit(
            prompt.input_ids, params, executor=executor, streaming=bool(params.stop), recorder=recorder
        )
        update = TokenUpdate((), finished=False)
        try:
            async for update in self.batcher.aupdates(request_id, sink):
                if self._stop_seen(update, params):
                    break
        finally:
            self.batcher.release(request_id, cancel=not update.finished)
        return list(update.tokens)

    def _collect(self, request_id: str, params: SamplingParams, cancel: threading.Event | None = None) -> list[int]:
        """Wait for one submitted request; stop it early once a stop string shows up."""
        update = TokenUpdate((), finished=False)
        try:
            for update in self.batcher.updates(request_id, cancel):
                if self._stop_seen(update, params):
                    break
        finally:
            self.batcher.release(request_id, cancel=not update.finished)
        return list(update.tokens)

    def _stop_seen(self, update: TokenUpdate, params: SamplingParams) -> bool:
        """Whether an unfinished request already shows a stop string (then it is stopped early).
        Only requests with stop strings get per-token updates (`streaming` in `submit`)."""
        return bool(params.stop) and not update.finished and self.text.stop_seen(update.tokens, params.stop)


class _StreamedText:
    """One streamed request's text as updates arrive: new tokens decoded incrementally,
    any tail that could still become a stop string held back."""

    def __init__(self, text: TextRules, params: SamplingParams):
        self.text, self.params = text, params
        self.tokens: tuple[int, ...] = ()
        self.finished = False
        self._decoder = IncrementalText(text.tokenizer)
        self._release = StopHoldBack(params.stop)

    @property
    def stopped(self) -> bool:
        """A stop string showed up: the request is done, whatever the batch still makes."""
        return self._release.stopped

    def feed(self, update: TokenUpdate) -> str:
        """The text this update adds that may be sent now ("" if none)."""
        new = update.tokens[len(self.tokens) :]
        self.tokens, self.finished = update.tokens, update.finished
        piece = self._decoder.feed(new)
        return self._release.feed(piece) if piece else ""

    def last_delta(self, prompt: PreparedPrompt, recorder: LogprobRecorder | None) -> StreamDelta:
        """The final delta: the rest of the text, finish reason and usage."""
        if recorder is not None:
            recorder.observe(self.tokens)  # the last token's logprob
        return self.text.last_delta(self.tokens, self.params, self._release.sent, prompt.prompt_tokens)
