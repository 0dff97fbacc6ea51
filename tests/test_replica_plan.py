"""The replica plan is the engine's only source of numbers (placement.replica).

- The user's model_configs.yaml, unchanged (roles, provider and model only),
  planned on the two real MedGemma config.json files as the unsloth bnb-4bit
  checkpoints ship them: the context is the plan's 4096, not the configs'
  131072, and the KV pool transformers builds for the plan's geometry is the
  plan's byte for byte. The README's memory table is this plan.
- One quantization decision (placement.quantization), which the loader obeys:
  a checkpoint named '-4bit' that is not pre-quantized is quantized at load.
- Every fixture model, planned and built, keeps the contract
  (deployments.engine.contract): pool bytes equal, weights within 2%.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from plans import replica_plan
from test_kv_budget import _transformers_pool_bytes

from deployments.engine.core import Engine
from deployments.engine.generation import GenerationInput, SamplingParams
from deployments.engine.loading import load_model
from placement.config import ModelSpec, load_model_configs
from placement.inventory import parse_gpu_spec
from placement.planner import make_plan
from placement.quantization import NOT_QUANTIZED, decide_quantization, read_checkpoint_quantization
from placement.sizing import estimate_memory
from placement.sizing.kv_budget import side_sequence_bytes
from placement.sizing.meta_model import to_config
from placement.sizing.reference_configs import MEDGEMMA_4B, MEDGEMMA_27B_TEXT
from placement.units import GIB

REPO_ROOT = Path(__file__).resolve().parent.parent
USER_CONFIG = REPO_ROOT / "model_configs.yaml"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def _unsloth_nf4(skip: list[str]) -> dict[str, Any]:
    """The quantization_config unsloth's bnb-4bit checkpoints carry (NF4, double quant, bf16 compute)."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "llm_int8_skip_modules": skip,
    }


@pytest.fixture(scope="module")
def config_only_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache holding only the two checkpoints' config.json (a few KB each, no weights)."""
    roles = load_model_configs(USER_CONFIG).models
    hub = tmp_path_factory.mktemp("hf-config-only") / "hub"
    configs = {
        "buffer_agent": {**MEDGEMMA_27B_TEXT, "quantization_config": _unsloth_nf4(["lm_head"])},
        # The vision tower and projector stay bf16 in unsloth's image+text checkpoints.
        "summarizer": {
            **MEDGEMMA_4B,
            "quantization_config": _unsloth_nf4(["lm_head", "vision_tower", "multi_modal_projector"]),
        },
    }
    for role, config in configs.items():
        repo = hub / ("models--" + roles[role].model.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(SNAPSHOT)
        snapshot = repo / "snapshots" / SNAPSHOT
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps(config))
    return hub


@pytest.fixture(scope="module")
def user_plan(config_only_hub: Path):
    specs = load_model_configs(USER_CONFIG).models
    assert all(set(spec.model_fields_set) <= {"provider", "model"} for spec in specs.values())  # the file as it is
    estimates = {role: estimate_memory(spec, cache_dir=config_only_hub, fetch=False) for role, spec in specs.items()}
    return make_plan(specs, parse_gpu_spec("2x24GB"), estimates=estimates)


