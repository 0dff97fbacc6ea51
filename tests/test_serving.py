"""The serving layer against a real local Ray, real Serve and real HTTP.

One Ray cluster per module, declaring 2 GPUs and their `gpu_slot_<i>`
resources on this CPU machine, exactly as `ray_start_args` would on a 2-GPU
box. Replicas pinned to a GPU that does not exist here load on CPU because the
module sets RAYFIT_ALLOW_CPU_FALLBACK=1 (the dev/test switch; the pin itself is
still checked).

The config makes the tiny text model "big" (`memory_gb: 15`) and the tiny
image+text model "small" (`memory_gb: 3`). The default size rules go by
parameter count (both are tiny), so the apps get a rules file that sends
models of 10 GiB or more to the last GPU (AppArgs.rules): on 2x24GB the
planner puts the big one alone on GPU 1 and the small one on GPU 0.

The main app's tests run first (file order); the placement tests at the end
replace it with apps of their own, one at a time (the GPU slots fit one app).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import ray
from pydantic import BaseModel
from ray import serve
from serve_support import SIZE_RULES as RULES
from shared_cluster import shared_serve

from deployments.app import AppArgs, build_app
from deployments.client import get_model
from deployments.model import ModelServer
from placement.placement_document import PlacementDocument, ReplicaMemory
from placement.plan import PlanError

APP = "rayfit-test"
BIG, SMALL = "buffer_agent", "summarizer"  # text model (15 GB declared), image+text model (3 GB)
# Greedy and short: deterministic, and fast on 2 cores.
GREEDY = {"temperature": 0, "max_tokens": 8}


def write_config(path: Path, text_dir: Path, vision_dir: Path, *, big_first: bool) -> Path:
    """model_configs.yaml in the user's format plus the test's overrides; order chosen by the caller."""
    # params_b too: the size rules (large models take the last GPU) go by parameter count.
    big = f"{BIG}:\n  provider: huggingface\n  model: {text_dir}\n  memory_gb: 15\n  params_b: 27\n  dtype: float32\n"
    small = (
        f"{SMALL}:\n  provider: huggingface\n  model: {vision_dir}\n  memory_gb: 3\n  params_b: 4\n  dtype: float32\n"
    )
    path.write_text(big + small if big_first else small + big)
    return path


def deploy(args: AppArgs, name: str) -> None:
    """Replace every running app with this one (the declared GPU slots hold one app)."""
    for existing in serve.status().applications:
        if existing != name:
            serve.delete(existing)
    serve.run(build_app(args), name=name, route_prefix=f"/{name}" if name != APP else "/")


def replica_placement(role: str, app: str) -> dict[str, Any]:
    return serve.get_deployment_handle(role, app).placement.remote().result(timeout_s=30)


# On the session's shared Ray (tests/shared_cluster.py): CPU, 2 declared GPUs with slots, the CPU fallback.
pytestmark = pytest.mark.shared_serve


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[int]:
    """A local Ray with 2 declared GPUs + slots, and Serve's HTTP on a free port."""
    # The replicas inherit the CPU fallback: their GPUs are declared, not real. A replica that refuses
    # its placement refuses every time.
    with shared_serve() as port:
        yield port


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory, tiny_text_model_dir: Path, tiny_vision_model_dir: Path):
    root = tmp_path_factory.mktemp("serving-configs")
    (root / "rules.yaml").write_text(RULES)
    return {
        "big_first": write_config(root / "big_first.yaml", tiny_text_model_dir, tiny_vision_model_dir, big_first=True),
        "small_first": write_config(
            root / "small_first.yaml", tiny_text_model_dir, tiny_vision_model_dir, big_first=False
        ),
        "text_dir": tiny_text_model_dir,
        "rules": root / "rules.yaml",
    }


