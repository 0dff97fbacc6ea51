"""Token log-probabilities: of generated tokens (both backends) and of a prompt (`echo`).

A logprob here is the log-softmax of the model's raw logits at that position:
BEFORE temperature, top-p / top-k / min-p, penalties, `logit_bias` and grammar
masks (vLLM's default, "raw model output"). So the numbers say what the model
thinks, whatever the request's sampling settings; with greedy decoding and no
rules the chosen token is the top-1 alternative.

- `LogprobRecorder` follows one decoding row. Each step the row's
  `RowLogits` (deployments.engine.row_logits, first in both backends' processor
  lists) hands it the raw scores before any rule edits them (`record`); the
  token chosen from them shows up at the next step (`observe`) or when the
  caller reads the entries (`resolved`). It keeps one vocabulary-sized fp32
  vector per row between steps.
- `score_prompt` runs a prompt through the model in chunks of positions with a
  KV cache (chunked prefill: one pass's worth of compute), so logits exist
  for at most `chunk` positions at once: never prompt × vocabulary fp32.
- `TokenTexts` turns ids into the text and exact bytes OpenAI shows.

Bytes held: placement.sizing.logprob_workspace (the plan states them).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from deployments.engine.generation import SamplingParams, StreamDelta, TokenLogprob, TopLogprob

# Alternatives per token OpenAI allows: chat `top_logprobs` up to 20, completions `logprobs` up to 5.
MAX_TOP_LOGPROBS = 20

# One position: (token id, its logprob or None, ((alternative id, logprob), ...) best first).
Scored = tuple[int, float | None, tuple[tuple[int, float], ...]]


def _top_pairs(logp: torch.Tensor, top: int) -> list[tuple[tuple[int, float], ...]]:
    """The `top` best (id, logprob) per row of `logp` [rows, vocab]."""
    if top <= 0:
        return [() for _ in range(logp.size(0))]
    values, ids = torch.topk(logp, top, dim=-1)  # [rows, top]
    rows = zip(ids.tolist(), values.tolist(), strict=True)
    return [tuple(zip(row_ids, row_values, strict=True)) for row_ids, row_values in rows]


class LogprobRecorder:
    """Logprobs of one row's generated tokens, `top` alternatives each. Thread-safe: the
    batching thread records, the request's own thread reads."""

    def __init__(self, top: int):
        self.top = top
        self._lock = threading.Lock()
        self._scored: list[Scored] = []
        self._pending: tuple[torch.Tensor, tuple[tuple[int, float], ...]] | None = None

    def record(self, scores: torch.Tensor) -> None:
        """The raw scores [vocab] the row's next token is chosen from."""
        logp = torch.log_softmax(scores.float(), dim=-1)  # [vocab] fp32: kept until the token is known
        pairs = _top_pairs(logp.unsqueeze(0), self.top)[0]
        with self._lock:
            self._pending = (logp, pairs)

    def observe(self, generated: Sequence[int]) -> None:
        """`generated`: the row's tokens so far; the newest one resolves the last recorded step."""
        with self._lock:
            self._resolve(generated)

    def resolved(self, generated: Sequence[int]) -> list[Scored]:
        """(token, logprob, alternatives) of the first len(generated) tokens, as far as recorded."""
        with self._lock:
            self._resolve(generated)
            return self._scored[: len(generated)]

    def scored(self) -> list[Scored]:
        """What is resolved so far (a stream reads this; the backend resolves the last token at its end)."""
        with self._lock:
            return list(self._scored)

    def _resolve(self, generated: Sequence[int]) -> None:
        if self._pending is not None and len(generated) > len(self._scored):
            token = int(generated[len(self._scored)])
            logp, pairs = self._pending
            self._pending = None
            self._scored.append((token, float(logp[token]), pairs))