def test_the_users_file_on_the_real_configs_plans_what_the_engine_builds(user_plan) -> None:
    assert user_plan.entry("buffer_agent").gpu_indices == (1,)
    assert user_plan.entry("summarizer").gpu_indices == (0,)
    references = {"buffer_agent": MEDGEMMA_27B_TEXT, "summarizer": MEDGEMMA_4B}
    for role, reference in references.items():
        entry = user_plan.entry(role)
        plan = entry.replica
        assert plan is not None and plan.kv is not None and plan.kv.pool is not None
        assert entry.estimate.source == "config" and plan.quantization.label == "nf4 (pre-quantized)"
        # The configs say 131072 positions; the plan sizes (and the engine serves) 4096.
        assert to_config(reference).get_text_config().max_position_embeddings == 131072
        assert plan.context_length == plan.kv.pool.context_length == 4096
        assert plan.batch_sequences == plan.kv.pool.sequences == 4
        # What transformers' continuous batching allocates for the plan's num_blocks, on the meta device.
        text_config = to_config(reference).get_text_config()
        built_pool = _transformers_pool_bytes(text_config, plan.kv.pool.num_blocks, plan.batch_sequences)
        assert built_pool == plan.kv.pool_bytes
        side = side_sequence_bytes(text_config, context_length=plan.context_length, dtype=torch.bfloat16)
        assert plan.kv.side_bytes == plan.kv.side_sequences * side
        # The whole KV the replica may hold is what the planner budgeted for it.
        assert plan.kv.total_bytes == plan.kv_budget_bytes == entry.estimate.kv_cache_bytes
        print(f"\n{role}: KV planned = built {plan.kv.total_bytes / GIB:.2f} GiB ({plan.kv.describe()})")


def test_the_readme_memory_table_is_this_plan(user_plan) -> None:
    """The README's table for the user's two models is what the planner computes from their configs."""
    readme = (REPO_ROOT / "README.md").read_text()
    rows = {"buffer_agent": "| MedGemma 27B text |", "summarizer": "| MedGemma 4B (vision tower unquantized) |"}
    for role, start in rows.items():
        line = next(line for line in readme.splitlines() if line.startswith(start))
        figures = [float(x) for x in re.findall(r"(\d+\.\d+) GiB", line)]
        entry = user_plan.entry(role)
        plan, estimate = entry.replica, entry.estimate
        assert plan is not None and plan.kv is not None
        expected = [
            plan.weights_bytes / GIB,
            plan.kv.pool_bytes / GIB,
            plan.kv.side_bytes / GIB,
            estimate.runtime_bytes / GIB,
            estimate.total_bytes / GIB,
        ]
        assert figures == [round(x, 2) for x in expected], (role, line)
        assert f"GPU {entry.gpu_indices[0]}" in line


def test_one_quantization_decision_for_the_plan_and_the_load(tiny_text_model_dir: Path, tmp_path: Path) -> None:
    """A checkpoint named '…-4bit' that is not pre-quantized: the plan budgets NF4 and the loader
    quantizes it (before, the loader's own rule read only 'bnb-4bit' and loaded it unquantized)."""
    import bitsandbytes as bnb

    directory = tmp_path / "tiny-gemma3-4bit"
    shutil.copytree(tiny_text_model_dir, directory)
    spec = ModelSpec(model=str(directory))
    plan = replica_plan(spec)
    assert plan.quantization.scheme == "nf4" and not plan.quantization.prequantized
    assert plan.quantization.load_arguments() is not None
    loaded = load_model(spec, plan)
    assert loaded.quantization == "nf4"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    Engine(loaded, plan).close()  # the contract holds: weights within 2% of the NF4 plan


