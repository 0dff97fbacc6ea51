"""A request's rules on its logits beyond temperature and top-p: what it asks (`RowRules`)
and how each rule edits a row's scores (`apply_rules`), side by side.

Adding a rule touches three files: a field and its edit here, the request field that
sets it (deployments/openai_api/protocol.py), and its test. Both backends (the running
batch and the side path) apply rules through deployments.engine.row_logits, which also
masks the grammar first, so every rule here chooses among tokens the grammar allows.

Light to import: the replica builds `RowRules` without torch, and the edits use only the
scores tensor's own methods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RowRules:
    """What one request asks of its logits, all optional (`active`: any is set)."""

    grammar: str | None = None  # an llguidance grammar (deployments.engine.structured builds it)
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    top_k: int = 0
    min_p: float = 0.0

    @property
    def active(self) -> bool:
        return self != RowRules()


@dataclass
class RowHistory:
    """The tokens a row's rules look at: its prompt, and what it has generated so far."""

    prompt_ids: tuple[int, ...] = ()
    generated: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)  # token → times generated

    def add(self, token: int) -> None:
        self.generated.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1


def apply_rules(
    rules: RowRules, scores: torch.Tensor, history: RowHistory, eos_token_ids: Sequence[int]
) -> torch.Tensor:
    """One row's scores ([vocab], float) after each rule but the grammar, in this order: penalties,
    bias, EOS rules, then the cuts (`top_k`, `min_p`). A new tensor; `scores` is left as it is.
    Token ids past the logits' width (a tokenizer wider than the model) are ignored."""
    vocab = scores.size(-1)
    out = scores.clone()
    if rules.repetition_penalty != 1.0:
        seen = [t for t in sorted(set(history.prompt_ids) | set(history.generated)) if t < vocab]
        picked = out[seen]
        # CTRL's penalty: a seen token's score moves towards "less likely" whatever its sign.
        out[seen] = (picked / rules.repetition_penalty).where(picked > 0, picked * rules.repetition_penalty)
    if history.counts and (rules.presence_penalty or rules.frequency_penalty):
        ids = [t for t in history.counts if t < vocab]
        counts = out.new_tensor([history.counts[t] for t in ids])
        out[ids] -= rules.presence_penalty + rules.frequency_penalty * counts
    for token, bias in rules.logit_bias:
        if token < vocab:
            out[token] += bias
    if rules.ignore_eos or len(history.generated) < rules.min_tokens:
        out[[t for t in eos_token_ids if t < vocab]] = float("-inf")
    if 0 < rules.top_k < vocab:
        threshold = out.topk(rules.top_k).values[-1]
        out = out.masked_fill(out < threshold, float("-inf"))
    if rules.min_p > 0:
        # p_i >= min_p · p_max  ⇔  s_i >= s_max + log(min_p)
        out = out.masked_fill(out < out.max() + math.log(rules.min_p), float("-inf"))
    return out
