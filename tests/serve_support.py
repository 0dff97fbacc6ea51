"""Helpers for tests that run a rayfit app on a real local Ray: a private Ray
with its own ports (other test modules run theirs at the same time), one
model config writer, and small HTTP helpers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from fault_injection import WRAPPER
from ray import serve

from deployments.engine.host import ENGINE_WRAPPER_ENV
from deployments.ports import free_port

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


@contextmanager
def local_serve(num_cpus: int = 4, env: dict[str, str] | None = None, **ray_init: Any) -> Iterator[int]:
    """Ray + Serve on 127.0.0.1:<free port>; `env` is inherited by every replica,
    `ray_init` goes to `ray.init` (declared GPUs, resources). Yields the port.

    Every replica's engine is wrapped with fault injection (tests/fault_injection.py):
    requests carrying its markers misbehave, all others are served as in production."""
    python_path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p)
    env = {ENGINE_WRAPPER_ENV: WRAPPER, "PYTHONPATH": python_path, **(env or {})}
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # set before ray.init: the raylet passes it to every worker
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **ray_init)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def model_config(path: Path, roles: dict[str, dict[str, Any]]) -> Path:
    """model_configs.yaml in the user's format: role → fields (model dir + overrides)."""
    lines = []
    for role, fields in roles.items():
        lines.append(f"{role}:\n  provider: huggingface\n")
        lines.extend(f"  {key}: {value}\n" for key, value in fields.items())
    path.write_text("".join(lines))
    return path


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `check` until true; seconds it took. Fails the test naming `what` on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if check():
                return time.monotonic() - start
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
