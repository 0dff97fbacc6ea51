"""Every byte a replica holds on a GPU is in the plan, on the GPU where the engine puts it.

- A CUDA context per engine process: each replica (its engine process, or the
  replica itself with `engine_process: false`) opens its own context on each
  GPU it uses, outside torch's allocator. The planner charges one per replica
  per GPU in the GPU's planned bytes and fractions; the allocator caps
  (`ReplicaPlan.gpu_budgets`) stay the torch-side budget.
- A split model's KV where transformers allocates it: the continuous-batching
  pool and the side caches go on `model.device`, the split's local cuda:0, so
  its KV and runtime are planned there and accelerate is given only the weights
  for each GPU (`weights_max_memory`), checked here with transformers' own
  device-map code on a meta-device MedGemma 27B under the bitsandbytes quantizer.

Sizes in GiB; a 24 GiB GPU has 22.8 GiB usable (5% margin), a 12 GiB one 11.4.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from plans import replica_plan

from placement.config import ModelSpec
from placement.estimate import MemoryEstimate
from placement.inventory import Reserve, parse_gpu_spec
from placement.plan import PlanError
from placement.planner import SPLIT_RUNTIME_SHARE, make_plan
from placement.replica import QUANTIZER_MAX_MEMORY_FACTOR
from placement.units import GIB

CONTEXT = Reserve().cuda_context_bytes
CAPACITY_24 = 24 * GIB - int(0.05 * 24 * GIB)


def lump(gib: float) -> MemoryEstimate:
    return MemoryEstimate.lump(int(gib * GIB), source="memory_gb", params=1_000_000)


def spec(**fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({"model": "org/m", **fields})


# ---- one CUDA context per engine process ----------------------------------------------------------


def test_two_models_sharing_a_gpu_are_charged_two_contexts() -> None:
    plan = make_plan({"a": spec(), "b": spec()}, parse_gpu_spec("1x24GB"), estimates={"a": lump(8), "b": lump(6)})
    (gpu,) = plan.gpus
    assert (gpu.cuda_contexts, gpu.cuda_context_bytes) == (2, 2 * CONTEXT)
    assert gpu.planned_bytes == 14 * GIB + 2 * CONTEXT
    for role, size in (("a", 8), ("b", 6)):
        entry = plan.entry(role)
        assert entry.cuda_context_bytes == CONTEXT
        # The fraction Ray holds counts the context; the allocator cap does not (it is not torch's memory).
        assert entry.fraction == (size * GIB + CONTEXT) * 1000 // CAPACITY_24 / 1000
        assert entry.replica is not None and entry.replica.gpu_budgets == (size * GIB,)


def test_two_replicas_on_one_gpu_are_charged_two_contexts() -> None:
    plan = make_plan({"pair": spec(replicas=2)}, parse_gpu_spec("1x24GB"), estimates={"pair": lump(5)})
    (gpu,) = plan.gpus
    pair = plan.entry("pair")
    assert gpu.cuda_contexts == 2 and gpu.planned_bytes == 2 * (5 * GIB + CONTEXT)
    assert gpu.fraction_used == pytest.approx(2 * pair.fraction)
    assert pair.replica is not None and pair.replica.gpu_budgets == (5 * GIB,)  # each replica's cap


def test_a_split_is_charged_one_context_on_each_of_its_gpus() -> None:
    plan = make_plan({"big": spec(split=True)}, parse_gpu_spec("2x24GB"), estimates={"big": lump(30)})
    big = plan.entry("big")
    assert big.gpu_indices == (0, 1) and big.cuda_context_bytes == CONTEXT
    assert [(g.cuda_contexts, g.planned_bytes) for g in plan.gpus] == [(1, 15 * GIB + CONTEXT)] * 2
    assert big.replica is not None and sum(big.replica.gpu_budgets) == 30 * GIB


def test_a_plan_that_fit_only_beside_one_shared_context_is_infeasible_and_says_why() -> None:
    models = {"a": spec(gpu=0), "b": spec(gpu=0)}
    estimates = {"a": lump(12), "b": lump(10)}
    # The old reserve held one 0.5 GiB context per GPU: 24 - 0.5 - 1.2 = 22.3 GiB for 22 GiB of models.
    assert 22 * GIB <= 24 * GIB - CONTEXT - int(0.05 * 24 * GIB)
    # Two engine processes hold two contexts: 22 + 1 > 22.8.
    with pytest.raises(PlanError) as raised:
        make_plan(models, parse_gpu_spec("1x24GB"), estimates=estimates)
    assert [u.role for u in raised.value.unplaced] == ["b"]
    message = str(raised.value)
    assert "b needs 10.00 GiB + 0.50 GiB for the CUDA context of its engine process" in message
    assert "holds a, 1 CUDA context(s)" in message
    # Without contexts the same models fit: the contexts are what the plan now counts.
    make_plan(models, parse_gpu_spec("1x24GB"), estimates=estimates, reserve=Reserve(cuda_context_bytes=0))


def test_replicas_that_do_not_fit_name_their_contexts() -> None:
    with pytest.raises(PlanError, match=r"needs 30.00 GiB \+ 3 × 0.50 GiB for the CUDA contexts of its replicas"):
        make_plan({"trio": spec(replicas=3)}, parse_gpu_spec("1x24GB"), estimates={"trio": lump(10)})


def test_the_plan_json_and_table_show_the_contexts(capsys: pytest.CaptureFixture[str]) -> None:
    from rich.console import Console

    from placement.render import plan_to_dict, print_plan

    plan = make_plan({"a": spec(), "b": spec()}, parse_gpu_spec("1x24GB"), estimates={"a": lump(8), "b": lump(6)})
    data = json.loads(json.dumps(plan_to_dict(plan)))
    assert [(g["cuda_contexts"], g["cuda_context_bytes"]) for g in data["gpus"]] == [(2, 2 * CONTEXT)]
    assert [(m["cuda_context_bytes"], m["gpu_budgets"]) for m in data["models"]] == [
        (CONTEXT, [8 * GIB]),
        (CONTEXT, [6 * GIB]),
    ]
    print_plan(plan, Console(width=250))
    table = capsys.readouterr().out
    assert "CUDA contexts" in table and "2 × 0.50 GiB" in table and "+ 0.50 GiB CUDA context per GPU" in table


# ---- the user's two models on the real configs ------------------------------------------------------


@pytest.fixture(scope="module")
def medgemma() -> dict[str, MemoryEstimate]:
    from placement.sizing.estimate import estimate_from_config
    from placement.sizing.reference_configs import MEDGEMMA_4B, MEDGEMMA_27B_TEXT

    return {
        "buffer_agent": estimate_from_config(MEDGEMMA_27B_TEXT, quantization="nf4"),
        "summarizer": estimate_from_config(MEDGEMMA_4B, quantization="nf4", skip_modules=["vision_tower"]),
    }


def test_the_users_two_models_still_fit_two_24gb_cards_with_their_contexts(medgemma) -> None:
    specs = {"buffer_agent": spec(), "summarizer": spec()}
    plan = make_plan(specs, parse_gpu_spec("2x24GB"), estimates=medgemma)
    assert plan.entry("buffer_agent").gpu_indices == (1,) and plan.entry("summarizer").gpu_indices == (0,)
    for role, index in (("summarizer", 0), ("buffer_agent", 1)):
        gpu = plan.gpus[index]
        assert gpu.planned_bytes == medgemma[role].total_bytes + CONTEXT and gpu.cuda_contexts == 1
        assert gpu.headroom_bytes > 0
        print(f"\nGPU {index}: {role} {gpu.planned_bytes / GIB:.2f} GiB, {gpu.headroom_bytes / GIB:.2f} GiB free")


# ---- a split: KV and runtime on cuda:0, weights around them ---------------------------------------


@pytest.fixture(scope="module")
def split_27b(medgemma):
    """MedGemma 27B (bnb NF4, 4 × 4096 tokens) split over two 12 GB cards."""
    plan = make_plan({"buffer_agent": spec(split=True)}, parse_gpu_spec("2x12GB"), estimates=medgemma)
    return plan, plan.entry("buffer_agent")


def test_a_split_plans_its_kv_and_runtime_on_its_first_gpu(split_27b) -> None:
    plan, entry = split_27b
    replica, estimate = entry.replica, entry.estimate
    assert replica is not None and entry.gpu_indices == (0, 1) and replica.is_split
    budgets, weights = replica.gpu_budgets, replica.weights_max_memory
    # GPU 1 holds its weights and its layers' runtime share; cuda:0 the rest of the runtime and the whole KV.
    moved = budgets[1] - weights[1]
    assert moved == math.floor(SPLIT_RUNTIME_SHARE * weights[1])
    kv_and_runtime = estimate.kv_cache_bytes + estimate.runtime_bytes - moved
    assert budgets[0] == weights[0] + kv_and_runtime
    # accelerate may fill cuda:0 with weights up to its share only: exactly the KV + runtime stay free under the cap.
    assert budgets[0] - replica.weights_max_memory[0] == kv_and_runtime
    # Nothing is lost or counted twice: the caps sum to the estimate, the shares to the weights.
    assert sum(budgets) == estimate.total_bytes == replica.memory_budget_bytes
    assert sum(weights) == estimate.weights_bytes + estimate.quant_overhead_bytes == replica.weights_bytes
    # The KV pushes weights off cuda:0 (an even split of the whole estimate gave both GPUs the same share).
    assert weights[0] < weights[1]
    assert entry.max_memory == {0: weights[0], 1: weights[1]}
    # The contexts sit beside the caps, one on each GPU, and both GPUs stay within what is usable.
    for local, gpu in enumerate(plan.gpus):
        assert gpu.planned_bytes == budgets[local] + CONTEXT <= gpu.usable_bytes
    print(
        f"\n27B split on 2x12GB: caps {[round(b / GIB, 2) for b in budgets]} GiB, "
        f"weights {[round(w / GIB, 2) for w in weights]} GiB, KV {estimate.kv_cache_bytes / GIB:.2f} GiB on cuda:0"
    )


def test_the_split_runtime_share_is_the_estimates_weight_share() -> None:
    from placement.sizing.estimate import RUNTIME_WEIGHT_SHARE

    assert SPLIT_RUNTIME_SHARE == RUNTIME_WEIGHT_SHARE


def test_accelerate_gets_the_weights_in_its_own_accounting() -> None:
    unquantized = dataclasses.replace(
        replica_plan(spec(memory_gb=1)),
        device="gpu",
        gpu_budgets=(5 * GIB, 4 * GIB),
        weights_max_memory=(3 * GIB, 3 * GIB + GIB // 2),
    )
    assert unquantized.quantization.scheme == "none" and unquantized.device_map == "auto"
    # Every GPU but the last: its weights share; the last takes what accelerate's whole layers leave over.
    assert unquantized.accelerate_max_memory == {0: 3 * GIB, 1: 4 * GIB}
    quantized = dataclasses.replace(
        unquantized,
        quantization=dataclasses.replace(unquantized.quantization, scheme="nf4"),
        weights_bytes=100,
        quant_overhead_bytes=4,
    )
    # Counted without bitsandbytes' side tensors (96 of 100), and the quantizer's 90% divided back out.
    expected = {0: int(3 * GIB * 0.96 / QUANTIZER_MAX_MEMORY_FACTOR), 1: int(4 * GIB * 0.96 / 0.9)}
    assert quantized.accelerate_max_memory == expected
    assert quantized.on_cpu().accelerate_max_memory is None and quantized.on_cpu().weights_max_memory == ()


def _meta_27b(quantizer: Any = None) -> Any:
    import torch

    from placement.sizing.meta_model import build_meta_model
    from placement.sizing.reference_configs import MEDGEMMA_27B_TEXT

    model = build_meta_model(MEDGEMMA_27B_TEXT).to(torch.bfloat16)  # from_pretrained builds it in the plan's dtype
    if quantizer is not None:
        quantizer.preprocess_model(model, device_map="auto", keep_in_fp32_modules=[])
    return model


def test_accelerate_places_the_27b_weights_as_planned(split_27b) -> None:
    """transformers' own device-map code (what from_pretrained runs for device_map="auto"), on a
    meta-device MedGemma 27B under the bitsandbytes quantizer, given the loader's max_memory."""
    from transformers import BitsAndBytesConfig
    from transformers.integrations.accelerate import _get_device_map
    from transformers.quantizers import AutoHfQuantizer

    from placement.sizing.meta_model import weight_tensors
    from placement.sizing.pricing import price

    _, entry = split_27b
    replica = entry.replica
    assert replica is not None
    config = BitsAndBytesConfig(  # unsloth's bnb-4bit checkpoints, as the plan sized them
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=["lm_head"],
    )
    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)
    device_map = _get_device_map(_meta_27b(quantizer), "auto", replica.accelerate_max_memory, quantizer)
    assert set(device_map.values()) == {0, 1}  # nothing offloaded to CPU or disk (which bnb refuses)

    def device_of(name: str) -> int:
        prefix = max((p for p in device_map if p == "" or name == p or name.startswith(p + ".")), key=len)
        return device_map[prefix]

    # The embedding on cuda:0, so model.device (where the KV pool and side caches go) is cuda:0.
    assert device_of("model.embed_tokens.weight") == 0
    # The bytes each GPU holds, priced as the planner prices the weights (bitsandbytes' side tensors included).
    held = {0: 0, 1: 0}
    tensors = weight_tensors(_meta_27b())
    for tensor in tensors:
        cost = price([tensor], scheme="nf4", dtype_bytes=2)
        held[device_of(tensor.name)] += cost.weights + cost.quant_overhead
    assert sum(held.values()) == replica.weights_bytes
    # cuda:0 holds no more weights than planned: its KV and runtime have their room under the cap.
    assert held[0] <= replica.weights_max_memory[0]
    # The layers accelerate left over from cuda:0 fit GPU 1's cap (its weights + its layers' runtime share).
    assert held[1] <= replica.gpu_budgets[1]
    print(
        f"\naccelerate places {held[0] / GIB:.2f} / {held[1] / GIB:.2f} GiB; plan: weights "
        f"{replica.weights_max_memory[0] / GIB:.2f} / {replica.weights_max_memory[1] / GIB:.2f}, "
        f"caps {replica.gpu_budgets[0] / GIB:.2f} / {replica.gpu_budgets[1] / GIB:.2f} GiB"
    )


def test_the_loader_gives_accelerate_the_plans_weights(tiny_text_model_dir: Path, monkeypatch) -> None:
    from deployments.engine import loading

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def from_pretrained(path: str, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    model_spec = ModelSpec(model=str(tiny_text_model_dir))
    split = dataclasses.replace(
        replica_plan(model_spec), device="gpu", gpu_budgets=(3 * GIB, 2 * GIB), weights_max_memory=(GIB, GIB)
    )
    with pytest.raises(loading.ModelLoadError):
        loading.load_model(model_spec, split)
    assert seen["device_map"] == "auto"
    assert seen["max_memory"] == split.accelerate_max_memory != dict(enumerate(split.gpu_budgets))
