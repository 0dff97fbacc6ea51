"""The ingress under models that are not there yet, under overload, and under bad requests
(real local Ray, real Serve, real HTTP over loopback, the tiny text model).

On the session's shared Ray (tests/shared_cluster.py: 2 declared GPUs, each with
its `gpu_slot_<i>`). For this module an actor holds all of `gpu_slot_1`, as a
model already there would. The main app plans `stuck` (15 GB declared) on GPU 1:
its replica asks for part of `gpu_slot_1`, which stays taken, so Serve keeps it
pending (deployment UPDATING, no replica RUNNING), as a model still loading, or
one whose node left, looks from the ingress. `ready` (the same tiny model, 1 GB) runs on GPU 0 (on CPU: the
CPU fallback switch, as in test_serving.py). The app gives up on a role with no
running replica after `UNAVAILABLE_S`.

A second app (`/tight`) has an ingress bound of 1 request in progress and 1
waiting, to show what lies past it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve
from serve_support import SIZE_RULES as RULES
from serve_support import model_config, wait_until
from shared_cluster import delete_every_app, shared_serve

from deployments.app import AppArgs, build_app
from deployments.client import get_model
from deployments.engine.errors import BadRequestError, OverloadedError
from deployments.status_watch import REFRESH_S, StatusWatch, read_states, wait_for_role
from placement.ray_options import gpu_slot_resource

pytestmark = [pytest.mark.slow, pytest.mark.shared_serve]

APP, TIGHT = "status", "tight"
STUCK, READY = "stuck", "ready"
UNAVAILABLE_S = 3.0
CONTEXT = 256  # tests/tiny_models.py: max_position_embeddings
SHORT = {"temperature": 0, "max_tokens": 4}
LONG = {"temperature": 0, "max_tokens": 200}
# Any answer slower than this is a hang: the test fails.
CLIENT_TIMEOUT_S = 60
WAITERS = 48
# Nothing here tests draining: replicas stop within seconds when the module ends (the defaults wait up to 120 s).
QUICK_STOP = {"graceful_shutdown_timeout_s": 2, "ingress_graceful_shutdown_timeout_s": 2}


@ray.remote(num_cpus=0)
class SlotHolder:
    """Holds the resources it was created with, as a replica already on that GPU would."""

    def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with shared_serve() as port:
        holder = SlotHolder.options(resources={gpu_slot_resource(1): 1.0}).remote()
        assert ray.get(holder.ready.remote(), timeout=60)
        try:
            yield port
        finally:
            delete_every_app()  # `stuck` first, so it cannot start on the slot freed next
            ray.kill(holder)


@pytest.fixture(scope="module")
def base_url(port: int, tmp_path_factory: pytest.TempPathFactory, tiny_text_model_dir: Path) -> str:
    root = tmp_path_factory.mktemp("ingress-status")
    (root / "rules.yaml").write_text(RULES)
    common = {"model": tiny_text_model_dir, "dtype": "float32"}
    path = model_config(
        root / "models.yaml",
        {STUCK: {**common, "memory_gb": 15}, READY: {**common, "memory_gb": 1, "max_tokens_cap": 256}},
    )
    args = AppArgs(
        model_config=str(path), rules=str(root / "rules.yaml"), gpus="2x24GB", unavailable_timeout_s=3, **QUICK_STOP
    )
    serve._run(build_app(args), name=APP, route_prefix="/", _blocking=False)  # `stuck` never gets healthy

    def ready_serves() -> bool:
        deployments = serve.status().applications[APP].deployments
        return all(deployments[name].status == "HEALTHY" for name in ("Ingress", READY))

    wait_until(ready_serves, 120, "the ingress and `ready` HEALTHY")
    assert serve.status().applications[APP].deployments[STUCK].status == "UPDATING"
    tight = model_config(root / "tight.yaml", {READY: {**common, "memory_gb": 1, "max_tokens_cap": 256}})
    tight_args = AppArgs(
        model_config=str(tight),
        gpus="none",
        ingress_max_ongoing_requests=1,
        ingress_max_queued_requests=1,
        **QUICK_STOP,
    )
    serve.run(build_app(tight_args), name=TIGHT, route_prefix=f"/{TIGHT}")
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=CLIENT_TIMEOUT_S) as client:
        yield client


def chat(role: str, text: str = "hello", **params: Any) -> dict[str, Any]:
    return {"model": role, "messages": [{"role": "user", "content": text}], **(params or SHORT)}


def assert_openai_503(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 503
    return error


# ------------------------------------------------------- a role with no replica


def test_models_lists_every_role_with_its_state_without_waiting(http: httpx.Client) -> None:
    start = time.perf_counter()
    models = {m["id"]: m for m in http.get("/v1/models", timeout=10).json()["data"]}
    took = time.perf_counter() - start
    print(f"\n/v1/models with a role still loading: {took:.2f} s")
    assert took < 5
    assert models[STUCK]["status"] == "loading" and models[STUCK]["object"] == "model"
    assert models[STUCK]["max_model_len"] is None
    assert models[READY]["status"] == "ready" and models[READY]["max_model_len"] == CONTEXT
    health = http.get("/health", timeout=10).json()
    assert health["status"] == "degraded" and health["unavailable"][STUCK].startswith("UPDATING")


def test_requests_for_a_role_with_no_replica_get_503_within_the_deadline(http: httpx.Client) -> None:
    def ask(body: dict[str, Any]) -> tuple[httpx.Response, float]:
        start = time.perf_counter()
        response = http.post("/v1/chat/completions", json=body)
        return response, time.perf_counter() - start

    bodies = [chat(STUCK, f"hi {i}") for i in range(12)] + [chat(STUCK, "s", stream=True, **SHORT)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(ask, bodies))
    seconds = sorted(took for _, took in answers)
    print(f"\nno replica: {len(answers)} requests answered 503 in {seconds[0]:.1f}-{seconds[-1]:.1f} s")
    for response, took in answers:
        error = assert_openai_503(response)
        assert "loading" in error["message"] and STUCK in error["message"]
        assert UNAVAILABLE_S <= took < UNAVAILABLE_S + 5
    assert http.post("/v1/chat/completions", json=chat(READY)).status_code == 200  # the other role serves


def test_waiting_requests_share_one_status_reader() -> None:
    """Calls waiting on `stuck` read the cache; the controller is asked once per REFRESH_S, not per call.
    (48 calls: past its max_queued_requests, 64, the handle itself refuses them.)"""
    reads = 0

    def read() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return read_states(APP)

    async def run() -> tuple[list[BaseException | None], float]:
        watch = StatusWatch(read)
        handle = serve.get_deployment_handle(STUCK, APP)

        async def one(i: int) -> BaseException | None:
            try:
                await wait_for_role(watch, STUCK, handle.info.remote(), UNAVAILABLE_S)
            except Exception as exc:
                return exc
            return None

        start = time.perf_counter()
        outcomes = await asyncio.gather(*(one(i) for i in range(WAITERS)))
        return outcomes, time.perf_counter() - start

    outcomes, seconds = asyncio.run(run())
    print(f"\n{WAITERS} waiting calls for {seconds:.1f} s: {reads} status reads")
    assert all(isinstance(o, OverloadedError) and o.retry_after_s for o in outcomes)
    assert reads <= seconds / REFRESH_S + 2


# ------------------------------------------------------------------ overload


def test_past_the_ingress_bound_every_503_is_json_with_retry_after(http: httpx.Client) -> None:
    """Bound 1 + 1. A running stream holds the one turn, so of two more requests one waits and one is
    turned away; of a burst of 8, all but one running and one waiting are turned away, each by the
    ingress in OpenAI's shape (Serve's proxy answers plain text past its own queue)."""
    url = f"/{TIGHT}/v1/chat/completions"

    def burst(n: int) -> list[httpx.Response]:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda i: http.post(url, json=chat(READY, f"q {i}", **LONG)), range(n)))

    with http.stream("POST", url, json=chat(READY, "a long story", stream=True, **LONG)) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept: a dropped iterator closes the connection (a client hanging up)
        next(lines)  # the stream has started its 200 tokens and holds the turn
        beside_stream = burst(2)
    assert sorted(a.status_code for a in beside_stream) == [200, 503]
    answers = burst(8)
    statuses = sorted(a.status_code for a in answers)
    print(f"\nbound 1+1: beside a stream [200, 503]; 8 at once {statuses}")
    assert statuses.count(503) >= 4 and set(statuses) <= {200, 503}
    for answer in beside_stream + answers:
        if answer.status_code == 503:
            assert "at capacity" in assert_openai_503(answer)["message"]
    # Every turn came back (the stream's too): the bound admits again.
    for _ in range(3):
        assert http.post(url, json=chat(READY)).status_code == 200


# ---------------------------------------------------------------- log lines


def _serve_logs() -> dict[Path, int]:
    """Each Serve log file of this Ray session, with its size now."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return {path: path.stat().st_size for path in logs.glob("*.log")}


