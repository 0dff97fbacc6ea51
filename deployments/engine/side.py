"""The side backend: classic `model.generate` for what the pool cannot take.

Seeded and image requests (every request when continuous batching is off).
`SideBackend.generate` groups rows by sampling settings (temperature, top_p,
seed) and runs one `model.generate` per group with LEFT padding, so every
row's last prompt token sits at the same position and decodes as if it were
alone. Each row stops on its own max_tokens, stop strings or EOS (`_RowStops`,
a per-row stopping criterion); the others go on. Image requests run alone
(pixel inputs of different requests are not stacked).

KV: each `generate` holds as many side slots as it has rows, for the whole
call, and rows are chunked so that the padded prompt width plus the longest
max_tokens stays within the context length (the per-sequence KV the plan
budgets: placement.sizing.kv_budget.side_sequence_bytes). A request's tensors
reach the device only once it holds its slots. The prompt is prefilled in
passes of `prefill_chunk` tokens (transformers' `prefill_chunk_size`): a
sliding-window layer keeps the last pass's whole K/V until the next step, so
one pass of the whole prompt would hold the prompt in every sliding layer.
An image request first prefills the text before its first image by itself,
so that image starts a pass and is not cut in two (Gemma 3's image tokens
attend to each other both ways; a pass cannot see the next one). The KV
ledger measures each call's cache storage after every forward pass
(deployments.engine.kv.SideCache); a pass checks `cancel` too.

Seeds: a seeded group calls `torch.manual_seed(seed)` before generating.
Caveat: rows of one batch share that RNG stream, so a seeded request's
sample depends on what it was batched with; only greedy (temperature 0) is
independent of batching.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from deployments.engine.generation import SamplingParams, StreamDelta
from deployments.engine.kv import KvLedger, RequestCancelled, SequenceSlots, SideCache
from deployments.engine.logprobs import LogprobRecorder, Scored, score_prompt
from deployments.engine.prompts import PreparedPrompt
from deployments.engine.row_logits import GenerateRowsProcessor, RowFactory
from deployments.engine.text import STOP_TAIL_TOKENS, StopHoldBack, TextRules
from placement.sizing.kv_budget import SIDE_PREFILL_CHUNK


def prefill_chunk(config: Any) -> int:
    """Prompt tokens per prefill pass: SIDE_PREFILL_CHUNK, at most one sliding window (`config`: the text
    config). placement.sizing.kv_budget.side_sequence_bytes prices exactly this; keep the two in step."""
    window = getattr(config, "sliding_window", None)
    return min(SIDE_PREFILL_CHUNK, window) if window else SIDE_PREFILL_CHUNK


def generation_config(
    params: SamplingParams,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    prefill_chunk_size: int | None = None,
) -> GenerationConfig:
    """`params` as `model.generate` takes them (the side path's one translation of SamplingParams).

    A fresh config rather than the model's: its defaults (top_k=64, top_p=0.95
    for Gemma) would silently change what the API promises."""
    sampling = not params.greedy
    return GenerationConfig(
        prefill_chunk_size=prefill_chunk_size,
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=params.temperature if sampling else None,
        top_p=params.top_p if sampling else None,
        top_k=None,
        pad_token_id=pad_token_id,
        eos_token_id=list(eos_token_ids) or None,
    )


def _group_key(params: SamplingParams) -> tuple[float, float, int | None]:
    # max_tokens and stop are per row (criterion + trimming); these are not.
    if params.greedy:
        return (0.0, 1.0, None)
    return (params.temperature, params.top_p, params.seed)


class _RowStops(StoppingCriteria):
    """Per-row stop: own max_tokens reached, own stop string seen, or cancelled.

    generate() ends a row when its criterion is True and the whole call when
    all rows are done, so short requests in a batch do not run long.
    """

    def __init__(
        self,
        prompt_width: int,
        max_tokens: Sequence[int],
        stops: Sequence[tuple[str, ...]],
        tokenizer: Any,
        cancel: threading.Event | None = None,
    ):
        self.prompt_width = prompt_width
        self.max_tokens = torch.tensor(list(max_tokens))
        self.stops = list(stops)
        self.tokenizer = tokenizer
        self.cancel = cancel
        self.tail_tokens = {
            row: max((len(s) for s in row_stops), default=0) + STOP_TAIL_TOKENS
            for row, row_stops in enumerate(self.stops)
        }

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_width
        done = (generated >= self.max_tokens).to(input_ids.device)
        if self.cancel is not None and self.cancel.is_set():
            return torch.ones_like(done)
        for row, row_stops in enumerate(self.stops):
            if not row_stops or done[row]:
                continue
            tail = input_ids[row, max(self.prompt_width, input_ids.shape[1] - self.tail_tokens[row]) :]
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            if any(stop in text for stop in row_stops):
                done[row] = True
        return done


class SideBackend:
    """`model.generate` per group of rows, inside `sequences` side slots."""

    def __init__(
        self,
        model: Any,
        *,
        sequences: int,
        context_length: int,
        pad_token_id: int,
        text: TextRules,
        ledger: KvLedger,
        rows: RowFactory | None = None,
    ):
        """`rows`: builds the logits rules of rows that carry any (grammars, penalties, ...)."""
        self.model = model
        self.rows = rows
        self.slots = SequenceSlots(sequences, "side")
        self.context_length = context_length
        self.pad_token_id = pad_token_id
        self.text = text
        self.ledger = ledger
        self.prefill_chunk = prefill_chunk(model.config.get_text_config())
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.last_progress = 0.0  # monotonic time of the last forward pass on this path

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def generate(
        self,
        prompts: Sequence[PreparedPrompt],
        params: Sequence[SamplingParams],
        cancel: threading.Event | None = None,
        recorders: Sequence[LogprobRecorder | None] | None = None,
    ) -> list[list[int]]:
        """New token ids per row, in input order. RequestCancelled once `cancel` is set.
        `recorders`: per row, where its logprobs go (None: not asked)."""
        recorders = recorders or [None] * len(prompts)
        groups: dict[tuple, list[int]] = {}
        for index, (prompt, row) in enumerate(zip(prompts, params, strict=True)):
            key = (_group_key(row), index if prompt.extra_inputs else -1)
            groups.setdefault(key, []).append(index)
        tokens: list[list[int]] = [[] for _ in prompts]
        for rows in groups.values():
            for chunk in self._chunks(rows, prompts, params):
                new_tokens = self._run(
                    [prompts[i] for i in chunk],
                    [params[i] for i in chunk],
                    cancel=cancel,
                    recorders=[recorders[i] for i in chunk],
                )
                if cancel is not None and cancel.is_set():
                    raise RequestCancelled("cancelled while generating")
                for i, row_tokens in zip(chunk, new_tokens, strict=True):
                    tokens[i] = row_tokens
        return tokens

    def stream(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        cancel: threading.Event | None = None,
        recorder: LogprobRecorder | None = None,
    ) -> Iterator[StreamDelta]:
        """One `generate` of its own in a worker thread feeding a TextIteratorStreamer; its
        exception is re-raised here. Closing early or `cancel` stops it within a step.
        `recorder` has every token's logprob by the last delta."""
        streamer = TextIteratorStreamer(self.text.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = cancel or threading.Event()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["tokens"] = self._run(
                    [prompt], [params], streamer=streamer, cancel=cancel, recorders=[recorder]
                )[0]
            except BaseException as exc:  # handed to the consumer, which re-raises it
                outcome["error"] = exc
                streamer.end()  # unblock the consumer

        worker = threading.Thread(target=work, name="rayfit-generate", daemon=True)
        worker.start()
        release = StopHoldBack(params.stop)
        try:
            for piece in streamer:
                if "error" in outcome:
                    break
                text = release.feed(piece)
                if text:
                    yield StreamDelta(text=text)
                if release.stopped:
                    cancel.set()
                    break
            worker.join()
            if "error" in outcome:
                raise outcome["error"]
            if recorder is not None:
                recorder.observe(outcome["tokens"])  # the last token's logprob
            yield self.text.last_delta(outcome["tokens"], params, release.sent, prompt.prompt_tokens)
        finally:
            cancel.set()
            if worker.is_alive():
                # Drain so generate's streamer.put never blocks (the queue is unbounded; this is cheap).
                for _ in streamer:
                    pass
                worker.join()

    # ---- one generate ---------------------------------------------------------

    def _chunks(
        self, rows: Sequence[int], prompts: Sequence[PreparedPrompt], params: Sequence[SamplingParams]
    ) -> Iterator[list[int]]:
        """Rows of one sampling group, cut so each `generate` fits its side slots.

        Left padding makes every row as long as the widest prompt plus the
        longest max_tokens: a chunk keeps that within the context length (the
        per-sequence KV the plan budgets) and within the side slots' count.
        """
        chunk: list[int] = []
        width = longest = 0
        for i in rows:
            new_width = max(width, prompts[i].prompt_tokens)
            new_longest = max(longest, params[i].max_tokens)
            fits = new_width + new_longest <= self.context_length and len(chunk) < self.slots.capacity
            if chunk and not fits:
                yield chunk
                chunk, new_width, new_longest = [], prompts[i].prompt_tokens, params[i].max_tokens
            chunk.append(i)
            width, longest = new_width, new_longest
        if chunk:
            yield chunk

    def _left_pad(self, prompts: Sequence[PreparedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask [batch, width], padded on the left (on the CPU: a request
        moves its tensors to the device only once it holds its slots)."""
        width = max(p.prompt_tokens for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            n = prompt.prompt_tokens
            ids[row, width - n :] = torch.tensor(prompt.input_ids, dtype=torch.long)
            mask[row, width - n :] = 1
        return ids, mask

    def _cache(self, cancel: threading.Event | None) -> SideCache:
        """A call's own cache: after every forward pass (prefill pass or decode step) the ledger records
        what it holds, liveness notes the pass, and a set `cancel` stops the call (RequestCancelled)."""

        def after_pass(held: int, peak: int) -> None:
            self.ledger.observe(call, held, peak)
            self.last_progress = time.monotonic()
            if cancel is not None and cancel.is_set():
                raise RequestCancelled("cancelled while generating")

        cache = SideCache(self.model.config, on_forward=after_pass)
        call = id(cache)  # unique while the call lives
        return cache

    def _device_inputs(self, ids: torch.Tensor, mask: torch.Tensor, extra: dict[str, Any] | None) -> dict[str, Any]:
        """The model inputs on the model's device (called inside the held slots); pixels in the model's dtype,
        converted in the one copy."""
        inputs: dict[str, Any] = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        for name, value in (extra or {}).items():
            dtype = self.model.dtype if name == "pixel_values" else None
            inputs[name] = value.to(self.device, dtype=dtype) if isinstance(value, torch.Tensor) else value
        return inputs

    def _prefill_text_before_image(self, input_ids: torch.Tensor, cache: SideCache) -> None:
        """Prefill (one row) the tokens before the first image in passes of `prefill_chunk`, so that
        generate's own passes start at that image: an image of up to `prefill_chunk` tokens then sits
        in one pass, its tokens attending to each other as Gemma 3 wants (both ways)."""
        if self.image_token_id is None:
            return
        found = (input_ids[0] == self.image_token_id).nonzero()
        before = int(found[0, 0]) if found.numel() else 0
        for start in range(0, before, self.prefill_chunk):
            end = min(before, start + self.prefill_chunk)
            self.model(input_ids=input_ids[:, start:end], cache=cache, use_cache=True, logits_to_keep=1)

    def _row_processors(
        self,
        prompts: Sequence[PreparedPrompt],
        params: Sequence[SamplingParams],
        width: int,
        recorders: Sequence[LogprobRecorder | None],
    ) -> LogitsProcessorList | None:
        """The rows' logits rules and logprob recorders as one processor (None when no row has any)."""
        if self.rows is None:
            return None
        rows = [
            self.rows.row(p.rules, prompt.input_ids, recorder)
            for prompt, p, recorder in zip(prompts, params, recorders, strict=True)
        ]
        return LogitsProcessorList([GenerateRowsProcessor(rows, width)]) if any(rows) else None

    def _run(
        self,
        prompts: Sequence[PreparedPrompt],
        params: Sequence[SamplingParams],
        streamer: TextIteratorStreamer | None = None,
        cancel: threading.Event | None = None,
        recorders: Sequence[LogprobRecorder | None] | None = None,
    ) -> list[list[int]]:
        """One model.generate over rows sharing sampling settings; new token ids per row."""
        recorders = recorders or [None] * len(prompts)
        ids, mask = self._left_pad(prompts)
        width = ids.shape[1]
        max_new = max(p.max_tokens for p in params)
        first = params[0]
        extra = prompts[0].extra_inputs if len(prompts) == 1 else None
        cache = self._cache(cancel)
        stops = _RowStops(width, [p.max_tokens for p in params], [p.stop for p in params], self.text.tokenizer, cancel)
        config = generation_config(first, max_new, self.pad_token_id, self.text.eos_token_ids, self.prefill_chunk)
        # One side slot per row, held for the whole call: rows past the budget wait here, holding nothing
        # on the device (their inputs move there once the slots are theirs).
        try:
            with self.slots.hold(len(prompts), cancel), torch.inference_mode():
                inputs = self._device_inputs(ids, mask, extra)
                if "pixel_values" in inputs:
                    self._prefill_text_before_image(inputs["input_ids"], cache)
                if first.seed is not None and not first.greedy:
                    torch.manual_seed(first.seed)
                out = self.model.generate(
                    **inputs,
                    cache=cache,
                    logits_processor=self._row_processors(prompts, params, width, recorders),
                    generation_config=config,
                    stopping_criteria=StoppingCriteriaList([stops]),
                    streamer=streamer,
                )
                del inputs  # freed before the slots are
        finally:
            self.ledger.forget(id(cache))
        return [row[width:].tolist() for row in out]

    # ---- prompt scoring -------------------------------------------------------

    def score_prompt(
        self, prompt: PreparedPrompt, top: int, chunk: int, cancel: threading.Event | None = None
    ) -> list[Scored]:
        """Logprobs of the prompt's tokens (`echo`): one chunked pass in a side slot, its KV
        measured like a generate's. RequestCancelled once `cancel` is set (checked per chunk).
        Passes are at most `prefill_chunk` long: a sliding layer holds window − 1 + a pass's tokens,
        and the plan prices that pass (side_sequence_bytes)."""
        cache = self._cache(cancel)
        try:
            with self.slots.hold(1, cancel), torch.inference_mode():
                chunk = min(chunk, self.prefill_chunk)
                return score_prompt(self.model, prompt.input_ids, top, chunk=chunk, cache=cache)
        finally:
            self.ledger.forget(id(cache))
