"""Per-request logits processing: grammars, then the request's other rules.

One `RowLogits` follows one request while it decodes. Before each sampling
step it sees the tokens generated so far (`observe`) and edits that row's
scores (`apply`): a grammar mask first (llguidance; the output then always
parses), then the rules of deployments.engine.rules (penalties, `logit_bias`,
`min_tokens` / `ignore_eos`, `top_k`, `min_p`). A row that asks for logprobs
also hands its raw scores, before any of these edits, to its
`LogprobRecorder` (deployments.engine.logprobs).

Two adapters plug it into the two backends: `BatchRowsProcessor` into
transformers' continuous batch (rows found by a `rayfit_row` key each request
carries), `GenerateRowsProcessor` into `model.generate` (rows by position).

Memory: per step a row with rules needs a few vocabulary-sized temporaries
(scores copy, mask), freed after the step. They are not yet itemized in the
plan: an open item of the memory contract.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import llguidance
import llguidance.hf
import torch
from transformers import LogitsProcessor

from deployments.engine.rules import RowHistory, RowRules, apply_rules
from placement import hf_internals

# The key every continuous-batching request carries (-1: nothing to do for this row).
ROW_KEY = "rayfit_row"


class GrammarCompiler:
    """Grammars for one tokenizer, compiled once each (a matcher per request is a cheap copy)."""

    def __init__(
        self, tokenizer: Any, eos_token_ids: Sequence[int], cache_size: int = 64, vocab_size: int | None = None
    ):
        """`vocab_size`: the model's logits width when it is wider than the tokenizer (Gemma 3: 262208
        logits, 262145 tokens); the grammar's bitmask must cover every logit."""
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._ll_tokenizer: Any = None
        self._compiled: dict[str, Any] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> Any:
        if self._ll_tokenizer is None:  # ~0.3 s for a 50k vocabulary: built on the first grammar
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._tokenizer, n_vocab=self._vocab_size, eos_token=self._eos or None
            )
        return self._ll_tokenizer

    def check(self, grammar: str) -> str | None:
        """The grammar's error against this tokenizer, or None when it is usable (compiled and cached)."""
        try:
            self._compile(grammar)
        except ValueError as exc:
            return str(exc)
        return None

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher at the grammar's start."""
        return self._compile(grammar).deep_copy()

    def _compile(self, grammar: str) -> Any:
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is None:
                compiled = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
                if compiled.is_error():
                    raise ValueError(f"invalid grammar: {compiled.get_error()}")
                if len(self._compiled) >= self._cache_size:
                    self._compiled.pop(next(iter(self._compiled)))  # the oldest
                self._compiled[grammar] = compiled
            return compiled


# Byte value → the 0 (allowed) / -inf (masked) bias of its 8 tokens, per (dtype, device).
_BYTE_BIAS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_BYTE_SHIFTS = torch.tensor([0, 8, 16, 24], dtype=torch.int32)


