"""The side path at its limits: a request of exactly `context_length` tokens holds no more KV than the plan.

The plan prices a side slot as `side_sequence_bytes` (placement.sizing.kv_budget). What is held is
counted here as torch holds it: the bytes of every distinct storage behind the cache's K/V tensors,
seen at every layer update (while a layer grows, its old and new storage are both alive). The
count is the test's own (`StorageProbe`), independent of the engine's ledger, which must agree.

Models: a tiny Gemma 3 with the real layer pattern (5 sliding layers, then a full one; window 64,
context 256) in bf16, and the tiny image+text model (tests/tiny_models.py). No engine, no Ray:
`SideBackend` is built directly, so that nothing but the side path is measured.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from tiny_models import TOKENS_PER_IMAGE, VOCAB_SIZE, build_tokenizer
from transformers import AutoProcessor, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig
from transformers.cache_utils import Cache

from deployments.engine.generation import SamplingParams
from deployments.engine.kv import KvLedger, RequestCancelled
from deployments.engine.prompts import PreparedPrompt
from deployments.engine.side import SideBackend
from deployments.engine.text import TextRules
from placement.sizing.kv_budget import side_sequence_bytes

CONTEXT = 256
WINDOW = 64
# 2 (K and V) × 1 KV head × 32 dims × 2 bytes (bf16): one token in one layer.
BF16_LAYER_TOKEN = 2 * 1 * 32 * 2


def _storages(tensors: Iterator[torch.Tensor]) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _layer_tensors(layer: Any) -> Iterator[torch.Tensor]:
    for name in ("keys", "values"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor):
            yield tensor


@dataclass
class StorageProbe:
    """What every cache update leaves alive, by storage (not by element)."""

    peak: int = 0  # the most alive at once: everything held before an update plus the layer's new storage
    held_peak: int = 0  # the most held between updates
    elements_peak: int = 0  # numel × element size: what views show (the ledger's old count)
    updates: int = 0

    def record(self, cache: Cache, layer_idx: int, update: Any) -> Any:
        before = sum(_storages(t for layer in cache.layers for t in _layer_tensors(layer)).values())
        result = update()
        new = sum(_storages(_layer_tensors(cache.layers[layer_idx])).values())
        after = sum(_storages(t for layer in cache.layers for t in _layer_tensors(layer)).values())
        # torch.cat made the layer's new storage while its old one (in `before`) was still held.
        self.peak = max(self.peak, before + new)
        self.held_peak = max(self.held_peak, after)
        elements = sum(t.numel() * t.element_size() for layer in cache.layers for t in _layer_tensors(layer))
        self.elements_peak = max(self.elements_peak, elements)
        self.updates += 1
        return result


@contextmanager
def probed(monkeypatch: pytest.MonkeyPatch) -> Iterator[StorageProbe]:
    """Count storages at every `Cache.update` (DynamicCache's, and the engine's SideCache through it)."""
    probe = StorageProbe()
    original = Cache.update

    def update(self: Cache, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *a: Any, **k: Any):
        return probe.record(self, layer_idx, lambda: original(self, key_states, value_states, layer_idx, *a, **k))

    with monkeypatch.context() as patch:
        patch.setattr(Cache, "update", update)
        yield probe


@dataclass
class Passes:
    """The input_ids of every forward pass of the model."""

    ids: list[list[int]] = field(default_factory=list)

    def hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.ids.append(ids[0].tolist())


@contextmanager
def passes_of(model: torch.nn.Module) -> Iterator[Passes]:
    passes = Passes()
    handle = model.register_forward_pre_hook(passes.hook, with_kwargs=True)
    try:
        yield passes
    finally:
        handle.remove()


# ---- models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="module")
def gemma3_fp32() -> Gemma3ForCausalLM:
    """Gemma 3's layer pattern at tiny sizes: 6 layers, 5 sliding (window 64) then 1 full."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=CONTEXT,
        sliding_window=WINDOW,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gemma3_bf16(gemma3_fp32: Gemma3ForCausalLM) -> Gemma3ForCausalLM:
    return copy.deepcopy(gemma3_fp32).to(torch.bfloat16)


def _side(model: Any, tokenizer: Any, sequences: int = 1) -> SideBackend:
    # No EOS ids: every row generates exactly its max_tokens, so the limit is reached.
    return SideBackend(
        model,
        sequences=sequences,
        context_length=CONTEXT,
        pad_token_id=0,
        text=TextRules(tokenizer, []),
        ledger=KvLedger(),
    )