@pytest.fixture(scope="module")
def base_url(ray_cluster: int, configs: dict[str, Path]) -> str:
    """The main app: big model first in the config, 2 declared 24 GB GPUs."""
    deploy(AppArgs(model_config=str(configs["small_first"]), rules=str(configs["rules"]), gpus="2x24GB"), APP)
    return f"http://127.0.0.1:{ray_cluster}"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def png_data_url(size: int = 32) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------- HTTP API


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=BIG, messages=[{"role": "user", "content": "hello there"}], **GREEDY)
    assert reply.object == "chat.completion"
    assert reply.model == BIG
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"  # the tiny model never emits <eos> (tests/tiny_models.py)
    assert reply.usage.completion_tokens == GREEDY["max_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_model_id_selects_the_same_role(client: openai.OpenAI, configs: dict[str, Path]) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    by_role = client.chat.completions.create(model=BIG, messages=messages, **GREEDY)
    by_id = client.chat.completions.create(model=str(configs["text_dir"]), messages=messages, **GREEDY)
    assert by_id.choices[0].message.content == by_role.choices[0].message.content


def test_streaming_matches_and_ends(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "tell me a story"}]
    whole = client.chat.completions.create(model=BIG, messages=messages, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=BIG, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == GREEDY["max_tokens"]


def test_raw_sse_ends_with_done(base_url: str) -> None:
    body = {"model": BIG, "messages": [{"role": "user", "content": "hi"}], "stream": True, **GREEDY}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    json.loads(lines[-2][len("data: ") :])  # every other line is one JSON chunk


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=BIG, prompt="once upon a time", **GREEDY)
    assert reply.object == "text_completion"
    assert reply.choices[0].text and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == GREEDY["max_tokens"]
    streamed = client.completions.create(model=BIG, prompt="once upon a time", stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_models_list(client: openai.OpenAI, configs: dict[str, Path]) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BIG, SMALL}
    assert models[BIG].model_extra["root"] == str(configs["text_dir"])
    assert models[SMALL].model_extra["multimodal"] is True
    assert models[BIG].model_extra["multimodal"] is False


def test_image_prompt_to_image_text_model(client: openai.OpenAI) -> None:
    content = [
        {"type": "text", "text": "what is in this picture?"},
        {"type": "image_url", "image_url": {"url": png_data_url()}},
    ]
    reply = client.chat.completions.create(model=SMALL, messages=[{"role": "user", "content": content}], **GREEDY)
    assert reply.choices[0].message.content
    text_only = client.chat.completions.create(
        model=SMALL, messages=[{"role": "user", "content": "what is in this picture?"}], **GREEDY
    )
    # The image's tokens are part of the prompt.
    assert reply.usage.prompt_tokens > text_only.usage.prompt_tokens


