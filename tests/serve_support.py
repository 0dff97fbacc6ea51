"""Helpers for tests that run a rayfit app on a real local Ray: a private Ray
with its own ports (other test modules run theirs at the same time), one
model config writer, and small HTTP helpers."""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import ray
from fault_injection import WRAPPER
from ray import serve
from ray_nodes import processes_under, short_temp_dir, terminate

from deployments.engine.host import ENGINE_WRAPPER_ENV
from deployments.ports import listening_pids, reserved_port

TESTS_DIR = Path(__file__).resolve().parent

# For a module whose replicas are meant to fail at start-up: one constructor attempt each, not
# Serve's three. Such a replica fails the same way every time, and each attempt is a new worker
# importing torch (~7 s here). Pass as `local_serve(env=...)`.
ONE_START_ATTEMPT = {"RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1"}

# Size rules for the declared-GPU apps: a model declared at 10 GiB or more takes the last GPU.
SIZE_RULES = """\
rules:
  - name: 10 GiB or more takes the last GPU
    min_memory_gb: 10
    prefer: last_gpu
  - name: the rest stay on the first GPU
    prefer: first_gpu
"""

PROXY_LISTENS_S = 60.0  # serve.start returns before its proxy listens; it does in ~1-3 s here
SERVE_START_ATTEMPTS = 3


def this_node_pids() -> set[int]:
    """The processes of the Ray node that this process's `ray.init` started: its raylet and everything under it
    (workers, actors: Serve's proxy among them)."""
    import psutil
    from ray._private import ray_constants

    node = ray._private.worker.global_worker.node
    raylets = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []) if node is not None else []
    assert raylets, "this process did not start a Ray node: say which processes are the cluster's (ours=...)"
    pids: set[int] = set()
    for info in raylets:
        try:
            raylet = psutil.Process(info.process.pid)
            pids |= {raylet.pid, *(child.pid for child in raylet.children(recursive=True))}
        except psutil.Error:
            continue
    return pids


def start_serve(host: str = "127.0.0.1", ours: Callable[[], set[int]] | None = None, **serve_start: Any) -> int:
    """`serve.start(**serve_start)` with its HTTP proxy on a port that cannot be lost; returns the port once
    the proxy listens on it.

    The port is held (deployments.ports.reserved_port) until the proxy listens on it, then read back: every
    listener on it must be one of `ours()` (this cluster's processes; default `this_node_pids`: the node that
    this process's `ray.init` started). Another Serve proxy (also SO_REUSEPORT) may still join a held port if
    another process picked it free before it was held; that start is shut down and tried again on a fresh
    port, as is one whose proxy never listens. Fails after `SERVE_START_ATTEMPTS`."""
    ours = ours or this_node_pids
    failures: list[str] = []
    for _ in range(SERVE_START_ATTEMPTS):
        with reserved_port(host) as port:
            serve.start(http_options={"host": host, "port": port}, **serve_start)
            deadline = time.monotonic() + PROXY_LISTENS_S
            while not (listeners := listening_pids(port)) and time.monotonic() < deadline:
                time.sleep(0.2)
        foreign = listeners - ours() if listeners else set()
        if listeners and not foreign:
            return port
        failures.append(
            f"port {port}: processes {sorted(foreign)} not of this cluster listen on it too"
            if foreign
            else f"port {port}: the proxy did not listen within {PROXY_LISTENS_S} s"
            " (SERVE_SOCKET_REUSE_PORT_ENABLED=0 stops it binding a held port)"
        )
        serve.shutdown()
    raise AssertionError(f"Serve's HTTP proxy never got a port of its own: {'; '.join(failures)}")