def _prompt(tokens: int, seed: int = 1) -> PreparedPrompt:
    generator = torch.Generator().manual_seed(seed)
    return PreparedPrompt(input_ids=[2] + torch.randint(10, VOCAB_SIZE, (tokens - 1,), generator=generator).tolist())


def _plan(model: Any) -> int:
    return side_sequence_bytes(model.config.get_text_config(), context_length=CONTEXT, dtype=model.dtype)


# ---- text: a seeded request of exactly the context ---------------------------------------

# 192 prompt tokens (three whole passes of 64) + 64 new tokens = the context, exactly.
LIMIT_PROMPT = 192
LIMIT_PARAMS = SamplingParams(max_tokens=CONTEXT - LIMIT_PROMPT, temperature=0.9, seed=7)
# A prefill pass longer than any prompt: the whole prompt at once (what the side path did before).
ONE_PASS = 10**6


def test_plan_prices_sliding_layers_at_window_minus_one_plus_a_pass(gemma3_bf16: Gemma3ForCausalLM) -> None:
    # Full layer: the context; sliding: window − 1 + a pass of one window; plus one layer growing (the full one).
    assert _plan(gemma3_bf16) == BF16_LAYER_TOKEN * (CONTEXT + 5 * (WINDOW - 1 + WINDOW) + CONTEXT)


