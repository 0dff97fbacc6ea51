"""A caller that goes away stops its generation, and a failure inside the batching
loop is recovered (real local Ray, real Serve, real HTTP).

One role on the tiny text model with ONE pool slot (`max_batch_size: 1`), so a
second request queues behind the first. After each disconnect the replica's
own report (`ModelServer.load`) must show no slot held and no live request,
and the request counted as `cancelled` — not merely that the next request works.

Every test runs twice: with the engine inside the replica, and in a process of
its own (`engine_process: true`, the default; deployments.engine.process), where each
cancel, error and report crosses a process boundary.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fault_injection import BATCH_OOM_MARKER
from ray import serve
from serve_support import ThreadGroup, model_config, wait_until
from shared_cluster import shared_serve

from deployments.app import AppArgs, build_app
from deployments.client import get_model
from deployments.engine.generation import GenerationInput, SamplingParams
from deployments.ingress import relay_stream

APP, ROLE = "cancel", "scribe"
# Long enough that a cancelled request would still be decoding when the check runs (the tiny
# model's RoPE runs past its 256 configured positions, so the role is given a longer context).
LONG = {"temperature": 0, "max_tokens": 3000}
# A stream the client leaves must end by the cancel, never by running out: 8000 tokens take the tiny
# model over 15 s, far longer than a cancel's path (proxy, ingress, replica) even on busy cores.
ENDLESS = {"temperature": 0, "max_tokens": 8000}


# On the session's shared Ray (tests/shared_cluster.py): CPU, 2 declared GPUs with slots, the CPU fallback.
pytestmark = pytest.mark.shared_serve


@pytest.fixture(scope="module", params=[False, True], ids=["engine in the replica", "engine process"])
def base_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_text_model_dir: Path
) -> Iterator[str]:
    fields = {"model": tiny_text_model_dir, "dtype": "float32", "max_batch_size": 1, "num_cpus": 0.2}
    fields |= {"context_length": 8192, "max_tokens_cap": 8192, "engine_process": request.param}
    path = model_config(tmp_path_factory.mktemp("cancel") / "models.yaml", {ROLE: fields})
    with shared_serve() as port:
        serve.run(build_app(AppArgs(model_config=str(path), gpus="none")), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
        serve.delete(APP)


def load() -> dict[str, Any]:
    return serve.get_deployment_handle(ROLE, APP).load.remote().result(timeout_s=30)


# What the replica's load report counts while a request holds anything.
IN_USE = ("pool_slots_in_use", "side_slots_in_use", "pool_requests_live")


def idle() -> bool:
    state = load()
    return not any(state[key] for key in IN_USE)


def wait_dropped(before: dict[str, Any], what: str) -> None:
    """Until the replica holds nothing AND has counted one more cancel: the slot is freed just before
    the outcome is counted, so idleness alone can be seen a moment too early."""
    cancelled = before["outcomes"].get("cancelled", 0)

    def dropped() -> bool:
        state = load()
        busy = {key: state[key] for key in IN_USE}
        # Raised, not returned: on timeout wait_until names the last check's error, so the state shows.
        assert not any(busy.values()) and state["outcomes"].get("cancelled", 0) > cancelled, (
            f"in use {busy}, outcomes {state['outcomes']} (cancelled before: {cancelled})"
        )
        return True

    wait_until(dropped, 60, what, retry_on=AssertionError)


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": ROLE, "prompt": "once upon a time", **LONG, **extra}


def full_request_seconds(base_url: str) -> float:
    started = time.monotonic()
    reply = httpx.post(f"{base_url}/v1/completions", json=_body(), timeout=120)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
    return time.monotonic() - started


@pytest.mark.slow
def test_non_streaming_disconnect_stops_decoding(base_url: str) -> None:
    full_s = full_request_seconds(base_url)
    before = load()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=_body(), timeout=full_s / 5)
    gone = time.monotonic()
    wait_dropped(before, "the replica drops the abandoned request")
    freed_s = time.monotonic() - gone
    after = load()
    assert after["outcomes"].get("cancelled", 0) == before["outcomes"].get("cancelled", 0) + 1
    assert after["outcomes"].get("ok", 0) == before["outcomes"].get("ok", 0)  # it never ran to the end
    print(f"\nfull request {full_s:.2f} s; slot free {freed_s:.2f} s after the client left")
    assert freed_s < full_s / 2


def test_streaming_disconnect_while_queued_never_starts(base_url: str, threads: ThreadGroup) -> None:
    before = load()
    threads.name = "holder"
    threads.start(full_request_seconds, base_url)  # its own assertions (a 200, every token) fail the test too
    wait_until(lambda: load()["pool_slots_in_use"] == 1, 30, "the first request holds the only slot")
    # The second request streams, but waits for the slot (the ingress answers once the first delta
    # exists, so no header comes yet); its client leaves before it gets one.
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", f"{base_url}/v1/completions", json=_body(stream=True), timeout=1.0):
            pass
    wait_until(lambda: load()["outcomes"].get("cancelled", 0) > before["outcomes"].get("cancelled", 0), 10, "cancel")
    assert load()["pool_slots_in_use"] == 1  # the holder still decodes: the abandoned request gave up waiting
    threads.join(180)
    wait_until(idle, 30, "nothing left behind")
    after = load()
    # Only the holder (and any health probe meanwhile) reached the engine; the abandoned request never did.
    probes = after["health_probes"] - before["health_probes"]
    assert after["pool_requests_submitted"] == before["pool_requests_submitted"] + 1 + probes
    assert after["outcomes"].get("cancelled", 0) == before["outcomes"].get("cancelled", 0) + 1


def test_streaming_disconnect_mid_stream(base_url: str) -> None:
    before = load()
    body = _body(stream=True, **ENDLESS)
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    wait_dropped(before, "the replica drops the abandoned stream")
    after = load()
    assert after["outcomes"].get("cancelled", 0) == before["outcomes"].get("cancelled", 0) + 1
    assert after["outcomes"].get("ok", 0) == before["outcomes"].get("ok", 0)


@pytest.mark.parametrize("how", ["closed at a yield", "cancelled while it waits"])
def test_the_ingress_relay_cancels_the_replicas_stream_when_stopped(base_url: str, how: str) -> None:
    """The ingress's relay (deployments.ingress.relay_stream) over a real replica stream, stopped the two
    ways Starlette stops it when the client leaves. Nothing cancels the replica's stream but the relay:
    like an ASGI call that ended normally, this driver's call has no parent request for Serve to cancel."""
    before = load()
    request = GenerationInput(params=SamplingParams(temperature=0.0, max_tokens=ENDLESS["max_tokens"]), prompt="once")

    async def stop_the_relay() -> None:
        deltas = serve.get_deployment_handle(ROLE, APP).options(stream=True).stream.remote(request)
        relay = relay_stream(await deltas.__anext__(), deltas, render=repr, role=ROLE)
        if how == "closed at a yield":
            assert await relay.__anext__()  # the first event is out: the relay waits at its yield
            await relay.aclose()
            return
        received = asyncio.Event()

        async def send_all() -> None:
            async for _ in relay:
                received.set()  # each event returns here at once: otherwise the task waits for a delta

        sending = asyncio.create_task(send_all())
        await asyncio.wait_for(received.wait(), 30)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending

    asyncio.run(stop_the_relay())
    wait_dropped(before, f"the replica drops the stream whose relay was {how}")
    after = load()
    assert after["outcomes"].get("ok", 0) == before["outcomes"].get("ok", 0)


