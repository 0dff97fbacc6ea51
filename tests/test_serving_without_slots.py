"""A Ray without `gpu_slot_<i>` resources, as when `serve run` starts its own.

The plan still pins each replica to its planned GPU (the bigger model to GPU 1)
and the app builder warns that Ray cannot keep another app off those GPUs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from ray import serve
from serve_support import local_serve, model_config

from deployments.app import AppArgs, build_app
from deployments.model import CPU_FALLBACK_ENV

pytestmark = pytest.mark.slow  # starts a Ray cluster of its own

BIG, SMALL = "buffer_agent", "summarizer"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.cpu_only(reason="declares 2 GPUs to Ray; a box with fewer real GPUs refuses the declaration")
def test_pinned_anyway_and_warned(tiny_text_model_dir: Path, tmp_path: Path) -> None:
    config = model_config(
        tmp_path / "models.yaml",
        {
            SMALL: {"model": tiny_text_model_dir, "memory_gb": 3, "dtype": "float32"},
            BIG: {"model": tiny_text_model_dir, "memory_gb": 15, "dtype": "float32"},
        },
    )
    warnings = _Collect()
    logger = logging.getLogger("ray.serve")
    logger.addHandler(warnings)
    # Declared GPUs and nothing else: the GPUs' memory comes from gpu_memory_gb.
    with local_serve(env={CPU_FALLBACK_ENV: "1"}, num_gpus=2):
        try:
            serve.run(build_app(AppArgs(model_config=str(config), gpu_memory_gb=24)), name="no-slots")
        finally:
            logger.removeHandler(warnings)
        devices = {
            role: serve.get_deployment_handle(role, "no-slots")
            .placement.remote()
            .result(timeout_s=60)["actual"]["cuda_visible_devices"]
            for role in (BIG, SMALL)
        }
    assert devices == {BIG: "1", SMALL: "0"}
    slot_warnings = [m for m in warnings.messages if "no gpu_slot_* resources" in m]
    assert {role for role in (BIG, SMALL) if any(f"'{role}'" in m for m in slot_warnings)} == {BIG, SMALL}