def test_seeded_request_at_the_context_stays_within_the_plan(
    gemma3_bf16: Gemma3ForCausalLM, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    side = _side(gemma3_bf16, tokenizer)
    prompt = _prompt(LIMIT_PROMPT)
    assert prompt.prompt_tokens + LIMIT_PARAMS.max_tokens == CONTEXT
    with probed(monkeypatch) as probe, passes_of(gemma3_bf16) as passes:
        tokens = side.generate([prompt], [LIMIT_PARAMS])[0]
    assert len(tokens) == LIMIT_PARAMS.max_tokens
    plan = _plan(gemma3_bf16)
    assert probe.peak <= plan, (probe.peak, plan)
    # The engine's ledger sees what torch holds, the growing layer's two storages included.
    assert side.ledger.peak_side_bytes == probe.peak
    # Prefill in passes of one window, then one token a step.
    assert [len(ids) for ids in passes.ids] == [64, 64, 64] + [1] * (LIMIT_PARAMS.max_tokens - 1)
    # After the last prefill pass: the full layer holds 192 tokens, each sliding layer 63 + 64.
    assert probe.held_peak == BF16_LAYER_TOKEN * (LIMIT_PROMPT + 5 * (WINDOW - 1 + WINDOW))
    assert side.ledger.side_bytes == 0  # forgotten once the call is over
    print(f"\nside slot at the context: plan {plan} B, peak storage {probe.peak} B, held {probe.held_peak} B")


def test_seeded_sample_does_not_depend_on_the_passes(gemma3_bf16: Gemma3ForCausalLM, tokenizer: Any) -> None:
    """Chunked prefill changes what the cache holds, not what is sampled: the same seed, the same tokens
    as one pass of the whole prompt."""
    side = _side(gemma3_bf16, tokenizer)
    prompt = _prompt(LIMIT_PROMPT)
    chunked = side.generate([prompt], [LIMIT_PARAMS])[0]
    side.prefill_chunk = ONE_PASS
    whole = side.generate([prompt], [LIMIT_PARAMS])[0]
    assert chunked == whole
    assert len(set(chunked)) > 1  # really sampled


def test_one_pass_of_the_whole_prompt_breaks_the_plan(
    gemma3_bf16: Gemma3ForCausalLM, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why the side path prefills in passes: one pass of 192 tokens leaves every sliding layer holding
    192 tokens of storage behind its 63-token view, and the plan is exceeded. Counting elements (what
    the ledger did before) shows only the window and misses it."""
    side = _side(gemma3_bf16, tokenizer)
    side.prefill_chunk = ONE_PASS
    with probed(monkeypatch) as probe:
        side.generate([_prompt(LIMIT_PROMPT)], [LIMIT_PARAMS])
    plan = _plan(gemma3_bf16)
    assert probe.held_peak == BF16_LAYER_TOKEN * 6 * LIMIT_PROMPT
    assert probe.peak > plan
    assert side.ledger.peak_side_bytes == probe.peak
    assert probe.elements_peak < plan < probe.peak


def test_prompt_scoring_of_the_whole_context_stays_within_the_plan(
    gemma3_bf16: Gemma3ForCausalLM, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`echo` scoring fills a side slot too; asked for passes of 256 it takes passes of one window."""
    side = _side(gemma3_bf16, tokenizer)
    prompt = _prompt(CONTEXT)
    with probed(monkeypatch) as probe, passes_of(gemma3_bf16) as passes:
        scored = side.score_prompt(prompt, top=1, chunk=CONTEXT)
    assert len(scored) == CONTEXT
    assert probe.peak <= _plan(gemma3_bf16)
    assert side.ledger.peak_side_bytes == probe.peak
    assert [len(ids) for ids in passes.ids] == [WINDOW] * (CONTEXT // WINDOW)


def test_left_padded_rows_prefilled_in_passes_match_each_row_alone(
    gemma3_fp32: Gemma3ForCausalLM, tokenizer: Any
) -> None:
    """Rows 10, 150 and 90 tokens long: the short rows are all padding for a whole pass or more."""
    side = _side(gemma3_fp32, tokenizer, sequences=3)
    prompts = [_prompt(10, seed=1), _prompt(150, seed=2), _prompt(90, seed=3)]
    greedy = [SamplingParams(max_tokens=16, temperature=0)] * 3
    alone = [side.generate([p], [greedy[0]])[0] for p in prompts]
    with passes_of(gemma3_fp32) as passes:
        together = side.generate(prompts, greedy)
    assert together == alone
    assert [len(ids) for ids in passes.ids[:3]] == [64, 64, 22]


def test_a_waiting_request_holds_nothing_on_the_device(
    gemma3_bf16: Gemma3ForCausalLM, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's tensors go to the device only once it holds its slot: one that waits (and here is
    cancelled while waiting) never asks for the device; a served one asks only inside its slot."""
    side = _side(gemma3_bf16, tokenizer)
    asked: list[int] = []  # slots in use at each look at the device

    def device(self: SideBackend) -> torch.device:
        asked.append(self.slots.in_use)
        return self.model.get_input_embeddings().weight.device

    monkeypatch.setattr(SideBackend, "device", property(device))
    cancel = threading.Event()
    cancel.set()
    with side.slots.hold(1):  # another request holds the only slot
        with pytest.raises(RequestCancelled):
            side.generate([_prompt(20)], [SamplingParams(max_tokens=4, temperature=0)], cancel)
    assert asked == []
    side.generate([_prompt(20)], [SamplingParams(max_tokens=4, temperature=0)])
    assert asked and all(in_use == 1 for in_use in asked)


# ---- an image request at the limit -------------------------------------------------------


@pytest.fixture(scope="module")
def vision(tiny_vision_model_dir: Path) -> tuple[Gemma3ForConditionalGeneration, Any]:
    model = Gemma3ForConditionalGeneration.from_pretrained(tiny_vision_model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_vision_model_dir)


def _image_prompt(processor: Any, words_before: int, words_after: int) -> PreparedPrompt:
    text = " ".join(["fox"] * words_before) + "<start_of_image>" + " ".join(["dog"] * words_after)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    batch = processor(text=[text], images=[[image]], return_tensors="pt")
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    return PreparedPrompt(input_ids=batch["input_ids"][0].tolist(), extra_inputs=extra)


def test_image_request_at_the_context_stays_within_the_plan(
    vision: tuple[Gemma3ForConditionalGeneration, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image whose tokens a plain pass of 64 would cut in two (e.g. positions 62-65): the text before it
    goes first, so the image sits in one pass; the request fills the context exactly."""
    model, processor = vision
    image_token = model.config.image_token_id
    for words in range(40, 80):  # the first prompt whose image a plain pass of one window would cut
        prompt = _image_prompt(processor, words, 40)
        first_image = prompt.input_ids.index(image_token)
        if first_image // WINDOW != (first_image + TOKENS_PER_IMAGE - 1) // WINDOW:
            break
    else:
        pytest.fail("no prompt puts the image across a pass boundary")
    params = SamplingParams(max_tokens=CONTEXT - prompt.prompt_tokens, temperature=0)
    side = _side(model, processor.tokenizer)
    with probed(monkeypatch) as probe, passes_of(model) as passes:
        tokens = side.generate([prompt], [params])[0]
    assert len(tokens) == params.max_tokens and prompt.prompt_tokens + len(tokens) == CONTEXT
    plan = _plan(model)
    assert probe.peak <= plan, (probe.peak, plan)
    assert side.ledger.peak_side_bytes == probe.peak
    assert max(len(ids) for ids in passes.ids) <= WINDOW
    with_image = [ids for ids in passes.ids if image_token in ids]
    assert len(with_image) == 1 and with_image[0].count(image_token) == TOKENS_PER_IMAGE
    print(f"\nimage request at the context: plan {plan} B, peak storage {probe.peak} B")
    # The same answer as one pass of the whole prompt.
    side.prefill_chunk = ONE_PASS
    assert side.generate([prompt], [params])[0] == tokens