def test_handle_client_breaking_out_of_a_stream(base_url: str) -> None:
    before = load()
    model = get_model(ROLE, APP)
    for chunk in model.stream([{"role": "user", "content": "tell me a story"}], **ENDLESS):
        if chunk.choices and chunk.choices[0].delta.content:
            break
    wait_dropped(before, "the replica drops the stream the caller left")
    after = load()
    assert after["outcomes"].get("cancelled", 0) == before["outcomes"].get("cancelled", 0) + 1
    assert after["outcomes"].get("ok", 0) == before["outcomes"].get("ok", 0)


def test_a_failed_choice_cancels_the_requests_other_choices(base_url: str) -> None:
    """Two prompts in one request: the second is over the context (a 400 from the replica), so the
    first's long generation must be withdrawn with it, not decoded to the end for nobody."""
    before = load()
    body = _body(prompt=["once upon a time", "word " * 9000])
    reply = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 400 and "context" in reply.json()["error"]["message"], reply.text
    wait_dropped(before, "the replica drops the request's other choice")
    after = load()
    assert after["outcomes"].get("invalid", 0) == before["outcomes"].get("invalid", 0) + 1
    assert after["outcomes"].get("cancelled", 0) == before["outcomes"].get("cancelled", 0) + 1
    assert after["outcomes"].get("ok", 0) == before["outcomes"].get("ok", 0)


