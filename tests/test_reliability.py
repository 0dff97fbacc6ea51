"""Bad input, overload, out-of-memory and access, against one running app
(real local Ray, real Serve, real HTTP over loopback, the tiny models).

The app requires an API key (the openai SDK sends it as `Authorization:
Bearer`), caps request bodies at 256 KiB, and gives the text model tight
limits so overload is reachable on 2 cores: 2 requests in progress, 2 queued,
max_tokens capped at 32. The fuzz test addresses the same text model as a role
of its own with the default limits (it sends one body at a time; a body that
asks for n choices takes n of them), and the image+text model. Faults are injected only through
`tests/fault_injection.py` (on for every local_serve Ray).

The figures printed by the fuzz and load tests are the ones in the README's
RELIABILITY section.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from fault_injection import BATCH_OOM_MARKER, OOM_MARKER, WEDGE_MARKER
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from ray import serve
from serve_support import model_config, p99
from shared_cluster import shared_serve

from deployments.app import AppArgs, build_app
from deployments.client import get_model
from deployments.engine.errors import BadRequestError, NotFoundError, OverloadedError
from deployments.engine.images import MAX_IMAGE_PIXELS
from deployments.guard import parse_body
from deployments.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from deployments.openai_api.responses import ResponsesRequest

APP = "reliability"
TEXT, VISION, FUZZ = "writer", "viewer", "fuzzed"
KEY = "sk-test-0123456789"
MAX_BODY = 256 * 1024
CAP = 32
CONTEXT = 256  # tests/tiny_models.py: max_position_embeddings
VOCAB = 256  # token ids below this are both tiny models' (tests/tiny_models.py: 512 and more)
SHORT = {"temperature": 0, "max_tokens": 4}


# On the session's shared Ray (tests/shared_cluster.py): CPU, 2 declared GPUs with slots, the CPU fallback.
pytestmark = pytest.mark.shared_serve


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with shared_serve() as port:
        yield port


@pytest.fixture(scope="module")
def base_url(
    port: int, tmp_path_factory: pytest.TempPathFactory, tiny_text_model_dir: Path, tiny_vision_model_dir: Path
):
    root = tmp_path_factory.mktemp("reliability")
    path = model_config(
        root / "models.yaml",
        {
            TEXT: {
                "model": tiny_text_model_dir,
                "memory_gb": 1,
                "dtype": "float32",
                "max_tokens_cap": CAP,
                "max_ongoing_requests": 2,
                "max_queued_requests": 2,
                "max_batch_size": 2,
            },
            VISION: {"model": tiny_vision_model_dir, "memory_gb": 1, "dtype": "float32"},
            FUZZ: {"model": tiny_text_model_dir, "memory_gb": 1, "dtype": "float32", "max_tokens_cap": CAP},
        },
    )
    args = AppArgs(model_config=str(path), gpus="none", api_key=KEY, max_body_bytes=MAX_BODY)
    serve.run(build_app(args), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(model: str = TEXT, content: Any = "hello", **params: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **SHORT, **params}


def assert_error(response: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error


def image_url(size: tuple[int, int] = (32, 32), fmt: str = "PNG") -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        pytest.param(b"{not json", "not valid JSON", id="malformed-json"),
        pytest.param(b"[1, 2]", "JSON object", id="not-an-object"),
        pytest.param(b'{"model": "writer", "messages": NaN}', "not valid JSON", id="nan"),
        pytest.param(json.dumps({"model": TEXT}).encode(), "messages", id="no-messages"),
        pytest.param(json.dumps({"model": TEXT, "messages": "hi"}).encode(), "messages", id="messages-wrong-type"),
        pytest.param(json.dumps(chat(max_tokens="many")).encode(), "max_tokens", id="max-tokens-wrong-type"),
        pytest.param(json.dumps(chat(max_tokens=0)).encode(), "max_tokens", id="max-tokens-zero"),
        pytest.param(json.dumps(chat(max_tokens=-5)).encode(), "max_tokens", id="max-tokens-negative"),
        pytest.param(json.dumps(chat(max_tokens=CAP + 1)).encode(), f"at most {CAP}", id="max-tokens-over-cap"),
        pytest.param(json.dumps(chat(temperature=2.5)).encode(), "temperature", id="temperature-high"),
        pytest.param(json.dumps(chat(temperature=-0.1)).encode(), "temperature", id="temperature-negative"),
        pytest.param(json.dumps(chat(top_p=0)).encode(), "top_p", id="top-p-zero"),
        pytest.param(json.dumps(chat(top_p=1.5)).encode(), "top_p", id="top-p-high"),
        pytest.param(json.dumps(chat(n=0)).encode(), "n", id="n-0"),
        pytest.param(json.dumps(chat(n=2, stream=True)).encode(), "stream", id="n-2-streamed"),
        pytest.param(json.dumps(chat(seed=2**70)).encode(), "seed", id="seed-huge"),
    ],
)
def test_bad_chat_body_is_400(http: httpx.Client, body: bytes, needle: str) -> None:
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    error = assert_error(response, 400, needle)
    assert error["type"] == "invalid_request_error"


# What the ingress converts after parsing a body (a Responses request into a chat request, a chat or
# completions request into the engine's input) is refused with a 400 naming the client's field, never a
# 500: no Ray needed. Before, each /v1/responses body here was a 500 (a pydantic ValidationError, or an
# AttributeError on a value of the wrong shape, raised inside `to_chat`), as were the chat bodies whose
# tools / tool_choice / response_format held a value of the wrong shape.
@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        pytest.param({"top_p": 21}, "top_p", "less than or equal to 1", id="top-p-21"),
        pytest.param({"temperature": -1}, "temperature", "greater than or equal to 0", id="temperature-negative"),
        pytest.param({"max_output_tokens": CAP + 1}, "max_output_tokens", f"at most {CAP}", id="over-cap"),
        pytest.param({"input": []}, "input", "at least 1 item", id="input-empty"),
        pytest.param({"input": [{"role": "wizard", "content": "x"}]}, "input.0.role", "'user'", id="role"),
        pytest.param({"input": [{"role": "user", "content": 5}]}, "input.0.content", "valid", id="content-number"),
        pytest.param(
            {"input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "input.0.content.0",
            "content part type",
            id="content-part-type",
        ),
        pytest.param(
            {"input": ["hi", {"role": "user", "content": [{"type": "input_image", "image_url": "http://a.b/c.png"}]}]},
            "input.0",
            "valid dictionary",
            id="item-not-an-object",
        ),
        pytest.param(
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://a.b/c.png"}]}]},
            "input.0.content.0.image_url",
            "data URL",
            id="remote-image",
        ),
        pytest.param({"input": [{"type": "item_reference", "id": "x"}]}, "input.0", "input item type", id="item-type"),
        pytest.param(
            {"input": [{"type": "function_call", "name": "f", "arguments": {}}]},
            "input.0.arguments",
            "valid string",
            id="call-arguments-object",
        ),
        pytest.param({"tools": [{"type": "web_search"}]}, "tools.0.type", "'function'", id="tool-type"),
        pytest.param(
            {"tools": [{"type": "function", "name": "f", "parameters": {"type": 3}}]},
            "tools.0.parameters",
            "invalid parameters schema",
            id="tool-schema",
        ),
        pytest.param(
            {"tools": [{"type": "function", "name": "f", "parameters": {"$schema": ["x"]}}]},
            "tools.0.parameters",
            "$schema",
            id="tool-schema-uri",
        ),
        pytest.param(
            {"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
            "tool_choice",
            "not in tools",
            id="tool-choice-unknown",
        ),
        pytest.param({"tool_choice": "required"}, "tool_choice", "no tools", id="tool-choice-required-no-tools"),
        pytest.param({"tool_choice": "sometimes"}, "tool_choice", "'required'", id="tool-choice-word"),
        pytest.param({"text": {"format": "json"}}, "text.format", "valid dictionary", id="format-string"),
        pytest.param({"text": {"format": {"type": "xml"}}}, "text.format.type", "'json_schema'", id="format-type"),
        pytest.param({"text": {"format": {"type": "json_schema"}}}, "text.format.schema", "needs", id="no-schema"),
        pytest.param(
            {"text": {"format": {"type": "json_schema", "schema": {"type": 3}}}},
            "text.format.schema",
            "invalid JSON schema",
            id="format-schema",
        ),
        pytest.param(
            {"text": {"format": {"type": "json_schema", "schema": {"$ref": "#/nowhere"}}}},
            "text.format.schema",
            "cannot be enforced",
            id="format-schema-unenforceable",
        ),
        pytest.param(
            {"text": {"format": {"type": "json_object"}}, "tools": [{"type": "function", "name": "f"}]},
            "text.format",
            "cannot be combined",
            id="format-and-tools",
        ),
        pytest.param({"previous_response_id": "resp_1"}, "previous_response_id", "stores no", id="server-state"),
        pytest.param({"input": "\ud83d hello"}, "input", "lone surrogate", id="lone-surrogate"),
    ],
)
def test_responses_conversion_refusal_names_the_field(fields: dict[str, Any], param: str, needle: str) -> None:
    body = json.dumps({"model": TEXT, "input": "hello", **fields}).encode()
    with pytest.raises(BadRequestError) as info:
        parse_body(body, ResponsesRequest).to_chat().to_generation_input(CAP)
    assert (info.value.status, info.value.param) == (400, param), info.value.message
    assert needle in info.value.message, info.value.message


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        pytest.param("chat", {"tools": [{"type": "function", "function": "f"}]}, "tools.0.function", id="function"),
        pytest.param(
            "chat",
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": 5}}]},
            "tools.0.function.parameters",
            id="parameters",
        ),
        pytest.param(
            "chat",
            {"tools": [{"function": {"name": "f", "parameters": {"$schema": ["x"]}}}]},
            "tools.0.function.parameters",
            id="schema-uri",
        ),
        pytest.param(
            "chat",
            {"tools": [{"function": {"name": "f", "description": 5}}]},
            "tools.0.function.description",
            id="description",
        ),
        pytest.param(
            "chat", {"tool_choice": {"type": "function", "function": "f"}}, "tool_choice.function", id="choice"
        ),
        pytest.param(
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": "x"}},
            "response_format.json_schema",
            id="format",
        ),
        pytest.param(
            "completions",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"$schema": 7}}}},
            "response_format.json_schema.schema",
            id="format-schema-uri",
        ),
        pytest.param(
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages.0.content.0.text",
            id="part",
        ),
        pytest.param("chat", {"logit_bias": {"-1": 5}}, "logit_bias.-1", id="logit-bias-negative-token"),
        pytest.param("chat", {"stop": list("abcde")}, "stop", id="stop-5"),
        pytest.param("completions", {"seed": 2**64 - 1, "n": 2}, "seed", id="seed-of-second-choice"),
        pytest.param("chat", {"max_completion_tokens": CAP + 1}, "max_completion_tokens", id="over-cap"),
        pytest.param("completions", {"prompt": [3, -1]}, "prompt.1", id="negative-token-id"),
        # The tokenizer refuses text that is not Unicode (a TypeError in the replica, a 500, before).
        pytest.param(
            "chat", {"messages": [{"role": "user", "content": "a\udfffb"}]}, "messages.0.content", id="surrogate"
        ),
        pytest.param("completions", {"prompt": ["ok", "\ud800"]}, "prompt.1", id="surrogate-prompt"),
    ],
)
def test_chat_and_completion_refusal_names_the_field(route: str, fields: dict[str, Any], param: str) -> None:
    """Values of the wrong shape inside the free-form fields, refused before any code reads them (a 500 before)."""
    base = {"messages": [{"role": "user", "content": "hello"}]} if route == "chat" else {"prompt": "hello"}
    body = json.dumps({"model": TEXT, **base, **fields}).encode()
    model = ChatCompletionRequest if route == "chat" else CompletionRequest
    with pytest.raises(BadRequestError) as info:
        request = parse_body(body, model)
        request.to_generation_input(CAP)
    assert (info.value.status, info.value.param) == (400, param), info.value.message


def test_responses_history_converts_to_chat() -> None:
    """An agent's history (instructions, a message in parts, two calls, their outputs) as the chat request."""
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get", "arguments": ""},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
        {"type": "function_call_output", "call_id": "c2", "output": {"temp": 20}},
    ]
    body = {"model": TEXT, "input": items, "instructions": "Be brief.", "max_output_tokens": 3, "top_p": 0.5}
    chat = parse_body(json.dumps(body).encode(), ResponsesRequest).to_chat()
    assert (chat.max_tokens, chat.top_p) == (3, 0.5)
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool", "tool"]
    assert [(c.id, c.function.name, c.function.arguments) for c in chat.messages[2].tool_calls or []] == [
        ("c1", "get", '{"city": "Paris"}'),
        ("c2", "get", "{}"),
    ]
    assert [(m.tool_call_id, m.content) for m in chat.messages[3:]] == [("c1", "18 C"), ("c2", '{"temp": 20}')]


