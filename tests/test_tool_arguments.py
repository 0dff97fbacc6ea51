"""Tool-call arguments decoded strictly: no key the tool's parameters do not declare.

JSON Schema lets an object without `additionalProperties` take any other key,
and so did the grammar built from a tool's `parameters`. The demo's SmolLM2,
asked for a required call at temperature 0, then wrote the schema's own words
as arguments: `"when": {"type": "object", "properties": {"date": ...}}`.
rayfit closes every object of a tool's parameters that does not say otherwise
(deployments.engine.structured.closed_schema), as OpenAI's strict tools and xgrammar do.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from plans import engine_plan

from deployments.engine.core import Engine
from deployments.engine.loading import load_model
from deployments.engine.row_logits import RowFactory
from deployments.engine.structured import (
    closed_schema,
    parse_tool_calls,
    response_format_grammar,
    tagged_tool_call_grammar,
    tool_call_grammar,
    tool_specs,
)
from deployments.openai_api.protocol import ChatCompletionRequest
from placement.config import ModelSpec
from placement.demo_models import smollm2_gguf

WHEN = {"type": "object", "properties": {"date": {"type": "string"}}}
BOOK = {
    "type": "function",
    "function": {
        "name": "book_flight",
        "description": "Book a flight",
        "parameters": {
            "type": "object",
            "properties": {"origin": {"type": "string"}, "when": WHEN},
            "required": ["origin"],
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _valid(instance: Any, schema: dict) -> bool:
    return jsonschema.validators.validator_for(schema)(schema).is_valid(instance)


# ------------------------------------------------------------ the schema


def test_every_object_without_a_word_on_extra_keys_is_closed() -> None:
    schema = {
        "type": "object",
        "properties": {
            "when": WHEN,
            "stops": {"type": "array", "items": {"type": "object", "properties": {"city": {"type": "string"}}}},
            "seat": {"anyOf": [{"type": "object", "properties": {"row": {"type": "integer"}}}, {"type": "null"}]},
            "payer": {"$ref": "#/$defs/person"},
            "pair": {"type": "array", "prefixItems": [{"type": "object", "properties": {"a": {}}}]},
        },
        "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }
    original = copy.deepcopy(schema)
    closed = closed_schema(schema)
    assert schema == original  # the caller's dict is untouched
    good = {
        "when": {"date": "d"},
        "stops": [{"city": "Rome"}],
        "seat": {"row": 3},
        "payer": {"name": "A"},
        "pair": [{"a": 1}],
    }
    assert _valid(good, closed) and _valid({"seat": None}, closed)
    for extra in (
        {"extra": 1},
        {"when": {"date": "d", "time": "9"}},
        {"stops": [{"city": "Rome", "x": 1}]},
        {"seat": {"row": 3, "aisle": True}},
        {"payer": {"name": "A", "age": 3}},
        {"pair": [{"a": 1, "b": 2}]},
    ):
        assert _valid(extra, schema) and not _valid(extra, closed), extra


def test_explicit_extra_keys_are_kept() -> None:
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "object", "additionalProperties": True},
            "scores": {"type": "object", "additionalProperties": {"type": "object", "properties": {"v": {}}}},
        },
    }
    closed = closed_schema(schema)
    assert closed["properties"]["tags"]["additionalProperties"] is True
    assert _valid({"tags": {"any": 1, "thing": 2}, "scores": {"x": {"v": 1}}}, closed)
    assert not _valid({"scores": {"x": {"v": 1, "w": 2}}}, closed)  # the extra-keys schema is closed itself
    assert not _valid({"other": 1}, closed)


def test_branches_of_one_object_share_its_keys() -> None:
    # Closing each allOf branch alone would forbid the other branch's key: no instance would pass.
    both = {"allOf": [{"type": "object", "properties": {"a": {}}}, {"type": "object", "properties": {"b": {}}}]}
    either = {"type": "object", "properties": {"a": {}, "b": {}}, "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}
    required_only = {"type": "object", "required": ["r"]}
    for schema, good, extra in (
        (both, {"a": 1, "b": 2}, {"a": 1, "c": 3}),
        (either, {"a": 1, "b": 2}, {"a": 1, "c": 3}),
        (required_only, {"r": 1}, {"r": 1, "s": 2}),
    ):
        closed = closed_schema(schema)
        assert _valid(good, closed) and not _valid(extra, closed), schema


# ------------------------------------------------------------ the grammars


@pytest.fixture(scope="module")
def smollm2_engine():
    directory, name = smollm2_gguf()
    spec = ModelSpec(model=str(Path(directory) / name), context_length=1024)
    plan = engine_plan(spec, max_batch_size=2)
    engine = Engine(load_model(spec, plan), plan, tool_format=spec.tool_format)
    yield engine
    engine.close()


def _accepts(engine: Engine, grammar: str, text: str) -> bool:
    """Whether `grammar` lets the model write all of `text`."""
    tokenizer = engine.loaded.tokenizer
    matcher = RowFactory(tokenizer, [tokenizer.eos_token_id]).grammars.matcher(grammar)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return matcher.validate_tokens(ids) == len(ids)


def test_call_grammars_refuse_an_undeclared_argument(smollm2_engine) -> None:
    specs = tool_specs([WEATHER, BOOK])
    json_format = tool_call_grammar(specs, "required", parallel=False)
    tagged = tagged_tool_call_grammar(specs, "required", parallel=False)
    assert json_format is not None and tagged is not None
    call = '{"name": "book_flight", "arguments": {"origin": "Paris", "when": {"date": "2025-01-01"'
    assert _accepts(smollm2_engine, json_format, '{"tool_calls": [' + call + "}}}]}")
    assert _accepts(smollm2_engine, tagged, "<tool_call>\n" + call + "}}}\n</tool_call>")
    for undeclared in (', "type": "object"', '}, "seat": "12A"'):  # inside `when`, and beside it
        assert not _accepts(smollm2_engine, json_format, '{"tool_calls": [' + call + undeclared)
        assert not _accepts(smollm2_engine, tagged, "<tool_call>\n" + call + undeclared)


def test_response_format_is_closed_when_strict_and_as_written_otherwise(smollm2_engine) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    text = '{"answer": "yes", "why": "because"}'
    for strict, accepted in ((True, False), (False, True), (None, True)):
        spec: dict[str, Any] = {"name": "a", "schema": schema} | ({"strict": strict} if strict is not None else {})
        grammar = response_format_grammar({"type": "json_schema", "json_schema": spec})
        assert grammar is not None
        assert _accepts(smollm2_engine, grammar, text) is accepted, strict
        assert _accepts(smollm2_engine, grammar, '{"answer": "yes"}')


# ------------------------------------------------------------ a model's call


def _undeclared_keys(value: Any, schema: dict, path: str = "") -> list[str]:
    """Keys of `value` that its schema's `properties` do not name, at any depth."""
    if not isinstance(value, dict):
        return []
    properties = schema.get("properties", {})
    found = [f"{path}.{key}" for key in value if key not in properties]
    for key, inner in value.items():
        if key in properties:
            found += _undeclared_keys(inner, properties[key], f"{path}.{key}")
    return found


