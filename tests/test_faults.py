"""Faults against one running app (real local Ray, real Serve, real HTTP):
models that fail to load, a replica killed mid-request, a wedged replica,
a redeploy and a shutdown under traffic.

The app has two working roles on the tiny text model (`alpha`, `beta`) and
two that cannot load: `corrupt` (safetensors cut short after its header) and
`missing` (no weights file). Health checks run every second with a 5 s
timeout so a wedged replica is found quickly. Tests run in file order and
share the app; the last one deletes it.

Every request in these tests must come back (a client timeout is a failure):
"accepted and unanswered" is the figure the README's RELIABILITY section
reports, and it must stay 0.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from fault_injection import WEDGE_MARKER, gate_marker, hold_marker
from ray import serve
from serve_support import model_config, wait_until
from shared_cluster import shared_serve

from deployments.app import AppArgs, build_app

APP = "faults"
ALPHA, BETA, CORRUPT, MISSING = "alpha", "beta", "corrupt", "missing"
LONG = {"temperature": 0, "max_tokens": 200}
SHORT = {"temperature": 0, "max_tokens": 4}
# A gated request is in flight for as long as its gate is shut: it need not be long (and its prompt, with the
# gate's path, must leave room in the tiny model's 256-token context).
GATED = {"temperature": 0, "max_tokens": 32}
# Any request not answered within this is a hang: the test fails.
CLIENT_TIMEOUT_S = 90


def _broken_copies(text_dir: Path, root: Path) -> tuple[Path, Path]:
    corrupt, missing = root / "corrupt", root / "missing"
    shutil.copytree(text_dir, corrupt)
    shutil.copytree(text_dir, missing)
    weights = corrupt / "model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[: header + (len(data) - header) // 3])  # header intact, tensors cut short
    (missing / "model.safetensors").unlink()
    return corrupt, missing


# On the session's shared Ray (tests/shared_cluster.py): CPU, 2 declared GPUs with slots, the CPU fallback.
pytestmark = pytest.mark.shared_serve


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with shared_serve() as port:  # the broken model directories fail every time
        yield port


@pytest.fixture(scope="module")
def args(port: int, tmp_path_factory: pytest.TempPathFactory, tiny_text_model_dir: Path) -> AppArgs:
    root = tmp_path_factory.mktemp("faults")
    corrupt, missing = _broken_copies(tiny_text_model_dir, root)
    common = {"memory_gb": 1, "dtype": "float32", "max_tokens_cap": 256}
    roles = {ALPHA: tiny_text_model_dir, BETA: tiny_text_model_dir, CORRUPT: corrupt, MISSING: missing}
    path = model_config(root / "models.yaml", {role: {"model": d, **common} for role, d in roles.items()})
    return AppArgs(
        model_config=str(path),
        gpus="none",
        health_check_period_s=1,
        health_check_timeout_s=5,
        graceful_shutdown_timeout_s=10,
    )


def deploy(args: AppArgs) -> float:
    """Deploy; the broken roles make Serve report the app DEPLOY_FAILED, the others serve. Seconds taken."""
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=f"Deploying application {APP} failed"):
        serve.run(build_app(args), name=APP, route_prefix="/")

    def settled() -> bool:  # serve.run returns on the first failed deployment; the others may still be starting
        deployments = serve.status().applications[APP].deployments
        broken = deployments[CORRUPT].status == deployments[MISSING].status == "DEPLOY_FAILED"
        return broken and deployments[ALPHA].status == deployments[BETA].status == "HEALTHY"

    wait_until(settled, 120, "both broken roles DEPLOY_FAILED and both sound ones HEALTHY")
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def http(port: int, args: AppArgs) -> Iterator[httpx.Client]:
    deploy(args)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=CLIENT_TIMEOUT_S) as client:
        yield client


def ask(http: httpx.Client, role: str, params: dict[str, Any] = SHORT, text: str = "hello") -> int:
    body = {"model": role, "messages": [{"role": "user", "content": text}], **params}
    return http.post("/v1/chat/completions", json=body).status_code


def pid(http: httpx.Client, role: str) -> int:
    return http.get("/v1/placement").json()["models"][role]["replica"]["actual"]["pid"]


def replica_actor_names(role: str) -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#{role}#")
    ]


# ------------------------------------------------------------ load failure


def test_load_failures_are_reported_and_the_rest_serves(http: httpx.Client) -> None:
    deployments = serve.status().applications[APP].deployments
    for role in (CORRUPT, MISSING):
        assert deployments[role].status == "DEPLOY_FAILED"
        assert "ModelLoadError" in deployments[role].message and "cannot load" in deployments[role].message
    assert deployments[ALPHA].status == deployments[BETA].status == "HEALTHY"

    models = http.get("/v1/placement").json()["models"]
    assert models[CORRUPT]["replica"]["status"] == "DEPLOY_FAILED"
    assert models[CORRUPT]["replica"]["error"].startswith("ModelLoadError: cannot load")
    assert (
        "model.safetensors" in models[MISSING]["replica"]["error"] or "no file" in models[MISSING]["replica"]["error"]
    )
    assert models[ALPHA]["replica"]["actual"]["pid"]

    response = http.post(
        "/v1/chat/completions", json={"model": CORRUPT, "messages": [{"role": "user", "content": "x"}]}
    )
    assert response.status_code == 503
    assert "failed to deploy" in response.json()["error"]["message"] and "ModelLoadError" in response.text
    assert int(response.headers["retry-after"]) >= 1
    # Every role is listed, each with its state (and a failed one with its load error).
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert {role: m["status"] for role, m in models.items()} == {
        ALPHA: "ready",
        BETA: "ready",
        CORRUPT: "failed",
        MISSING: "failed",
    }
    assert models[CORRUPT]["reason"].startswith("ModelLoadError")
    assert ask(http, ALPHA) == ask(http, BETA) == 200


# ---------------------------------------------------------- replica killed


def load(role: str) -> dict[str, Any]:
    """The replica's own report (ModelServer.load), with fault injection's `held` and `gated` counts."""
    return serve.get_deployment_handle(role, APP).load.remote().result(timeout_s=30)


def actual(http: httpx.Client, role: str) -> dict[str, Any]:
    return http.get("/v1/placement").json()["models"][role]["replica"]["actual"]


def answer(http: httpx.Client, role: str, text: str, *, stream: bool = False) -> tuple[int, str, str | None]:
    """Status, body and Retry-After of one chat request (streamed: the whole event stream read)."""
    body = {"model": role, "messages": [{"role": "user", "content": text}], **LONG, "stream": stream}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        return response.status_code, response.read().decode(), response.headers.get("retry-after")


@pytest.mark.slow
def test_killed_replica_is_restarted_and_no_request_hangs(http: httpx.Client) -> None:
    before = actual(http, ALPHA)
    (name,) = replica_actor_names(ALPHA)
    # Held in alpha's engine process until it dies: certainly on the replica when it is killed.
    hold = hold_marker(before["engine_pid"])
    with concurrent.futures.ThreadPoolExecutor(18) as pool:
        held = [pool.submit(answer, http, ALPHA, f"{hold} held", stream=stream) for stream in (False, True)]
        alpha = [pool.submit(ask, http, ALPHA, LONG, f"story {i}") for i in range(12)]
        beta = [pool.submit(ask, http, BETA, SHORT, f"note {i}") for i in range(4)]
        wait_until(lambda: load(ALPHA)["held"] == 2, 60, "both held requests waiting in alpha's engine")
        state = load(ALPHA)
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        held_answers = [f.result(timeout=CLIENT_TIMEOUT_S) for f in held]
        alpha_statuses = Counter(f.result(timeout=CLIENT_TIMEOUT_S) for f in alpha)
        beta_statuses = Counter(f.result(timeout=CLIENT_TIMEOUT_S) for f in beta)
    print(f"\nkill: alpha's report at the kill {state}; alpha {dict(alpha_statuses)}, beta {dict(beta_statuses)}")
    # The README's promise for a replica that dies mid-request: a clean 503 with Retry-After, never a 500.
    for status, text, retry_after in held_answers:
        assert status == 503, text
        assert "the replica serving this request died" in json.loads(text)["error"]["message"], text
        assert retry_after is not None and int(retry_after) >= 1
    assert set(alpha_statuses) <= {200, 503}  # the others: answered before the kill, or 503
    assert beta_statuses == Counter({200: 4})  # the other model is untouched
    took = wait_until(lambda: ask(http, ALPHA) == 200, 90, "alpha serving again after its replica was killed")
    after = actual(http, ALPHA)
    assert after["pid"] != before["pid"] and after["engine_pid"] != before["engine_pid"]
    print(f"kill: alpha serving again {took:.1f} s after the last in-flight answer")


# ------------------------------------------------------------ wedged replica


@pytest.mark.slow
def test_wedged_replica_fails_its_health_probe_and_is_replaced(http: httpx.Client) -> None:
    before = pid(http, BETA)
    start = time.perf_counter()
    status = ask(http, BETA, SHORT, f"{WEDGE_MARKER} hang")  # answered once Serve replaces the replica
    print(f"\nwedge: the wedged request got {status} after {time.perf_counter() - start:.1f} s")
    assert status == 503
    wait_until(lambda: ask(http, BETA) == 200, 90, "beta serving again after its replica wedged")
    assert pid(http, BETA) != before
    assert ask(http, ALPHA) == 200


# ------------------------------------------------------ redeploy, shutdown


def _edited(args: AppArgs, role: str, **fields: Any) -> AppArgs:
    """`args` with `role`'s entry of the model config changed (a copy of the file)."""
    path = Path(args.models_path)
    models = yaml.safe_load(path.read_text())
    models[role].update(fields)
    edited = path.with_name(f"edited-{path.name}")
    edited.write_text(yaml.safe_dump(models))
    return args.model_copy(update={"models_path": str(edited)})


