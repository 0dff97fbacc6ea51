"""Bad input, overload, out-of-memory and access, against one running app
(real local Ray, real Serve, real HTTP over loopback, the tiny models).

The app requires an API key (the openai SDK sends it as `Authorization:
Bearer`), caps request bodies at 256 KiB, and gives the text model tight
limits so overload is reachable on 2 cores: 2 requests in progress, 2 queued,
max_tokens capped at 32. Faults are injected only through
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
from collections.abc import Iterator
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
from serve_support import local_serve, model_config, p99

from deployments.app import AppArgs, build_app
from deployments.client import get_model
from deployments.errors import BadRequestError, NotFoundError, OverloadedError
from deployments.images import MAX_IMAGE_PIXELS

APP = "reliability"
TEXT, VISION = "writer", "viewer"
KEY = "sk-test-0123456789"
MAX_BODY = 256 * 1024
CAP = 32
CONTEXT = 256  # tests/tiny_models.py: max_position_embeddings
SHORT = {"temperature": 0, "max_tokens": 4}


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with local_serve() as port:
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

_scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
_json = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "audio"]) | _scalar},
    optional={
        "text": st.text(max_size=30) | _scalar,
        "image_url": st.fixed_dictionaries({"url": st.sampled_from(["data:image/png;base64,AAAA", "x"]) | _scalar})
        | _scalar,
    },
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "wizard"]) | _scalar},
    optional={"content": st.text(max_size=40) | st.lists(_part, max_size=3) | _json, "name": _scalar},
)
_fields = {
    "max_tokens": st.integers(-3, CAP + 3) | _scalar,
    "temperature": st.floats(-1, 3, allow_nan=False) | _scalar,
    "top_p": st.floats(-0.5, 1.5, allow_nan=False) | _scalar,
    "n": st.integers(-1, 3) | _scalar,
    "stream": st.booleans() | _scalar,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=3), max_size=6) | _scalar,
    "seed": st.integers(-(2**70), 2**70) | _scalar,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | _json,
    "tools": _json,
}
_model = st.sampled_from([TEXT, VISION, "gpt-4", ""]) | _scalar
_chat = st.fixed_dictionaries(
    {"model": _model}, optional={"messages": st.lists(_message, max_size=3) | _json, **_fields}
)
_completion = st.fixed_dictionaries({"model": _model}, optional={"prompt": st.text(max_size=60) | _json, **_fields})
_malformed = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), _chat.map(json.dumps)),
    st.tuples(st.just("/v1/completions"), _completion.map(json.dumps)),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), st.binary(max_size=80)),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), _json.map(json.dumps)),
)
# Valid bodies with random sampling settings: these reach the model (1-3 tokens, so they stay quick).
_valid = st.fixed_dictionaries(
    {
        "model": st.sampled_from([TEXT, VISION]),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=40)}
            ),
            min_size=1,
            max_size=3,
        ),
        "max_tokens": st.integers(1, 3),
    },
    optional={
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True),
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=3), max_size=4),
        "seed": st.integers(-(2**63), 2**64 - 1),
        "stream": st.booleans(),
    },
)
# One body in ten is valid: the rest test validation, which must answer without generating.
_bodies = st.integers(0, 9).flatmap(
    lambda i: st.tuples(st.just("/v1/chat/completions"), _valid.map(json.dumps)) if i == 0 else _malformed
)
FUZZ_BODIES = 2000


@pytest.mark.slow
def test_fuzzed_bodies_never_5xx_or_hang(http: httpx.Client) -> None:
    statuses: Counter[int] = Counter()
    started = time.perf_counter()

    @settings(
        max_examples=FUZZ_BODIES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(_bodies)
    def send(case: tuple[str, str | bytes]) -> None:
        path, body = case
        # Hypothesis also draws string constants from the code under test, fault markers included:
        # a body that asks for an injected fault is not a fuzzed client's body.
        text = body if isinstance(body, str) else body.decode(errors="replace")
        assume(not any(marker in text for marker in (OOM_MARKER, BATCH_OOM_MARKER, WEDGE_MARKER)))
        # httpx's timeout fails the example: a hang is a failure, not a wait.
        response = http.post(path, content=body, headers={"content-type": "application/json"}, timeout=30)
        statuses[response.status_code] += 1
        assert response.status_code in {200, 400, 404, 413}, (path, body, response.status_code, response.text)
        if response.status_code != 200:
            assert response.json()["error"]["message"]

    send()
    seconds = time.perf_counter() - started
    print(f"\nfuzz: {sum(statuses.values())} bodies in {seconds:.1f} s: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= FUZZ_BODIES
    assert statuses[400] > FUZZ_BODIES // 2  # most are rejected at validation
    assert statuses[200] > FUZZ_BODIES // 40  # and valid ones, with random settings, are answered
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
    assert {m.id for m in client.models.list().data} == {TEXT, VISION}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0).models.list()
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaked == []


def test_http_binds_loopback_by_default() -> None:
    config = yaml.safe_load((Path(__file__).parents[1] / "serve_config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    from deployments import demo

    assert "127.0.0.1" in Path(demo.__file__).read_text()


def test_trust_remote_code_refused_unless_set(tmp_path: Path, tiny_text_model_dir: Path) -> None:
    from plans import replica_plan

    from deployments.loading import ModelLoadError, load_model
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