def test_bad_completion_body_is_400(http: httpx.Client) -> None:
    assert_error(http.post("/v1/completions", json={"model": TEXT}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"model": TEXT, "prompt": 7}), 400, "prompt")


def test_unknown_model_is_404_naming_models(http: httpx.Client) -> None:
    error = assert_error(http.post("/v1/chat/completions", json=chat(model="gpt-4")), 404, "gpt-4", TEXT, VISION)
    assert error["type"] == "not_found_error" and error["param"] == "model"


def test_prompt_over_context_states_both_numbers(http: httpx.Client) -> None:
    long_prompt = "word " * (CONTEXT + 50)
    error = assert_error(http.post("/v1/completions", json={"model": TEXT, "prompt": long_prompt, **SHORT}), 400)
    assert f"context length of {CONTEXT}" in error["message"] and "prompt has" in error["message"]
    # Fits alone, not with max_tokens (the image+text model has no small cap): both numbers named.
    short = {"model": VISION, "prompt": "a short prompt", "temperature": 0}
    prompt_tokens = http.post("/v1/completions", json={**short, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    over = CONTEXT - prompt_tokens + 1
    error = assert_error(http.post("/v1/completions", json={**short, "max_tokens": over}), 400)
    assert f"prompt has {prompt_tokens} tokens and max_tokens is {over}" in error["message"]
    assert f"context length of {CONTEXT}" in error["message"]


def test_images_checked_before_any_model(http: httpx.Client) -> None:
    part = {"type": "image_url", "image_url": {"url": image_url()}}
    assert_error(http.post("/v1/chat/completions", json=chat(TEXT, [part])), 400, "text-only")
    broken = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"x" * 99).decode()},
    }
    assert_error(http.post("/v1/chat/completions", json=chat(VISION, [broken])), 400, "not a readable image")
    huge = {"type": "image_url", "image_url": {"url": image_url((4097, 4097))}}  # compresses to a few KiB
    assert_error(http.post("/v1/chat/completions", json=chat(VISION, [huge])), 400, str(MAX_IMAGE_PIXELS))
    remote = {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}
    assert_error(http.post("/v1/chat/completions", json=chat(VISION, [remote])), 400, "data URL")
    good = {"type": "image_url", "image_url": {"url": image_url()}}
    assert http.post("/v1/chat/completions", json=chat(VISION, [good])).status_code == 200


