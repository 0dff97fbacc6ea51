"""The twins of the production checkpoints (tests/twins.py) are what they claim to be.

Configs as the real MedGemma checkpoints load in the installed transformers,
Gemma's token ids, Gemma 3's chat template, bitsandbytes NF4 pre-quantization
with unsloth's bf16 modules, the hub-cache layout, and CPU generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from huggingface_hub import scan_cache_dir
from jinja2.exceptions import TemplateError
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Gemma3TextConfig,
    GenerationConfig,
)
from twins import (
    EOS_TOKEN_IDS,
    LAYER_TYPES,
    ROPE_PARAMETERS,
    SPECIAL_IDS,
    TEXT_REPO_ID,
    TOKENS_PER_IMAGE,
    VISION_REPO_ID,
    VISION_SKIP_MODULES,
    VISION_SKIP_MODULES_ANCHORED,
)

from placement.sizing.reference_configs import MEDGEMMA_4B, MEDGEMMA_27B_TEXT

# ---- configs ------------------------------------------------------------------------------


def _check_text_config(text: Gemma3TextConfig) -> None:
    assert text.model_type == "gemma3_text"
    assert text.layer_types == LAYER_TYPES == ["sliding_attention"] * 5 + ["full_attention"]
    assert text.sliding_window == 1024
    assert text.max_position_embeddings == 131072
    assert text.rope_parameters == ROPE_PARAMETERS
    assert text.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert text.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}
    assert text.final_logit_softcapping is None and text.attn_logit_softcapping is None
    assert text.tie_word_embeddings is True
    assert text.vocab_size == 262208
    assert (text.pad_token_id, text.bos_token_id, text.eos_token_id) == (0, 2, [1, 106])
    assert text.num_attention_heads == 2 * text.num_key_value_heads  # GQA 2:1, as 32:16 and 8:4
    assert text.head_dim * text.num_attention_heads != text.hidden_size  # q_proj not square, as in both
    assert text.intermediate_size == 4 * text.hidden_size
    linear_dims = {
        text.hidden_size,
        text.intermediate_size,
        text.head_dim * text.num_attention_heads,
        text.head_dim * text.num_key_value_heads,
    }
    assert all(dim % 64 == 0 for dim in linear_dims)  # bitsandbytes' CPU 4-bit blocks


def _check_quantization(config: AutoConfig, skip: list[str]) -> None:
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    assert quant["quant_method"] == "bitsandbytes" and quant["load_in_4bit"]
    assert quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_use_double_quant"]
    assert quant["bnb_4bit_compute_dtype"] == "bfloat16"
    assert quant["llm_int8_skip_modules"] == skip


def test_text_twin_config_is_medgemma_27b_text_but_its_sizes(text_twin_dir: Path) -> None:
    config = AutoConfig.from_pretrained(text_twin_dir)
    assert config.architectures == ["Gemma3ForCausalLM"]
    _check_text_config(config)
    assert config.query_pre_attn_scalar == config.hidden_size // config.num_attention_heads  # 27B: 5376 / 32
    _check_quantization(config, ["lm_head"])


def test_vision_twin_config_is_medgemma_4b_but_its_sizes(vision_twin_dir: Path) -> None:
    config = AutoConfig.from_pretrained(vision_twin_dir)
    assert config.architectures == ["Gemma3ForConditionalGeneration"] and config.model_type == "gemma3"
    _check_text_config(config.text_config)
    assert config.text_config.query_pre_attn_scalar == config.text_config.head_dim  # 4B: 256 = head_dim
    assert (config.image_token_index, config.boi_token_index, config.eoi_token_index) == (262144, 255999, 256000)
    assert config.mm_tokens_per_image == TOKENS_PER_IMAGE
    vision = config.vision_config
    assert vision.model_type == "siglip_vision_model" and vision.vision_use_head is False
    assert vision.vision_use_head == MEDGEMMA_4B["vision_config"]["vision_use_head"]
    patches_per_side = vision.image_size // vision.patch_size
    assert round(config.mm_tokens_per_image**0.5) ** 2 == config.mm_tokens_per_image
    assert patches_per_side % round(config.mm_tokens_per_image**0.5) == 0  # pooled evenly, as 64 → 16
    _check_quantization(config, VISION_SKIP_MODULES)


def test_generation_config_is_gemma_3s(text_twin_dir: Path, vision_twin_dir: Path) -> None:
    for directory in (text_twin_dir, vision_twin_dir):
        generation = GenerationConfig.from_pretrained(directory)
        assert generation.eos_token_id == EOS_TOKEN_IDS == [1, 106]
        assert (generation.bos_token_id, generation.pad_token_id) == (2, 0)
        assert generation.do_sample is True and (generation.top_k, generation.top_p) == (64, 0.95)


def test_the_hub_files_legacy_rope_keys_load_as_the_twins_rope_per_layer_type() -> None:
    """The MedGemma config.json files (transformers 4.5x) say rope_scaling / rope_theta / rope_local_base_freq /
    sliding_window_pattern; the installed transformers keys rope by layer type, as the twins' files do."""
    legacy = {
        "hidden_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 6,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window_pattern": 6,
    }
    loaded = Gemma3TextConfig.from_dict(legacy)
    assert loaded.rope_parameters == ROPE_PARAMETERS
    assert loaded.layer_types == LAYER_TYPES
    # The real-shaped reference config (placement.sizing) yields the same rope and the same period.
    real = Gemma3TextConfig(**{key: value for key, value in MEDGEMMA_27B_TEXT.items() if key != "model_type"})
    assert real.rope_parameters == ROPE_PARAMETERS
    assert real.layer_types[:6] == LAYER_TYPES and real.layer_types.count("full_attention") == 62 // 6


