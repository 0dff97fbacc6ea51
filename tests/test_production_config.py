"""The production config (top-level `model_configs.yaml`, hub ids) on local files.

No machine here reaches a model hub, so the two hub ids of the user's config
are laid out in a Hugging Face cache as their twins (tests/twins.py): tiny
random checkpoints of the same classes, configs, tokenizer, chat template and
bitsandbytes NF4 pre-quantization (Gemma3ForCausalLM for the 27B text model,
Gemma3ForConditionalGeneration for the 4B image+text model), the way a real
first download leaves them. The hub-id path — find in the cache, size from
safetensors headers, load pre-quantized, generate — then runs unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_CONFIG = REPO_ROOT / "model_configs.yaml"


def _offline_env(hub: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def test_plan_of_the_production_config_sizes_from_the_cached_checkpoints(twin_hub_cache: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "placement", "plan", str(PRODUCTION_CONFIG), "--gpus", "2x24GB", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        env=_offline_env(twin_hub_cache),
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    for model in plan["models"]:
        estimate = model["estimate"]
        assert estimate["source"] == "safetensors", model["role"]
        assert estimate["quantization"] == "nf4" and not estimate["is_guess"]
        assert any("HF cache" in note for note in estimate["notes"])
    assert not plan["warnings"]  # nothing guessed


LOAD_AND_GENERATE = """
import json, sys
from deployments.engine.core import Engine
from deployments.engine.generation import GenerationInput, SamplingParams
from deployments.engine.loading import load_model
from placement.config import load_model_configs
from placement.inventory import parse_gpu_spec
from placement.planner import make_plan

role = sys.argv[2]
spec = load_model_configs(sys.argv[1]).models[role]
plan = make_plan({role: spec}, parse_gpu_spec("none", cpu_memory_bytes=64 << 30)).entry(role).replica
loaded = load_model(spec, plan)
engine = Engine(loaded, plan)
out = engine.generate_batch(
    [GenerationInput(params=SamplingParams(max_tokens=4, temperature=0), messages=({"role": "user", "content": "hi"},))]
)[0]
engine.close()  # its continuous-batching thread is not a daemon: the process would not exit
print(json.dumps({"quantization": loaded.quantization, "multimodal": loaded.is_multimodal,
                  "source": loaded.source, "tokens": out.completion_tokens}))
"""


@pytest.mark.parametrize(("role", "multimodal"), [("buffer_agent", False), ("summarizer", True)])
def test_hub_ids_load_pre_quantized_from_the_cache_and_generate(
    twin_hub_cache: Path, role: str, multimodal: bool
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, str(PRODUCTION_CONFIG), role],
        capture_output=True,
        text=True,
        timeout=180,
        env=_offline_env(twin_hub_cache),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["quantization"] == "nf4 (pre-quantized)"
    assert report["multimodal"] is multimodal
    assert report["tokens"] > 0
