"""The in-process engine: requests in, text out, on one loaded model.

No Ray and no HTTP here; the Serve deployment wraps an `Engine`.

- Prompts: chat `messages` go through the processor's (image+text) or the
  tokenizer's chat template; a tokenizer without one gets `FALLBACK_TEMPLATE`
  ("role: content" lines, then "assistant:"). A raw `prompt` is tokenized as is
  (with the tokenizer's BOS).
- Routes (decided here, `uses_pool`): text requests without a seed, greedy or
  sampled, streamed or not, join transformers' continuous batch
  (deployments.continuous). Seeded and image requests take the side path:
  `generate_batch` groups them by sampling settings (temperature, top_p, seed)
  and runs one `model.generate` per group with LEFT padding, so every row's
  last prompt token sits at the same position and decodes as if it were
  alone. Each row stops on its own max_tokens, stop strings or EOS (a per-row
  stopping criterion); the others go on.
- Cancellation: `generate_batch(..., cancel)` and `stream(..., cancel)` stop
  within a decode step once `cancel` is set (the caller went away), also while
  the request still waits for a slot, and raise RequestCancelled.
- KV memory (the plan's contract): `kv_budget` (placement.sizing.kv_budget)
  fixes the sequences that may hold KV at once — the continuous-batching
  pool's batch, and side slots for requests the pool cannot take (seeded,
  images; every request when continuous batching is off). Each classic
  `generate` holds as many side slots as it has rows, and a row never exceeds
  the context length (rows are chunked so that the padded prompt width plus
  the longest max_tokens fits). Requests wait for a slot; none allocates past
  the budget. `kv_report()` gives the planned bytes, the pool's measured
  tensor and the peak measured in side caches.
- Seeds: a seeded group calls `torch.manual_seed(seed)` before generating.
  Caveat: rows of one batch share that RNG stream, so a seeded request's
  sample depends on what it was batched with; only greedy (temperature 0) is
  independent of batching.
- Usage: prompt_tokens counts the model's input ids (image tokens included);
  completion_tokens counts the generated tokens kept in the text (up to the
  stop string, without the EOS token).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from deployments.continuous import ContinuousBatcher
from deployments.generation import GenerationInput, GenerationOutput, SamplingParams, StreamDelta
from deployments.kv_slots import KvLedger, RequestCancelled, SequenceSlots
from deployments.loading import LoadedModel
from placement.sizing.kv_budget import KvBudget, fit_budget

logger = logging.getLogger(__name__)

# For tokenizers without a chat template (e.g. a base model's GGUF): plain
# "role: content" lines, then "assistant:" for the model to continue.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# Special tokens that end an assistant turn in common chat templates; a model's
# generation_config often lists only <eos>, so these are added when present.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
# Extra tokens decoded around a stop string when checking for it during
# generation (a token can hold less than one character).
_STOP_TAIL_TOKENS = 8


class InvalidRequest(ValueError):
    """The request cannot be served as asked (maps to HTTP 400)."""


@dataclass(frozen=True)
class PreparedPrompt:
    """One request turned into model inputs."""

    input_ids: list[int]
    # Processor outputs besides input_ids/attention_mask (pixel_values, ...), image requests only.
    extra_inputs: dict[str, torch.Tensor] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class _Finished:
    text: str
    completion_tokens: int
    finish_reason: str


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
        on_step: Any = None,
    ):
        self.on_step = on_step  # called every step (the KV ledger measures the side cache)
        self.prompt_width = prompt_width
        self.max_tokens = torch.tensor(list(max_tokens))
        self.stops = list(stops)
        self.tokenizer = tokenizer
        self.cancel = cancel
        self.tail_tokens = {
            row: max((len(s) for s in row_stops), default=0) + _STOP_TAIL_TOKENS
            for row, row_stops in enumerate(self.stops)
        }

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if self.on_step is not None:
            self.on_step()
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


def decode_image_url(url: str) -> Image.Image:
    """A `data:image/...;base64,...` URL as an RGB PIL image (no network: other URLs are refused)."""
    if not url.startswith("data:"):
        raise InvalidRequest("image_url must be a data URL (data:image/png;base64,...); remote URLs are not fetched")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise InvalidRequest("image_url data URL must be base64-encoded (data:image/...;base64,...)")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
    except (binascii.Error, ValueError, OSError) as exc:
        raise InvalidRequest(f"image_url is not a readable image: {exc}") from exc
    return image.convert("RGB")


def _content_parts(content: Any) -> list[dict]:
    """OpenAI content (str or list of parts) as a list of parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    raise InvalidRequest(f"message content must be a string or a list of parts, got {type(content).__name__}")