def test_body_over_limit_is_413(http: httpx.Client) -> None:
    big = json.dumps(chat(content="x" * (MAX_BODY + 10))).encode()
    assert_error(http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"}), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds on what actually arrives
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    response = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, str(MAX_BODY))
    assert http.post("/v1/chat/completions", json=chat()).status_code == 200  # still serving


def test_handle_client_raises_typed_errors(base_url: str) -> None:
    writer = get_model(TEXT, app_name=APP)
    messages = [{"role": "user", "content": "hello"}]
    with pytest.raises(BadRequestError, match="temperature") as info:
        writer.chat(messages, temperature=9)
    assert info.value.status == 400
    with pytest.raises(BadRequestError, match=f"at most {CAP}"):
        writer.chat(messages, max_tokens=CAP + 1)
    with pytest.raises(BadRequestError, match="context length"):
        writer.chat([{"role": "user", "content": "word " * (CONTEXT + 10)}], max_tokens=4)
    with pytest.raises(BadRequestError, match="text-only"):
        writer.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url()}}]}])
    with pytest.raises(BadRequestError, match="messages"):
        writer.chat("not a list of messages")  # type: ignore[arg-type]
    with pytest.raises(BadRequestError, match="n > 1"):
        list(writer.stream(messages, n=3))
    with pytest.raises(NotFoundError, match=TEXT):
        get_model("nobody", app_name=APP)
    assert writer.chat(messages, max_tokens=2, temperature=0).usage.completion_tokens == 2


# ------------------------------------------------------------------ fuzzing
# One generator for every route (chat, completions, responses), streamed and not, over every request
# field the API reads, with schema- and tool-shaped values; benchmarks/bench_fuzz.py sends thousands of
# its bodies to the offline demo. A body is one of four kinds:
# - valid: every field in range and consistent with the others: answered 200, whatever tokens are sampled;
# - invalid: a valid body but for one field (or one rule between fields) the API refuses: a 4xx whose
#   `error.param` names that field (the Responses field on /v1/responses);
# - odd: a valid body but for one field, known or not, set to any JSON (or text with lone surrogates):
#   any answer but a 5xx;
# - junk: not JSON, not an object, or an object of anything: any answer but a 5xx;
# - unenforceable: a valid body asking for tool calls or JSON from models that cannot enforce a grammar
#   (`grammars=False`): a 400.
# Every answer is checked by `answer_problems`: never a 5xx, every error in OpenAI's shape, every 200
# whole (a stream ends with its last event, with no error inside it). No check depends on the tokens
# sampled: only on the body (a valid body whose prompt outgrows the context is the one 400 allowed).

ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}
DROP = "<drop>"  # an invalid body's update that removes the field


@dataclass(frozen=True)
class FuzzCase:
    route: str  # a key of ROUTES
    body: bytes
    kind: str  # valid, invalid, odd, junk, or unenforceable (see fuzz_cases)
    field: str | None = None  # invalid: the field the 4xx must name (its param's first part)
    stream: bool = False  # the body asks for a stream

    @property
    def path(self) -> str:
        return ROUTES[self.route]


_name = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
_words = st.text(max_size=16)  # any text but lone surrogates (hypothesis leaves those out)
_scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
_json = st.recursive(
    _scalar | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# A valid body's JSON values (tool call arguments and outputs): small and ASCII (templates write them as JSON,
# non-ASCII as \u escapes), so a history fits the tiny models' context.
_arguments = st.dictionaries(
    _name, st.none() | st.booleans() | st.integers(-99, 99) | st.from_regex(r"[ -~]{0,6}", fullmatch=True), max_size=3
)
_surrogates = st.sampled_from(["\ud800", "a\udfffb", "\ud83d hello", "\udc00" * 3])
_not_number = st.sampled_from(["hot", [], {}, [1.0], {"value": 1}])
_not_int = st.sampled_from(["many", 1.5, [], {}, [1]])
_not_bool = st.sampled_from(["maybe", 2, -1, 0.5, [], {}])
_not_text = st.sampled_from([5, 1.5, [], {}, ["a"], True])


def _outside(low: float, high: float) -> st.SearchStrategy[Any]:
    """Numbers below `low` or above `high` (by a clear margin: no -0.0 for a bound of 0), or not numbers."""
    return st.floats(-1e300, low - 1e-6) | st.floats(high + 1e-6, 1e300) | _not_number


# JSON schemas that llguidance enforces: leaves, objects (closed or not), arrays, alternatives.
_leaf_schema = st.one_of(
    st.sampled_from([{"type": t} for t in ("string", "integer", "number", "boolean", "null")]),
    st.builds(
        lambda low, span: {"type": "string", "minLength": low, "maxLength": low + span},
        st.integers(0, 3),
        st.integers(0, 8),
    ),
    st.builds(
        lambda low, span: {"type": "integer", "minimum": low, "maximum": low + span},
        st.integers(-99, 99),
        st.integers(0, 99),
    ),
    st.lists(st.text(max_size=6) | st.integers(-9, 9), min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
    (st.text(max_size=6) | st.integers(-9, 9) | st.booleans()).map(lambda value: {"const": value}),
    st.sampled_from(["^[a-z]{1,8}$", "^[0-9]{2,4}$"]).map(lambda pattern: {"type": "string", "pattern": pattern}),
)


def _object_schema(values: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(_name, values, max_size=4).flatmap(
        lambda properties: st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.just(properties)},
            optional={
                "required": st.lists(st.sampled_from(sorted(properties)), unique=True) if properties else st.just([]),
                "additionalProperties": st.just(False),
            },
        )
    )


_schema = st.recursive(
    _leaf_schema,
    lambda inner: st.one_of(
        _object_schema(inner),
        st.builds(lambda items, most: {"type": "array", "items": items, "maxItems": most}, inner, st.integers(0, 3)),
        st.lists(inner, min_size=1, max_size=3).map(lambda options: {"anyOf": options}),
    ),
    max_leaves=6,
)
_parameters = _object_schema(_schema)
# Schemas a client may send by mistake: not JSON schemas, or ones that cannot be enforced.
_bad_schema = st.sampled_from(
    [
        {"type": 3},
        {"type": "nonsense"},
        {"properties": 5},
        {"required": "a"},
        {"minimum": "a"},
        {"enum": 5},
        {"items": 5},
        {"type": "object", "properties": {"a": {"type": "strin"}}},
        {"$schema": ["x"]},
        {"$schema": 7},
        {"$ref": "#/nowhere"},
        "an object",
        [],
        7,
    ]
)
_SAMPLING = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(-1, 64),
    "min_p": st.floats(0, 1),
    "seed": st.integers(-(2**63), 2**64 - 3),  # choice i of n (at most 3 here) takes seed + i
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 10),
    # Token ids beyond the vocabulary change nothing.
    "logit_bias": st.dictionaries(st.integers(0, 2**40).map(str), st.floats(-100, 100), max_size=4),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=3), max_size=4),
    "ignore_eos": st.booleans(),
    # Accepted and ignored.
    "user": _words,
    "metadata": st.dictionaries(_name, st.text(max_size=8), max_size=2),
    "store": st.booleans(),
}


