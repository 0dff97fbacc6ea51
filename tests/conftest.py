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
