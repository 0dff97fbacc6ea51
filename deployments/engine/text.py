"""Generated token ids into the text a caller sees: stop strings, EOS, streaming.

- `TextRules.finish`: one row's text, kept-token count and finish reason.
  completion_tokens counts the generated tokens kept in the text (up to the
  stop string, without the EOS token).
- `IncrementalText`: streamed detokenization, O(1) per token.
- `StopHoldBack`: streamed text released as it arrives, holding back any
  tail that could still become a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deployments.engine.generation import SamplingParams, StreamDelta

# Extra tokens decoded around a stop string when checking for it during
# generation (a token can hold less than one character).
STOP_TAIL_TOKENS = 8


@dataclass(frozen=True)
class Finished:
    text: str
    completion_tokens: int
    finish_reason: str


class TextRules:
    """Where a row's text ends, for one tokenizer and its end-of-turn ids."""

    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)

    def stop_seen(self, tokens: Sequence[int], stops: Sequence[str]) -> bool:
        """Whether a stop string shows in the last tokens (decoded with a margin)."""
        tail = max(len(s) for s in stops) + STOP_TAIL_TOKENS
        text = self.tokenizer.decode(list(tokens[-tail:]), skip_special_tokens=True)
        return any(s and s in text for s in stops)

    def finish(self, new_tokens: Sequence[int], params: SamplingParams) -> Finished:
        """Text, kept-token count and finish reason of one row's generated ids."""
        tokens = list(new_tokens)
        reason = "length"
        for i, token in enumerate(tokens):
            if token in self.eos_token_ids:
                tokens, reason = tokens[:i], "stop"
                break
        tokens = tokens[: params.max_tokens]
        if reason == "length" and len(tokens) < params.max_tokens:
            reason = "stop"  # ended by a stop string the backend saw, trimmed below
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in params.stop if s) if i >= 0), default=-1)
        if cut < 0:
            return Finished(text=text, completion_tokens=len(tokens), finish_reason=reason)
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
        return Finished(text=text[:cut], completion_tokens=low, finish_reason="stop")

    def last_delta(self, tokens: Sequence[int], params: SamplingParams, sent: int, prompt_tokens: int) -> StreamDelta:
        """A stream's final delta: the final text is authoritative, so whatever of it is past the
        `sent` characters already streamed, with the finish reason and usage."""
        done = self.finish(tokens, params)
        return StreamDelta(
            text=done.text[sent:],
            finish_reason=done.finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=done.completion_tokens,
        )


class IncrementalText:
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


class StopHoldBack:
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
