"""Miniature twins of the user's two checkpoints, built offline in seconds.

The production config (`model_configs.yaml`) names two pre-quantized hub
checkpoints. No machine here reaches a hub, so tests use twins of them that
keep everything the serving code can see except the sizes:

- `unsloth/medgemma-27b-text-it-unsloth-bnb-4bit` → `build_text_twin`:
  Gemma3ForCausalLM, config `gemma3_text`.
- `unsloth/medgemma-1.5-4b-it-unsloth-bnb-4bit` → `build_vision_twin`:
  Gemma3ForConditionalGeneration (Gemma 3 text model + SigLIP tower +
  multi-modal projector), config `gemma3`, with a Gemma3Processor.

What is faithful (the real values; the twins carry the same):
- architecture classes and model types; the text config's layer pattern
  (5 sliding-window layers then 1 full-attention layer; `layer_types` written
  out as transformers writes it), `sliding_window` 1024,
  `max_position_embeddings` 131072, rope per layer type (full attention:
  linear scaling factor 8 over theta 1e6; sliding: default rope, theta 1e4),
  no logit soft-capping (Gemma 3 has none: `final_logit_softcapping` and
  `attn_logit_softcapping` are null), tied word embeddings, GQA with twice as
  many query heads as KV heads, `head_dim × heads ≠ hidden` (q_proj not
  square), MLP width 4 × hidden, and `query_pre_attn_scalar` following the
  same rule as each real model (27B: hidden / heads = 168; 4B: head_dim = 256);
- vocabulary: config `vocab_size` 262208 (the tokenizer's 262145 tokens, the
  embedding padded), Gemma's special-token ids (<pad> 0, <eos> 1, <bos> 2,
  <unk> 3, <mask> 4, <start_of_turn> 105, <end_of_turn> 106,
  <start_of_image> 255999, <end_of_image> 256000, <image_soft_token> 262144),
  eos [1, 106] in the generation config with Gemma 3's sampling defaults
  (do_sample, top_k 64, top_p 0.95);
- tokenizer: transformers' GemmaTokenizer (BPE with byte fallback, spaces
  normalized to "▁", no dummy prefix, <bos> added, decoder
  Replace/ByteFallback/Fuse, padding left), Gemma 3's chat template
  (tests/templates/gemma3.jinja: system folded into the first user turn,
  alternation enforced), on tokenizer and processor both;
- image+text: a SigLIP tower without a head (`vision_use_head` False),
  patches average-pooled to a square number of soft tokens per image,
  `image_token_index` / `boi_token_index` / `eoi_token_index` as above, a
  Gemma3Processor whose `image_seq_length` equals `mm_tokens_per_image`;
- storage: a pre-quantized bitsandbytes NF4 double-quant checkpoint (compute
  bf16) whose config.json carries `quantization_config`, with unsloth's skip
  list (text: lm_head; image+text: also vision_tower and multi_modal_projector,
  whose tensors stay bf16, named `vision_tower.vision_model.*` as in the hub
  files), laid out in a hub cache as a download leaves it
  (`install_in_hub_cache`: refs/main, snapshots/<commit>/ symlinks into blobs/).
  So the twin also reproduces what transformers 5.x does with that list: it
  matches skip names from the start of a module's name, "vision_tower" misses
  "model.vision_tower.*", and a plain `from_pretrained` puts the tower's bf16
  weights into Linear4bit modules that fail on the first image (see
  `VISION_SKIP_MODULES_ANCHORED` and tests/test_twins.py).

What differs: sizes (below), 6 layers instead of 62 / 34, random weights, and
a vocabulary whose ordinary tokens are a BPE trained on a few ASCII sentences
plus 256 byte tokens (<0x00>..<0xFF>); every other id up to 262143 is a filler
`<unusedN>` (Gemma also names its reserved ids so, <unused0> at 6). The real
checkpoints' config.json was written by transformers 4.5x (`rope_scaling`,
`rope_theta`, `rope_local_base_freq`, `sliding_window_pattern`); the twins'
is written by the installed transformers (`rope_parameters` keyed by layer
type, `layer_types`): both load to the same config (tests/test_twins.py).

Sizes (bf16 parameters; Linear dims are multiples of 64 because bitsandbytes'
CPU 4-bit path needs whole 64-element blocks):
- text tower (both twins): vocab 262208 × hidden 64 embedding = 16.78 M
  (tied with lm_head); 6 layers of hidden 64, 2 query heads × head_dim 64,
  1 KV head, MLP 256: q 8192 + k 4096 + v 4096 + o 8192 + gate/up/down
  3 × 16384 + norms 4 × 64 + q/k norms 2 × 64 = 74 112 per layer, 0.44 M in
  all (0.44 M of it Linear weights). 17.23 M parameters, 97% of them the
  embedding (the real 4B's embedding alone is 0.67 B parameters).
  Saved NF4: the Linear weights at 0.5 B each + absmax, the embedding and
  norms bf16: 33.9 MB on disk (the image+text twin: 34.0 MB).
- SigLIP tower (image+text twin): image 32 px, patch 8 → 4 × 4 = 16 patches;
  hidden 64, 1 layer, 2 heads, MLP 128: patch conv 12 352 + positions 1 024
  + layer 33 472 + post norm 128 = 47 k (bf16, unquantized).
- projector: 64 → 64 matrix + norm = 4.2 k (bf16); 16 patches average-pooled
  (kernel 2) to 2 × 2 = 4 soft tokens per image (real: 4096 → 256, kernel 4).

Every embedding row but the trained tokens' is zeroed (special tokens, byte
tokens, fillers, padding rows), so greedy decoding emits ordinary text and
never <eos>: see `_zero_unreachable_rows`.

Build time on this 2-core machine: ~2 s for each twin when the machine is idle
(tokenizer ~0.6 s, random init ~0.6 s, bf16 save + NF4 reload + save ~1 s),
up to ~4-9 s under load; the first build in a process also pays the imports.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tiny_models import _CORPUS
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    BitsAndBytesConfig,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    GenerationConfig,
    SiglipVisionConfig,
)
from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

# The hub ids the twins stand for (the repo's model_configs.yaml names them).
TEXT_REPO_ID = "unsloth/medgemma-27b-text-it-unsloth-bnb-4bit"
VISION_REPO_ID = "unsloth/medgemma-1.5-4b-it-unsloth-bnb-4bit"

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "gemma3.jinja"
CHAT_TEMPLATE = TEMPLATE_PATH.read_text()

# Gemma 3's vocabulary: 262144 SentencePiece ids, then <image_soft_token>; the
# models' embedding has 262208 rows (padded to a multiple of 64).
VOCAB_SIZE = 262_208
TOKENIZER_SIZE = 262_145
SPECIAL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<start_of_turn>": 105,
    "<end_of_turn>": 106,
    "<start_of_image>": 255_999,
    "<end_of_image>": 256_000,
    "<image_soft_token>": 262_144,
}
EOS_TOKEN_IDS = [1, 106]  # <eos>, <end_of_turn>: the real generation_config.json

# The real layer pattern: every 6th layer attends globally, the rest within a
# 1024-token window. 6 layers keep one whole period.
NUM_LAYERS = 6
LAYER_TYPES = ["sliding_attention"] * 5 + ["full_attention"]
SLIDING_WINDOW = 1024
MAX_POSITION_EMBEDDINGS = 131_072
# The real config.json says rope_scaling {"rope_type": "linear", "factor": 8.0},
# rope_theta 1e6 and rope_local_base_freq 1e4; transformers 5.x keys rope by layer type.
ROPE_PARAMETERS = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}

HIDDEN = 64
INTERMEDIATE = 256  # 4 × hidden, as in both real models
HEADS = 2
KV_HEADS = 1
HEAD_DIM = 64

IMAGE_SIZE = 32
PATCH_SIZE = 8
TOKENS_PER_IMAGE = 4  # 4 × 4 patches pooled to 2 × 2

# unsloth's skip lists, as their config.json writes them: these modules stay bf16 in the checkpoints.
TEXT_SKIP_MODULES = ["lm_head"]
VISION_SKIP_MODULES = ["lm_head", "vision_tower", "multi_modal_projector"]
# transformers 5.x matches llm_int8_skip_modules from the START of a module's name (or as its whole
# suffix), no longer anywhere inside it as 4.x did: "vision_tower" misses "model.vision_tower.encoder...".
# Quantizing with the bare names would quantize the tower; these keep it bf16 as unsloth's files have it.
# Loading a checkpoint whose config says the bare names still builds Linear4bit modules for the tower,
# which then hold its bf16 weights without a quant_state: see tests/test_twins.py.
VISION_SKIP_MODULES_ANCHORED = ["lm_head", "model.vision_tower", "model.multi_modal_projector"]

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # any commit hash: the cache layout needs one


# ---- tokenizer -----------------------------------------------------------------------------


@functools.cache
def _vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...], tuple[int, ...]]:
    """Gemma's id layout around a BPE trained on `_CORPUS`: (vocab, merges, ids of the trained tokens).

    Trained as GemmaTokenizer encodes (spaces normalized to "▁", split on
    nothing else), so the merges apply unchanged. The trained tokens take the
    first free ids from 107 (Gemma's "\\n" is 107; the trained vocabulary starts
    with it too), then come the 256 byte-fallback tokens, then fillers
    `<unusedN>` up to 262143.
    """
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    trainer_tok.train_from_iterator(_CORPUS * 4, trainer=trainers.BpeTrainer(vocab_size=1000, show_progress=False))
    trained_model = json.loads(trainer_tok.to_str())["model"]
    trained = sorted(trained_model["vocab"], key=trained_model["vocab"].get)
    merges = tuple((left, right) for left, right in trained_model["merges"])

    vocab = dict(SPECIAL_IDS)
    vocab["[@BOS@]"] = 5
    vocab.update((f"<unused{k}>", 6 + k) for k in range(99))  # ids 6..104, as Gemma has them
    taken = set(vocab.values())
    free = [index for index in range(TOKENIZER_SIZE - 1) if index not in taken]
    ordinary = trained + [f"<0x{byte:02X}>" for byte in range(256)]
    vocab.update(zip(ordinary, free, strict=False))
    vocab.update((f"<unused{k}>", index) for k, index in enumerate(free[len(ordinary) :], start=99))
    assert len(vocab) == TOKENIZER_SIZE and len(set(vocab.values())) == TOKENIZER_SIZE
    return vocab, merges, tuple(free[: len(trained)])


def build_tokenizer() -> GemmaTokenizer:
    """Gemma 3's tokenizer in miniature: ids, special tokens, normalization, chat template (~1.5 s)."""
    vocab, merges, _ = _vocabulary()
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=list(merges),
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tokenizer