def test_a_failure_inside_the_batching_loop_is_a_503_and_the_replica_recovers(base_url: str) -> None:
    before = load()
    body = {"model": ROLE, "prompt": f"once {BATCH_OOM_MARKER}", "temperature": 0, "max_tokens": 8}
    failed = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert failed.status_code == 503 and "Retry-After" in failed.headers, failed.text
    assert failed.json()["error"]["message"]
    ok = httpx.post(f"{base_url}/v1/completions", json={**body, "prompt": "once"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
    after = load()
    assert after["batcher_restarts"] == before["batcher_restarts"] + 1
    assert idle()


def test_the_memory_reported_is_the_model_holding_process(base_url: str, request: pytest.FixtureRequest) -> None:
    """The replica's memory report is read in the process that holds the weights and the KV
    cache: the replica itself, or its engine process."""
    actual = serve.get_deployment_handle(ROLE, APP).placement.remote().result(timeout_s=30)["actual"]
    holder = psutil.Process(actual["engine_pid"])
    memory = actual["memory"]
    assert abs(memory["rss_bytes"] - holder.memory_info().rss) < 0.2 * holder.memory_info().rss
    assert 0 < memory["kv_pool_bytes"] <= memory["kv_built_bytes"]
    engine_process = request.node.callspec.params["base_url"]
    assert (actual["engine_pid"] != actual["pid"]) == engine_process
    # Only the model-holding process loads torch: a replica whose engine runs apart maps no libtorch,
    # so on a GPU it cannot open a CUDA context (memory the plan does not budget) next to its child.
    assert _maps_libtorch(actual["engine_pid"])
    assert _maps_libtorch(actual["pid"]) != engine_process
    assert actual["torch_threads"] >= 1


def _maps_libtorch(pid: int) -> bool:
    return any("libtorch" in Path(m.path).name for m in psutil.Process(pid).memory_maps())


def test_a_killed_model_holding_process_is_replaced(base_url: str) -> None:
    """SIGKILL the process with the weights (an engine process, or the replica itself): callers get
    503s with Retry-After, never a 500 or a hang, until Serve's health check has a new replica up."""
    before = serve.get_deployment_handle(ROLE, APP).placement.remote().result(timeout_s=30)["actual"]
    os.kill(before["engine_pid"], signal.SIGKILL)
    # Every attempt is counted: a status (with or without Retry-After), or the error that stood for one
    # (a timeout is the hang this test rules out; a dropped connection is no answer either).
    counts: Counter[str] = Counter()
    errors: list[str] = []

    def serves_again() -> bool:
        try:
            reply = httpx.post(f"{base_url}/v1/completions", json=_body(max_tokens=4), timeout=60)
        except httpx.TransportError as exc:
            counts[type(exc).__name__] += 1
            errors.append(repr(exc))
            return False
        retry = " with Retry-After" if "Retry-After" in reply.headers else ""
        counts[f"{reply.status_code}{retry}"] += 1
        return reply.status_code == 200

    # retry_on=(): anything else a check raises is a failure of its own, not "not yet".
    try:
        wait_until(serves_again, 120, "a new replica answers", retry_on=())
    finally:
        print(f"\nanswers until served again: {dict(counts)}")  # shown with a failure too
    assert not errors, (counts, errors)
    assert counts["200"] == 1 and counts.total() == counts["200"] + counts["503 with Retry-After"], counts
    after = serve.get_deployment_handle(ROLE, APP).placement.remote().result(timeout_s=30)["actual"]
    assert after["engine_pid"] != before["engine_pid"]


def test_deleting_the_app_leaves_no_model_holding_process(base_url: str) -> None:
    """Last in the module: the app is deleted, and the process that held the model exits with it
    (an engine process follows its replica out; nothing is left holding memory)."""
    actual = serve.get_deployment_handle(ROLE, APP).placement.remote().result(timeout_s=30)["actual"]
    holder = psutil.Process(actual["engine_pid"])
    serve.delete(APP)
    holder.wait(timeout=60)
    assert not holder.is_running()