# ---- tokenizer and chat template ----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(text_twin_dir: Path):
    return AutoTokenizer.from_pretrained(text_twin_dir)


@pytest.fixture(scope="module")
def processor(vision_twin_dir: Path):
    return AutoProcessor.from_pretrained(vision_twin_dir)


def test_tokenizer_has_gemmas_ids(tokenizer, processor) -> None:
    assert type(tokenizer).__name__ == "GemmaTokenizer"
    assert len(tokenizer) == 262145
    for tok in (tokenizer, processor.tokenizer):
        assert {token: tok.convert_tokens_to_ids(token) for token in SPECIAL_IDS} == SPECIAL_IDS
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
        assert (tok.boi_token, tok.eoi_token, tok.image_token) == (
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        )
        assert tok.padding_side == "left"
    special = set(tokenizer.all_special_ids)
    assert {0, 1, 2, 3, 105, 106, 255999, 256000, 262144} <= special
    assert tokenizer.convert_ids_to_tokens(6) == "<unused0>"


def test_tokenizer_encodes_as_gemma(tokenizer) -> None:
    ids = tokenizer("Hello there, é")["input_ids"]
    assert ids[0] == 2  # <bos> added, as Gemma's tokenizer does
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello there, é"  # no dummy prefix; bytes fall back
    assert "<0xC3>" in tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.convert_tokens_to_ids("\n") == 107  # as in Gemma
    turn = tokenizer("<start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False)["input_ids"]
    assert turn[0] == 105 and turn[-1] == 106


def test_chat_template_folds_the_system_message_into_the_first_user_turn(tokenizer, processor) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "again"},
    ]
    expected = (
        "<bos><start_of_turn>user\nBe brief.\n\nhello<end_of_turn>\n"
        "<start_of_turn>model\nhi<end_of_turn>\n"
        "<start_of_turn>user\nagain<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


def test_chat_template_refuses_two_user_turns_in_a_row(tokenizer, processor) -> None:
    messages = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    for owner in (tokenizer, processor):
        with pytest.raises(TemplateError, match="Conversation roles must alternate"):
            owner.apply_chat_template(messages, tokenize=False)


def test_processor_expands_an_image_to_its_soft_tokens(processor) -> None:
    assert processor.image_seq_length == TOKENS_PER_IMAGE
    assert type(processor.image_processor).__name__.startswith("Gemma3ImageProcessor")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=Image.new("RGB", (50, 30), "red"), return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(262144) == TOKENS_PER_IMAGE and ids.count(255999) == 1 and ids.count(256000) == 1
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)


# ---- pre-quantized checkpoints ------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(text_twin_dir: Path):
    return AutoModelForCausalLM.from_pretrained(text_twin_dir, device_map="cpu")


def _assert_nf4_double_quant(linear: torch.nn.Module) -> None:
    assert isinstance(linear, bnb.nn.Linear4bit)
    assert isinstance(linear.weight, bnb.nn.Params4bit)
    state = linear.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantization: absmax quantized again
    assert state.dtype == torch.bfloat16


def test_text_twin_loads_pre_quantized(text_model) -> None:
    layer = text_model.model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        _assert_nf4_double_quant(getattr(layer.self_attn, name))
    for name in ("gate_proj", "up_proj", "down_proj"):
        _assert_nf4_double_quant(getattr(layer.mlp, name))
    assert type(text_model.lm_head) is torch.nn.Linear and text_model.lm_head.weight.dtype == torch.bfloat16
    assert text_model.lm_head.weight is text_model.model.embed_tokens.weight  # tied, bf16