class _IncrementalText:
    """Detokenizes a growing token sequence piece by piece.

    Fast tokenizers use `tokenizers.decoders.DecodeStream` (O(1) per token);
    others decode the whole sequence and send what is new. Pieces hold whole
    characters only: a token that ends mid UTF-8 character waits for the next.
    """

    def __init__(self, tokenizer: Any):
        from tokenizers.decoders import DecodeStream

        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = DecodeStream(skip_special_tokens=True) if self.backend is not None else None
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""

    def feed(self, new_tokens: Sequence[int]) -> str:
        if self.stream is not None:
            pieces = [self.stream.step(self.backend, token) for token in new_tokens]
            return "".join(piece for piece in pieces if piece)
        self.tokens.extend(new_tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).rstrip("\ufffd")
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


class _StopHoldBack:
    """Releases streamed text as it arrives, holding back any tail that could
    still become a stop string, so nothing past a stop is ever sent."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [stop for stop in stops if stop]
        self.hold = max((len(stop) for stop in stops), default=1) - 1
        self.received = ""
        self.sent = 0  # characters of `received` already released
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Take one streamed piece; return the text safe to send now."""
        self.received += piece
        cut = min((i for i in (self.received.find(stop) for stop in self.stops) if i >= 0), default=-1)
        self.stopped = cut >= 0
        limit = cut if self.stopped else max(self.sent, len(self.received) - self.hold)
        released = self.received[self.sent : limit] if limit > self.sent else ""
        self.sent = max(self.sent, limit)
        return released