# ---- configs ------------------------------------------------------------------------------


def text_config(query_pre_attn_scalar: int) -> Gemma3TextConfig:
    """The Gemma 3 text tower shared by both twins (the 27B's and the 4B's differ in sizes only)."""
    return Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=query_pre_attn_scalar,
        layer_types=list(LAYER_TYPES),
        sliding_window=SLIDING_WINDOW,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rope_parameters=json.loads(json.dumps(ROPE_PARAMETERS)),
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        tie_word_embeddings=True,
        pad_token_id=SPECIAL_IDS["<pad>"],
        bos_token_id=SPECIAL_IDS["<bos>"],
        eos_token_id=list(EOS_TOKEN_IDS),
    )


def _generation_config() -> GenerationConfig:
    # Gemma 3's generation_config.json: sampling on by default, eos = <eos> or <end_of_turn>.
    return GenerationConfig(
        bos_token_id=SPECIAL_IDS["<bos>"],
        eos_token_id=list(EOS_TOKEN_IDS),
        pad_token_id=SPECIAL_IDS["<pad>"],
        do_sample=True,
        top_k=64,
        top_p=0.95,
    )


def nf4_config(skip_modules: list[str]) -> BitsAndBytesConfig:
    """unsloth's bnb-4bit settings: NF4, double quantization, bf16 compute."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=list(skip_modules),
    )


def _zero_unreachable_rows(embeddings: torch.nn.Embedding) -> None:
    """Zero every embedding row but the trained tokens': the ids a trained model would not emit at random.

    With tied embeddings a token's logit is its row · the final hidden state:
    a zero row gives a logit of exactly 0, while the largest of the ~440
    trained tokens' random-row logits is positive, so greedy decoding only
    emits trained tokens: never a special token (<eos>, <end_of_turn>: tests
    control the length), never a byte token out of a valid UTF-8 sequence (which
    decodes to U+FFFD), never a reserved <unusedN> nor an id past the
    tokenizer's vocabulary (rows 262145..262207). Gemma 3 has no final logit
    soft-capping; soft-capping (cap · tanh(x / cap)) keeps 0 at 0 and the order
    of logits, so this would hold with it too.
    """
    _, _, trained_ids = _vocabulary()
    keep = torch.zeros(embeddings.num_embeddings, dtype=torch.bool)
    keep[list(trained_ids)] = True
    with torch.no_grad():
        embeddings.weight[~keep] = 0.0


# ---- building ----------------------------------------------------------------------------


def _save_quantized(
    model: torch.nn.Module, auto_class: type, quantize_skip: list[str], declared_skip: list[str], directory: Path
) -> None:
    """Save bf16, reload through bitsandbytes NF4 keeping `quantize_skip` bf16, save pre-quantized.

    config.json then carries `quantization_config`; its `llm_int8_skip_modules`
    is set to `declared_skip`, the names unsloth's config.json lists.
    """
    with tempfile.TemporaryDirectory(prefix="twin-bf16-") as staging:
        model.save_pretrained(staging)
        quantized = auto_class.from_pretrained(staging, quantization_config=nf4_config(quantize_skip), device_map="cpu")
    quantized.generation_config = _generation_config()
    quantized.save_pretrained(directory)
    config_path = Path(directory) / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["llm_int8_skip_modules"] = list(declared_skip)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _legacy_vision_keys(directory: Path) -> None:
    """Name the SigLIP tower's tensors as the hub files do (`vision_tower.vision_model.*`).

    transformers 5.x flattened SiglipVisionModel and saves `vision_tower.encoder.*`;
    the MedGemma files were written with the `vision_model` level, which 5.x strips
    on load. The language model's `language_model.model.*` names are already the
    files' own.
    """
    path = Path(directory) / "model.safetensors"
    tensors = load_file(path)
    renamed = {
        (
            "vision_tower.vision_model." + key.removeprefix("vision_tower.") if key.startswith("vision_tower.") else key
        ): t
        for key, t in tensors.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def build_text_twin(directory: Path, seed: int = 0) -> Path:
    """The 27B text model's twin (Gemma3ForCausalLM, NF4 pre-quantized) and its tokenizer, in `directory`."""
    torch.manual_seed(seed)
    directory = Path(directory)
    tokenizer = build_tokenizer()
    config = text_config(query_pre_attn_scalar=HIDDEN // HEADS)  # the 27B's rule: 5376 / 32 = 168
    config.architectures = ["Gemma3ForCausalLM"]
    model = Gemma3ForCausalLM(config).to(torch.bfloat16).eval()
    _zero_unreachable_rows(model.get_input_embeddings())
    _save_quantized(model, AutoModelForCausalLM, TEXT_SKIP_MODULES, TEXT_SKIP_MODULES, directory)
    tokenizer.save_pretrained(directory)
    return directory


def vision_config() -> Gemma3Config:
    """The 4B image+text model's config at twin size."""
    vision = SiglipVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config(query_pre_attn_scalar=HEAD_DIM),  # the 4B's rule: head_dim 256
        vision_config=vision,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=SPECIAL_IDS["<start_of_image>"],
        eoi_token_index=SPECIAL_IDS["<end_of_image>"],
        image_token_index=SPECIAL_IDS["<image_soft_token>"],
        tie_word_embeddings=True,
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]
    return config


