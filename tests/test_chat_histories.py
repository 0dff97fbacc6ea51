"""Chat histories as agents send them, on a template that demands alternation (no Ray).

Gemma 3's real chat template (tests/templates/gemma3.jinja, as the MedGemma
checkpoints ship it) folds a system message into the first user turn and
raises "Conversation roles must alternate" on two turns of one role in a row.
The tiny random models take it through `chat_template:`; the histories below
are the ones agents send: two user turns, two `tool` results after parallel
calls, a system and a developer message, an assistant turn last, and an
image inside a merged turn.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from plans import replica_plan

from deployments.engine.core import Engine, InvalidRequest
from deployments.engine.errors import BadRequestError, classify
from deployments.engine.generation import GenerationInput
from deployments.engine.loading import load_model
from deployments.engine.prompts import merge_repeated_roles
from deployments.openai_api.protocol import ChatCompletionRequest
from placement.config import ModelSpec

GEMMA3_TEMPLATE = Path(__file__).parent / "templates" / "gemma3.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _call(index: int, city: str) -> dict:
    arguments = json.dumps({"city": city})
    return {"id": f"call_{index}", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


PARALLEL_RESULTS = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [_call(1, "Paris"), _call(2, "Rome")]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25 C"},
]


def _engine(model_dir: Path, **fields) -> Engine:
    spec = ModelSpec(model=str(model_dir), dtype="float32", continuous_batching=False, **fields)
    plan = replica_plan(spec)
    return Engine(load_model(spec, plan), plan)


@pytest.fixture(scope="module")
def gemma_engine(tiny_text_model_dir: Path):
    engine = _engine(tiny_text_model_dir, chat_template=str(GEMMA3_TEMPLATE))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def plain_engine(tiny_text_model_dir: Path):
    """The tiny model's own template, which renders any order of roles."""
    engine = _engine(tiny_text_model_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def gemma_vision_engine(tiny_vision_model_dir: Path):
    engine = _engine(tiny_vision_model_dir, chat_template=str(GEMMA3_TEMPLATE))
    yield engine
    engine.close()


def _input(messages: list[dict], **fields) -> GenerationInput:
    body = {"model": "m", "messages": messages, "temperature": 0, "max_tokens": 6, **fields}
    return ChatCompletionRequest.model_validate(body).to_generation_input()


def _prompt(engine: Engine, inp: GenerationInput) -> str:
    """The text the chat template rendered for `inp`, as `prepare` renders it (the tiny tokenizer
    decodes "{", "[" and "_" as <unk>, and its grammar support, which tools need, is missing)."""
    prompts = engine.prompts
    messages, template_args = prompts.tool_format.chat(inp)
    messages, _ = prompts._normalize_messages(messages)
    return prompts._render_chat(messages, template_args)


def test_the_template_is_probed_once_and_its_refusal_remembered(gemma_engine, plain_engine, monkeypatch) -> None:
    assert gemma_engine.prompts.refuses_repeated_roles()
    assert not plain_engine.prompts.refuses_repeated_roles()
    renders: list[int] = []
    apply = gemma_engine.prompts._apply_template
    monkeypatch.setattr(
        gemma_engine.prompts, "_apply_template", lambda m, *a, **k: renders.append(len(m)) or apply(m, *a, **k)
    )
    gemma_engine.prepare(_input([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]))
    assert renders == [1]  # the request itself, merged; no probe again


def test_two_user_turns_in_a_row_become_one(gemma_engine, plain_engine) -> None:
    inp = _input([{"role": "user", "content": "Hello"}, {"role": "user", "content": "Are you there?"}])
    assert _prompt(gemma_engine, inp) == (
        "<bos><start_of_turn>user\nHello\n\nAre you there?<end_of_turn>\n<start_of_turn>model\n"
    )
    # A template that takes repeated roles gets the history as it was sent.
    assert _prompt(plain_engine, inp).count("<start_of_turn>user\n") == 2
    out = gemma_engine.generate_batch([inp])[0]
    assert out.completion_tokens == 6 and out.text


def test_parallel_tool_results_become_one_user_turn(gemma_engine) -> None:
    prompt = _prompt(gemma_engine, _input(PARALLEL_RESULTS))
    assert prompt == (
        "<bos><start_of_turn>user\nWeather in Paris and Rome?<end_of_turn>\n"
        '<start_of_turn>model\n{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_weather", "arguments": {"city": "Rome"}}]}<end_of_turn>\n'
        "<start_of_turn>user\nTool result (call_1): 18 C\n\nTool result (call_2): 25 C<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_with_tools_the_tool_prompt_folds_into_the_first_user_turn(gemma_engine) -> None:
    turns = _prompt(gemma_engine, _input(PARALLEL_RESULTS, tools=[WEATHER])).split("<start_of_turn>")[1:]
    assert [turn.split("\n", 1)[0] for turn in turns] == ["user", "model", "user", "model"]
    assert turns[0].startswith("user\nYou can call these tools")
    assert turns[0].endswith("Weather in Paris and Rome?<end_of_turn>\n")
    assert turns[2] == "user\nTool result (call_1): 18 C\n\nTool result (call_2): 25 C<end_of_turn>\n"


def test_system_and_developer_messages_fold_into_the_first_user_turn(gemma_engine) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
    ]
    expected = (
        "<bos><start_of_turn>user\nYou are terse.\n\nAnswer in French.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert _prompt(gemma_engine, _input(messages)) == expected
    # A developer message alone is the system message too.
    alone = _prompt(gemma_engine, _input(messages[1:]))
    assert alone.startswith("<bos><start_of_turn>user\nAnswer in French.\n\nHi<end_of_turn>")


def test_an_assistant_turn_last_is_answered_by_a_new_turn(gemma_engine) -> None:
    # As OpenAI and vLLM (add_generation_prompt defaults to true): the model's turn is closed, a new one opens.
    history = [{"role": "user", "content": "Name a fox."}, {"role": "assistant", "content": "The quick"}]
    assert _prompt(gemma_engine, _input(history)).endswith(
        "<start_of_turn>model\nThe quick<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize(
    ("fields", "last"),
    [
        ({"continue_final_message": True, "add_generation_prompt": False}, {}),  # vLLM's fields
        ({"continue_final_message": True}, {}),
        ({}, {"prefix": True}),  # Mistral's and DeepSeek's
    ],
)
def test_a_prefilled_answer_is_continued(gemma_engine, fields: dict, last: dict) -> None:
    history = [
        {"role": "user", "content": "Name a fox."},
        {"role": "assistant", "content": "The quick"},
        {"role": "assistant", "content": "brown", **last},
    ]
    inp = _input(history, **fields)
    # The two assistant turns merged, the prompt ends inside the model's turn, not after it.
    assert _prompt(gemma_engine, inp).endswith(
        "<start_of_turn>user\nName a fox.<end_of_turn>\n<start_of_turn>model\nThe quick\n\nbrown"
    )
    tokenized = gemma_engine.loaded.tokenizer.decode(gemma_engine.prepare(inp).input_ids)
    assert tokenized.endswith("<start_of_turn>model\nThe quick\n\nbrown")
    out = gemma_engine.generate_batch([inp])[0]
    assert out.completion_tokens == 6 and out.text


@pytest.mark.parametrize(
    ("fields", "messages", "param"),
    [
        ({"continue_final_message": True}, [{"role": "user", "content": "a"}], "messages"),
        ({"continue_final_message": True, "add_generation_prompt": True}, None, "add_generation_prompt"),
        ({"add_generation_prompt": False}, None, "add_generation_prompt"),
        ({"continue_final_message": True, "tools": [WEATHER]}, None, "tools"),
        ({"continue_final_message": True, "response_format": {"type": "json_object"}}, None, "response_format"),
        ({}, [{"role": "assistant", "content": "x", "prefix": True}, {"role": "user", "content": "a"}], "messages.0"),
    ],
)
def test_prefill_misuse_is_a_400_naming_the_field(fields: dict, messages: list[dict] | None, param: str) -> None:
    history = messages or [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(BadRequestError) as caught:
        _input(history, **fields)
    assert caught.value.status == 400 and caught.value.param == param


def test_an_image_in_a_merged_turn_keeps_its_place(gemma_vision_engine) -> None:
    def png(color: tuple[int, int, int]) -> str:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), color).save(buffer, "PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    messages = [
        {"role": "system", "content": "You read scans."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First:"},
                {"type": "image_url", "image_url": {"url": png((200, 0, 0))}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Second:"},
                {"type": "image_url", "image_url": {"url": png((0, 0, 200))}},
            ],
        },
        {"role": "user", "content": "Compare them."},
    ]
    inp = _input(messages)
    prepared = gemma_vision_engine.prepare(inp)
    assert prepared.extra_inputs is not None and prepared.extra_inputs["pixel_values"].shape[0] == 2
    prompt = gemma_vision_engine.loaded.tokenizer.decode(prepared.input_ids)
    assert prompt.count("<start_of_turn>") == 2  # one user turn, then the model's
    text = prompt.replace("<image_soft_token>", "")
    assert (
        "<start_of_turn>user\nYou read scans.\n\nFirst:\n\n<start_of_image><end_of_image>\n\n"
        "Second:\n\n<start_of_image><end_of_image>\n\nCompare them.<end_of_turn>"
    ) in text
    out = gemma_vision_engine.generate_batch([inp])[0]
    assert out.completion_tokens == 6


@pytest.mark.parametrize(
    "messages",
    [
        # A system message in the middle: the template takes one, first.
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
        # The model speaks first.
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "a"}],
    ],
)
def test_what_the_template_still_refuses_is_a_400_naming_its_rule(gemma_engine, messages: list[dict]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        gemma_engine.prepare(_input(messages))
    error = classify(caught.value, "summarizer")
    assert error.status == 400 and "Conversation roles must alternate user/assistant/user/assistant" in error.message


def test_merging_joins_texts_and_keeps_parts_in_order() -> None:
    image = {"type": "image"}
    merged = merge_repeated_roles(
        [
            {"role": "user", "content": [{"type": "text", "text": "a"}, image]},
            {"role": "user", "content": [{"type": "text", "text": "b"}]},
            {"role": "user", "content": [{"type": "text", "text": "c"}, image]},
            {"role": "assistant", "content": "x"},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "y"},
            {"role": "tool", "tool_call_id": "1", "content": "r1"},
            {"role": "tool", "tool_call_id": "2", "content": "r2"},
        ]
    )
    assert merged[0] == {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, image, {"type": "text", "text": "b\n\nc"}, image],
    }
    assert merged[1] == {"role": "assistant", "content": "x\n\ny"}
    assert [m["tool_call_id"] for m in merged[2:]] == ["1", "2"]  # turns answering a call stay apart