class _OwnAgentPorts(ray._private.parameter.RayParams):
    """ray.init's node with its dashboard agent on a port the OS picks: ray.init has no argument for it, and
    Ray's default (52365) is the same for every cluster on this machine. The agent reads its port back.
    No log monitor either (ray.init has no argument for that): it streams worker logs to drivers, and
    these drivers do not take them (log_to_driver=False); it cost ~0.6 CPU s a minute per cluster."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("dashboard_agent_listen_port", 0)
        kwargs.setdefault("include_log_monitor", False)
        super().__init__(*args, **kwargs)


# What ray.init raises when the node's raylet has not registered within Ray's fixed 30 s (ray/_private/node.py).
_NODE_START_TIMED_OUT = "The current node timed out during startup"


def init_local_ray(**ray_init: Any) -> str:
    """ray.init for a Ray of the test's own; returns its temp dir (sessions, sockets, logs).

    address="local" (never joins a running cluster), no dashboard, no worker logs to the driver, and
    `_OwnAgentPorts`. Once in many full runs on 2 loaded cores, the raylet never started (no raylet log
    at all) and Ray gave up after its fixed 30 s: that failure alone is tried once more, on a fresh temp
    dir, after killing what the first try left (its GCS and monitors outlive a failed ray.init), with a
    warning pytest shows."""
    ray_init = {"address": "local", "include_dashboard": False, "log_to_driver": False, **ray_init}
    temp_dir = short_temp_dir("rf-")
    try:
        _init_with_own_ports(temp_dir, ray_init)
    except Exception as exc:
        if _NODE_START_TIMED_OUT not in str(exc):
            raise
        ray.shutdown()
        terminate(processes_under(temp_dir), graceful=False)
        warnings.warn(f"a local Ray's node did not start in Ray's 30 s, started again (logs: {temp_dir})", stacklevel=2)
        temp_dir = short_temp_dir("rf-")
        _init_with_own_ports(temp_dir, ray_init)
    return temp_dir


def _init_with_own_ports(temp_dir: str, ray_init: dict[str, Any]) -> None:
    with mock.patch.object(ray._private.parameter, "RayParams", _OwnAgentPorts):
        ray.init(_temp_dir=temp_dir, **ray_init)


@contextmanager
def local_serve(num_cpus: int = 4, env: dict[str, str] | None = None, **ray_init: Any) -> Iterator[int]:
    """A new Ray of its own + Serve on 127.0.0.1:<port>; `env` is inherited by every replica,
    `ray_init` goes to `ray.init` (declared GPUs, resources). Yields the port.

    Shares nothing with other clusters on this machine: a temp dir of its own (sessions, sockets,
    logs, the address file), its own agent and metrics ports (bound by the OS), and the HTTP port held
    until Serve's proxy listens (`start_serve`); never joins a running cluster (address="local").
    A failure while starting tears down what was started and restores the environment.

    Every replica's engine is wrapped with fault injection (tests/fault_injection.py):
    requests carrying its markers misbehave, all others are served as in production."""
    python_path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p)
    env = {ENGINE_WRAPPER_ENV: WRAPPER, "PYTHONPATH": python_path, **(env or {})}
    previous = {key: os.environ.get(key) for key in env}
    temp_dir = None
    started = False
    try:
        os.environ.update(env)  # set before ray.init: the raylet passes it to every worker
        temp_dir = init_local_ray(num_cpus=num_cpus, **ray_init)
        port = start_serve()
        started = True
        yield port
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if started and temp_dir is not None:  # kept after a failed start: its logs say why
                shutil.rmtree(temp_dir, ignore_errors=True)


def model_config(path: Path, roles: dict[str, dict[str, Any]]) -> Path:
    """model_configs.yaml in the user's format: role → fields (model dir + overrides)."""
    lines = []
    for role, fields in roles.items():
        lines.append(f"{role}:\n  provider: huggingface\n")
        lines.extend(f"  {key}: {value}\n" for key, value in fields.items())
    path.write_text("".join(lines))
    return path


def wait_until(
    check: Callable[[], Any],
    timeout_s: float,
    what: str,
    *,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    interval_s: float = 0.5,
) -> float:
    """Poll `check` until it returns true; seconds it took.

    An exception of a type in `retry_on` means "not yet" (default: any Exception; `retry_on=()` lets every
    exception fail the test at once); others propagate. On timeout the test fails naming `what`, how many
    checks ran, and the last exception a check raised (type and message), chained as its cause."""
    start = time.monotonic()
    checks, last_error, last_raised = 0, None, False
    while True:
        checks += 1
        try:
            if check():
                return time.monotonic() - start
            last_raised = False
        except retry_on as exc:
            last_error, last_raised = exc, True
        if time.monotonic() - start >= timeout_s:
            break
        time.sleep(interval_s)
    detail = f"{checks} checks"
    if last_error is not None:
        when = "the last check" if last_raised else "an earlier check (the last returned false)"
        detail += f"; {when} raised {type(last_error).__name__}: {last_error}"
    raise AssertionError(f"{what}: not within {timeout_s} s ({detail})") from last_error


class ThreadGroup:
    """Threads whose failures are the test's: `start` runs a call in a thread of its own, `join` waits for all
    of them within one bound, fails naming those still running, and re-raises the first exception a thread
    raised (the others are listed in its notes). Returns their results in start order."""

    def __init__(self, name: str = "worker") -> None:
        self.name = name
        self._threads: list[threading.Thread] = []
        self._results: list[Any] = []
        self._errors: list[tuple[int, BaseException]] = []
        self._lock = threading.Lock()
        self.joined = False

    def start(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> threading.Thread:
        index = len(self._threads)
        self._results.append(None)

        def run() -> None:
            try:
                self._results[index] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the test by join
                with self._lock:
                    self._errors.append((index, exc))

        self.joined = False
        thread = threading.Thread(target=run, name=f"{self.name}-{index}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def join(self, timeout_s: float) -> list[Any]:
        self.joined = True
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        running = [thread.name for thread in self._threads if thread.is_alive()]
        with self._lock:
            errors = sorted(self._errors, key=lambda item: item[0])
        first = errors[0][1] if errors else None
        if first is not None:
            for index, other in errors[1:]:
                first.add_note(f"{self.name}-{index} raised too: {type(other).__name__}: {other}")
        if running:
            raise AssertionError(
                f"{len(running)} of {len(self._threads)} threads still running after {timeout_s} s: {running}"
            ) from first
        if first is not None:
            raise first
        return list(self._results)


def run_in_threads(calls: Sequence[Callable[[], Any]], timeout_s: float, name: str = "worker") -> list[Any]:
    """Each call in a thread of its own, all at once; their results once all finished within `timeout_s`
    (ThreadGroup.join: a thread still running or raising fails the test)."""
    group = ThreadGroup(name)
    for call in calls:
        group.start(call)
    return group.join(timeout_s)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
