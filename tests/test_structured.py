"""Structured output and tools at the protocol level: request fields, grammars, tool calls.

No Ray here: the request models (deployments.openai_api.protocol), the grammars built
from them (deployments.engine.structured) and the per-row logits rules
(deployments.engine.row_logits) driving a real `model.generate` of the demo's
SmolLM2 (converted once from its GGUF, cached).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest
import torch
from peak_memory import peak_allocated
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.engine.errors import BadRequestError
from deployments.engine.generation import StreamDelta
from deployments.engine.loading import convert_gguf
from deployments.engine.row_logits import GenerateRowsProcessor, RowFactory
from deployments.engine.rules import RowRules
from deployments.engine.structured import parse_tool_calls, response_format_grammar, tool_call_grammar, tool_specs
from deployments.engine.tool_formats import ToolFormat
from deployments.openai_api.protocol import ChatCompletionRequest, ChatStreamConverter, CompletionRequest
from placement.demo_models import smollm2_gguf

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ANSWER_SCHEMA = {
    "type": "object",
    # A bounded integer: unbounded, a sampled answer (temperature 0.8 below) can be all digits until
    # max_tokens cuts it. Bounded (and the grammar's JSON compact), every answer ends within ~15 tokens.
    "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


# ------------------------------------------------------------ request fields


def test_fields_that_change_nothing_are_accepted_and_listed() -> None:
    request = chat(store=True, metadata={"run": "1"}, service_tier="auto", user="u", some_future_field=3)
    assert request.ignored_fields == ["metadata", "service_tier", "some_future_field", "store", "user"]


@pytest.mark.parametrize(
    "field, value",
    [("top_logprobs", 3), ("audio", {"voice": "x"}), ("functions", [{}]), ("prediction", {"type": "content"})],
)
def test_fields_rayfit_cannot_honour_are_a_400_naming_them(field: str, value: object) -> None:
    with pytest.raises(BadRequestError) as caught:
        chat(**{field: value})
    assert caught.value.param == field and field in caught.value.message


def test_sampling_fields_reach_the_engine_rules() -> None:
    params = (
        chat(
            presence_penalty=0.5,
            frequency_penalty=0.25,
            logit_bias={"7": -100},
            top_k=5,
            min_p=0.1,
            repetition_penalty=1.2,
            min_tokens=3,
            ignore_eos=True,
            max_tokens=9,
        )
        .to_generation_input()
        .params
    )
    assert params.rules == RowRules(
        logit_bias=((7, -100.0),),
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.2,
        min_tokens=3,
        ignore_eos=True,
        top_k=5,
        min_p=0.1,
    )
    assert not chat().to_generation_input().params.rules.active


def test_min_tokens_above_max_tokens_is_a_400() -> None:
    with pytest.raises(BadRequestError, match="min_tokens"):
        chat(min_tokens=10, max_tokens=4).to_generation_input()


# ------------------------------------------------------------ grammars


def test_bad_schemas_and_tool_choices_are_400s() -> None:
    with pytest.raises(BadRequestError, match="invalid JSON schema"):
        response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    with pytest.raises(BadRequestError, match="not supported"):
        response_format_grammar({"type": "yaml"})
    with pytest.raises(BadRequestError, match="parameters schema"):
        tool_specs([{"type": "function", "function": {"name": "f", "parameters": {"type": 12}}}])
    with pytest.raises(BadRequestError, match="not in tools") as caught:
        chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}).to_generation_input()
    assert caught.value.param == "tool_choice"
    with pytest.raises(BadRequestError, match="no tools"):
        chat(tool_choice="required").to_generation_input()


def test_tool_history_renders_as_plain_turns() -> None:
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    generation = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": messages, "tools": [WEATHER]}
    ).to_generation_input()
    rendered, template_args = ToolFormat("json").chat(generation)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert "get_weather" in rendered[0]["content"] and template_args == {}
    assert json.loads(rendered[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    }
    assert "call_1" in rendered[3]["content"] and "18 C" in rendered[3]["content"]


def test_tool_calls_are_parsed_and_validated() -> None:
    specs = tool_specs([WEATHER])
    calls = parse_tool_calls('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}', specs)
    assert calls is not None and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert parse_tool_calls('{"tool_calls": [{"name": "get_weather", "arguments": {}}]}', specs) is None  # invalid
    assert parse_tool_calls("It is sunny.", specs) is None


def test_streamed_tool_call_arrives_as_one_delta() -> None:
    converter = ChatStreamConverter("m", tools=tool_specs([WEATHER]))
    pieces = ['{"tool_calls": [{"name": "get_', 'weather", "arguments": {"city": "Rome"}}]}']
    chunks = [c for piece in pieces for c in converter.convert(StreamDelta(text=piece))]
    chunks += converter.convert(StreamDelta(text="", finish_reason="stop", prompt_tokens=3, completion_tokens=9))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    calls = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert contents == []  # nothing of the call object leaked as text
    assert len(calls) == 1 and calls[0].finish_reason == "tool_calls"
    call = calls[0].delta.tool_calls[0]
    assert (
        call.index == 0
        and call.function.name == "get_weather"
        and json.loads(call.function.arguments) == {"city": "Rome"}
    )


def test_streamed_prose_with_tools_is_not_held_back() -> None:
    converter = ChatStreamConverter("m", tools=tool_specs([WEATHER]))
    first = converter.convert(StreamDelta(text="It is "))
    assert any(c.choices and c.choices[0].delta.content == "It is " for c in first)


# ------------------------------------------------------------ constrained decoding on a real model


@pytest.fixture(scope="module")
def smollm2() -> tuple[object, object]:
    directory, name = smollm2_gguf()
    converted, _ = convert_gguf(Path(directory) / name)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    return tokenizer, AutoModelForCausalLM.from_pretrained(converted).eval()


def _generate(smollm2, messages: list[dict], rules: RowRules, max_new_tokens: int = 48) -> str:
    tokenizer, model = smollm2
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    row = RowFactory(tokenizer, [tokenizer.eos_token_id]).row(rules, ids)
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        logits_processor=[GenerateRowsProcessor([row], len(ids))],
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_json_schema_output_parses_and_validates(smollm2) -> None:
    request = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA, "strict": True}}
    )
    question = [{"role": "user", "content": "Is water wet? Answer in JSON."}]
    text = _generate(smollm2, question, request.to_generation_input().params.rules)
    jsonschema.validate(json.loads(text), ANSWER_SCHEMA)


def test_required_tool_choice_yields_a_valid_call(smollm2) -> None:
    request = chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    generation = dataclasses.replace(
        request.to_generation_input(), messages=({"role": "user", "content": "What's the weather in Paris?"},)
    )
    messages, _ = ToolFormat("json").chat(generation)
    text = _generate(smollm2, messages, generation.params.rules, max_new_tokens=64)
    calls = parse_tool_calls(text, tool_specs([WEATHER]))
    assert calls is not None and len(calls) == 1 and calls[0].name == "get_weather"


def test_completions_take_response_format_too() -> None:
    request = CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "response_format": {"type": "json_object"}}
    )
    assert request.to_generation_input().params.rules.grammar is not None


def test_logit_bias_and_min_tokens_shape_the_scores(smollm2) -> None:
    tokenizer, _ = smollm2
    eos = tokenizer.eos_token_id
    row = RowFactory(tokenizer, [eos]).row(RowRules(logit_bias=((5, 100.0),), min_tokens=2))
    scores = torch.zeros(len(tokenizer))
    shaped = row.apply(scores)
    assert int(shaped.argmax()) == 5 and shaped[eos] == float("-inf")
    row.observe([5, 6])  # two tokens out: EOS allowed again
    assert row.apply(scores)[eos] == 0.0
    penalised = RowFactory(tokenizer, [eos]).row(RowRules(presence_penalty=1.0, frequency_penalty=0.5))
    penalised.observe([9, 9])
    assert penalised.apply(scores)[9] == pytest.approx(-2.0)


@pytest.mark.parametrize(
    "cut", [{"top_k": 1}, {"min_p": 1.0}, {"top_k": 3, "repetition_penalty": 9.0, "logit_bias": ((0, -100.0),)}]
)
def test_top_k_and_min_p_choose_among_the_grammars_tokens(smollm2, cut: dict) -> None:
    """The model's favourite token is one the grammar forbids: cutting to the top tokens before
    masking would leave no token at all (NaN probabilities, a failed batch); found by the fuzz
    benchmark with response_format + top_k / min_p."""
    from deployments.engine.row_logits import BatchRowsProcessor

    tokenizer, _ = smollm2
    factory = RowFactory(tokenizer, [tokenizer.eos_token_id])
    rules = RowRules(grammar=response_format_grammar({"type": "json_object"}), **cut)
    favourite = tokenizer.encode("Hello", add_special_tokens=False)[0]
    scores = torch.zeros(len(tokenizer))
    scores[favourite] = 10.0
    row = factory.row(rules)
    assert row.matcher.validate_tokens([favourite]) == 0  # JSON cannot start with it

    def chosen(shaped: torch.Tensor) -> int:
        assert bool(torch.isfinite(shaped).any()), "no token left to sample"
        return int(shaped.argmax())

    assert row.matcher.validate_tokens([chosen(row.apply(scores))]) == 1
    batch = BatchRowsProcessor()
    key = batch.register(factory.row(rules))
    shaped = batch(torch.stack([scores, scores]), torch.tensor([key, -1], dtype=torch.int32))
    assert row.matcher.validate_tokens([chosen(shaped[0])]) == 1
    assert torch.equal(shaped[1], scores)  # the row without rules is untouched


def test_the_grammar_wins_when_ignore_eos_leaves_no_token(smollm2) -> None:
    tokenizer, _ = smollm2
    eos = tokenizer.eos_token_id
    rules = RowRules(grammar=response_format_grammar({"type": "json_object"}), ignore_eos=True)
    row = RowFactory(tokenizer, [eos]).row(rules)
    row.observe(tokenizer.encode("{}", add_special_tokens=False))  # a whole object: only EOS may follow
    shaped = row.apply(torch.zeros(len(tokenizer)))
    assert torch.isfinite(shaped).nonzero().flatten().tolist() == [eos]


def test_tool_grammar_rejects_an_unknown_tool_name(smollm2) -> None:
    tokenizer, _ = smollm2
    grammar = tool_call_grammar(tool_specs([WEATHER]), "required", parallel=False)
    matcher = RowFactory(tokenizer, [tokenizer.eos_token_id]).grammars.matcher(grammar)
    ids = tokenizer.encode('{"tool_calls": [{"name": "delete_all"', add_special_tokens=False)
    assert matcher.validate_tokens(ids) < len(ids)  # the grammar stops accepting at the wrong name


# ------------------------------------------------------------ both engine backends


@pytest.fixture(scope="module")
def smollm2_engine(smollm2):
    from plans import engine_plan

    from deployments.engine.core import Engine
    from deployments.engine.loading import load_model
    from placement.config import ModelSpec

    directory, name = smollm2_gguf()
    spec = ModelSpec(model=str(Path(directory) / name), context_length=1024)
    plan = engine_plan(spec, max_batch_size=2)
    engine = Engine(load_model(spec, plan), plan)
    yield engine
    engine.close()


def test_schema_holds_in_the_running_batch_and_on_the_side(smollm2_engine) -> None:
    from deployments.engine.generation import GenerationInput

    request = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}},
        max_tokens=40,
    )
    base = request.to_generation_input()
    question = ({"role": "user", "content": "Is fire cold? Answer in JSON."},)
    pooled = GenerationInput(params=dataclasses.replace(base.params, temperature=0.8), messages=question)
    seeded = GenerationInput(params=dataclasses.replace(base.params, temperature=0.8, seed=7), messages=question)
    assert smollm2_engine.uses_pool(pooled) and not smollm2_engine.uses_pool(seeded)
    outputs = smollm2_engine.generate_batch([pooled, pooled, seeded])
    for output in outputs:
        assert output.finish_reason == "stop", output  # the grammar ended it, max_tokens did not
        jsonschema.validate(json.loads(output.text), ANSWER_SCHEMA)
    deltas = list(smollm2_engine.stream(pooled))
    assert deltas[-1].finish_reason == "stop", deltas[-1]
    jsonschema.validate(json.loads("".join(delta.text for delta in deltas)), ANSWER_SCHEMA)
    load = smollm2_engine.load_report()
    assert load["pool_requests_live"] == 0 and load["pool_slots_in_use"] == 0
    assert smollm2_engine.pool.batcher.row_processor.rows == {}  # every row's rules forgotten


def test_a_call_list_cut_at_max_tokens_keeps_its_whole_calls() -> None:
    cut = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "argu'
    calls = parse_tool_calls(cut, tool_specs([WEATHER]))
    assert calls is not None and [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}]
    assert parse_tool_calls('{"tool_calls": [{"name": "get_wea', tool_specs([WEATHER])) is None


# ------------------------------------------------------------ the memory contract


@pytest.mark.parametrize("rows", [1, 8])
def test_logits_rules_stay_within_the_planned_workspace(smollm2, rows: int) -> None:
    """The contract: a decode step's rules (every one of them, on every row) hold at most what
    placement.sizing.rules_workspace states, in the batch's processor and in generate's."""
    from deployments.engine.row_logits import BatchRowsProcessor
    from placement.sizing.rules_workspace import RulesWorkspace

    tokenizer, _ = smollm2
    vocab = len(tokenizer)
    every_rule = RowRules(
        grammar=response_format_grammar({"type": "json_object"}),
        logit_bias=((5, 1.0),),
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.1,
        min_tokens=2,
        top_k=40,
        min_p=0.05,
    )
    factory = RowFactory(tokenizer, [tokenizer.eos_token_id])
    batch = BatchRowsProcessor()
    keys = [batch.register(factory.row(every_rule, [1, 2, 3])) for _ in range(rows)]
    generate = GenerateRowsProcessor([factory.row(every_rule, [1, 2, 3]) for _ in range(rows)], prompt_width=3)
    scores, ids = torch.randn(rows, vocab), torch.tensor([[1, 2, 3, 7, 8]] * rows)
    stated = RulesWorkspace(vocab, rows).total_bytes
    for step in (lambda: batch(scores, torch.tensor(keys, dtype=torch.int32)), lambda: generate(ids, scores)):
        step()  # warm up (one-time tables)
        peak = peak_allocated(step)
        assert 0 < peak <= stated, (rows, peak, stated)


def test_tool_choice_none_never_reads_the_answer_as_calls() -> None:
    """tool_choice none: no tool prompt, no grammar, and JSON the model writes stays text."""
    request = chat(tools=[WEATHER], tool_choice="none")
    assert request.tool_setup() == ("none", [])
    generation = request.to_generation_input()
    assert generation.tools is None and generation.params.rules.grammar is None
    from deployments.engine.generation import GenerationOutput
    from deployments.openai_api.protocol import chat_choice

    call_like = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}'
    choice = chat_choice(GenerationOutput(call_like, 3, 9, "stop"), request.tool_setup()[1])
    assert choice.message.content == call_like and choice.message.tool_calls is None


def test_grammar_bias_is_zero_exactly_on_allowed_tokens() -> None:
    """llguidance's bitmask (bit j of word w: token 32·w + j allowed) as the additive 0 / -inf bias."""
    from deployments.engine.row_logits import grammar_bias

    vocab = 70  # three words, the last one partly past the vocabulary
    allowed = [{0, 5, 31, 32, 69}, set(range(64, 70))]
    bitmask = torch.zeros(len(allowed), 3, dtype=torch.int32)
    for row, tokens in enumerate(allowed):
        for token in tokens:
            word, bit = divmod(token, 32)
            bitmask[row, word] |= torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32)  # bit 31: the sign bit
    bias = grammar_bias(bitmask, vocab, torch.float32, torch.device("cpu"))
    assert bias.shape == (2, vocab)
    for row, tokens in enumerate(allowed):
        assert {int(t) for t in torch.nonzero(bias[row] == 0).flatten()} == tokens
        assert torch.isinf(bias[row]).sum() == vocab - len(tokens)