def stopping(role: str) -> int:
    """Replicas of `role` Serve is draining (graceful shutdown: they finish their requests first), from the
    controller's own record (Serve's testing hook; `serve.status()` lists no deployment of an app being deleted)."""
    from ray.serve._private.common import DeploymentID, ReplicaState
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    replicas = ray.get(controller._dump_replica_states_for_testing.remote(DeploymentID(role, APP)), timeout=30)
    return replicas.count(states=[ReplicaState.STOPPING])


def open_gate_when(gate: Path, check: Any, what: str, seen: list[str]) -> None:
    """Open `gate` once `check` holds (polled, bounded); `seen` gets `what` if it did, so the test can
    assert that its gated requests were still in flight at that moment. Opened in every case; gives up
    at once when the test opened the gate itself (it failed)."""
    try:
        wait_until(lambda: gate.exists() or check(), 120, what)
        if not gate.exists():
            seen.append(what)
    finally:
        gate.touch()


@pytest.mark.slow
def test_redeploy_with_the_same_plan_keeps_serving(http: httpx.Client, args: AppArgs, tmp_path: Path) -> None:
    # Serve restarts only a deployment whose version or Ray options changed (deployments.versions):
    # redeploying the same config would restart nothing, so alpha's entry is edited to force a real restart.
    edited = _edited(args, ALPHA, max_tokens_cap=300)
    alpha_before, beta_before = pid(http, ALPHA), pid(http, BETA)
    statuses: Counter[int] = Counter()
    stop = threading.Event()
    gate, seen = tmp_path / "gate", []

    def traffic() -> None:
        while not stop.is_set():
            statuses[ask(http, ALPHA)] += 1

    # Leaving the pool waits for every thread: whatever fails below, the traffic stops and the gate opens
    # (a failure must not turn into a hang).
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        try:
            # Held at a gate in alpha's old replica until Serve drains that replica: in flight through the redeploy.
            in_flight = [pool.submit(ask, http, ALPHA, GATED, f"{gate_marker(gate)} gated {i}") for i in range(2)]
            loops = [pool.submit(traffic) for _ in range(2)]
            wait_until(lambda: load(ALPHA)["gated"] == 2 and statuses[200] > 0, 60, "2 gated on alpha, traffic 200")
            opener = pool.submit(open_gate_when, gate, lambda: stopping(ALPHA) > 0, "old alpha replica draining", seen)
            seconds = deploy(edited)
            # serve.run returns once the broken roles report DEPLOY_FAILED; alpha may still be rolling.
            wait_until(lambda: pid(http, ALPHA) != alpha_before, 120, "alpha restarted by the redeploy")
            opener.result(timeout=CLIENT_TIMEOUT_S)
            stop.set()
            for loop in loops:
                loop.result(timeout=CLIENT_TIMEOUT_S)
            long_statuses = [f.result(timeout=CLIENT_TIMEOUT_S) for f in in_flight]
        finally:
            stop.set()
            gate.touch()
    print(f"\nredeploy: {seconds:.1f} s; traffic meanwhile {dict(statuses)}; in-flight {long_statuses}")
    assert seen == ["old alpha replica draining"]  # the gated requests were on it while it drained
    assert long_statuses == [200, 200]
    assert set(statuses) == {200} and statuses[200] > 0
    assert ask(http, ALPHA) == 200
    assert pid(http, BETA) == beta_before  # untouched by the edit: not restarted


@pytest.mark.slow
def test_shutdown_lets_in_flight_requests_finish(http: httpx.Client, args: AppArgs, tmp_path: Path) -> None:
    gate, seen = tmp_path / "gate", []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        try:
            in_flight = [pool.submit(ask, http, ALPHA, GATED, f"{gate_marker(gate)} last {i}") for i in range(3)]
            wait_until(lambda: load(ALPHA)["gated"] == 3, 60, "3 requests gated on alpha's replica")
            start = time.perf_counter()
            serve.delete(APP, _blocking=False)
            pool.submit(open_gate_when, gate, lambda: stopping(ALPHA) > 0, "alpha's replica draining", seen)
            wait_until(lambda: APP not in serve.status().applications, 120, f"{APP} deleted")
            deleted = time.perf_counter() - start
            statuses = [f.result(timeout=CLIENT_TIMEOUT_S) for f in in_flight]
        finally:
            gate.touch()  # whatever failed: no request left waiting at the gate
    print(f"\nshutdown: deleted in {deleted:.1f} s; in-flight {statuses}")
    assert seen == ["alpha's replica draining"]  # the gated requests were on it while it drained
    assert statuses == [200, 200, 200]
    assert deleted < args.graceful_shutdown_timeout_s + 10