def test_vision_twin_checkpoint_keeps_the_tower_and_projector_bf16(vision_twin_dir: Path) -> None:
    with safe_open(vision_twin_dir / "model.safetensors", "pt") as files:
        keys = list(files.keys())
        unquantized = [k for k in keys if k.startswith(("vision_tower.", "multi_modal_projector."))]
        assert unquantized and all(
            k.startswith(("vision_tower.vision_model.", "multi_modal_projector.")) for k in unquantized
        )
        assert {str(files.get_slice(k).get_dtype()) for k in unquantized} == {"BF16"}
    assert not [k for k in unquantized if ".quant_state." in k or k.endswith((".absmax", ".quant_map"))]
    quantized = {k.removesuffix(".quant_state.bitsandbytes__nf4") for k in keys if k.endswith("bitsandbytes__nf4")}
    assert quantized and all(k.startswith("language_model.model.layers.") for k in quantized)
    assert len(quantized) == 6 * 7  # every text Linear: q k v o gate up down × 6 layers


def _anchored(directory: Path) -> AutoConfig:
    """The config with a skip list that transformers 5.x matches (see twins.VISION_SKIP_MODULES_ANCHORED)."""
    config = AutoConfig.from_pretrained(directory)
    config.quantization_config["llm_int8_skip_modules"] = list(VISION_SKIP_MODULES_ANCHORED)
    return config


@pytest.fixture(scope="module")
def vision_model(vision_twin_dir: Path):
    return AutoModelForImageTextToText.from_pretrained(
        vision_twin_dir, config=_anchored(vision_twin_dir), device_map="cpu"
    )


def test_vision_twin_loads_nf4_text_and_a_bf16_tower(vision_model) -> None:
    tower_linear = vision_model.model.vision_tower.encoder.layers[0].self_attn.q_proj
    assert type(tower_linear) is torch.nn.Linear and tower_linear.weight.dtype == torch.bfloat16
    assert vision_model.model.multi_modal_projector.mm_input_projection_weight.dtype == torch.bfloat16
    layer = vision_model.model.language_model.layers[0]
    _assert_nf4_double_quant(layer.self_attn.q_proj)
    _assert_nf4_double_quant(layer.mlp.down_proj)


def test_transformers_5_misses_unsloths_bare_skip_names(vision_twin_dir: Path) -> None:
    """A measured fact of the installed transformers, which the twin reproduces: llm_int8_skip_modules are
    matched from the start of a module's name, so the checkpoint's own ["vision_tower", ...] misses
    "model.vision_tower.*" and the tower's bf16 weights land in Linear4bit modules without a quant_state
    (forward then fails in bitsandbytes). A loader must override the list (config=, as `_anchored` does)."""
    plain = AutoModelForImageTextToText.from_pretrained(vision_twin_dir, device_map="cpu")
    tower_linear = plain.model.vision_tower.encoder.layers[0].self_attn.q_proj
    assert isinstance(tower_linear, bnb.nn.Linear4bit)
    assert not isinstance(tower_linear.weight, bnb.nn.Params4bit) and tower_linear.weight.dtype == torch.bfloat16


# ---- generation ---------------------------------------------------------------------------


def test_text_twin_generates_8_greedy_tokens_on_cpu(text_model, tokenizer) -> None:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello there"}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    out = text_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == 8
    assert not set(new) & set(tokenizer.all_special_ids)  # zeroed rows: never <eos>/<end_of_turn> by chance


def test_vision_twin_generates_8_greedy_tokens_on_cpu_from_an_image(vision_model, processor) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=text, images=Image.new("RGB", (40, 40), "blue"), return_tensors="pt", add_special_tokens=False
    )
    out = vision_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == 8 and not set(new) & set(processor.tokenizer.all_special_ids)


# ---- hub cache ----------------------------------------------------------------------------


def test_hub_cache_holds_both_twins_as_a_download_leaves_them(twin_hub_cache: Path, text_twin_dir: Path) -> None:
    info = scan_cache_dir(twin_hub_cache)
    assert not info.warnings
    repos = {repo.repo_id: repo for repo in info.repos}
    assert set(repos) == {TEXT_REPO_ID, VISION_REPO_ID}
    for repo in repos.values():
        (revision,) = repo.revisions
        assert revision.refs == frozenset({"main"})
        files = {file.file_name for file in revision.files}
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
        for file in revision.files:
            assert file.file_path.is_symlink() and file.blob_path.parent.name == "blobs"
    snapshot = next(iter(repos[TEXT_REPO_ID].revisions)).snapshot_path
    assert json.loads((snapshot / "config.json").read_text()) == json.loads((text_twin_dir / "config.json").read_text())
