"""Shared pytest fixtures. Tests never reach a model hub (HF_HUB_OFFLINE)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Set before transformers is imported by any test module: no hub access exists here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray waits 30 s for a new head's GCS to write its port, then fails ray.init; with two test workers
# each starting clusters on 2 busy cores that wait ran out once. Every Ray this run starts (ray.init
# here, `ray start` in subprocesses, which inherit the environment) waits up to 120 s instead.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
# One torch thread per test process, as each replica computes (Ray sets its OMP_NUM_THREADS from
# num_cpus): two test workers on 2 cores each running torch on 2 threads stall every small op.
# Measured on tests/test_structured.py under load: 61-65 s with 2 threads, 27-30 s with 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Background work of every test Ray that no test reads, on 2 cores that the run keeps busy:
# - a raylet starts one idle worker per CPU when the first driver connects, for tasks the tests never
#   run (each imports Ray, ~1.8 s of CPU; ~30 of them per run were never used);
# - every worker reports its task events to the GCS each second, for the dashboard's task view.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
os.environ.setdefault("RAY_task_events_report_interval_ms", "0")


def pytest_configure(config: pytest.Config) -> None:
    # The session's shared Ray for the modules marked `shared_serve` (tests/shared_cluster.py).
    import shared_cluster

    config.pluginmanager.register(shared_cluster, "shared-cluster")


# ---- tiny random models (tests/tiny_models.py) ----------------------------


@pytest.fixture(scope="session")
def tiny_text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Gemma3ForCausalLM + BPE tokenizer with a chat template."""
    from tiny_models import build_text_model

    return build_text_model(tmp_path_factory.mktemp("tiny-gemma3-text"))


@pytest.fixture(scope="session")
def tiny_vision_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Gemma3ForConditionalGeneration + Gemma3Processor."""
    from tiny_models import build_vision_model

    return build_vision_model(tmp_path_factory.mktemp("tiny-gemma3-vision"))


# ---- twins of the production checkpoints (tests/twins.py) ----------------------------------
# Built once per run under pytest's temporary directory; nothing is cached outside it.


@pytest.fixture(scope="session")
def text_twin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MedGemma 27B text checkpoint in miniature: Gemma3ForCausalLM, bnb NF4 pre-quantized, Gemma's tokenizer."""
    from twins import build_text_twin

    return build_text_twin(tmp_path_factory.mktemp("twin-medgemma-27b-text"))


@pytest.fixture(scope="session")
def vision_twin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MedGemma 1.5 4B checkpoint in miniature: Gemma3ForConditionalGeneration, NF4 text, bf16 SigLIP tower."""
    from twins import build_vision_twin

    return build_vision_twin(tmp_path_factory.mktemp("twin-medgemma-1.5-4b"))


@pytest.fixture(scope="session")
def twin_hub_cache(text_twin_dir: Path, vision_twin_dir: Path) -> Path:
    """A hub cache directory (give it as HF_HUB_CACHE) holding both twins, as a download leaves them, under
    the hub ids that the repo's model_configs.yaml names. The shared cluster's replicas read this one."""
    import yaml
    from shared_cluster import HUB_CACHE
    from twins import TEXT_REPO_ID, VISION_REPO_ID, install_in_hub_cache

    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "model_configs.yaml").read_text())
    named = {role["model"] for role in config.values()}
    twins = {TEXT_REPO_ID: text_twin_dir, VISION_REPO_ID: vision_twin_dir}
    assert named == set(twins), f"model_configs.yaml names {sorted(named)}; tests/twins.py has twins of {sorted(twins)}"
    hub = HUB_CACHE  # the one the shared cluster's replicas were started with (tests/shared_cluster.py)
    for repo_id, built in twins.items():
        install_in_hub_cache(hub, repo_id, built)
    return hub


# ---- threads whose failures are the test's -------------------------------------------------


@pytest.fixture
def threads() -> Iterator[Any]:
    """A serve_support.ThreadGroup: `threads.start(fn, *args)`, then `threads.join(timeout_s)` re-raises what a
    thread raised and fails if one is still running. A group the test did not join is joined at teardown
    (60 s), so a thread's failure is never lost."""
    from serve_support import ThreadGroup

    group = ThreadGroup()
    yield group
    if not group.joined:
        group.join(THREAD_TEARDOWN_JOIN_S)


THREAD_TEARDOWN_JOIN_S = 60.0


# ---- leaving the test process ------------------------------------------------------------
# This one process starts and stops Ray many times (a local cluster per module). Threads that
# Ray and Serve leave behind in the driver (handle routers, the core worker's own) can crash
# CPython's finalization after the run (ray-project/ray#31145): a segmentation fault after
# pytest has printed its summary, which turns a green run red. The result is decided by then,
# so the process leaves with pytest's own exit status and skips finalization.

_exit_status: int | None = None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _exit_status is None:
        return
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


# ---- markers: gpu and cpu_only (pyproject.toml) --------------------------------------------
# Decided once per run from what torch sees in this process. torch.cuda.device_count() asks NVML
# first, so the check creates no CUDA context here (a child given its own CUDA_VISIBLE_DEVICES
# still gets its own view). Each skip carries its reason, and the summary says how many went.

GPU_SKIP_REASON = "needs a CUDA GPU torch can see"
CPU_ONLY_SKIP_REASON = "holds only without a GPU; on a GPU machine its gpu-marked twin tests the GPU path"
_marker_skips: dict[str, int] = {}


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only the selected tests are counted
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("gpu") or item.get_closest_marker("cpu_only")]
    if not marked:
        return  # a run that selects neither kind never imports torch here
    import torch

    has_gpu = torch.cuda.device_count() > 0
    for item in marked:
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))
            _marker_skips[GPU_SKIP_REASON] = _marker_skips.get(GPU_SKIP_REASON, 0) + 1
        cpu_only = item.get_closest_marker("cpu_only")
        if cpu_only and has_gpu:
            reason = f"cpu_only: {cpu_only.kwargs.get('reason') or CPU_ONLY_SKIP_REASON}"
            item.add_marker(pytest.mark.skip(reason=reason))
            _marker_skips[reason] = _marker_skips.get(reason, 0) + 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for reason, count in _marker_skips.items():
        terminalreporter.write_line(f"skipped by marker ({count}): {reason}")
