"""The in-process engine: requests in, text out, on one loaded model.

No Ray and no HTTP here; the Serve deployment (deployments.model) wraps an
`Engine` and calls only its face (deployments.engine.protocol):

- `generate_async(inp)` / `open_stream(inp)`: one request from an event loop,
  whole or as deltas; the engine decides where it runs (below);
- `generate_batch(inputs, cancel)`: whole answers, in input order;
- `stream(inp, cancel)`: deltas, the last with finish_reason and usage;
- `prepare` / `count_tokens` / `count_prompt_tokens`: validation and counting;
- `kv_report()`, `load_report()`, `memory_report()`, `last_progress`: KV
  bytes, what is held now, the model's memory with its KV bytes, liveness;
  `close()`.

The modules, one concern each:

- `prompts`: chat templating, images, tokenizing, the context check;
- `text`: stop strings, EOS, finish reasons, incremental detokenizing;
- `pool`: the continuous-batching backend (transformers' manager);
- `side`: the classic `model.generate` backend (seeded and image requests);
- `kv`: sequence slots (KV admission) and the KV ledger (measured bytes).

Routes (decided here, `uses_pool`): text requests without a seed, greedy or
sampled, streamed or not, join the pool. Seeded and image requests take the side
backend, and so does everything when continuous batching is off; whole side
requests that arrive together run as one batch (deployments.engine.side_batches). Per-request
sampling settings reach both backends as one `SamplingParams`.

Cancellation: `generate_batch(..., cancel)` and `stream(..., cancel)` stop
within a decode step once `cancel` is set (the caller went away), also while
the request still waits for a slot, and raise RequestCancelled.

KV memory (the plan's contract): the replica plan's `kv` (placement.replica)
fixes the sequences that may hold KV at once — the pool's batch, and side
slots for requests the pool cannot take; the engine builds exactly that and
checks it (deployments.engine.contract) before it serves. Requests wait for a slot; none
allocates past the budget. `kv_report()` gives the planned bytes, the pool's
measured tensor and the peak measured in side caches.

Logprobs (deployments.engine.logprobs): a request with `params.logprobs` gets a
recorder that both backends feed the raw scores; `echo` with `prompt_logprobs`
first scores the prompt in a side slot (chunked, so the workspace stays what
`logprob_workspace` states); `max_tokens` 0 with `echo` then generates nothing.

Usage: prompt_tokens counts the model's input ids (image tokens included);
completion_tokens counts the generated tokens kept in the text (up to the
stop string, without the EOS token).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

from deployments.engine.contract import check_built, held_weight_bytes
from deployments.engine.errors import InvalidRequest
from deployments.engine.generation import (
    GenerationInput,
    GenerationOutput,
    SamplingParams,
    StreamDelta,
    image_count,
    pool_takes,
    requests_images,
)
from deployments.engine.kv import KvLedger, RequestCancelled
from deployments.engine.loading import LoadedModel
from deployments.engine.logprobs import LogprobRecorder, Scored, StreamedLogprobs, TokenTexts
from deployments.engine.pool import ContinuousBatcher, PoolBackend
from deployments.engine.prompts import PreparedPrompt, Prompter, eos_token_ids, pad_token_id
from deployments.engine.protocol import KvFigures, LoadFigures
from deployments.engine.row_logits import RowFactory
from deployments.engine.side import SideBackend
from deployments.engine.side_batches import SideBatches
from deployments.engine.text import TextRules
from deployments.engine.tool_formats import ToolFormat
from deployments.engine.verify import memory_report
from placement.hf_internals import check_transformers_internals
from placement.kv_geometry import KvBudget
from placement.replica import ReplicaPlan
from placement.sizing.logprob_workspace import LogprobWorkspace

__all__ = ["Engine", "InvalidRequest", "PreparedPrompt", "RequestCancelled"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Engine:
    """Generates for one `LoadedModel`. Thread-safe for concurrent calls except
    for seeding (torch's global RNG; see deployments.engine.side)."""

    def __init__(self, loaded: LoadedModel, plan: ReplicaPlan, *, tool_format: str = "auto"):
        """`plan`: the replica plan (placement.replica), the engine's only source of numbers: context
        length, the KV pool's geometry and side slots (its `kv`, completed by the host when the
        planner could not read the shape), whether the pool runs. Before serving, what was built is
        checked against it (deployments.engine.contract): PlanContractError when they differ.
        `tool_format`: json, hermes, or auto (from the chat template; deployments.engine.tool_formats)."""
        if plan.kv is None:
            raise ValueError(f"{plan.role}: the replica plan has no KV geometry yet (placement.replica.complete_kv)")
        check_transformers_internals()  # an untested transformers fails here, naming the internal that moved
        self.loaded = loaded
        self.plan = plan
        self.model = loaded.model
        # The weights do not change after loading; summing every tensor took 2 ms per request on the demo's
        # 135M model, so it is taken once.
        self.weights_bytes = held_weight_bytes(self.model)
        self.context_length = plan.context_length
        # auto: the Prompter reads the format off the chat template.
        self.prompts = Prompter(loaded, plan.context_length, None if tool_format == "auto" else ToolFormat(tool_format))
        self.tool_format = self.prompts.tool_format
        pad, eos = pad_token_id(loaded), eos_token_ids(loaded)
        self.text = TextRules(loaded.tokenizer, eos)
        # Grammars, penalties and other per-request logits rules, for both backends.
        self.rows = RowFactory(loaded.tokenizer, eos, vocab_size=int(self.model.config.get_text_config().vocab_size))
        self.kv_planned_bytes = plan.kv_budget_bytes
        self.kv_budget: KvBudget = plan.kv
        self.pool: PoolBackend | None = None
        if self.kv_budget.pool is not None:
            batcher = ContinuousBatcher(
                self.model, pool=self.kv_budget.pool, eos_token_ids=eos, pad_token_id=pad, rows=self.rows
            )
            self.pool = PoolBackend(batcher, self.text)
        self.kv_ledger = KvLedger(pool_bytes=self.pool.batcher.cache_bytes if self.pool else 0)
        try:
            check_built(plan, weights_bytes=self.weights_bytes, pool_bytes=self.kv_ledger.pool_bytes)
        except Exception:
            self.close()  # the batching thread holds the pool: stop it before refusing
            raise
        self.side = SideBackend(
            self.model,
            sequences=self.kv_budget.side_sequences,
            context_length=self.context_length,
            pad_token_id=pad,
            text=self.text,
            ledger=self.kv_ledger,
            rows=self.rows,
        )
        # Side requests that arrive together run as one batch, up to the plan's batch size.
        self.side_batches = SideBatches(self.generate_batch, plan.batch_sequences)
        # Token texts for logprobs, and the bytes logprob requests hold (as the plan states them).
        self.texts = TokenTexts(lambda: self.rows.grammars.ll_tokenizer, loaded.tokenizer)
        pool_rows = self.kv_budget.pool.sequences if self.kv_budget.pool else 0
        self.logprob_workspace = LogprobWorkspace(
            vocab_size=int(self.model.config.get_text_config().vocab_size),
            dtype_bytes=self.model.dtype.itemsize,
            sequences=pool_rows + self.kv_budget.side_sequences,
        )

    # ---- requests -------------------------------------------------------------

    def prepare(self, inp: GenerationInput) -> PreparedPrompt:
        """Render and tokenize one request; InvalidRequest if it cannot be served (e.g. over the context,
        or a grammar this tokenizer cannot follow)."""
        return self._prepared(inp)[0]

    def _prepared(self, inp: GenerationInput) -> tuple[PreparedPrompt, SamplingParams]:
        """The request's model inputs and its sampling settings with this model's tool grammar, checked."""
        images = image_count(inp)
        if images > self.plan.max_images:
            # Each image's pixels and vision-tower activations are priced in the plan, for this many at most.
            raise InvalidRequest(
                f"the request carries {images} images; this model takes at most {self.plan.max_images} per request "
                "(max_images_per_request in model_configs.yaml)"
            )
        params = self.tool_format.params(inp)
        if params.rules.grammar is not None:
            error = self.rows.grammars.check(params.rules.grammar)
            if error:
                raise InvalidRequest(f"response_format / tools cannot be enforced for this model: {error}")
        return self.prompts.prepare(inp), params

    def count_tokens(self, text: str) -> int:
        """Tokens in plain text (no special tokens added)."""
        return self.prompts.count_tokens(text)

    def count_prompt_tokens(self, inp: GenerationInput) -> int:
        """Tokens the request's prompt takes, as it would be fed to the model."""
        return self.prepare(inp).prompt_tokens

    def uses_pool(self, inp: GenerationInput) -> bool:
        """Whether `inp` runs in the continuous-batching pool (text, unseeded) or on the side backend."""
        return self.pool is not None and pool_takes(inp.params) and not requests_images(inp)

    def _pooled(self, prompt: PreparedPrompt, params: SamplingParams) -> bool:
        return self.pool is not None and not prompt.extra_inputs and pool_takes(params)

    def generate_batch(
        self, inputs: Sequence[GenerationInput], cancel: threading.Event | None = None
    ) -> list[GenerationOutput]:
        """Generate for every input; outputs in input order.

        `cancel` (the caller went away): waiting and decoding stop within a
        step, every row is withdrawn, and RequestCancelled is raised.

        Raises InvalidRequest for the first bad input before generating
        anything (the Serve layer validates per request before batching).
        """
        checked = [self._prepared(inp) for inp in inputs]
        prepared = [prompt for prompt, _ in checked]
        params = [row for _, row in checked]
        recorders = [LogprobRecorder(p.logprobs) if p.logprobs is not None else None for p in params]
        scored_prompts = {
            i: self.side.score_prompt(prepared[i], inp.prompt_logprobs, self.logprob_workspace.chunk, cancel)
            for i, inp in enumerate(inputs)
            if inp.echo and inp.prompt_logprobs is not None
        }
        route = [self._pooled(prompt, row) for prompt, row in zip(prepared, params, strict=True)]
        # max_tokens 0 (echo): the prompt is all there is to answer.
        pooled = [i for i, in_pool in enumerate(route) if in_pool and params[i].max_tokens > 0]
        side = [i for i, in_pool in enumerate(route) if not in_pool and params[i].max_tokens > 0]
        tokens: dict[int, list[int]] = {}
        for rows, backend in ((pooled, self.pool), (side, self.side)):
            if rows:
                assert backend is not None
                out = backend.generate(
                    [prepared[i] for i in rows], [params[i] for i in rows], cancel, [recorders[i] for i in rows]
                )
                tokens.update(zip(rows, out, strict=True))
        return [
            self._output(tokens.get(i, []), prepared[i], params[i], inputs[i], recorders[i], scored_prompts.get(i))
            for i in range(len(inputs))
        ]

    def stream(self, inp: GenerationInput, cancel: threading.Event | None = None) -> Iterator[StreamDelta]:
        """Yield text pieces as they are generated; the last delta has finish_reason and usage.

        A bad request raises InvalidRequest here, before any delta. A backend's
        exception is re-raised into the iterator. Closing it early, or setting
        `cancel` (client gone), stops generation within a step, also while
        the request still waits for a slot or is in prefill.
        """
        prompt, params, recorder = self._stream_setup(inp)
        if self._pooled(prompt, params):
            assert self.pool is not None
            deltas = self.pool.stream(prompt, params, cancel, recorder)
        else:
            deltas = self.side.stream(prompt, params, cancel, recorder)
        return deltas if recorder is None else self._with_logprobs(deltas, recorder, params)

    async def open_stream(self, inp: GenerationInput, executor: Executor | None = None) -> AsyncIterator[StreamDelta]:
        """`stream` for a caller on an event loop (the replica's): awaiting it checks the request
        (InvalidRequest, before any delta) and gives the deltas as an async iterator.

        A pooled request's tokens come from the batch straight onto the loop;
        a side request is drained by a thread of its own. Templating and image
        decoding run off the loop; waits for a slot on `executor`. Closing the
        iterator (or cancelling its reader) stops generation within a step.
        """
        prompt, params, recorder = await asyncio.to_thread(self._stream_setup, inp)
        deltas: AsyncIterator[StreamDelta]
        if self._pooled(prompt, params):
            assert self.pool is not None
            deltas = self.pool.astream(prompt, params, recorder, executor)
        else:
            cancel = threading.Event()
            deltas = drained(self.side.stream(prompt, params, cancel, recorder), cancel)
        if recorder is None:
            return deltas
        return _with_logprobs_async(deltas, StreamedLogprobs(self.texts, recorder, params))

    async def generate_async(self, inp: GenerationInput, executor: Executor | None = None) -> GenerationOutput:
        """One request for a caller on an event loop. A pooled one waits on the loop for its
        answer; anything else (side backend, prompt scoring) runs in one `generate_batch` call with
        the side requests that arrive with it (SideBatches). Cancelling the caller withdraws the
        request within a step."""
        scores_prompt = inp.echo and inp.prompt_logprobs is not None
        if not self.uses_pool(inp) or scores_prompt or inp.params.max_tokens < 1:
            return await self.side_batches.generate(inp)
        prompt, params = await asyncio.to_thread(self._prepared, inp)
        assert self.pool is not None
        recorder = LogprobRecorder(params.logprobs) if params.logprobs is not None else None
        tokens = await self.pool.agenerate(prompt, params, recorder, executor)
        return self._output(tokens, prompt, params, inp, recorder)

    def _stream_setup(self, inp: GenerationInput) -> tuple[PreparedPrompt, SamplingParams, LogprobRecorder | None]:
        """A streamed request's inputs, settings and logprob recorder (None: not asked), checked."""
        prompt, params = self._prepared(inp)
        if inp.echo or params.max_tokens < 1:
            raise InvalidRequest("echo is not supported with streaming")
        recorder = LogprobRecorder(params.logprobs) if params.logprobs is not None else None
        return prompt, params, recorder

    def _with_logprobs(
        self, deltas: Iterator[StreamDelta], recorder: LogprobRecorder, params: SamplingParams
    ) -> Iterator[StreamDelta]:
        """Each delta with its logprobs (StreamedLogprobs)."""
        logprobs = StreamedLogprobs(self.texts, recorder, params)
        try:
            for delta in deltas:
                yield logprobs.attach(delta)
        finally:
            close = getattr(deltas, "close", None)
            if close is not None:
                close()  # stops the backend when the caller stopped early

    def _output(
        self,
        tokens: Sequence[int],
        prompt: PreparedPrompt,
        params: SamplingParams,
        inp: GenerationInput | None = None,
        recorder: LogprobRecorder | None = None,
        scored_prompt: list[Scored] | None = None,
    ) -> GenerationOutput:
        done = self.text.finish(tokens, params)
        logprobs = None
        if recorder is not None:
            logprobs = self.texts.entries(recorder.resolved(tokens)[: done.completion_tokens])
        echoed = None
        if inp is not None and inp.echo:
            echoed = inp.prompt if inp.prompt is not None else self.text.tokenizer.decode(prompt.input_ids)
        return GenerationOutput(
            text=done.text,
            prompt_tokens=prompt.prompt_tokens,
            completion_tokens=done.completion_tokens,
            finish_reason=done.finish_reason,
            logprobs=logprobs,
            prompt_text=echoed,
            prompt_logprobs=self.texts.entries(scored_prompt) if scored_prompt is not None else None,
        )

    # ---- state ----------------------------------------------------------------

    @property
    def last_progress(self) -> float:
        """Monotonic time tokens last came out of any backend (liveness: a long answer is progress too)."""
        pool = self.pool.batcher.last_progress if self.pool is not None else 0.0
        return max(pool, self.side.last_progress)

    def kv_report(self) -> KvFigures:
        """KV bytes: planned, this engine's worst case over all paths, and what was measured.

        `built_bytes` (the worst case) is the pool tensor as allocated plus
        the side slots at full context; it is what must stay ≤ `planned_bytes`.
        """
        budget = self.kv_budget
        pool_bytes = self.kv_ledger.pool_bytes
        return {
            "built_bytes": pool_bytes + budget.side_bytes,
            "planned_bytes": self.kv_planned_bytes,
            "pool_bytes": pool_bytes,
            "pool_sequences": budget.pool.sequences if budget.pool else 0,
            "side_sequences": budget.side_sequences,
            "side_bytes_worst": budget.side_bytes,
            "peak_kv_bytes": self.kv_ledger.peak_bytes,
            "peak_side_bytes": self.kv_ledger.peak_side_bytes,
            "context_length": self.context_length,
        }

    def memory_report(self) -> dict[str, int | str]:
        """The model's memory in this process (deployments.engine.verify.memory_report; cheap: no device sync)
        and the engine's KV bytes: worst case over all paths, pool, side slots, measured peak."""
        kv = self.kv_report()
        return {
            **memory_report(self.model, self.weights_bytes),
            "kv_built_bytes": kv["built_bytes"],
            "kv_pool_bytes": kv["pool_bytes"],
            "kv_side_bytes": kv["side_bytes_worst"],
            "kv_peak_bytes": kv["peak_kv_bytes"],
            "kv_sequences": kv["pool_sequences"] + kv["side_sequences"],
        }

    def load_report(self) -> LoadFigures:
        """What the engine holds right now: sequence slots in use, live pool requests, batcher restarts."""
        batcher = self.pool.batcher if self.pool is not None else None
        return {
            "pool_slots_in_use": batcher.slots.in_use if batcher else 0,
            "side_slots_in_use": self.side.slots.in_use,
            "pool_requests_live": batcher.live_requests if batcher else 0,
            "pool_requests_submitted": batcher.submitted if batcher else 0,
            "batcher_restarts": batcher.restarts if batcher else 0,
        }

    def close(self) -> None:
        """Stop the continuous-batching thread, if any."""
        if self.pool is not None:
            self.pool.batcher.close()
            self.pool = None


async def _with_logprobs_async(
    deltas: AsyncIterator[StreamDelta], logprobs: StreamedLogprobs
) -> AsyncIterator[StreamDelta]:
    try:
        async for delta in deltas:
            yield logprobs.attach(delta)
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]  # stops the backend when the caller stopped early


async def drained(items: Iterator[T], cancel: threading.Event) -> AsyncIterator[T]:
    """A blocking iterator's items on the event loop, drained by a thread of its own (not a
    shared pool: streams blocked on a slot could starve it). Closing this sets `cancel`, and
    the thread stops at the iterator's next item."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def drain() -> None:
        try:
            for item in items:
                if cancel.is_set():
                    break
                put("item", item)
        except BaseException as exc:  # re-raised on the event loop side
            put("error", exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # lets the backend stop generating when the reader stopped early
            put("end", None)

    threading.Thread(target=drain, name="rayfit-stream", daemon=True).start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        cancel.set()