class Engine:
    """Generates for one `LoadedModel`. Thread-safe for concurrent calls except
    for seeding (torch's global RNG; see the module docstring)."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int = 4,
        continuous: bool = False,
        kv_budget_bytes: int | None = None,
    ):
        """`max_batch_size`: sequences the plan sized the KV for. `continuous`: run
        unseeded text requests (streamed or not) through transformers'
        continuous batching (deployments.continuous); otherwise every request
        runs its own `generate`. `kv_budget_bytes`: the plan's KV bytes; the
        engine fits its pool and slots inside them (None: not itemized, the
        full batch is used)."""
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.processor = loaded.processor
        self.context_length = loaded.context_length
        self.pad_token_id = self._pad_token_id()
        self.eos_token_ids = self._eos_token_ids()
        self.kv_planned_bytes = kv_budget_bytes
        self.kv_budget: KvBudget = fit_budget(
            self.model.config.get_text_config(),
            planned_bytes=kv_budget_bytes,
            batch_sequences=max_batch_size,
            context_length=self.context_length,
            dtype=self.model.dtype,
            continuous=continuous,
        )
        if self.kv_budget.pool is not None and self.kv_budget.pool.sequences < max_batch_size:
            logger.warning(
                "KV plan of %s bytes holds %d of %d batch sequences; the batch is cut to fit",
                kv_budget_bytes,
                self.kv_budget.pool.sequences,
                max_batch_size,
            )
        self.side_slots = SequenceSlots(self.kv_budget.side_sequences, "side")
        self.batcher: ContinuousBatcher | None = None
        if self.kv_budget.pool is not None:
            self.batcher = ContinuousBatcher(
                self.model,
                pool=self.kv_budget.pool,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
            )
        self.kv_ledger = KvLedger(pool_bytes=self.batcher.cache_bytes if self.batcher else 0)
        self._side_progress = 0.0

    def _side_step(self, call: int, cache: Any) -> None:
        """Every decode step of a side-path generate: measure its KV, and note that tokens flow."""
        self.kv_ledger.observe(call, cache)
        self._side_progress = time.monotonic()

    @property
    def last_progress(self) -> float:
        """Monotonic time tokens last came out of any path (liveness: a long answer is progress too)."""
        pool = self.batcher.last_progress if self.batcher is not None else 0.0
        return max(pool, self._side_progress)

    def close(self) -> None:
        """Stop the continuous-batching thread, if any."""
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None

    def kv_report(self) -> dict[str, Any]:
        """KV bytes: planned, this engine's worst case over all paths, and what was measured.

        `kv_cache_bytes` (the worst case) is the pool tensor as allocated plus
        the side slots at full context; it is what must stay ≤ the plan.
        """
        budget = self.kv_budget
        pool_bytes = self.kv_ledger.pool_bytes
        return {
            "kv_cache_bytes": pool_bytes + budget.side_bytes,
            "planned_kv_cache_bytes": self.kv_planned_bytes,
            "pool_bytes": pool_bytes,
            "pool_sequences": budget.pool.sequences if budget.pool else 0,
            "side_sequences": budget.side_sequences,
            "side_bytes_worst": budget.side_bytes,
            "peak_kv_bytes": self.kv_ledger.peak_bytes,
            "peak_side_bytes": self.kv_ledger.peak_side_bytes,
            "context_length": self.context_length,
        }

    # ---- set-up -------------------------------------------------------------

    def _pad_token_id(self) -> int:
        tok = self.tokenizer
        configured = getattr(self.model.generation_config, "pad_token_id", None)
        for candidate in (tok.pad_token_id, tok.eos_token_id, configured):
            if isinstance(candidate, int):
                return candidate
        return 0

    def _eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        for value in (configured, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.append(value)
            elif isinstance(value, list):
                ids.extend(value)
        vocab = self.tokenizer.get_vocab()
        ids.extend(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
        return sorted(set(ids))

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # ---- prompts --------------------------------------------------------------

    def _template_owner(self) -> Any:
        return self.processor if self.processor is not None else self.tokenizer

    def _render_chat(self, messages: Sequence[dict], multimodal: bool) -> str:
        owner = self._template_owner()
        template = getattr(owner, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if not template:
            kwargs["chat_template"] = FALLBACK_TEMPLATE
            owner = self.tokenizer
        try:
            return owner.apply_chat_template(list(messages), **kwargs)
        except Exception as exc:  # jinja raises its own errors for malformed conversations
            raise InvalidRequest(f"messages could not be rendered with the chat template: {exc}") from exc

    def _normalize_messages(self, messages: Sequence[dict]) -> tuple[list[dict], list[Image.Image]]:
        """Messages for the template, and the images they carry (in order).

        Text-only models get each content as one string (many templates expect
        a string); image+text models get parts with {"type": "image"} markers.
        """
        images: list[Image.Image] = []
        normalized: list[dict] = []
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise InvalidRequest("each message needs a `role` and `content`")
            parts: list[dict] = []
            for part in _content_parts(message.get("content")):
                kind = part.get("type")
                if kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind == "image_url":
                    if not self.loaded.is_multimodal:
                        raise InvalidRequest(
                            f"model {self.loaded.source!r} is text-only; it cannot take image_url content"
                        )
                    image_url = part.get("image_url")
                    url = image_url.get("url") if isinstance(image_url, dict) else image_url
                    if not isinstance(url, str):
                        raise InvalidRequest("image_url part needs image_url.url")
                    images.append(decode_image_url(url))
                    parts.append({"type": "image"})
                else:
                    raise InvalidRequest(f"unsupported content part type {kind!r} (use 'text' or 'image_url')")
            if self.loaded.is_multimodal:
                normalized.append({"role": message["role"], "content": parts})
            else:
                text = "\n".join(p["text"] for p in parts)
                normalized.append({"role": message["role"], "content": text})
        return normalized, images

    def prepare(self, inp: GenerationInput) -> PreparedPrompt:
        """Render and tokenize one request; check it fits the context."""
        if (inp.messages is None) == (inp.prompt is None):
            raise InvalidRequest("give exactly one of `messages` or `prompt`")
        if inp.params.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {inp.params.max_tokens}")
        images: list[Image.Image] = []
        if inp.messages is not None:
            messages, images = self._normalize_messages(inp.messages)
            text = self._render_chat(messages, self.loaded.is_multimodal)
            # The template already wrote BOS where the model wants it.
            add_special = False
        else:
            text = inp.prompt or ""
            add_special = True
        if images:
            assert self.processor is not None  # images only pass _normalize_messages on multimodal models
            batch = self.processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=add_special)
            ids = batch["input_ids"][0].tolist()
            extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
            prepared = PreparedPrompt(input_ids=ids, extra_inputs=extra)
        else:
            ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
            prepared = PreparedPrompt(input_ids=list(ids))
        total = prepared.prompt_tokens + inp.params.max_tokens
        if total > self.context_length:
            raise InvalidRequest(
                f"prompt has {prepared.prompt_tokens} tokens and max_tokens is {inp.params.max_tokens}: "
                f"{total} exceeds the model's context length of {self.context_length} tokens"
            )
        return prepared

    # ---- token counting -----------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Tokens in plain text (no special tokens added)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_prompt_tokens(self, inp: GenerationInput) -> int:
        """Tokens the request's prompt takes, as it would be fed to the model."""
        return self.prepare(inp).prompt_tokens

    # ---- generation -----------------------------------------------------------

    def _generation_config(self, params: SamplingParams, max_new_tokens: int) -> GenerationConfig:
        # A fresh config rather than the model's: its defaults (top_k=64,
        # top_p=0.95 for Gemma) would silently change what the API promises.
        sampling = params.temperature > 0
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=params.temperature if sampling else None,
            top_p=params.top_p if sampling else None,
            top_k=None,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids or None,
        )

    def _left_pad(self, prompts: Sequence[PreparedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask [batch, width], padded on the left."""
        width = max(p.prompt_tokens for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            n = prompt.prompt_tokens
            ids[row, width - n :] = torch.tensor(prompt.input_ids, dtype=torch.long)
            mask[row, width - n :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _finish(self, new_tokens: Sequence[int], params: SamplingParams) -> _Finished:
        """Text, kept-token count and finish reason of one row's generated ids."""
        tokens = list(new_tokens)
        reason = "length"
        for i, token in enumerate(tokens):
            if token in self.eos_token_ids:
                tokens, reason = tokens[:i], "stop"
                break
        tokens = tokens[: params.max_tokens]
        if reason == "length" and len(tokens) < params.max_tokens:
            reason = "stop"  # ended by a stop string the criterion saw, trimmed below
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in params.stop if s) if i >= 0), default=-1)
        if cut < 0:
            return _Finished(text=text, completion_tokens=len(tokens), finish_reason=reason)
        # Tokens up to the one completing the earliest stop string: the shortest
        # prefix whose text contains a stop (monotone, so binary search).
        low, high = 1, len(tokens)
        while low < high:
            mid = (low + high) // 2
            prefix = self.tokenizer.decode(tokens[:mid], skip_special_tokens=True)
            if any(s and s in prefix for s in params.stop):
                high = mid
            else:
                low = mid + 1
        return _Finished(text=text[:cut], completion_tokens=low, finish_reason="stop")

    @staticmethod
    def _group_key(params: SamplingParams) -> tuple[float, float, int | None]:
        # max_tokens and stop are per row (criterion + trimming); these are not.
        if params.temperature <= 0:
            return (0.0, 1.0, None)
        return (params.temperature, params.top_p, params.seed)

    def _run(
        self,
        prompts: Sequence[PreparedPrompt],
        params: Sequence[SamplingParams],
        streamer: TextIteratorStreamer | None = None,
        cancel: threading.Event | None = None,
    ) -> list[list[int]]:
        """One model.generate over rows sharing sampling settings; new token ids per row."""
        ids, mask = self._left_pad(prompts)
        width = ids.shape[1]
        max_new = max(p.max_tokens for p in params)
        first = params[0]
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if len(prompts) == 1 and prompts[0].extra_inputs:
            inputs.update({k: v.to(self.device) for k, v in prompts[0].extra_inputs.items()})
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        # Our own cache object, so the ledger can measure what this call holds at every step
        # (keyed by the cache's id: unique while the call lives).
        cache = DynamicCache(config=self.model.config)
        call = id(cache)
        stops = _RowStops(
            width,
            [p.max_tokens for p in params],
            [p.stop for p in params],
            self.tokenizer,
            cancel,
            on_step=lambda: self._side_step(call, cache),
        )
        # One side slot per row, held for the whole call: rows past the budget wait here.
        try:
            with self.side_slots.hold(len(prompts), cancel), torch.inference_mode():
                if first.seed is not None and first.temperature > 0:
                    torch.manual_seed(first.seed)
                out = self.model.generate(
                    **inputs,
                    cache=cache,
                    generation_config=self._generation_config(first, max_new),
                    stopping_criteria=StoppingCriteriaList([stops]),
                    streamer=streamer,
                )
                self.kv_ledger.observe(call, cache)
        finally:
            self.kv_ledger.forget(call)
        return [row[width:].tolist() for row in out]

    def generate_batch(
        self, inputs: Sequence[GenerationInput], cancel: threading.Event | None = None
    ) -> list[GenerationOutput]:
        """Generate for every input; outputs in input order.

        `cancel` (the caller went away): waiting and decoding stop within a
        step, every row is withdrawn, and RequestCancelled is raised.

        Raises InvalidRequest for the first bad input before generating
        anything (the Serve layer validates per request before batching).
        """
        prepared = [self.prepare(inp) for inp in inputs]
        results: list[GenerationOutput | None] = [None] * len(inputs)
        groups: dict[tuple, list[int]] = {}
        for index, (inp, prompt) in enumerate(zip(inputs, prepared, strict=True)):
            # Image requests run alone: pixel inputs of different requests are not stacked.
            key = (self._group_key(inp.params), index if prompt.extra_inputs else -1)
            groups.setdefault(key, []).append(index)
        continuous = [i for i, prompt in enumerate(prepared) if self._continuous(prompt, inputs[i].params)]
        if continuous:
            for i in continuous:
                groups[(self._group_key(inputs[i].params), -1)].remove(i)
            assert self.batcher is not None
            capacity = self.batcher.slots.capacity
            for start in range(0, len(continuous), capacity):
                wave = continuous[start : start + capacity]
                # All of a wave's slots at once, then every row submitted before waiting on any,
                # so they decode in one batch; a failed submit withdraws the rows already in.
                self.batcher.slots.acquire(len(wave), cancel)
                ids: dict[int, str] = {}
                try:
                    for n, i in enumerate(wave):
                        try:
                            # Whole answers only: per-token updates just to watch for stop strings.
                            streaming = bool(inputs[i].params.stop)
                            ids[i] = self._submit(prepared[i], inputs[i].params, slot_held=True, streaming=streaming)
                        except BaseException:
                            self.batcher.slots.release(len(wave) - n - 1)  # the slots of rows never submitted
                            raise
                    for i in wave:
                        tokens = self._collect(ids.pop(i), inputs[i].params, cancel)
                        results[i] = self._output(tokens, prepared[i], inputs[i].params)
                finally:
                    for request_id in ids.values():
                        self._release(request_id, cancel=True)
        for rows in groups.values():
            for chunk in self._side_chunks(rows, prepared, inputs):
                new_tokens = self._run([prepared[i] for i in chunk], [inputs[i].params for i in chunk], cancel=cancel)
                if cancel is not None and cancel.is_set():
                    raise RequestCancelled("cancelled while generating")
                for i, tokens in zip(chunk, new_tokens, strict=True):
                    results[i] = self._output(tokens, prepared[i], inputs[i].params)
        return [r for r in results if r is not None]

    def _side_chunks(
        self, rows: Sequence[int], prepared: Sequence[PreparedPrompt], inputs: Sequence[GenerationInput]
    ) -> Iterator[list[int]]:
        """Rows of one sampling group, cut so each `generate` fits its side slots.

        Left padding makes every row as long as the widest prompt plus the
        longest max_tokens: a chunk keeps that within the context length (the
        per-sequence KV the plan budgets) and within the side slots' count.
        """
        chunk: list[int] = []
        width = longest = 0
        for i in rows:
            new_width = max(width, prepared[i].prompt_tokens)
            new_longest = max(longest, inputs[i].params.max_tokens)
            fits = new_width + new_longest <= self.context_length and len(chunk) < self.side_slots.capacity
            if chunk and not fits:
                yield chunk
                chunk, new_width, new_longest = [], prepared[i].prompt_tokens, inputs[i].params.max_tokens
            chunk.append(i)
            width, longest = new_width, new_longest
        if chunk:
            yield chunk

    def _output(self, tokens: Sequence[int], prompt: PreparedPrompt, params: SamplingParams) -> GenerationOutput:
        done = self._finish(tokens, params)
        return GenerationOutput(
            text=done.text,
            prompt_tokens=prompt.prompt_tokens,
            completion_tokens=done.completion_tokens,
            finish_reason=done.finish_reason,
        )

    # ---- continuous batching ---------------------------------------------------

    @staticmethod
    def _pool_takes(params: SamplingParams) -> bool:
        """The batcher samples per row but has no per-request seed: a seeded sampled request runs alone."""
        return params.temperature <= 0 or params.seed is None

    def uses_pool(self, inp: GenerationInput) -> bool:
        """Whether `inp` runs in the continuous-batching pool (text, unseeded) or on the side path."""
        if self.batcher is None or not self._pool_takes(inp.params):
            return False
        for message in inp.messages or ():
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
                return False
        return True

    def _continuous(self, prompt: PreparedPrompt, params: SamplingParams) -> bool:
        return self.batcher is not None and not prompt.extra_inputs and self._pool_takes(params)

    def _submit(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        *,
        slot_held: bool = False,
        cancel: threading.Event | None = None,
        streaming: bool = True,
    ) -> str:
        assert self.batcher is not None
        return self.batcher.submit(
            prompt.input_ids,
            params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            slot_held=slot_held,
            cancel=cancel,
            streaming=streaming,
        )

    def _release(self, request_id: str, *, cancel: bool) -> None:
        if self.batcher is not None:
            self.batcher.release(request_id, cancel=cancel)

    def _stop_seen(self, tokens: Sequence[int], stops: Sequence[str]) -> bool:
        tail = max(len(s) for s in stops) + _STOP_TAIL_TOKENS
        text = self.tokenizer.decode(list(tokens[-tail:]), skip_special_tokens=True)
        return any(s and s in text for s in stops)

    def _collect(self, request_id: str, params: SamplingParams, cancel: threading.Event | None = None) -> list[int]:
        """Wait for one submitted request; stop it early once a stop string shows up."""
        assert self.batcher is not None
        tokens: tuple[int, ...] = ()
        finished = False
        try:
            for update in self.batcher.updates(request_id, cancel):
                tokens, finished = update.tokens, update.finished
                if params.stop and not finished and self._stop_seen(tokens, params.stop):
                    break
        finally:
            self._release(request_id, cancel=not finished)
        return list(tokens)

    def _continuous_pieces(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        tokens_out: list[int],
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Text pieces of one streamed request from the batcher; `tokens_out` ends up holding its tokens.

        Detokenized incrementally (one `DecodeStream` step per new token, not
        the whole sequence again for every token)."""
        assert self.batcher is not None
        request_id = self._submit(prompt, params, cancel=cancel)
        finished = False
        decoder = _IncrementalText(self.tokenizer)
        try:
            for update in self.batcher.updates(request_id, cancel):
                new = update.tokens[len(tokens_out) :]
                tokens_out[:] = update.tokens
                finished = update.finished
                piece = decoder.feed(new)
                if piece:
                    yield piece
        finally:
            self._release(request_id, cancel=not finished)

    def stream(self, inp: GenerationInput, cancel: threading.Event | None = None) -> Iterator[StreamDelta]:
        """Yield text pieces as they are generated; the last delta has finish_reason and usage.

        generate runs in a worker thread feeding a TextIteratorStreamer; its
        exception is re-raised here. Closing the iterator early, or setting
        `cancel` (client gone), stops generation within a step, also while
        the request still waits for a slot or is in prefill.
        """
        prompt = self.prepare(inp)
        params = inp.params
        if self._continuous(prompt, params):
            return self._stream_continuous(prompt, params, cancel)
        return self._stream_generate(prompt, params, cancel)

    def _stream_continuous(
        self, prompt: PreparedPrompt, params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[StreamDelta]:
        """`stream` through the batcher: same hold-back of possible stop strings as below."""
        tokens: list[int] = []
        pieces = self._continuous_pieces(prompt, params, tokens, cancel)
        release = _StopHoldBack(params.stop)
        try:
            for piece in pieces:
                text = release.feed(piece)
                if text:
                    yield StreamDelta(text=text)
                if release.stopped:
                    break
        finally:
            pieces.close()  # cancels the request if it is still generating
        done = self._finish(tokens, params)
        yield StreamDelta(
            text=done.text[release.sent :],
            finish_reason=done.finish_reason,
            prompt_tokens=prompt.prompt_tokens,
            completion_tokens=done.completion_tokens,
        )

    def _stream_generate(
        self, prompt: PreparedPrompt, params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[StreamDelta]:
        """`stream` with one `generate` of its own in a worker thread."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = cancel or threading.Event()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["tokens"] = self._run([prompt], [params], streamer=streamer, cancel=cancel)[0]
            except BaseException as exc:  # handed to the consumer, which re-raises it
                outcome["error"] = exc
                streamer.end()  # unblock the consumer

        worker = threading.Thread(target=work, name="rayfit-generate", daemon=True)
        worker.start()
        release = _StopHoldBack(params.stop)
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
            done = self._finish(outcome["tokens"], params)
            # The final text is authoritative: send whatever of it is not sent yet.
            yield StreamDelta(
                text=done.text[release.sent :],
                finish_reason=done.finish_reason,
                prompt_tokens=prompt.prompt_tokens,
                completion_tokens=done.completion_tokens,
            )
        finally:
            cancel.set()
            if worker.is_alive():
                # Drain so generate's streamer.put never blocks (the queue is unbounded; this is cheap).
                for _ in streamer:
                    pass
                worker.join()