def test_image_to_text_only_model_is_400(client: openai.OpenAI) -> None:
    content = [{"type": "image_url", "image_url": {"url": png_data_url()}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=BIG, messages=[{"role": "user", "content": content}], **GREEDY)
    assert "text-only" in info.value.body["message"]


def test_invalid_streaming_request_is_400_not_a_broken_stream(client: openai.OpenAI) -> None:
    content = [{"type": "image_url", "image_url": {"url": png_data_url()}}]
    with pytest.raises(openai.BadRequestError, match="text-only"):
        client.chat.completions.create(
            model=BIG, messages=[{"role": "user", "content": content}], stream=True, **GREEDY
        )


def test_unknown_model_is_404_naming_models(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    message = info.value.body["message"]
    assert "gpt-4" in message and BIG in message and SMALL in message
    assert info.value.body["type"] == "not_found_error"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"model": BIG}, id="no-messages"),
        pytest.param({"model": BIG, "messages": [{"role": "user", "content": "hi"}], "n": 0}, id="n=0"),
        pytest.param(
            {"model": BIG, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, id="unsupported-field"
        ),
        pytest.param({"model": BIG, "messages": [{"role": "wizard", "content": "hi"}]}, id="bad-role"),
        pytest.param("{not json", id="not-json"),
    ],
)
def test_malformed_body_is_400_in_openai_shape(base_url: str, body: Any) -> None:
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    )
    response = httpx.post(f"{base_url}/v1/chat/completions", timeout=30, **kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == 400 and error["message"]


def test_concurrent_requests_all_answered(client: openai.OpenAI) -> None:
    """Several requests at once are batched by the engine; each gets its own answer."""
    prompts = ["alpha", "beta beta", "gamma gamma gamma", "delta"]

    def ask(prompt: str) -> str:
        reply = client.chat.completions.create(model=BIG, messages=[{"role": "user", "content": prompt}], **GREEDY)
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    alone = [ask(p) for p in prompts]
    assert together == alone  # left padding: a batched row decodes as if alone


def test_client_disconnect_mid_stream_leaves_server_healthy(base_url: str, client: openai.OpenAI) -> None:
    body = {"model": BIG, "messages": [{"role": "user", "content": "a long one"}], "stream": True, "max_tokens": 200}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        next(response.iter_lines())  # first chunk, then hang up
    reply = client.chat.completions.create(model=BIG, messages=[{"role": "user", "content": "still there?"}], **GREEDY)
    assert reply.choices[0].message.content


def test_health(base_url: str) -> None:
    response = httpx.get(f"{base_url}/health", timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def _unmodelled(part: Any, where: str = "") -> list[str]:
    """Where the served document has keys PlacementDocument does not name (the CUDA figures per local GPU aside,
    which the memory report keeps as extra keys by design)."""
    if isinstance(part, list):
        return [key for i, item in enumerate(part) for key in _unmodelled(item, f"{where}.{i}")]
    if isinstance(part, dict):
        return [key for name, item in part.items() for key in _unmodelled(item, f"{where}.{name}")]
    if not isinstance(part, BaseModel):
        return []
    extra = [f"{where}.{key}" for key in part.model_extra or {}]
    if isinstance(part, ReplicaMemory):
        extra = [key for key in extra if not re.search(r"\.cuda:\d+_\w+_bytes$", key)]
    fields = ((name, getattr(part, name)) for name in type(part).model_fields)
    return extra + [key for name, value in fields for key in _unmodelled(value, f"{where}.{name}")]


def _placement_models(base_url: str) -> dict[str, Any]:
    """/v1/placement's models, with what holds on any machine checked: the document's schema, the plan and the pin."""
    document = httpx.get(f"{base_url}/v1/placement", timeout=30).json()
    parsed = PlacementDocument.model_validate(document)
    assert parsed.to_json() == document  # the model keeps every key the app sends
    assert _unmodelled(parsed) == []  # and names each of them
    models = document["models"]
    assert set(models) == {BIG, SMALL}
    for role, gpu in ((BIG, "1"), (SMALL, "0")):
        plan, actual = models[role]["plan"], models[role]["replica"]["actual"]
        assert plan["device"] == f"cuda:{gpu}"
        assert actual["cuda_visible_devices"] == gpu
        assert actual["node_id"] and actual["load_seconds"] > 0
        # memory_gb overrides do not itemize KV: the plan says so, the engine still reports its KV.
        assert plan["kv_cache_bytes"] is None and actual["memory"]["kv_built_bytes"] > 0
    assert models[BIG]["plan"]["fraction"] > models[SMALL]["plan"]["fraction"]
    return models


@pytest.mark.cpu_only
def test_placement_endpoint_shows_plan_and_replica(base_url: str) -> None:
    for role in (BIG, SMALL):
        actual = _placement_models(base_url)[role]["replica"]["actual"]
        assert actual["cpu_fallback"] is True and actual["device"] == "cpu"  # no CUDA on this machine
        assert actual["memory"]["rss_bytes"] > 0
        assert actual["memory_cap_bytes"] == {}  # CPU: report only


@pytest.mark.gpu
def test_placement_endpoint_on_a_gpu_machine(base_url: str) -> None:
    """The GPU twin: a replica pinned to a GPU this machine has loads there (its local cuda:0), capped at
    its plan's budget; one pinned to a GPU the machine lacks (GPU 1 on a one-GPU box) falls back to CPU."""
    import torch

    host_gpus = torch.cuda.device_count()  # this process's view: Ray's workers get the same host GPUs
    models = _placement_models(base_url)
    for role, gpu in ((BIG, 1), (SMALL, 0)):
        plan, actual = models[role]["plan"], models[role]["replica"]["actual"]
        if gpu < host_gpus:
            assert actual["cpu_fallback"] is False and actual["device"] == "cuda:0", actual
            assert len(actual["gpu_uuids"]) == 1
            # The allocator is capped at the replica plan's budget for the card, within the entry's budget.
            (cap,) = actual["memory_cap_bytes"].values()
            assert list(actual["memory_cap_bytes"]) == ["0"] and 0 < cap <= plan["memory_budget_bytes"]
            assert 0 < int(actual["memory"]["cuda:0_allocated_bytes"]) <= cap, actual["memory"]
        else:
            assert actual["cpu_fallback"] is True and actual["device"] == "cpu", actual
            assert actual["memory_cap_bytes"] == {}


def test_report_cli_reads_the_served_document(base_url: str) -> None:
    """`placement report` parses the app's /v1/placement with the same model and finds both roles in place
    (on a machine without the second GPU, a CPU fallback is a warning, not an error)."""
    done = subprocess.run(
        [sys.executable, "-m", "placement", "report", "--url", base_url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    rows = {row["role"]: row for row in report["models"]}
    assert {role: (row["status"], row["planned_device"]) for role, row in rows.items()} == {
        BIG: ("ok", "cuda:1"),
        SMALL: ("ok", "cuda:0"),
    }
    assert all(row["actual_bytes"] and row["actual_node"] for row in rows.values()), rows
    assert all((f["kind"], f["severity"]) == ("fallback", "warning") for f in report["findings"]), report["findings"]
    assert [gpu["index"] for gpu in report["gpus"]] == [0, 1]
    running = sorted(rep["role"] for rep in report["replicas"] if rep["state"] == "RUNNING")
    assert running == [BIG, SMALL]


# ---------------------------------------------------------- handle client


def test_handle_client_chat_and_stream(base_url: str) -> None:
    model = get_model(BIG, app_name=APP)
    messages = [{"role": "user", "content": "hello there"}]
    reply = model.chat(messages, **GREEDY)
    assert reply.choices[0].message.content and reply.usage.completion_tokens == GREEDY["max_tokens"]
    chunks = list(model.stream(messages, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # Same HTTP answer: one conversion path for both.
    http = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused").chat.completions.create(
        model=BIG, messages=messages, **GREEDY
    )
    assert http.choices[0].message.content == reply.choices[0].message.content


# ---------------------------------------------------- placement via the app


def _devices(app: str) -> dict[str, str | None]:
    return {role: replica_placement(role, app)["actual"]["cuda_visible_devices"] for role in (BIG, SMALL)}


@pytest.mark.cpu_only(
    reason="plans from the running Ray's 2 declared GPUs: on a GPU machine its probe measures the real ones "
    "(a one-GPU box refuses 2 declared); the pins are tested on any machine by the next two tests"
)
def test_big_model_gets_gpu1_whatever_the_config_order(ray_cluster: int, configs: dict[str, Path]) -> None:
    """Big first in the config, GPUs read from the running Ray (declared, sized by gpu_memory_gb)."""
    deploy(
        AppArgs(model_config=str(configs["big_first"]), rules=str(configs["rules"]), gpu_memory_gb=24),
        "order-big-first",
    )
    assert _devices("order-big-first") == {BIG: "1", SMALL: "0"}


def test_one_gpu_both_share_gpu0(ray_cluster: int, configs: dict[str, Path]) -> None:
    deploy(AppArgs(model_config=str(configs["big_first"]), rules=str(configs["rules"]), gpus="1x24GB"), "one-gpu")
    reports = {role: replica_placement(role, "one-gpu") for role in (BIG, SMALL)}
    assert {role: r["actual"]["cuda_visible_devices"] for role, r in reports.items()} == {BIG: "0", SMALL: "0"}
    fractions = [r["planned"]["fraction"] for r in reports.values()]
    assert all(0 < f < 1 for f in fractions) and sum(fractions) <= 1


def test_no_gpu_both_on_cpu(ray_cluster: int, configs: dict[str, Path]) -> None:
    deploy(AppArgs(model_config=str(configs["small_first"]), rules=str(configs["rules"]), gpus="none"), "no-gpu")
    for role in (BIG, SMALL):
        report = replica_placement(role, "no-gpu")
        assert report["planned"]["device"] == "cpu"
        assert report["actual"]["cuda_visible_devices"] == ""
        assert report["actual"]["device"] == "cpu" and report["actual"]["cpu_fallback"] is False


def test_infeasible_plan_fails_before_anything_starts(
    ray_cluster: int, tmp_path: Path, configs: dict[str, Path]
) -> None:
    path = tmp_path / "too_big.yaml"
    path.write_text(f"{BIG}:\n  model: {configs['text_dir']}\n  memory_gb: 30\n")
    apps_before = {name: app.status for name, app in serve.status().applications.items()}
    actors_before = {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}
    with pytest.raises(PlanError, match=rf"(?s){BIG} needs 30\.00 GiB.*fits no single GPU.*Nothing was started"):
        build_app(AppArgs(model_config=str(path), gpus="2x24GB"))
    # Nothing reached Serve: the apps running before (the previous test's) are the same, in the same
    # state, and no replica or other named actor was created.
    assert apps_before, "the previous test's app should still be running"
    assert {name: app.status for name, app in serve.status().applications.items()} == apps_before
    assert {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)} == actors_before


def test_replaced_ray_actor_options_are_refused(ray_cluster: int, configs: dict[str, Path]) -> None:
    """What a serve YAML's `ray_actor_options` does (replace, no merge): the pin is gone → the replica refuses."""
    from deployments.app import plan_app

    specs, _, _, plan = plan_app(
        AppArgs(model_config=str(configs["big_first"]), rules=str(configs["rules"]), gpus="2x24GB")
    )
    entry = plan.entry(BIG)
    assert entry.gpu_indices == (1,)
    app = ModelServer.options(name=BIG, ray_actor_options={"num_cpus": 0.1}).bind(BIG, specs[BIG].model_dump(), entry)
    for existing in serve.status().applications:
        serve.delete(existing)
    with pytest.raises(RuntimeError, match="Deploying application overridden failed"):
        serve.run(app, name="overridden", route_prefix=None)
    status = serve.status().applications["overridden"].deployments[BIG]
    assert "CUDA_VISIBLE_DEVICES=''" in status.message and "ray_actor_options" in status.message
    serve.delete("overridden")


def test_replicas_share_the_planned_gpu_each_holding_its_slot(ray_cluster: int, configs: dict[str, Path]) -> None:
    config = configs["rules"].parent / "replicas.yaml"
    config.write_text(f"{SMALL}:\n  model: {configs['text_dir']}\n  memory_gb: 3\n  replicas: 2\n  dtype: float32\n")
    deploy(AppArgs(model_config=str(config), gpus="1x24GB"), "replicas")
    status = serve.status().applications["replicas"].deployments[SMALL]
    assert status.replica_states.get("RUNNING") == 2
    fraction = replica_placement(SMALL, "replicas")["planned"]["fraction"]
    # Each replica holds its own share of GPU 0's slot (the other slot is untouched).
    assert ray.available_resources()["gpu_slot_0"] == pytest.approx(1 - 2 * fraction, abs=1e-4)
    assert ray.available_resources()["gpu_slot_1"] == pytest.approx(1)
