"""Token log-probabilities in the engine (both backends, streamed and not, prompt scoring) and
their memory, on the demo's SmolLM2-135M-Instruct (real weights, float32 so the two backends
agree to rounding). No Ray here; tests/test_logprobs_api.py covers the served app.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from peak_memory import peak_allocated
from plans import engine_plan

from deployments.engine.core import Engine
from deployments.engine.generation import GenerationInput, GenerationOutput, SamplingParams, TokenLogprob
from deployments.engine.loading import LoadedModel, load_model
from deployments.engine.logprobs import LogprobRecorder
from deployments.engine.rules import RowRules
from placement.config import ModelSpec
from placement.demo_models import smollm2_gguf
from placement.sizing.kv_budget import side_sequence_bytes

QUESTION = ({"role": "user", "content": "Name three colours."},)
GREEDY = SamplingParams(max_tokens=12, temperature=0, logprobs=5)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    directory, name = smollm2_gguf()
    return ModelSpec(model=str(Path(directory) / name), context_length=1024, dtype="float32")


@pytest.fixture(scope="module")
def loaded(spec: ModelSpec) -> LoadedModel:
    return load_model(spec, engine_plan(spec))


@pytest.fixture(scope="module")
def pooled(loaded: LoadedModel, spec: ModelSpec):
    engine = Engine(loaded, engine_plan(spec, max_batch_size=2))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def side(loaded: LoadedModel, spec: ModelSpec) -> Engine:
    # Every request on model.generate.
    return Engine(loaded, engine_plan(spec, max_batch_size=2, continuous_batching=False))


def _raw_logprobs(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's own logits at every position [len(ids), vocab], one plain forward."""
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _check_consistent(entries: tuple[TokenLogprob, ...], top: int, greedy: bool) -> None:
    for entry in entries:
        assert entry.logprob is not None and entry.logprob <= 0
        assert len(entry.top) == top
        values = [t.logprob for t in entry.top]
        assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1 + 1e-6
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        if greedy:  # no rules: the chosen token is the model's top-1
            assert entry.top[0].token == entry.token and entry.top[0].logprob == pytest.approx(entry.logprob)


def test_greedy_logprobs_agree_across_backends(pooled: Engine, side: Engine) -> None:
    inp = GenerationInput(params=GREEDY, messages=QUESTION)
    assert pooled.uses_pool(inp) and not side.uses_pool(inp)
    from_pool, from_side = pooled.generate_batch([inp])[0], side.generate_batch([inp])[0]
    for out in (from_pool, from_side):
        assert out.logprobs is not None and len(out.logprobs) == out.completion_tokens
        assert "".join(e.token for e in out.logprobs) == out.text  # ASCII answer: the tokens rejoin to it
        _check_consistent(out.logprobs, 5, greedy=True)
    assert from_pool.text == from_side.text
    for a, b in zip(from_pool.logprobs, from_side.logprobs, strict=True):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert [t.token for t in a.top[:2]] == [t.token for t in b.top[:2]]


def test_logprobs_are_the_raw_model_logits_whatever_the_sampling(pooled: Engine, side: Engine) -> None:
    # Sampled hot, penalised and biased: the recorded numbers are still the model's own log-softmax
    # at each position, for the token that was chosen (checked against one plain forward pass).
    rules = RowRules(presence_penalty=1.5, logit_bias=((28, 5.0),))
    params = SamplingParams(max_tokens=10, temperature=1.5, top_p=0.9, rules=rules, logprobs=2)
    inp = GenerationInput(params=params, prompt="The capital of France is")
    for backend in (pooled.pool, side.side):
        prompt = pooled.prepare(inp)
        recorder = LogprobRecorder(2)
        row_params = params if backend is pooled.pool else dataclasses.replace(params, seed=11)
        tokens = backend.generate([prompt], [row_params], None, [recorder])[0]
        scored = recorder.resolved(tokens)
        assert [token for token, _, _ in scored] == tokens
        reference = _raw_logprobs(pooled.loaded, prompt.input_ids + tokens)
        for i, (token, logprob, top) in enumerate(scored):
            row = reference[prompt.prompt_tokens - 1 + i]
            assert logprob == pytest.approx(float(row[token]), abs=1e-3)
            assert [t for t, _ in top] == row.topk(2).indices.tolist()
        _check_consistent(pooled.texts.entries(scored), 2, greedy=False)


def test_streamed_logprobs_are_the_whole_answers(pooled: Engine, side: Engine) -> None:
    inp = GenerationInput(params=GREEDY, messages=QUESTION)
    stopped = dataclasses.replace(inp, params=dataclasses.replace(GREEDY, stop=("\n",), max_tokens=24))
    for engine in (pooled, side):
        for request in (inp, stopped):
            whole = engine.generate_batch([request])[0]
            deltas = list(engine.stream(request))
            assert "".join(d.text for d in deltas) == whole.text
            streamed = tuple(e for d in deltas for e in d.logprobs)
            assert [e.token for e in streamed] == [e.token for e in whole.logprobs]
            assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole.logprobs], abs=1e-4)
            if not request.params.stop:  # without stop strings logprobs come as their text does
                assert sum(bool(d.logprobs) for d in deltas) > 1


