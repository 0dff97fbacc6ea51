"""Logprobs over the served API, with the clients that ask for them, unchanged: the openai SDK
(chat `logprobs`/`top_logprobs`, streamed and not; completions `logprobs` + `echo`, also with
`max_tokens: 0`), lm-evaluation-harness's loglikelihood request as it sends it, and the handle
client. One local Ray serves the demo's SmolLM2-135M-Instruct (CPU) as `summarizer`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from ray import serve
from serve_support import model_config
from shared_cluster import shared_serve
from transformers import AutoTokenizer

from deployments.app import AppArgs, build_app
from deployments.client import ModelClient
from deployments.engine.loading import convert_gguf
from deployments.openai_api.logprobs import ChoiceLogprobs
from placement.demo_models import smollm2_gguf

pytestmark = [pytest.mark.slow, pytest.mark.shared_serve]
ROLE = "summarizer"
APP = "logprobs"
QUESTION = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("logprobs-api")
    config = model_config(
        directory / "model_configs.yaml",
        {ROLE: {"model": "demo:smollm2-135m-instruct", "context_length": 1024, "max_batch_size": 2}},
    )
    with shared_serve() as port:
        serve.run(build_app(AppArgs(model_config=str(config), gpus="none")), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer():
    directory, name = smollm2_gguf()
    return AutoTokenizer.from_pretrained(convert_gguf(Path(directory) / name)[0])


def _check_chat_entries(content, top: int) -> None:
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == top
        assert bytes(entry.bytes).decode() == entry.token
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1 + 1e-6
        # Greedy, no rules: the chosen token is the model's top-1.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_chat_logprobs_streamed_and_not(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=ROLE, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    choice = answer.choices[0]
    content = choice.logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert "".join(e.token for e in content) == choice.message.content
    _check_chat_entries(content, 5)

    chunks = list(
        client.chat.completions.create(
            model=ROLE, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert text == choice.message.content
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-3)
    # top_logprobs 0: the tokens' own logprobs, no alternatives; without logprobs: none at all.
    bare = client.chat.completions.create(model=ROLE, messages=QUESTION, max_tokens=4, logprobs=True, top_logprobs=0)
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    assert client.chat.completions.create(model=ROLE, messages=QUESTION, max_tokens=2).choices[0].logprobs is None


def test_completions_echo_scores_the_prompt(client: openai.OpenAI) -> None:
    scored = client.completions.create(model=ROLE, prompt=PROMPT, max_tokens=0, echo=True, logprobs=3)
    choice = scored.choices[0]
    logprobs = choice.logprobs
    assert choice.text == PROMPT and scored.usage.completion_tokens == 0
    assert "".join(logprobs.tokens) == PROMPT  # no BOS for this tokenizer: the prompt's tokens rejoin to it
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        assert choice.text[offset : offset + len(token)] == token
    for token, lp, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True):
        assert top[token] == pytest.approx(lp) and 3 <= len(top) <= 4  # 3 best, plus the token itself
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
    # With an answer: the prompt's logprobs first, the same as scored alone, then the answer's.
    with_answer = client.completions.create(
        model=ROLE, prompt=PROMPT, max_tokens=2, temperature=0, echo=True, logprobs=2, extra_body={"ignore_eos": True}
    )
    answer = with_answer.choices[0]
    assert answer.text.startswith(PROMPT) and len(answer.logprobs.tokens) == len(logprobs.tokens) + 2
    assert answer.logprobs.token_logprobs[: len(logprobs.tokens)] == pytest.approx(logprobs.token_logprobs, abs=1e-3)


def test_lm_eval_loglikelihood_request(base_url: str, tokenizer) -> None:
    """lm-evaluation-harness `local-completions`, loglikelihood: a batch of token-id prompts
    (context + continuation), max_tokens 1, logprobs 1, echo, temperature 0, seed 1234; it sums
    token_logprobs[ctxlen:-1] and calls the continuation greedy when each is its dict's maximum."""
    context = tokenizer("The capital of Italy is", add_special_tokens=False)["input_ids"]
    likely = tokenizer(" Rome", add_special_tokens=False)["input_ids"]
    unlikely = tokenizer(" banana soup", add_special_tokens=False)["input_ids"]
    body = {
        "model": ROLE,
        "prompt": [context + likely, context + unlikely],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    reply = httpx.post(f"{base_url}/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    choices = sorted(reply.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    results = []
    for choice, continuation in zip(choices, (likely, unlikely), strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(context) + len(continuation) + 1  # + the one generated
        ctxlen = len(context)
        tokens_logprobs = logprobs["token_logprobs"][ctxlen:-1]
        top_logprobs = logprobs["top_logprobs"][ctxlen:-1]
        is_greedy = all(lp == max(top.values()) for lp, top in zip(tokens_logprobs, top_logprobs, strict=True))
        results.append((sum(tokens_logprobs), is_greedy))
    (likely_sum, likely_greedy), (unlikely_sum, unlikely_greedy) = results
    assert likely_sum > unlikely_sum and not unlikely_greedy
    assert all(lp <= 0 for lp in (likely_sum, unlikely_sum))
    usage = reply.json()["usage"]
    assert usage["prompt_tokens"] == 2 * len(context) + len(likely) + len(unlikely)


def test_completions_stream_logprobs(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=ROLE,
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            logprobs=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert "".join(tokens) == text and len(tokens) == 6
    assert all(text[o : o + len(t)] == t for t, o in zip(tokens, offsets, strict=True))


def test_handle_client_logprobs(base_url: str) -> None:
    model = ModelClient(ROLE, serve.get_deployment_handle(ROLE, APP))
    reply = model.chat(QUESTION, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    assert isinstance(reply.choices[0].logprobs, ChoiceLogprobs)
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
    streamed = [
        e
        for chunk in model.stream(QUESTION, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in reply.choices[0].logprobs.content]


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("chat/completions", {"logprobs": "many"}, "logprobs"),
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"max_tokens": 0}, "max_tokens"),
        ("completions", {"echo": True, "stream": True}, "echo"),
        ("completions", {"prompt": []}, "prompt"),
        ("completions", {"prompt": [[1, 2], [99999999]], "echo": True, "max_tokens": 0}, None),
    ],
)
def test_bad_logprob_requests_are_400s_in_openai_shape(base_url: str, path: str, extra: dict, param: str) -> None:
    body = {"model": ROLE, **({"messages": QUESTION} if path.startswith("chat") else {"prompt": PROMPT}), **extra}
    reply = httpx.post(f"{base_url}/{path}", json=body, timeout=60)
    assert reply.status_code == 400, (extra, reply.text)
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param, error
