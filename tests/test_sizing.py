"""placement.sizing: parameter counts, quantized bytes, KV cache, and the source order.

Published parameter counts are checked against configs written out below with
their real values; tiny random Gemma 3 models saved to tmp_path (plain and bnb
NF4 on CPU) check the safetensors path against the bytes actually saved and
held. Nothing here touches the network.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from placement.config import ModelSpec
from placement.demo_models import smollm2_gguf
from placement.sizing import SizingError, count_parameters, estimate_from_config, estimate_memory
from placement.sizing.estimate import PARAMS_B_LINEAR_SHARE
from placement.sizing.name_guess import guess_params_from_name
from placement.sizing.quantization import nf4_cost
from placement.sizing.reference_configs import MEDGEMMA_4B as GEMMA3_4B_MULTIMODAL
from placement.sizing.reference_configs import MEDGEMMA_27B_TEXT as GEMMA3_27B_TEXT
from placement.sizing.safetensors_header import read_header
from placement.units import GIB, MIB

# --- Published configs (config.json values) -------------------------------------------------

LLAMA_31_8B: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
}
MISTRAL_7B_V01: dict[str, Any] = {
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
}
QWEN25_32B: dict[str, Any] = {  # q/k/v projections carry biases
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 152064,
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "max_window_layers": 64,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize(
    ("config", "published"),
    [
        pytest.param(GEMMA3_27B_TEXT, 27.0e9, id="gemma3-27b-text"),
        pytest.param(LLAMA_31_8B, 8.03e9, id="llama-3.1-8b"),
        pytest.param(MISTRAL_7B_V01, 7.24e9, id="mistral-7b-v0.1"),
        pytest.param(QWEN25_32B, 32.76e9, id="qwen2.5-32b"),
        pytest.param(GEMMA3_4B_MULTIMODAL, 4.3e9, id="gemma3-4b-multimodal"),
    ],
)
def test_parameter_counts_match_published(config: dict[str, Any], published: float) -> None:
    counts = count_parameters(config)
    assert abs(counts.total - published) / published < 0.01
    assert counts.total == counts.quantizable + counts.other
    # Linear layers hold most of an LLM; embeddings (and lm_head, never quantized) the rest.
    assert 0.8 < counts.quantizable / counts.total < 0.97


def test_llama_counts_worked_out() -> None:
    # Per layer: q,o 4096² + k,v 4096×1024 + MLP 3×4096×14336 = 218,103,808 linear weights, 2 norms of 4096.
    # Untied embed + lm_head: 2 × 128256 × 4096 (lm_head is linear but never quantized).
    counts = count_parameters(LLAMA_31_8B)
    assert counts.quantizable == 32 * 218_103_808
    assert counts.other == 2 * 128256 * 4096 + 32 * 2 * 4096 + 4096


def test_medgemma_27b_text_nf4() -> None:
    started = time.perf_counter()
    estimate = estimate_from_config(GEMMA3_27B_TEXT, quantization="nf4")
    print(f"\n27B config estimate: {time.perf_counter() - started:.2f} s")
    assert estimate.source == "config" and estimate.quantization == "nf4"
    held = estimate.weights_bytes + estimate.quant_overhead_bytes
    assert 14.5 * GIB < held < 16.5 * GIB  # 25.6B linears at ~0.52 B + 1.41B embedding at 2 B
    # Double-quant NF4: 0.5 + 1/64 + 4/(64·256) B/param on the linears, plus ~1 KiB of code books
    # for each of the 434 linears.
    linears = count_parameters(GEMMA3_27B_TEXT).quantizable
    assert estimate.weights_bytes - (estimate.params - linears) * 2 == linears // 2
    assert estimate.quant_overhead_bytes == pytest.approx(linears * (1 / 64 + 4 / (64 * 256)) + 434 * 1088, rel=1e-4)

    # 52 of 62 layers slide over 1024 tokens: KV at 4096 × 4 is well under the all-global figure.
    all_global = {**GEMMA3_27B_TEXT, "layer_types": ["full_attention"] * 62}
    no_sliding = estimate_from_config(all_global, quantization="nf4")
    # KV = transformers' paged pool for 4 × 4096 tokens + one side sequence (placement.sizing.kv_budget).
    per_layer_token = 2 * 16 * 128 * 2
    page = per_layer_token * 64  # 512 KiB
    # All global: blocks of 62 pages, one block per sector; 4 × 64 blocks + 2 trash sectors.
    # Side sequence: every layer at 4096, plus one layer growing (placement.sizing.kv_budget.side_sequence_bytes).
    assert no_sliding.kv_cache_bytes == (4 * 64 + 2) * 62 * page + per_layer_token * (62 * 4096 + 4096)
    # 10 global + 52 sliding layers: a sector is lcm(10, 52) = 260 pages; 4 × 64 global blocks take
    # ceil(256 / 26) = 10 sectors, 4 × 16 sliding blocks ceil(64 / 5) = 13, plus 2 trash sectors.
    # Side sequence: sliding layers hold window − 1 + a 256-token prefill pass; plus one layer growing.
    side = per_layer_token * (10 * 4096 + 52 * (1023 + 256) + 4096)
    assert estimate.kv_cache_bytes == (10 + 13 + 2) * 260 * page + side
    # Logprob workspace (placement.sizing.logprob_workspace), vocabulary 262,208 in bf16: prompt
    # scoring takes 64 MiB // (262208 × (2 × 2 + 8) B) = 21 positions a pass; 4 + 1 decoding rows
    # keep 8 B per vocabulary entry.
    assert estimate.logprob_workspace_bytes == 21 * 262208 * 12 + 5 * 262208 * 8
    # Logits rules (placement.sizing.rules_workspace): the same 5 rows × 12 B + 24 B per vocabulary entry.
    assert estimate.rules_workspace_bytes == (5 * 12 + 24) * 262208
    workspaces = estimate.logprob_workspace_bytes + estimate.rules_workspace_bytes
    assert estimate.runtime_bytes == 256 * MIB + math.ceil(0.05 * held) + workspaces


def test_medgemma_4b_multimodal_uses_text_config_for_kv() -> None:
    estimate = estimate_from_config(GEMMA3_4B_MULTIMODAL, quantization="nf4", context_length=8192, batch_size=1)
    # 34 layers: every 6th global → 5 global, 29 sliding; 4 KV heads × 256.
    # Pool: sectors of lcm(5, 29) = 145 pages; 128 global blocks → ceil(128 / 29) = 5 sectors,
    # 16 sliding blocks → ceil(16 / 5) = 4, + 2 trash; then one side sequence.
    per_layer_token = 2 * 4 * 256 * 2
    pool = (5 + 4 + 2) * 145 * per_layer_token * 64
    assert estimate.kv_cache_bytes == pool + per_layer_token * (5 * 8192 + 29 * (1023 + 256) + 8192)
    assert 2.5 * GIB < estimate.weights_bytes + estimate.quant_overhead_bytes < 3.5 * GIB


def test_int8_and_none_costs() -> None:
    counts = count_parameters(LLAMA_31_8B)
    none = estimate_from_config(LLAMA_31_8B, quantization="none")
    assert none.weights_bytes == 2 * counts.total and none.quant_overhead_bytes == 0
    int8 = estimate_from_config(LLAMA_31_8B, quantization="int8")
    assert int8.weights_bytes == counts.quantizable + 2 * counts.other
    rows_per_layer = 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096  # q k v o gate up down
    assert int8.quant_overhead_bytes == 4 * 32 * rows_per_layer


def test_nf4_cost_formula() -> None:
    n = 64 * 256 * 10
    assert nf4_cost(n, double_quant=False).overhead_bytes == 4 * n // 64 + 64
    assert nf4_cost(n, double_quant=True).overhead_bytes == n // 64 + 4 * 10 + 256 * 4 + 64


# --- Tiny checkpoints on disk ----------------------------------------------------------------


def _tiny_gemma3_config() -> Any:
    from transformers import Gemma3TextConfig

    # Linear dims are multiples of 64: bitsandbytes' CPU 4-bit path needs whole blocks.
    return Gemma3TextConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        sliding_window=64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_gemma3_config(), dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny-gemma3")
    model.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def _file_tensor_bytes(path: Path) -> int:
    return sum(t.nbytes for f in path.glob("*.safetensors") for t in read_header(f).values())


def test_safetensors_plain_checkpoint_exact(tiny_dir: tuple[Path, int]) -> None:
    path, params = tiny_dir
    estimate = estimate_memory(ModelSpec(model=str(path), quantization="none"))
    assert estimate.source == "safetensors"
    assert estimate.params == params
    assert estimate.weights_bytes == 2 * params == _file_tensor_bytes(path)
    # KV from config.json: both layers slide (Gemma 3 makes every 6th global), so each holds 64 of
    # the 256 default-context tokens; 1 KV head × 64 dims, batch 4.
    assert estimate.context_length == 256
    # Pool: blocks of 2 pages (one sector each), 1 per request, 4 requests + 2 trash; + 1 side sequence.
    per_layer_token = 2 * 1 * 64 * 2
    # Side: each sliding layer holds 63 + a prefill pass of one window (64), plus one layer growing.
    assert estimate.kv_cache_bytes == (4 + 2) * 2 * per_layer_token * 64 + per_layer_token * 3 * (63 + 64)


def test_safetensors_quantize_at_load_matches_meta_model(tiny_dir: tuple[Path, int]) -> None:
    # The header heuristic (2-D *.weight, not embeddings/norms/lm_head) must pick the same
    # tensors as the meta model's nn.Linear modules.
    path, _ = tiny_dir
    from_files = estimate_memory(ModelSpec(model=str(path), quantization="nf4"))
    from_config = estimate_from_config(json.loads((path / "config.json").read_text()), quantization="nf4")
    assert from_files.quantization == "nf4"
    assert (from_files.weights_bytes, from_files.quant_overhead_bytes) == (
        from_config.weights_bytes,
        from_config.quant_overhead_bytes,
    )


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-double-quant"])
def test_safetensors_bnb_nf4_checkpoint(tiny_dir: tuple[Path, int], tmp_path: Path, double_quant: bool) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path, params = tiny_dir
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant)
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map="cpu", dtype=torch.bfloat16)
    in_memory = sum(p.numel() * p.element_size() for p in loaded.parameters())
    in_memory += sum(b.numel() * b.element_size() for b in loaded.buffers())
    saved = tmp_path / "tiny-bnb-4bit"
    loaded.save_pretrained(saved)

    estimate = estimate_memory(ModelSpec(model=str(saved)))  # quantization: auto
    assert estimate.source == "safetensors"
    assert estimate.quantization == "nf4"
    assert estimate.params == params
    # Everything saved is held on the device except the quant_state JSON blobs (80–170 B per linear).
    headers = read_header(saved / "model.safetensors")
    json_blobs = sum(t.nbytes for name, t in headers.items() if ".quant_state." in name)
    assert 0 < json_blobs < 200 * 14
    assert estimate.weights_bytes + estimate.quant_overhead_bytes == _file_tensor_bytes(saved) - json_blobs
    # Parameters + buffers of the loaded model (bnb keeps absmax outside them).
    assert abs(estimate.weights_bytes - in_memory) / in_memory < 0.05
    # The load-time formula agrees with what bnb actually saved.
    predicted = estimate_memory(ModelSpec(model=str(path), quantization="nf4"))
    if double_quant:
        assert predicted.quant_overhead_bytes == estimate.quant_overhead_bytes
    assert predicted.weights_bytes == estimate.weights_bytes


def test_hf_cache_snapshot(tiny_dir: tuple[Path, int], tmp_path: Path) -> None:
    # The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}.
    path, params = tiny_dir
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-gemma3"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in path.iterdir():
        (snapshot / file.name).symlink_to(file)
    estimate = estimate_memory(ModelSpec(model="someone/tiny-gemma3", quantization="none"), cache_dir=tmp_path / "hub")
    assert estimate.source == "safetensors" and estimate.params == params
    assert any("HF cache" in note for note in estimate.notes)
    # With only config.json cached, the meta-device build takes over.
    (snapshot / "model.safetensors").unlink()
    from_config = estimate_memory(
        ModelSpec(model="someone/tiny-gemma3", quantization="none"), cache_dir=tmp_path / "hub"
    )
    assert from_config.source == "config" and from_config.params == params


# --- GGUF, overrides, counts, names ----------------------------------------------------------


def test_gguf_header() -> None:
    directory, name = smollm2_gguf()  # the demo's PyPI GGUF (scripts/install.sh installs it)
    gguf_path = directory / name
    estimate = estimate_memory(ModelSpec(model=str(gguf_path)))
    # SmolLM2-135M: 30 layers, hidden 576, tied 49152-token embedding → 134,515,008 params.
    assert estimate.params == 134_515_008
    assert estimate.quantization == "none" and estimate.weights_bytes == 2 * estimate.params
    # 3 KV heads × 64 dims, 30 layers, context min(8192, 4096), batch 4.
    # Pool: 30-page blocks, one per sector, 4 × 64 blocks + 2 trash; + 1 side sequence.
    per_layer_token = 2 * 3 * 64 * 2
    assert estimate.kv_cache_bytes == (4 * 64 + 2) * 30 * per_layer_token * 64 + per_layer_token * 31 * 4096


def test_memory_gb_override_wins(tiny_dir: tuple[Path, int]) -> None:
    path, _ = tiny_dir
    estimate = estimate_memory(ModelSpec(model=str(path), memory_gb=3.5))
    assert estimate.source == "memory_gb"
    assert estimate.total_bytes == estimate.weights_bytes == int(3.5 * GIB)
    assert "override" in estimate.notes[0]


def test_params_b_when_no_files() -> None:
    estimate = estimate_memory(ModelSpec(model="nobody/not-cached-model", params_b=8.0, quantization="nf4"))
    assert estimate.source == "params_b" and not estimate.is_guess
    assert estimate.params == 8_000_000_000
    assert f"{PARAMS_B_LINEAR_SHARE:.0%}" in estimate.notes[0]
    assert 4 * GIB < estimate.weights_bytes + estimate.quant_overhead_bytes < 6 * GIB


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("unsloth/medgemma-27b-text-it-unsloth-bnb-4bit", 27e9),
        ("unsloth/medgemma-1.5-4b-it-unsloth-bnb-4bit", 4e9),  # not 1.5B, and not "4bit" → 4B
        ("google/gemma-3-270m", 270e6),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", 135e6),
        ("meta-llama/Llama-3.1-8B", 8e9),
        ("Qwen/Qwen2.5-1.5B-Instruct", 1.5e9),
        ("Qwen/Qwen3-30B-A3B", 30e9),
        ("mistralai/Mixtral-8x7B-v0.1", 56e9),
        ("someone/model-bnb-4bit", None),
        ("gpt2", None),
    ],
)
def test_name_guess(name: str, params: float | None) -> None:
    assert guess_params_from_name(name) == (int(params) if params else None)


def test_name_guess_is_loud() -> None:
    estimate = estimate_memory(ModelSpec(model="unsloth/medgemma-27b-text-it-unsloth-bnb-4bit-not-cached"))
    assert estimate.source == "name_guess" and estimate.is_guess
    assert estimate.quantization == "nf4"  # auto: "bnb-4bit" in the name
    assert estimate.notes[0].startswith("GUESS")


def test_nothing_works_raises() -> None:
    with pytest.raises(SizingError, match="nobody/mystery-model") as info:
        estimate_memory(ModelSpec(model="nobody/mystery-model"))
    assert "params_b" in str(info.value) and "Hugging Face cache" in str(info.value)