def grammar_bias(bitmask: torch.Tensor, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """llguidance's [rows, words] int32 bitmask (bit j of word w set: token 32·w + j allowed)
    as a [rows, vocab] additive bias: 0 where allowed, -inf where masked.

    Adding it is branch-free, where `masked_fill` with a bool mask slows down on CPU as the
    mask gets irregular (8 rows × 49k tokens of random bits: 1.85 ms vs 0.21 ms here). One
    table lookup per mask byte, for all rows together."""
    table = _BYTE_BIAS.get((dtype, device))
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # [byte, bit]
        table = torch.zeros(256, 8, dtype=dtype).masked_fill_(bits == 0, float("-inf")).to(device)
        _BYTE_BIAS[(dtype, device)] = table
    mask_bytes = ((bitmask.unsqueeze(-1) >> _BYTE_SHIFTS) & 0xFF).flatten(1)  # [rows, 4·words], token order
    bias = table.index_select(0, mask_bytes.flatten().long().to(device))
    return bias.view(bitmask.size(0), -1)[:, :vocab]


@dataclass
class RowLogits:
    """One request's logits rules and the state they need (tokens seen, grammar position)."""

    rules: RowRules
    eos_token_ids: tuple[int, ...]
    history: RowHistory = field(default_factory=RowHistory)
    matcher: Any = None
    recorder: Any = None  # a LogprobRecorder when the request asks for logprobs

    def observe(self, generated: Sequence[int]) -> None:
        """Take in the tokens generated since the last call (`generated` is all of them so far)."""
        if self.recorder is not None:
            self.recorder.observe(generated)
        for token in generated[len(self.history.generated) :]:
            self.history.add(int(token))
            if self.matcher is not None and not self.matcher.is_stopped():
                self.matcher.consume_token(int(token))

    @property
    def grammar_failed(self) -> str | None:
        return self.matcher.get_error() if self.matcher is not None and self.matcher.is_error() else None

    @property
    def masks_grammar(self) -> bool:
        """Whether this row's next step takes a grammar mask."""
        return self.matcher is not None and not self.matcher.is_error()

    @cached_property
    def grammar_only(self) -> bool:
        """Nothing to do for this row but the grammar mask (no other rule, no logprobs)."""
        return self.recorder is None and self.matcher is not None and not replace(self.rules, grammar=None).active

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """The grammar's allowed next tokens into row `index` of an int32 [rows, words] CPU bitmask."""
        # What llguidance.torch.fill_next_token_bitmask does. That module is not imported: it runs
        # torch.compile on a kernel at import, which loads inductor (~2 s of CPU in every engine process)
        # for a kernel rayfit never calls.
        row = bitmask[index]
        assert bitmask.dtype == torch.int32 and bitmask.device.type == "cpu" and row.is_contiguous()
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def apply(self, scores: torch.Tensor, grammar: bool = True, raw: torch.Tensor | None = None) -> torch.Tensor:
        """This row's scores ([vocab], float) after every rule; a new tensor (the same one when
        the row only records logprobs). `grammar=False`: all but the grammar mask, because the
        caller has already masked the batch's grammar rows together; `raw` is then the model's
        own scores, which logprobs are of.

        The grammar mask comes first: it says which tokens may follow at all, and `top_k` /
        `min_p` then choose among those. The other way round, `top_k` could keep only tokens the
        grammar forbids, leave no finite score, and sampling fails on NaN probabilities. Where the
        rules still leave nothing (`ignore_eos` or `min_tokens` when the grammar allows only EOS),
        the grammar wins: the row keeps the grammar's tokens."""
        if self.recorder is not None:
            self.recorder.record(scores if raw is None else raw)  # logprobs are of the raw logits
            if not self.rules.active:
                return scores
        allowed = self._grammar_mask(scores) if grammar and self.masks_grammar else scores
        out = apply_rules(self.rules, allowed, self.history, self.eos_token_ids)
        if not bool(torch.isfinite(out).any()):
            return allowed.clone()
        return out

    def _grammar_mask(self, scores: torch.Tensor) -> torch.Tensor:
        bitmask = torch.full((1, (scores.size(-1) + 31) // 32), -1, dtype=torch.int32)
        self.fill_bitmask(bitmask, 0)
        return scores + grammar_bias(bitmask, scores.size(-1), scores.dtype, scores.device)[0]


class BatchRowsProcessor(hf_internals.CBLogitsProcessor):
    """`RowLogits` inside transformers' continuous batch.

    Each request that needs rules is added with `rayfit_row=<key>`; before a
    step, `prepare_tensor_args` (on the batching thread, rows in batch order)
    lets each row's `RowLogits` see its new tokens and hands the keys on as the
    step's argument; `__call__` then edits the rows with a key. Rows without
    one (-1) are untouched, so plain requests cost one tensor read. The grammar
    rows of a step are masked together: their bitmasks filled into one
    preallocated tensor, turned into one additive bias and added in one op.
    """

    supported_kwargs: dict[str, type] = {ROW_KEY: int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.rows: dict[int, RowLogits] = {}
        self._lock = threading.Lock()
        self._next_key = 0
        self._bitmask: torch.Tensor | None = None  # [rows, words] int32, reused step to step

    def register(self, row: RowLogits) -> int:
        with self._lock:
            key, self._next_key = self._next_key, self._next_key + 1
            self.rows[key] = row
        return key

    def forget(self, key: int) -> None:
        with self._lock:
            self.rows.pop(key, None)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(-1)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        keys = []
        for request in requests_with_new_token:
            kwargs, generated = hf_internals.request_row_state(request)
            key = kwargs.get(ROW_KEY, -1)
            row = self.rows.get(key)
            if row is not None:
                row.observe(generated)
            keys.append(key if row is not None else -1)
        return torch.tensor(keys, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        keys = tensor_arg[: scores.size(0)].tolist()
        if all(key < 0 for key in keys):
            return scores
        out = scores.clone()
        rows = [(index, row) for index, key in enumerate(keys) if (row := self.rows.get(key)) is not None]
        grammar_rows = [(index, row) for index, row in rows if row.masks_grammar]
        if grammar_rows:  # first, as RowLogits.apply does: the other rules choose among allowed tokens
            self._mask_grammar_rows(out, grammar_rows)
        for index, row in rows:
            if not row.grammar_only:
                out[index] = row.apply(out[index], grammar=False, raw=scores[index])
        return out

    def _mask_grammar_rows(self, out: torch.Tensor, grammar_rows: list[tuple[int, RowLogits]]) -> None:
        """Each grammar row's mask on `out` ([batch rows, vocab]), in place."""
        count, vocab = len(grammar_rows), out.size(-1)
        words = (vocab + 31) // 32
        if self._bitmask is None or self._bitmask.size(0) < count or self._bitmask.size(1) != words:
            self._bitmask = torch.empty((max(count, out.size(0)), words), dtype=torch.int32)
        bitmask = self._bitmask[:count]
        bitmask.fill_(-1)
        for slot, (_, row) in enumerate(grammar_rows):
            row.fill_bitmask(bitmask, slot)
        bias = grammar_bias(bitmask, vocab, out.dtype, out.device)
        if count == out.size(0):
            out.add_(bias)
        else:
            out.index_add_(0, torch.tensor([i for i, _ in grammar_rows], device=out.device), bias)


def install_batch_rows(manager: Any, rows: BatchRowsProcessor) -> None:
    """Put `rows` first in a continuous-batching manager's processors (before temperature and
    top-p, so rules act on the model's own scores); call before `manager.start()`."""
    hf_internals.add_first_processor(manager, rows)


class GenerateRowsProcessor(LogitsProcessor):
    """`RowLogits` inside `model.generate`: row i of the batch is `rows[i]` (None: untouched).

    generate runs custom processors before its temperature and top-p warpers, so rows see the
    model's own scores here too."""

    def __init__(self, rows: Sequence[RowLogits | None], prompt_width: int):
        self.rows = list(rows)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for index, row in enumerate(self.rows):
            if row is not None:
                row.observe(input_ids[index, self.prompt_width :].tolist())
                out[index] = row.apply(scores[index].float()).to(scores.dtype)
        return out


class RowFactory:
    """Builds each request's `RowLogits` (None when it asks for nothing beyond temperature and top-p)."""

    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int], vocab_size: int | None = None):
        """`vocab_size`: the model's logits width (GrammarCompiler)."""
        self.eos_token_ids = tuple(eos_token_ids)
        self.grammars = GrammarCompiler(tokenizer, eos_token_ids, vocab_size=vocab_size)

    def row(self, rules: RowRules, prompt_ids: Sequence[int] = (), recorder: Any = None) -> RowLogits | None:
        """Raises ValueError for a grammar this tokenizer cannot follow. `recorder`: the
        request's LogprobRecorder, if it asks for logprobs."""
        if not rules.active and recorder is None:
            return None
        matcher = self.grammars.matcher(rules.grammar) if rules.grammar else None
        return RowLogits(rules, self.eos_token_ids, RowHistory(tuple(prompt_ids)), matcher, recorder)