def _response_format() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.just({"type": "text"}),
        st.just({"type": "json_object"}),
        st.fixed_dictionaries(
            {
                "type": st.just("json_schema"),
                "json_schema": st.fixed_dictionaries(
                    {"schema": _schema}, optional={"name": _name, "strict": st.booleans(), "description": _words}
                ),
            }
        ),
    )


@st.composite
def _chat_history(draw: Any, image: str | None) -> list[dict[str, Any]]:
    """Earlier turns (any roles, tool rounds) and a last user turn (text, or text and an image)."""
    turns: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 2))):
        role = draw(st.sampled_from(["system", "developer", "user", "assistant", "tool round"]))
        if role != "tool round":
            turns.append({"role": role, "content": draw(_words)})
            continue
        ids = draw(st.lists(_name.map(lambda n: f"call_{n}"), min_size=1, max_size=2, unique=True))
        calls = [
            {"id": i, "type": "function", "function": {"name": draw(_name), "arguments": json.dumps(draw(_arguments))}}
            for i in ids
        ]
        turns.append({"role": "assistant", "content": draw(st.none() | st.just("")), "tool_calls": calls})
        turns += [{"role": "tool", "tool_call_id": i, "content": draw(_words)} for i in ids]
    parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _words}), min_size=1, max_size=2)
    if image is not None:
        parts = parts.map(lambda p: [*p, {"type": "image_url", "image_url": {"url": image}}])
    content = draw(_words | parts) if image is None else draw(parts)
    user = {"role": "user", "content": content, **draw(st.fixed_dictionaries({}, optional={"name": _name}))}
    return [*turns, user]


def _length(model: str, uncapped: Sequence[str], low: int = 1) -> st.SearchStrategy[int | None]:
    """A valid body's max_tokens: 1 or 2, or none (the model's default) where that fits the context."""
    return st.integers(low, 2) if model in uncapped else st.none() | st.integers(low, 2)


def _some(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict holding any of `fields` (each drawn from its strategy)."""
    return st.fixed_dictionaries({}, optional=fields)


_stream_options = _some(include_usage=st.booleans(), continuous_usage_stats=st.booleans())


@st.composite
def _valid_chat(
    draw: Any, models: Sequence[str], vision: str | None, image: str | None, uncapped: Sequence[str]
) -> dict[str, Any]:
    # The choices that shape the body first (see `fuzz_cases`), the long draws last.
    model, extra, stream = draw(st.sampled_from(models)), draw(st.sampled_from(_CHAT_EXTRAS)), draw(st.booleans())
    length, logprobs = draw(_length(model, uncapped)), draw(st.none() | st.booleans())
    body: dict[str, Any] = {"model": model}
    if length is not None:
        body[draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))] = length
        body.update(draw(_some(min_tokens=st.integers(0, length))))
    if stream:
        body.update(stream=True, **draw(_some(stream_options=_stream_options)))
    else:
        body.update(draw(_some(n=st.integers(1, 3), stream=st.just(False))))
    if logprobs is not None:
        body["logprobs"] = logprobs
        body.update(draw(_some(top_logprobs=st.integers(0, 20))) if logprobs else {})
    body["messages"] = draw(_chat_history(image if model == vision else None))
    if extra == "tools":
        names = draw(st.lists(_name, min_size=1, max_size=3, unique=True))
        body["tools"] = [{"type": "function", "function": {"name": name, **draw(_tool_fields)}} for name in names]
        named = st.sampled_from(names).map(lambda n: {"type": "function", "function": {"name": n}})
        choice = st.sampled_from(["none", "auto", "required"]) | named
        body.update(draw(_some(tool_choice=choice, parallel_tool_calls=st.booleans())))
    elif extra == "response_format":
        body["response_format"] = draw(_response_format())
    elif extra == "prefill":
        body["messages"].append({"role": "assistant", "content": draw(_words)})
        if draw(st.booleans()):
            body.update(continue_final_message=True, **draw(_some(add_generation_prompt=st.just(False))))
        else:
            body["messages"][-1]["prefix"] = True
    body.update(draw(_some(**_SAMPLING)))
    return body


_CHAT_EXTRAS = ["plain", "tools", "response_format", "prefill"]
_tool_fields = _some(description=_words, parameters=_parameters, strict=st.booleans())


@st.composite
def _valid_completion(draw: Any, models: Sequence[str], vocab: int, uncapped: Sequence[str]) -> dict[str, Any]:
    model, stream, formatted = draw(st.sampled_from(models)), draw(st.booleans()), draw(st.booleans())
    echo = False if stream else draw(st.booleans())
    length = draw(_length(model, uncapped, 0 if echo else 1))
    body: dict[str, Any] = {"model": model}
    if echo:
        body["echo"] = True
    if length is not None:
        body["max_tokens"] = length
        body.update(draw(_some(min_tokens=st.integers(0, length))))
    if stream:
        body.update(stream=True, **draw(_some(stream_options=_stream_options)))
    else:
        body.update(draw(_some(n=st.integers(1, 3), stream=st.just(False))))
    body.update(draw(_some(logprobs=st.integers(0, 5))))
    ids = st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8)
    text = st.text(min_size=1, max_size=16)
    one = text | ids  # a stream answers one prompt
    several = st.lists(text, min_size=1, max_size=3) | st.lists(ids, min_size=1, max_size=3)
    body["prompt"] = draw(one if stream else one | several)
    if formatted:
        body["response_format"] = draw(_response_format())
    body.update(draw(_some(**_SAMPLING)))
    return body


@st.composite
def _responses_input(draw: Any, image: str | None) -> list[dict[str, Any]]:
    """Messages (string or parts content), function calls with their outputs, reasoning items; a user
    message or a call's output last."""
    items: list[dict[str, Any]] = []
    text_part = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text"]), "text": _words})
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["message", "call", "reasoning"]))
        if kind == "message":
            message = {"role": draw(st.sampled_from(["user", "assistant", "system", "developer"]))}
            message["content"] = draw(_words | st.lists(text_part, min_size=1, max_size=2))
            if draw(st.booleans()):
                message["type"] = "message"
            items.append(message)
        elif kind == "call":
            for call_id in draw(st.lists(_name.map(lambda n: f"call_{n}"), min_size=1, max_size=2, unique=True)):
                items.append(
                    {
                        "type": "function_call",
                        "call_id": call_id,
                        "name": draw(_name),
                        "arguments": json.dumps(draw(_arguments)),
                    }
                )
                output = draw(_words | _arguments)
                items.append({"type": "function_call_output", "call_id": call_id, "output": output})
        else:
            items.append({"type": "reasoning", "id": "rs_1", "summary": []})
    parts = st.lists(st.fixed_dictionaries({"type": st.just("input_text"), "text": _words}), min_size=1, max_size=2)
    if image is not None:
        parts = parts.map(lambda p: [*p, {"type": "input_image", "image_url": image}])
    last = items[-1] if items else None
    if last is None or last.get("type") != "function_call_output" or image is not None or draw(st.booleans()):
        items.append({"role": "user", "content": draw(parts) if image is not None else draw(_words | parts)})
    return items


