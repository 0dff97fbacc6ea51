"""Tool formats: a model whose chat template renders tools gets them that way and answers
in its own `<tool_call>` blocks; other models get rayfit's JSON format.

The demo's SmolLM2 (its own template knows no tools) stands in for both: as
it is, and with a Hermes-style template given by the per-model
`chat_template` override (tests/templates/hermes_tools.jinja).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plans import engine_plan

from deployments.engine.core import Engine
from deployments.engine.loading import load_model
from deployments.engine.structured import parse_tool_calls, tagged_tool_call_grammar, tool_specs
from deployments.engine.tool_formats import detect_tool_format
from deployments.openai_api.protocol import ChatCompletionRequest, ChatStreamConverter
from placement.config import ConfigError, ModelSpec, load_model_configs
from placement.demo_models import smollm2_gguf

HERMES_TEMPLATE = Path(__file__).parent / "templates" / "hermes_tools.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


def _request(messages: list[dict], **fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": messages, "tools": [WEATHER], "temperature": 0, "max_tokens": 48, **fields}
    return ChatCompletionRequest.model_validate(body)


def _engine(**spec_fields) -> Engine:
    directory, name = smollm2_gguf()
    spec = ModelSpec(model=str(Path(directory) / name), context_length=1024, **spec_fields)
    plan = engine_plan(spec, max_batch_size=2)
    return Engine(load_model(spec, plan), plan, tool_format=spec.tool_format)


@pytest.fixture(scope="module")
def hermes_engine():
    engine = _engine(chat_template=str(HERMES_TEMPLATE))
    yield engine
    engine.close()


def test_the_format_is_read_off_the_chat_template() -> None:
    assert detect_tool_format(HERMES_TEMPLATE.read_text()) == "hermes"
    assert detect_tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") == "json"
    assert detect_tool_format(None) == "json"


def test_a_template_with_tools_renders_them_and_the_tool_turns(hermes_engine) -> None:
    assert hermes_engine.tool_format.name == "hermes"
    inp = _request(HISTORY).to_generation_input()
    prompt = hermes_engine.loaded.tokenizer.decode(hermes_engine.prepare(inp).input_ids)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt  # the template listed the tool
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt
    assert "tool_calls" not in prompt  # not rayfit's JSON format


def test_required_calls_follow_the_templates_format_on_both_backends(hermes_engine) -> None:
    inp = _request([{"role": "user", "content": "Weather in Rome?"}], tool_choice="required").to_generation_input()
    specs = list(inp.tools.tools)
    pooled, streamed = hermes_engine.generate_batch([inp])[0].text, "".join(d.text for d in hermes_engine.stream(inp))
    for text in (pooled, streamed):
        assert text.startswith("<tool_call>\n{")
        calls = parse_tool_calls(text, specs)
        assert calls and all(c.name == "get_weather" and "city" in json.loads(c.arguments) for c in calls)
    assert hermes_engine.load_report()["pool_requests_live"] == 0


def test_a_streamed_tagged_call_is_held_back_and_sent_as_tool_calls() -> None:
    from deployments.engine.generation import StreamDelta

    converter = ChatStreamConverter("m", tools=tool_specs([WEATHER]))
    pieces = ["<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}\n</tool_call>']
    chunks = [c for piece in pieces for c in converter.convert(StreamDelta(text=piece))]
    chunks += converter.convert(StreamDelta(text="", finish_reason="stop", prompt_tokens=3, completion_tokens=9))
    assert not [c for c in chunks if c.choices and c.choices[0].delta.content]
    calls = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0].finish_reason == "tool_calls"
    assert json.loads(calls[0].delta.tool_calls[0].function.arguments) == {"city": "Oslo"}
    prose = ChatStreamConverter("m", tools=tool_specs([WEATHER]))
    assert any(c.choices and c.choices[0].delta.content == "<b>" for c in prose.convert(StreamDelta(text="<b>")))


def test_tagged_grammar_and_parse_keep_only_whole_calls() -> None:
    specs = tool_specs([WEATHER])
    assert tagged_tool_call_grammar(specs, "none", parallel=True) is None
    assert tagged_tool_call_grammar(specs, "auto", parallel=False) is not None
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n<tool_call>\n{"na'
    calls = parse_tool_calls(cut, specs)
    assert calls is not None and len(calls) == 1
    assert parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>', specs) is None


def test_the_json_override_wins_over_the_template() -> None:
    engine = _engine(chat_template=str(HERMES_TEMPLATE), tool_format="json")
    try:
        inp = _request([{"role": "user", "content": "Weather in Rome?"}], tool_choice="required").to_generation_input()
        text = engine.generate_batch([inp])[0].text
        assert engine.tool_format.name == "json" and text.startswith('{"tool_calls": [')
        assert parse_tool_calls(text, list(inp.tools.tools))
    finally:
        engine.close()


def test_chat_template_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "chat.jinja").write_text(HERMES_TEMPLATE.read_text())
    config = tmp_path / "model_configs.yaml"
    config.write_text("agent:\n  model: some/model\n  chat_template: templates/chat.jinja\n  tool_format: hermes\n")
    spec = load_model_configs(config).models["agent"]
    assert spec.chat_template == str((tmp_path / "templates" / "chat.jinja").resolve()) and spec.tool_format == "hermes"
    config.write_text("agent:\n  model: some/model\n  chat_template: missing.jinja\n")
    with pytest.raises(ConfigError, match="agent.chat_template.*no such file"):
        load_model_configs(config)
