"""One local Ray + Serve shared by the test modules that serve on the same kind of cluster.

Starting and stopping a local Ray costs 10-20 s on 2 cores, and most serving modules ask for the same
kind: CPU models, two declared GPUs with one `gpu_slot_<i>` each, the CPU fallback for replicas
planned on those (declared, not real) GPUs, one start attempt per replica, and a Hugging Face hub
cache of the run's own (`HUB_CACHE`, where conftest's `twin_hub_cache` lays out the MedGemma twins). A module marked
`shared_serve` takes that cluster with `shared_serve()` in its module fixture; when the module
ends, every Serve application on it is deleted (and checked gone), so the next module starts from
an empty Serve on a warm Ray.

This module is a pytest plugin (registered by conftest.py): it runs the `shared_serve` modules
one after another, first, and stops the shared cluster before any other module (they start their
own Ray, and a process holds one Ray at a time) and at the end of the run.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve
from serve_support import ONE_START_ATTEMPT, local_serve

from deployments.engine.verify import CPU_FALLBACK_ENV

MARKER = "shared_serve"
# The replicas' hub cache (HF_HUB_CACHE), fixed before the cluster starts: a process reads it when it
# imports huggingface_hub. Empty until a module asks for the twins; removed when the run ends.
HUB_CACHE = Path(tempfile.mkdtemp(prefix="rf-hub-")) / "hub"
# What every shared module gets: the union of what each of them asked for on its own cluster.
SHARED_ENV = {CPU_FALLBACK_ENV: "1", "HF_HUB_CACHE": str(HUB_CACHE), **ONE_START_ATTEMPT}
SHARED_RAY = {"num_cpus": 4, "num_gpus": 2, "resources": {"gpu_slot_0": 1.0, "gpu_slot_1": 1.0}}


class _SharedCluster:
    """The running shared cluster, if any: its teardown and its Serve HTTP port."""

    def __init__(self) -> None:
        self.stack: ExitStack | None = None
        self.port: int | None = None
        self.modules = 0  # modules served so far: the run's summary says how many clusters were saved

    def start(self) -> int:
        if self.port is None:
            stack = ExitStack()
            self.port = stack.enter_context(local_serve(env=SHARED_ENV, **SHARED_RAY))
            self.stack = stack
        self.modules += 1
        return self.port

    def stop(self) -> None:
        stack, self.stack, self.port = self.stack, None, None
        if stack is not None:
            stack.close()


_cluster = _SharedCluster()


def delete_every_app() -> None:
    """Delete every Serve application (each call waits until its replicas are gone) and check none is left."""
    for name in list(serve.status().applications):
        serve.delete(name)
    left = serve.status().applications
    assert not left, f"applications still on the shared cluster: {sorted(left)}"


@contextmanager
def shared_serve() -> Iterator[int]:
    """The shared cluster's Serve HTTP port (started by the first module that asks). On exit every
    application the module deployed is deleted. Only for modules marked `shared_serve`."""
    port = _cluster.start()
    try:
        yield port
    finally:
        if ray.is_initialized():
            delete_every_app()


# ---- plugin hooks -------------------------------------------------------------------------------


def _shared(item: pytest.Item) -> bool:
    return item.get_closest_marker(MARKER) is not None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: the module serves on the session's shared Ray (shared_cluster.py)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The shared modules first, together; then the modules with slow tests, then the rest (two workers
    # each take whole modules in this order: a slow module last would leave one worker idle meanwhile).
    # The order within each group is pytest's.
    slow_modules = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (not _shared(item), item.nodeid.split("::")[0] not in slow_modules))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before the fixtures of a module that starts its own Ray (the previous module's are torn down by now).
    if not _shared(item) and _cluster.port is not None:
        _cluster.stop()


def pytest_sessionfinish(session: pytest.Session) -> None:
    _cluster.stop()
    shutil.rmtree(HUB_CACHE.parent, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _cluster.modules > 1:
        terminalreporter.write_line(f"shared Ray: {_cluster.modules} module(s) served on one cluster")