@st.composite
def _valid_responses(
    draw: Any, models: Sequence[str], vision: str | None, image: str | None, uncapped: Sequence[str]
) -> dict[str, Any]:
    model, extra, stream = (
        draw(st.sampled_from(models)),
        draw(st.sampled_from(["plain", "tools", "text"])),
        draw(st.booleans()),
    )
    image = image if model == vision else None
    body: dict[str, Any] = {"model": model, **({"stream": True} if stream else draw(_some(stream=st.just(False))))}
    length = draw(_length(model, uncapped))
    body.update({"max_output_tokens": length} if length is not None else {})
    body["input"] = draw(_responses_input(image) if image else _words | _responses_input(None))
    if extra == "tools":
        names = draw(st.lists(_name, min_size=1, max_size=3, unique=True))
        body["tools"] = [{"type": "function", "name": name, **draw(_tool_fields)} for name in names]
        named = st.sampled_from(names).map(lambda n: {"type": "function", "name": n})
        body.update(draw(_some(tool_choice=st.sampled_from(["none", "auto", "required"]) | named)))
    elif extra == "text":
        schema = st.fixed_dictionaries(
            {"type": st.just("json_schema"), "schema": _schema},
            optional={"name": _name, "strict": st.booleans(), "description": _words},
        )
        formats = st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | schema
        body["text"] = draw(st.fixed_dictionaries({"format": formats}, optional={"verbosity": st.just("low")}))
    else:
        body.update(draw(_some(tool_choice=st.sampled_from(["none", "auto"]))))
    fields = {
        "instructions": _words,
        "temperature": _SAMPLING["temperature"],
        "top_p": _SAMPLING["top_p"],
        "parallel_tool_calls": st.booleans(),
        # Accepted and ignored.
        "store": st.booleans(),
        "metadata": _SAMPLING["metadata"],
        "user": _words,
        "reasoning": st.just({"effort": "low"}),
        "truncation": st.just("disabled"),
        "include": st.just([]),
    }
    body.update(draw(_some(**fields)))
    return body


def _bad(field: str, **updates: st.SearchStrategy[Any] | Any) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """An invalid body's changes (`DROP` removes a field) and the field its 4xx must name."""
    strategies = {k: v if isinstance(v, st.SearchStrategy) else st.just(v) for k, v in updates.items()}
    return st.tuples(st.just(field), st.fixed_dictionaries(strategies))