@pytest.mark.parametrize("question", ["Book me a flight from Paris tomorrow", "What's the weather in Paris?"])
def test_a_required_call_at_temperature_0_uses_only_declared_keys(smollm2_engine, question: str) -> None:
    # Before the arguments were closed, SmolLM2 answered both with book_flight and arguments like
    # {"origin": "Paris", "when": {"type": "object", "properties": {"date": "2022-01-01", ...}}}.
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": question}],
        "tools": [WEATHER, BOOK],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 120,
    }
    out = smollm2_engine.generate_batch([ChatCompletionRequest.model_validate(body).to_generation_input()])[0]
    assert out.finish_reason == "stop", out.text
    calls = parse_tool_calls(out.text, tool_specs([WEATHER, BOOK]))
    assert calls is not None and len(calls) == 1, out.text
    parameters = next(t["function"]["parameters"] for t in (WEATHER, BOOK) if t["function"]["name"] == calls[0].name)
    assert _undeclared_keys(json.loads(calls[0].arguments), parameters) == [], out.text


def test_grammars_run_on_a_model_whose_logits_outnumber_its_tokens(text_twin_dir: Path) -> None:
    """MedGemma's config says 262208 logits, its tokenizer has 262145 tokens: the grammar's bitmask
    must cover every logit (llguidance built with the model's width), or every constrained request fails
    ('Invalid buffer size'), on the pool and on the side path alike."""
    spec = ModelSpec(model=str(text_twin_dir))
    plan = engine_plan(spec, max_batch_size=2)
    engine = Engine(load_model(spec, plan), plan)
    try:
        for seed in (None, 7):  # the pool (unseeded) and the side path (seeded)
            body = {
                "model": "m",
                "messages": [{"role": "user", "content": "Weather in Paris?"}],
                "response_format": {"type": "json_object"},
                "temperature": 0 if seed is None else 0.5,
                "seed": seed,
                "max_tokens": 6,
            }
            request = ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v not in (None, [])})
            out = engine.generate_batch([request.to_generation_input()])[0]
            assert out.text.lstrip().startswith("{"), out.text
            if out.finish_reason == "stop":  # the grammar closed the object before max_tokens
                assert isinstance(json.loads(out.text), dict)
            else:
                assert out.finish_reason == "length" and out.completion_tokens == 6
    finally:
        engine.close()