def _written_since(sizes: dict[Path, int]) -> str:
    """What the Serve components logged since `sizes` was taken (all files, new ones too)."""
    text = []
    for path in _serve_logs():
        with open(path, "rb") as f:
            f.seek(sizes.get(path, 0))
            text.append(f.read().decode(errors="replace"))
    return "".join(text)


def _logged_since(sizes: dict[Path, int], check: Any, what: str) -> str:
    """What was logged since `sizes`, once `check(text)` holds (the log files are polled, bounded)."""
    wait_until(lambda: check(_written_since(sizes)), 30, what)
    return _written_since(sizes)


def _context_warnings(written: str) -> list[str]:
    return [line for line in written.splitlines() if line.startswith("WARNING") and "context length" in line]


def test_a_bad_request_is_one_warning_line_without_traceback(http: httpx.Client) -> None:
    before = _serve_logs()
    over = {"model": READY, "prompt": "word " * (CONTEXT + 50), **SHORT}
    assert http.post("/v1/completions", json=over).status_code == 400
    assert http.post("/v1/completions", json={**over, "stream": True}).status_code == 400
    client = get_model(READY, APP)  # the handle client: the same request, the same typed error
    messages = [{"role": "user", "content": over["prompt"]}]
    for call in (client.chat, lambda m, **p: list(client.stream(m, **p))):
        with pytest.raises(BadRequestError, match="context length"):
            call(messages, **SHORT)
    written = _logged_since(before, lambda text: len(_context_warnings(text)) >= 4, "4 WARNING lines logged")
    assert "Traceback" not in written, written
    assert not [line for line in written.splitlines() if line.startswith("ERROR")], written
    assert len(_context_warnings(written)) == 4, written  # one line per bad request


def test_an_unexpected_error_keeps_its_traceback() -> None:
    before = _serve_logs()
    # A call the replica cannot make sense of: Ray raises the replica's own error (a RayTaskError that is
    # also an AttributeError), and Serve logs it with its traceback.
    with pytest.raises(AttributeError, match="'dict' object has no attribute 'params'"):
        serve.get_deployment_handle(READY, APP).generate.remote({"not": "a GenerationInput"}).result(timeout_s=30)
    logged = _logged_since(before, lambda text: "Request failed." in text and "Traceback" in text, "the traceback")
    assert "AttributeError: 'dict' object has no attribute 'params'" in logged, logged