def _pick(*options: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One of `options`, each as likely (`st.one_of` favours the first)."""
    return st.sampled_from(options).flatmap(lambda option: option)


def _invalid(route: str, caps: Mapping[str, int]) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """What the API must refuse in a valid body of `route`, field by field (chat's bounds on every route)."""

    def over_cap(field: str, **updates: Any) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
        """`field` above the cap of the role the body now addresses."""
        return st.sampled_from(sorted(caps.items())).flatmap(
            lambda item: _bad(field, model=item[0], **{field: st.integers(item[1] + 1, 2**70)}, **updates)
        )

    common = [
        _bad("model", model=st.sampled_from(["gpt-4", "", "no-such-model"]) | _not_text | st.just(DROP)),
        _bad("temperature", temperature=_outside(0, 2)),
        _bad("top_p", top_p=st.floats(1 + 1e-6, 1e300) | st.floats(-1e300, 0) | st.just(21) | _not_number),
        _bad("stream", stream=_not_bool),
    ]
    sampling = [
        _bad("top_k", top_k=st.integers(-(2**40), -2) | _not_int),
        _bad("min_p", min_p=_outside(0, 1)),
        _bad("seed", seed=st.integers(2**64, 2**80) | st.integers(-(2**80), -(2**63) - 1) | _not_int),
        _bad("seed", seed=2**64 - 1, n=st.integers(2, 8), stream=False),
        _bad("presence_penalty", presence_penalty=_outside(-2, 2)),
        _bad("frequency_penalty", frequency_penalty=_outside(-2, 2)),
        _bad(
            "repetition_penalty",
            repetition_penalty=st.floats(-1e300, 0.0099) | st.floats(10 + 1e-6, 1e300) | _not_number,
        ),
        _bad(
            "logit_bias",
            logit_bias=st.sampled_from([{"-1": 1}, {"x": 1}, {"1": 101}, {"1": -101}, {"1": "x"}, [1], "x"]),
        ),
        _bad(
            "stop", stop=st.lists(st.text(max_size=3), min_size=5, max_size=8) | st.sampled_from([[1], 5, {}, [["a"]]])
        ),
        _bad("n", n=st.integers(-(2**40), 0) | st.integers(9, 2**40) | _not_int),
        _bad("min_tokens", min_tokens=st.integers(-(2**40), -1) | _not_int),
        over_cap("min_tokens"),  # above max_tokens, whatever that is
        _bad("ignore_eos", ignore_eos=_not_bool),
        _bad("stream_options", stream_options=st.sampled_from(["x", 5, [], {"include_usage": "maybe"}])),
        _bad(
            "response_format",
            response_format=st.one_of(
                st.sampled_from(
                    [{"type": "xml"}, "json", 5, {"type": "json_schema"}, {"type": "json_schema", "json_schema": "x"}]
                ),
                _bad_schema.map(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}),
            ),
            tools=DROP,
            tool_choice=DROP,
        ),
        _bad("suffix", suffix=st.text(min_size=1, max_size=8)),
        _bad("audio", audio=st.just({"voice": "alloy", "format": "wav"})),
        _bad("prediction", prediction=st.just({"type": "content", "content": "x"})),
        _bad("web_search_options", web_search_options=st.just({"search_context_size": "low"})),
        _bad("functions", functions=st.just([{"name": "f"}])),
        _bad("function_call", function_call=st.just("auto")),
    ]
    bad_tools = st.one_of(
        st.sampled_from(["x", 5, [5], [{"type": "function", "function": "x"}], [{"type": "retrieval"}]]),
        st.sampled_from([{"name": ""}, {"name": 5}, {"name": "f", "description": 5}, {}]).map(
            lambda f: [{"type": "function", "function": f}]
        ),
        _bad_schema.map(lambda s: [{"type": "function", "function": {"name": "f", "parameters": s}}]),
        st.just([{"type": "function", "function": {"name": "f"}}] * 2),
    )
    if route == "chat":
        bad_message = st.sampled_from(
            [
                {"role": "wizard", "content": "x"},
                {"content": "x"},
                {"role": "user", "content": 5},
                {"role": "user", "content": [{"type": "audio"}]},
                {"role": "user", "content": [{"type": "text", "text": 5}]},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]},
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]},
                "hello",
            ]
        )
        return _pick(
            *common,
            *sampling,
            _bad("messages", messages=st.sampled_from([DROP, [], "hi", 5, {}])),
            _bad("messages", messages=st.lists(bad_message, min_size=1, max_size=2)),
            _bad(
                "messages",
                messages=st.just([{"role": "user", "content": "x", "prefix": True}, {"role": "user", "content": "y"}]),
            ),
            _bad("max_tokens", max_tokens=st.integers(-(2**40), 0) | _not_int, max_completion_tokens=DROP),
            over_cap("max_tokens", max_completion_tokens=DROP),
            _bad("max_completion_tokens", max_completion_tokens=st.integers(-(2**40), 0) | _not_int),
            over_cap("max_completion_tokens"),
            _bad("tools", tools=bad_tools, response_format=DROP, tool_choice=DROP),
            _bad(
                "tool_choice",
                tool_choice=st.sampled_from(
                    [
                        "sometimes",
                        5,
                        [],
                        {"type": "function", "function": "x"},
                        {"type": "function"},
                        {"type": "function", "function": {"name": "not_a_tool_zz"}},
                    ]
                ),
            ),
            _bad("tool_choice", tool_choice="required", tools=DROP),
            _bad("parallel_tool_calls", parallel_tool_calls=_not_bool),
            _bad("logprobs", logprobs=_not_bool),
            _bad(
                "top_logprobs",
                top_logprobs=st.integers(21, 2**40) | st.integers(-(2**40), -1) | _not_int,
                logprobs=True,
            ),
            _bad("top_logprobs", top_logprobs=st.integers(0, 20), logprobs=False),
            _bad("continue_final_message", continue_final_message=_not_bool),
            _bad("add_generation_prompt", continue_final_message=True, add_generation_prompt=True),
            _bad("n", n=st.integers(2, 8), stream=True),
        )
    if route == "completions":
        return _pick(
            *common,
            *sampling,
            _bad(
                "prompt",
                prompt=st.sampled_from(
                    [DROP, 5, "", [], [[]], ["a", ""], {"a": 1}, [1.5], [[1], ["x"]], [-1], ["a"] * 33]
                ),
            ),
            _bad("max_tokens", max_tokens=st.integers(-(2**40), -1) | _not_int),
            over_cap("max_tokens"),
            _bad("max_tokens", max_tokens=0, echo=False),
            _bad("echo", echo=_not_bool),
            _bad("echo", echo=True, stream=True, n=DROP, prompt="hello"),
            _bad("logprobs", logprobs=st.integers(6, 2**40) | st.integers(-(2**40), -1) | _not_int),
            _bad("n", n=st.integers(2, 8), stream=True, prompt="hello", echo=DROP, max_tokens=DROP, min_tokens=DROP),
        )
    bad_item = st.sampled_from(
        [
            5,
            "hi",
            {"role": "wizard", "content": "x"},
            {"type": "item_reference", "id": "x"},
            {"type": "message", "content": "x"},
            {"role": "user", "content": 5},
            {"role": "user", "content": [{"type": "input_audio"}]},
            {"role": "user", "content": [{"type": "input_text", "text": 5}]},
            {"role": "user", "content": [{"type": "input_image", "image_url": "http://example.com/a.png"}]},
            {"type": "function_call"},
            {"type": "function_call", "name": "f", "arguments": {}},
            {"type": "function_call_output", "call_id": 5, "output": "x"},
        ]
    )
    bad_response_tools = st.one_of(
        st.sampled_from(
            ["x", 5, [5], [{"type": "web_search"}], [{"type": "function"}], [{"type": "function", "name": ""}]]
        ),
        st.sampled_from([{"name": 5}, {"name": "f", "description": 5}, {"name": "f", "strict": "maybe"}]).map(
            lambda f: [{"type": "function", **f}]
        ),
        _bad_schema.map(lambda s: [{"type": "function", "name": "f", "parameters": s}]),
        st.just([{"type": "function", "name": "f"}] * 2),
    )
    bad_format = st.one_of(
        st.sampled_from(["x", 5, {"format": "json"}, {"format": {"type": "xml"}}, {"format": {"type": "json_schema"}}]),
        _bad_schema.map(lambda s: {"format": {"type": "json_schema", "name": "x", "schema": s}}),
    )
    return _pick(
        *common,
        _bad("input", input=st.sampled_from([DROP, [], 5, {}, None])),
        _bad("input", input=st.lists(bad_item, min_size=1, max_size=2)),
        _bad("instructions", instructions=_not_text),
        _bad("max_output_tokens", max_output_tokens=st.integers(-(2**40), 0) | _not_int),
        over_cap("max_output_tokens"),
        _bad("tools", tools=bad_response_tools, text=DROP, tool_choice=DROP),
        _bad(
            "tool_choice",
            tool_choice=st.sampled_from(
                [
                    "sometimes",
                    5,
                    [],
                    {"type": "file_search"},
                    {"type": "function"},
                    {"type": "function", "name": "not_a_tool_zz"},
                ]
            ),
        ),
        _bad("tool_choice", tool_choice="required", tools=DROP),
        _bad("parallel_tool_calls", parallel_tool_calls=_not_bool),
        _bad("text", text=bad_format, tools=DROP, tool_choice=DROP),
        _bad("previous_response_id", previous_response_id="resp_1"),
        _bad("conversation", conversation="conv_1"),
    )


_KNOWN_FIELDS = {
    "chat": [
        "messages",
        "tools",
        "tool_choice",
        "response_format",
        "logprobs",
        "top_logprobs",
        "n",
        "stop",
        "stream_options",
        "logit_bias",
        "max_tokens",
        "max_completion_tokens",
        "continue_final_message",
    ],
    "completions": ["prompt", "echo", "logprobs", "n", "stop", "logit_bias", "max_tokens", "response_format", "suffix"],
    "responses": ["input", "instructions", "tools", "tool_choice", "text", "max_output_tokens", "reasoning", "include"],
}
_TEXT_FIELD = {"chat": ("messages", -1, "content"), "completions": ("prompt",), "responses": ("input",)}