def test_the_quantization_rules() -> None:
    bnb = read_checkpoint_quantization({"quantization_config": _unsloth_nf4(["lm_head"])})
    gptq = read_checkpoint_quantization({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    # A pre-quantized bnb checkpoint loads as saved, whatever is asked.
    assert decide_quantization("int8", bnb, "x").label == "nf4 (pre-quantized)"
    assert decide_quantization("auto", bnb, "x").load_arguments() is None
    # Another method's 4-bit checkpoint is never re-quantized by bitsandbytes, whatever its name says.
    assert decide_quantization("auto", gptq, "org/model-gptq-4bit").scheme == "none"
    # Names: '4bit' → nf4 and '8bit' → int8 at load; nothing else unless asked.
    assert decide_quantization("auto", NOT_QUANTIZED, "org/model-4bit").scheme == "nf4"
    assert decide_quantization("auto", NOT_QUANTIZED, "org/model-8bit").scheme == "int8"
    assert decide_quantization("auto", NOT_QUANTIZED, "org/model").scheme == "none"
    assert decide_quantization("int8", NOT_QUANTIZED, "org/model").load_arguments() == {
        "load_in_8bit": True,
        "llm_int8_skip_modules": ["lm_head"],
    }
    with pytest.raises(ValueError, match="unknown quantization"):
        decide_quantization("fp8", NOT_QUANTIZED, "org/model")


FIXTURE_MODELS = ["tiny_text_model_dir", "tiny_vision_model_dir", "text_twin_dir", "vision_twin_dir"]


@pytest.mark.parametrize("fixture", FIXTURE_MODELS)
def test_every_fixture_model_is_built_as_planned(fixture: str, request: pytest.FixtureRequest) -> None:
    directory = request.getfixturevalue(fixture)
    spec = ModelSpec(model=str(directory))
    plan = replica_plan(spec)
    engine = Engine(load_model(spec, plan), plan)  # raises PlanContractError when built ≠ planned
    try:
        report = engine.kv_report()
        assert plan.kv is not None
        assert report["pool_bytes"] == plan.kv.pool_bytes and report["built_bytes"] <= plan.kv_budget_bytes
        assert abs(engine.weights_bytes - plan.weights_bytes) <= 0.02 * plan.weights_bytes
        assert engine.context_length == plan.context_length
    finally:
        engine.close()


def test_the_vision_tower_stays_unquantized_in_the_plan_and_the_load(vision_twin_dir: Path) -> None:
    """The checkpoint lists bare "vision_tower" / "multi_modal_projector" (unsloth's names), which
    transformers 5 would apply to none of the tower's linears (tests/test_twins.py pins that): the plan
    prices the tower in bf16 and the loader keeps it there, so an image request works."""
    import bitsandbytes as bnb

    spec = ModelSpec(model=str(vision_twin_dir))
    plan = replica_plan(spec)
    loaded = load_model(spec, plan)
    tower = loaded.model.model.vision_tower.encoder.layers[0].self_attn.q_proj
    assert type(tower) is torch.nn.Linear and tower.weight.dtype == torch.bfloat16
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.model.language_model.modules())
    engine = Engine(loaded, plan)  # weights within 2% of the plan
    try:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), "blue").save(buffer, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]
        messages = ({"role": "user", "content": content},)
        request = GenerationInput(params=SamplingParams(max_tokens=4, temperature=0), messages=messages)
        assert engine.generate_batch([request])[0].completion_tokens == 4
    finally:
        engine.close()


def test_images_per_request_are_capped_and_priced(vision_twin_dir: Path) -> None:
    """The plan's runtime holds `max_images_per_request` images (pixels, vision tower, features); a
    request with more is a 400-class InvalidRequest before anything is decoded."""
    from deployments.engine.errors import InvalidRequest
    from placement.sizing.image_workspace import image_workspace

    spec = ModelSpec(model=str(vision_twin_dir), max_images_per_request=2)
    plan = replica_plan(spec)
    assert plan.max_images == 2
    estimate = estimate_memory(spec)
    config = json.loads((vision_twin_dir / "config.json").read_text())
    workspace = image_workspace(config, dtype_bytes=2, max_images=2)
    assert workspace is not None and estimate.image_workspace_bytes == workspace.total_bytes > 0
    assert estimate_memory(spec.model_copy(update={"max_images_per_request": 4})).runtime_bytes == (
        estimate.runtime_bytes + workspace.total_bytes
    )
    engine = Engine(load_model(spec, plan), plan)
    try:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), "red").save(buffer, "PNG")
        part = {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
        }
        three = ({"role": "user", "content": [part, part, part, {"type": "text", "text": "Compare."}]},)
        with pytest.raises(InvalidRequest, match="carries 3 images.*at most 2"):
            engine.generate_batch([GenerationInput(params=SamplingParams(max_tokens=2, temperature=0), messages=three)])
        two = ({"role": "user", "content": [part, part, {"type": "text", "text": "Compare."}]},)
        out = engine.generate_batch([GenerationInput(params=SamplingParams(max_tokens=2, temperature=0), messages=two)])
        assert out[0].completion_tokens == 2
    finally:
        engine.close()