def score_prompt(
    model: Any,
    input_ids: Sequence[int],
    top: int,
    *,
    chunk: int,
    cache: Any,
    on_chunk: Callable[[], None] | None = None,
) -> list[Scored]:
    """Each prompt token's logprob given the tokens before it, `top` alternatives each; the first
    token has none. Forward passes of `chunk` positions fill `cache` (a DynamicCache the caller
    holds in a side slot); each pass's logits are reduced to the chosen token and its
    alternatives before the next pass. `on_chunk` runs after each pass (KV measurement, cancel)."""
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)  # [1, prompt]
    scored: list[Scored] = [(int(ids[0, 0]), None, ())]
    for start in range(0, ids.size(1), chunk):
        end = min(ids.size(1), start + chunk)
        targets = ids[0, start + 1 : end + 1]  # position p predicts token p + 1; the last predicts nothing
        out = model(input_ids=ids[:, start:end], cache=cache, use_cache=True)
        if targets.numel():
            logp = torch.log_softmax(out.logits[0, : targets.numel()].float(), dim=-1)  # [≤ chunk, vocab] fp32
            del out
            chosen = logp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            pairs = _top_pairs(logp, top)
            del logp
            scored.extend(zip(targets.tolist(), chosen, pairs, strict=True))
        else:
            del out
        if on_chunk is not None:
            on_chunk()
    return scored


class TokenTexts:
    """Token ids as OpenAI shows them: the token's text and its exact bytes.

    Bytes come from llguidance's view of the tokenizer (byte-level BPE and
    SentencePiece byte fallback alike; special tokens as their text). For a
    tokenizer llguidance cannot read, from the tokenizer itself: byte-fallback
    pieces (`<0xE2>`) as their byte, others decoded after an anchor token so a
    leading space survives. A token holding part of a UTF-8 character shows
    U+FFFD in `token`; `bytes` stays exact where llguidance reads the tokenizer."""

    def __init__(self, ll_tokenizer: Callable[[], Any], tokenizer: Any):
        self._ll_tokenizer = ll_tokenizer  # built on first use (~0.3 s for a 50k vocabulary)
        self._tokenizer = tokenizer
        self._ll: Any = None
        self._ll_failed = False
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}
        self._lock = threading.Lock()

    def _bytes(self, token: int) -> bytes:
        if self._ll is None and not self._ll_failed:
            try:
                self._ll = self._ll_tokenizer()
            except ValueError:  # a decoder llguidance does not know (e.g. a bare Metaspace)
                self._ll_failed = True
        if self._ll is not None:
            return self._ll.decode_bytes([token])
        tok = self._tokenizer
        piece = tok.convert_ids_to_tokens(token)
        if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        if token in tok.all_special_ids:
            return str(piece).encode()
        anchor = tok("a", add_special_tokens=False)["input_ids"][-1]
        alone = tok.decode([anchor], clean_up_tokenization_spaces=False)
        both = tok.decode([anchor, token], clean_up_tokenization_spaces=False)
        return (both[len(alone) :] if both.startswith(alone) else tok.decode([token])).encode()

    def text(self, token: int) -> tuple[str, tuple[int, ...]]:
        with self._lock:
            known = self._cache.get(token)
            if known is None:
                raw = self._bytes(token)
                known = self._cache[token] = (raw.decode("utf-8", errors="replace"), tuple(raw))
        return known

    def entry(self, scored: Scored) -> TokenLogprob:
        token, logprob, pairs = scored
        text, raw = self.text(token)
        top = tuple(TopLogprob(*self.text(alt), logprob=value) for alt, value in pairs)
        return TokenLogprob(token=text, bytes=raw, logprob=logprob, top=top)

    def entries(self, scored: Sequence[Scored]) -> tuple[TokenLogprob, ...]:
        return tuple(self.entry(s) for s in scored)


class StreamedLogprobs:
    """Puts on each streamed delta the logprobs of the tokens its text covers.

    A delta gets the entries whose token texts, summed, fit in the text
    streamed so far; the last delta brings the rest, cut to the kept tokens.
    With stop strings all come in the last delta (a token past a stop must
    never be sent).
    """

    def __init__(self, texts: TokenTexts, recorder: LogprobRecorder, params: SamplingParams):
        self.texts, self.recorder, self.params = texts, recorder, params
        self.sent = 0  # entries sent
        self.covered = 0  # characters the sent entries cover
        self.streamed = 0  # characters streamed

    def attach(self, delta: StreamDelta) -> StreamDelta:
        self.streamed += len(delta.text)
        if delta.finish_reason is not None:
            entries = self.texts.entries(self.recorder.scored()[self.sent : delta.completion_tokens])
        elif self.params.stop:
            return delta
        else:
            entries = ()
            for scored in self.recorder.scored()[self.sent :]:
                entry = self.texts.entry(scored)
                if self.covered + len(entry.token) > self.streamed:
                    break
                entries, self.covered = (*entries, entry), self.covered + len(entry.token)
        self.sent += len(entries)
        return dataclasses.replace(delta, logprobs=entries)