def _with_surrogates(route: str, body: dict[str, Any], text: str) -> dict[str, Any]:
    if route == "chat":
        body["messages"][-1]["content"] = text
    elif route == "completions":
        body["prompt"] = text
    else:
        body["input"] = text
    return body


_junk = st.one_of(
    st.binary(max_size=80),
    _json.map(json.dumps).map(str.encode),
    st.dictionaries(st.text(max_size=8), _json, max_size=5).map(json.dumps).map(str.encode),
    st.sampled_from([b"", b"{", b'{"model": NaN}', b'{"model": Infinity}', b"[" * 100_000, b'{"a":' * 10_000]),
)


def _constrained(body: dict[str, Any]) -> bool:
    """Whether a valid body asks for constrained decoding (tool calls, a JSON response format)."""
    tools = bool(body.get("tools")) and body.get("tool_choice") != "none"
    format_ = body.get("response_format") or (body.get("text") or {}).get("format") or {}
    return tools or format_.get("type") in ("json_object", "json_schema")


def fuzz_cases(
    caps: Mapping[str, int],
    *,
    vocab: int,
    vision: str | None = None,
    image: str | None = None,
    grammars: bool = True,
    uncapped: Sequence[str] = (),
) -> st.SearchStrategy[FuzzCase]:
    """Bodies for every route: `caps` the roles to address and their max_tokens caps (above it, a 400
    naming the field); `vocab`: token ids below it are every model's; `vision`: the role that takes `image`
    (a data URL); `grammars`: whether the models enforce grammars (when not, a valid body asking for tool
    calls or JSON is of kind `unenforceable`, answered 400); `uncapped`: roles whose default max_tokens
    does not fit their context (no small cap): a valid body to one names max_tokens."""
    models = sorted(caps)
    valid = {
        "chat": _valid_chat(models, vision, image, uncapped),
        "completions": _valid_completion(models, vocab, uncapped),
        "responses": _valid_responses(models, vision, image, uncapped),
    }

    @st.composite
    def case(draw: Any) -> FuzzCase:
        # What to change is drawn before the body: hypothesis fills the draws after a large example with
        # its simplest choices, which would make every late choice the first option.
        route = draw(st.sampled_from(sorted(ROUTES)))
        kind = draw(st.sampled_from(["valid"] * 7 + ["invalid"] * 9 + ["odd"] * 2 + ["junk"] * 2))
        if kind == "junk":
            return FuzzCase(route, draw(_junk), kind)
        field, updates = draw(_invalid(route, caps)) if kind == "invalid" else (None, {})
        odd = draw(st.sampled_from(_KNOWN_FIELDS[route]) | _name | st.none()) if kind == "odd" else None
        odd_value = draw(_json if odd is not None else _surrogates) if kind == "odd" else None
        body = draw(valid[route])
        for name, value in updates.items():
            if value == DROP:
                body.pop(name, None)
            else:
                body[name] = value
        if odd is not None:
            body[odd] = odd_value
        elif kind == "odd":
            body = _with_surrogates(route, body, odd_value)
        if kind == "valid" and not grammars and _constrained(body):
            kind = "unenforceable"
        return FuzzCase(route, json.dumps(body).encode(), kind, field, body.get("stream") is True)

    return case()


def _error_problems(status: int, text: str) -> list[str]:
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return [f"{status} not in OpenAI's error shape"]
    problems = []
    if set(error) != {"message", "type", "param", "code"}:
        problems.append(f"error keys {sorted(error)}")
    if not isinstance(error.get("message"), str) or not error.get("message"):
        problems.append("no error.message")
    if not isinstance(error.get("type"), str) or not error.get("type"):
        problems.append("no error.type")
    if error.get("code") != status:
        problems.append(f"error.code {error.get('code')!r} for a {status}")
    if not isinstance(error.get("param"), str | None):
        problems.append(f"error.param {error.get('param')!r}")
    return problems


def _stream_problems(route: str, text: str) -> list[str]:
    # Server-sent events end their lines with \n (JSON escapes it in strings); str.splitlines would also
    # split at the U+2028 or U+0085 a model may write.
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return ["stream does not end with [DONE]"]
    try:
        chunks = [json.loads(event) for event in events[:-1]]
    except ValueError as exc:
        return [f"an event is not JSON: {exc}"]
    if any(isinstance(chunk.get("error"), dict) for chunk in chunks):
        return [f"error inside the stream: {next(c['error'] for c in chunks if isinstance(c.get('error'), dict))}"]
    if route == "responses" and (
        not chunks or chunks[-1].get("type") not in ("response.completed", "response.incomplete")
    ):
        return ["Responses stream without its final event"]
    if route != "responses" and not any(chunk.get("choices") for chunk in chunks):
        return ["stream without a choice"]
    return []


def _too_long(status: int, text: str) -> bool:
    """A valid body whose prompt does not fit the model's context: refused by what its tokens number,
    which a generator of bodies does not know (rare: valid bodies are kept short)."""
    return status == 400 and "exceeds the model's context length" in text


_OBJECTS = {"chat": "chat.completion", "completions": "text_completion", "responses": "response"}


def answer_problems(case: FuzzCase, status: int, text: str) -> list[str]:
    """What is wrong with the answer `status` / `text` to `case` (nothing: an empty list)."""
    problems = []
    if status >= 500:
        problems.append(f"{status}: {text[:300]}")
    elif case.kind == "valid" and status != 200 and not _too_long(status, text):
        problems.append(f"a valid body answered {status}: {text[:300]}")
    elif case.kind == "unenforceable" and status != 400:
        problems.append(f"constrained decoding on a model that cannot enforce it answered {status}")
    elif case.kind == "invalid" and status not in (400, 404):
        problems.append(f"a body with a bad {case.field} answered {status}")
    if status >= 400:
        problems += _error_problems(status, text)
        if case.kind == "invalid" and not problems:
            param = json.loads(text)["error"]["param"] or ""
            if param.split(".")[0] != case.field:
                problems.append(f"param {param!r} for a bad {case.field}: {text[:300]}")
    elif status == 200:
        if case.stream:
            problems += _stream_problems(case.route, text)
        elif json.loads(text).get("object") != _OBJECTS[case.route]:
            problems.append(f"answer is not a {_OBJECTS[case.route]}: {text[:300]}")
    return problems


# The suite's share: every route, streamed and not, answered and refused, at least 3 times each; the
# 5,000-body run is benchmarks/bench_fuzz.py's (0 × 5xx there too). 600 here cost ~60 s on 2 cores.
FUZZ_BODIES = 300


