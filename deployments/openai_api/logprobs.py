"""Token log-probabilities in OpenAI's two response shapes (used by deployments.openai_api.protocol).

- chat: `choices[i].logprobs = {"content": [{token, logprob, bytes,
  top_logprobs: [{token, logprob, bytes}]}], "refusal": null}`; a streamed
  chunk carries the entries of the tokens its delta came from.
- completions (legacy): `choices[i].logprobs = {tokens, token_logprobs,
  top_logprobs: [{token: logprob}], text_offset}`; with `echo` the prompt's
  tokens come first (the first one's logprob and alternatives null, as
  OpenAI and vLLM send them). `text_offset[i]` is where token i starts in
  `choices[i].text`, counted by the tokens' own texts. Each alternatives dict
  also holds the chosen token (vLLM does the same), so a greedy token's
  logprob is its dict's maximum — what lm-evaluation-harness checks.

The values are the engine's (deployments.engine.logprobs): log-softmax of the
raw model logits, before temperature, penalties and logit_bias.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from deployments.engine.generation import TokenLogprob

# OpenAI's limits: chat `top_logprobs` ≤ 20, completions `logprobs` ≤ 5.
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


class TopLogprobItem(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobItem]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


def chat_logprobs(entries: Sequence[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if entries is None:
        return None
    content = [
        ChatTokenLogprob(
            token=e.token,
            logprob=e.logprob if e.logprob is not None else 0.0,
            bytes=list(e.bytes),
            top_logprobs=[TopLogprobItem(token=t.token, logprob=t.logprob, bytes=list(t.bytes)) for t in e.top],
        )
        for e in entries
    ]
    return ChoiceLogprobs(content=content)


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """The legacy shape of `entries`; `offset`: where the first token starts in the choice's text."""
    tokens, offsets = [], []
    for e in entries:
        tokens.append(e.token)
        offsets.append(offset)
        offset += len(e.token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[_alternatives(e) for e in entries],
        text_offset=offsets,
    )


def _alternatives(entry: TokenLogprob) -> dict[str, float] | None:
    if entry.logprob is None:
        return None  # a prompt's first token: nothing predicted it
    top = {t.token: t.logprob for t in entry.top}
    top.setdefault(entry.token, entry.logprob)
    return top


def next_offset(logprobs: CompletionLogprobs | None, offset: int) -> int:
    """Where a stream's next token starts, after the tokens of `logprobs`."""
    if logprobs is None or not logprobs.tokens:
        return offset
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])
