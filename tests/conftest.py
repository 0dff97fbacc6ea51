"""Shared pytest fixtures. Tests never reach a model hub (HF_HUB_OFFLINE)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before transformers is imported by any test module: no hub access exists here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