@pytest.mark.slow
def test_fuzzed_bodies_never_5xx_or_hang(http: httpx.Client) -> None:
    """Every route, streamed and not, every field: no 5xx, every error in OpenAI's shape naming the field,
    every valid body answered (`answer_problems`). Derandomized: the same bodies every run."""
    statuses: Counter[tuple[str, str, bool, int]] = Counter()
    problems: list[str] = []
    # The tiny models' tokenizer (a Metaspace decoder) is one llguidance cannot build a token parser for:
    # their valid bodies asking for tool calls or JSON are refused (400), not answered.
    # The image+text model has no small max_tokens cap: its default (256) fills the context.
    image = image_url((16, 16))
    caps = {FUZZ: CAP, VISION: 4096}  # placement.config's default cap
    cases = fuzz_cases(caps, vocab=VOCAB, vision=VISION, image=image, grammars=False, uncapped=[VISION])
    started = time.perf_counter()

    @settings(
        max_examples=FUZZ_BODIES,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(cases)
    def send(case: FuzzCase) -> None:
        # Hypothesis also draws string constants from the code under test, fault markers included:
        # a body that asks for an injected fault is not a fuzzed client's body.
        text = case.body.decode(errors="replace")
        assume(not any(marker in text for marker in (OOM_MARKER, BATCH_OOM_MARKER, WEDGE_MARKER)))
        # httpx's timeout fails the example: a hang is a failure, not a wait.
        response = http.post(case.path, content=case.body, headers={"content-type": "application/json"}, timeout=30)
        statuses[(case.route, case.kind, case.stream, response.status_code)] += 1
        problems.extend(
            f"{case.path} {case.body[:400]!r}: {p}" for p in answer_problems(case, response.status_code, response.text)
        )

    send()
    seconds = time.perf_counter() - started
    print(f"\nfuzz: {sum(statuses.values())} bodies in {seconds:.1f} s")
    for (route, kind, stream, status), count in sorted(statuses.items()):
        print(f"  {route:<12} {kind:<14} {'streamed' if stream else 'whole':<9} {status}: {count}")
    assert problems == [], f"{len(problems)} bad answers:\n" + "\n".join(problems[:20])
    assert sum(statuses.values()) >= FUZZ_BODIES
    for route in ROUTES:  # every route, streamed and not, answered and refused
        for kind, stream in (("valid", False), ("valid", True), ("invalid", False)):
            sent = sum(n for (r, k, streamed, _), n in statuses.items() if (r, k, streamed) == (route, kind, stream))
            assert sent >= FUZZ_BODIES // 100, (route, kind, stream, sent)
    assert http.get("/health").status_code == 200


# ----------------------------------------------------------------- overload


@pytest.mark.slow
def test_overload_answers_503_with_retry_after_and_bounded_latency(http: httpx.Client) -> None:
    """12× the text model's capacity (2 in progress + 2 queued) at once."""
    capacity, factor = 4, 12
    body = chat(content="tell me a long story", max_tokens=CAP)

    def send(_: int) -> tuple[int, float, str | None]:
        start = time.perf_counter()
        response = http.post("/v1/chat/completions", json=body, timeout=60)
        return response.status_code, time.perf_counter() - start, response.headers.get("retry-after")

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(capacity * factor) as pool:
        results = list(pool.map(send, range(capacity * factor)))
    seconds = time.perf_counter() - started
    statuses = Counter(status for status, _, _ in results)
    admitted = [latency for status, latency, _ in results if status == 200]
    print(
        f"\noverload: {capacity * factor} requests at {factor}x capacity in {seconds:.1f} s: {dict(statuses)}; "
        f"admitted p99 {p99(admitted):.2f} s"
    )
    assert set(statuses) <= {200, 503}, statuses  # never a 500, never dropped
    assert statuses[503] > 0 and statuses[200] >= capacity
    assert all(retry is not None and int(retry) >= 1 for status, _, retry in results if status == 503)
    assert p99(admitted) < 30
    assert http.get("/health").status_code == 200
    assert http.post("/v1/chat/completions", json=chat()).status_code == 200


# ------------------------------------------------------------ out of memory


def _pid(http: httpx.Client, role: str) -> int:
    return http.get("/v1/placement").json()["models"][role]["replica"]["actual"]["pid"]


def test_oom_during_generation_is_503_and_replica_serves_next(http: httpx.Client) -> None:
    pid = _pid(http, TEXT)
    response = http.post("/v1/chat/completions", json=chat(content=f"{OOM_MARKER} hello"))
    error = assert_error(response, 503, "out of device memory", "retry")
    assert error["type"] == "overloaded_error" and response.headers["retry-after"] == "1"
    streamed = http.post("/v1/chat/completions", json=chat(content=f"{OOM_MARKER} again", stream=True))
    assert_error(streamed, 503, "out of device memory")
    assert http.post("/v1/chat/completions", json=chat()).status_code == 200
    assert _pid(http, TEXT) == pid  # the same replica: it stayed up


def test_oom_through_the_handle_client_is_overloaded_error(base_url: str) -> None:
    with pytest.raises(OverloadedError, match="out of device memory") as info:
        get_model(TEXT, app_name=APP).chat([{"role": "user", "content": f"{OOM_MARKER} hi"}], max_tokens=2)
    assert info.value.status == 503 and info.value.retry_after_s


# ------------------------------------------------------------------- access


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong-key"),
        pytest.param({"Authorization": f"Basic {KEY}"}, id="wrong-scheme"),
        pytest.param({"Authorization": f"Bearer {KEY}x"}, id="key-plus-one"),
    ],
)
def test_without_valid_key_every_route_but_health_is_401(base_url: str, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as anonymous:
        for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
            error = assert_error(anonymous.request(method, path, json=chat()), 401, "API key")
            assert error["type"] == "authentication_error"
        for path in ("/v1/models", "/v1/placement"):
            assert_error(anonymous.get(path), 401)
        assert anonymous.get("/health").status_code == 200


def test_valid_key_is_accepted_and_never_logged(client: openai.OpenAI, port: int) -> None:
    assert {m.id for m in client.models.list().data} == {TEXT, VISION, FUZZ}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0).models.list()
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaked == []


def test_the_repositorys_serve_configs_bind_loopback() -> None:
    """Both serve configs name 127.0.0.1 (test_demo reads back, from the OS, that the demo's proxy
    listens there and nowhere else)."""
    from deployments import demo

    root = Path(__file__).parents[1]
    for path in (root / "serve_config.yaml", demo.DEFAULT_CONFIG):
        assert yaml.safe_load(path.read_text())["http_options"]["host"] == "127.0.0.1", path


def test_trust_remote_code_refused_unless_set(tmp_path: Path, tiny_text_model_dir: Path) -> None:
    from plans import replica_plan

    from deployments.engine.loading import ModelLoadError, load_model
    from placement.config import ModelSpec

    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "rayfit_custom", "auto_map": {"AutoConfig": "custom_config.CustomConfig"}})
    )
    marker = tmp_path / "ran"
    (tmp_path / "custom_config.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'rayfit_custom'\n"
    )
    with pytest.raises(ModelLoadError, match="trust_remote_code: true"):
        # Any replica plan: the config is refused before the plan is used.
        load_model(ModelSpec(model=str(tmp_path)), replica_plan(ModelSpec(model=str(tiny_text_model_dir))))
    assert not marker.exists()  # the model's own code never ran