def _scored(engine: Engine, text: str, max_tokens: int = 0) -> tuple[GenerationOutput, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=3)
    inp = GenerationInput(params=params, prompt=text, echo=True, prompt_logprobs=3)
    return engine.generate_batch([inp])[0], engine.prepare(inp).input_ids


def test_echo_scores_the_prompt_in_chunks_like_one_forward(pooled: Engine) -> None:
    text = " ".join(["A fox and a dog met by the river."] * 25)
    out, ids = _scored(pooled, text)
    chunk = pooled.logprob_workspace.chunk
    assert len(ids) > 2 * chunk  # three passes at least
    assert out.prompt_text == text and out.text == "" and out.completion_tokens == 0
    assert out.finish_reason == "length" and out.logprobs == ()
    scored = out.prompt_logprobs
    assert scored is not None and len(scored) == len(ids)
    assert scored[0].logprob is None and scored[0].top == ()
    assert "".join(e.token for e in scored) == text  # no BOS for this tokenizer: the tokens rejoin to the prompt
    reference = _raw_logprobs(pooled.loaded, ids)
    for position, entry in enumerate(scored[1:], start=1):
        assert entry.logprob == pytest.approx(float(reference[position - 1, ids[position]]), abs=1e-4)
    _check_consistent(scored[1:], 3, greedy=False)
    # With max_tokens the answer follows, its logprobs as for any request.
    answered, _ = _scored(pooled, "The quick brown fox", max_tokens=3)
    assert answered.completion_tokens == 3 and len(answered.logprobs) == 3
    alone, _ = _scored(pooled, "The quick brown fox")
    assert [e.logprob for e in answered.prompt_logprobs] == [e.logprob for e in alone.prompt_logprobs]


def test_token_id_prompts_are_fed_as_they_are(pooled: Engine) -> None:
    ids = pooled.loaded.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    inp = GenerationInput(
        params=SamplingParams(max_tokens=1, temperature=0, logprobs=1),
        prompt_ids=tuple(ids),
        echo=True,
        prompt_logprobs=1,
    )
    out = pooled.generate_batch([inp])[0]
    assert out.prompt_tokens == len(ids) and out.prompt_text == "Hello there"
    assert len(out.prompt_logprobs) == len(ids) and len(out.logprobs) == 1
    bad = dataclasses.replace(inp, prompt_ids=(len(pooled.loaded.tokenizer) + 10,))
    with pytest.raises(Exception, match="token ids"):
        pooled.generate_batch([bad])


def test_prompt_scoring_stays_within_the_planned_bytes(side: Engine) -> None:
    """The contract: a prompt-scoring call holds its KV in a side slot (the plan's KV budget) plus at
    most the logprob workspace the estimate states; never prompt × vocabulary fp32 logits."""
    text = " ".join(["A fox and a dog met by the river."] * 10)
    prompt = side.prepare(GenerationInput(params=SamplingParams(max_tokens=0), prompt=text, echo=True))
    workspace = side.logprob_workspace
    # The KV this call holds: one side sequence of the prompt's length (what the side slot budgets at full context).
    config, dtype = side.model.config.get_text_config(), side.model.dtype
    kv = side_sequence_bytes(config, context_length=prompt.prompt_tokens, dtype=dtype)
    assert kv <= side.kv_budget.side_bytes_per_sequence
    # SmolLM2 in float32: 49,152 × (2 × 4 + 8) B a position, so 64 MiB // 786,432 B = 85 positions a pass.
    assert (workspace.vocab_size, workspace.bytes_per_position, workspace.chunk) == (49152, 786432, 85)
    assert prompt.prompt_tokens > workspace.chunk  # two passes at least
    side.side.score_prompt(prompt, 5, 16)  # warm up (one-time allocations)
    whole_logits = prompt.prompt_tokens * workspace.vocab_size * 4
    for chunk in (workspace.chunk, 16):
        peak = peak_allocated(lambda chunk=chunk: side.side.score_prompt(prompt, 5, chunk))
        stated = chunk * workspace.bytes_per_position  # = workspace.prompt_bytes at the engine's chunk
        assert peak <= kv + stated, (chunk, peak, kv, stated)
        print(
            f"prompt scoring, {prompt.prompt_tokens} tokens in passes of {chunk}: peak {peak} B = "
            f"KV {kv} B + {peak - kv} B (stated {stated} B; the whole prompt's fp32 logits: {whole_logits} B)"
        )
    assert peak - kv < whole_logits / 2  # passes of 16: far below the prompt's logits at once