def build_processor(tokenizer: GemmaTokenizer | None = None) -> Gemma3Processor:
    """Gemma3Processor as the 4B ships it (SigLIP normalization, no pan-and-scan), at the twin's image size."""
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=2,  # bilinear
        rescale_factor=1 / 255,
        do_pan_and_scan=None,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=TOKENS_PER_IMAGE,
    )


def build_vision_twin(directory: Path, seed: int = 0) -> Path:
    """The 4B image+text model's twin (Gemma3ForConditionalGeneration, NF4 pre-quantized, vision tower
    and projector bf16) and its Gemma3Processor, in `directory`."""
    torch.manual_seed(seed)
    directory = Path(directory)
    tokenizer = build_tokenizer()
    model = Gemma3ForConditionalGeneration(vision_config()).to(torch.bfloat16).eval()
    _zero_unreachable_rows(model.get_input_embeddings())
    _save_quantized(model, AutoModelForImageTextToText, VISION_SKIP_MODULES_ANCHORED, VISION_SKIP_MODULES, directory)
    _legacy_vision_keys(directory)
    build_processor(tokenizer).save_pretrained(directory)
    return directory


# ---- hub cache -----------------------------------------------------------------------------


def hub_snapshot_dir(hub: Path, repo_id: str, commit: str = SNAPSHOT) -> Path:
    """hub/models--org--name/{refs/main, snapshots/<commit>/} as huggingface_hub writes it (empty snapshot)."""
    repo_dir = Path(hub) / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def install_in_hub_cache(hub: Path, repo_id: str, built_dir: Path, commit: str = SNAPSHOT) -> Path:
    """Lay `built_dir` out in the hub cache `hub` the way a download of `repo_id` leaves it.

    Each file's bytes go to `blobs/<sha256>` and the snapshot holds relative
    symlinks to them (`snapshots/<commit>/config.json -> ../../blobs/...`), with
    `refs/main` naming the commit. Returns the snapshot directory.
    """
    snapshot = hub_snapshot_dir(hub, repo_id, commit)
    blobs = snapshot.parent.parent / "blobs"
    blobs.mkdir(exist_ok=True)
    for source in sorted(Path(built_dir).rglob("*")):
        if not source.is_file():
            continue
        digest = hashlib.sha256()
        with source.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        blob = blobs / digest.hexdigest()
        if not blob.exists():
            shutil.copyfile(source, blob)
        link = snapshot / source.relative_to(built_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot
