"""Tiny random Gemma3 models, built offline in seconds, for engine tests.

Sizes (Linear dims multiples of 64, because bitsandbytes' CPU 4-bit path
needs whole 64-element blocks):
- text: vocab 512, hidden 64, intermediate 128, 2 layers, 2 heads × 32 dims,
  1 KV head. ≈ 32.8k embedding + 2 × 45k layer params ≈ 0.13 M params.
- image+text: the same text tower, plus a SigLIP tower (image 32 px, patch 8
  → 4×4 = 16 patches, hidden 64, 1 layer) pooled to 2×2 = 4 tokens per image.

The tokenizer is a BPE trained with `tokenizers` on the sentences below, with
Gemma3's special tokens at Gemma's ids (<pad> 0, <eos> 1, <bos> 2) and a
Gemma-style chat template. Special tokens' embedding rows are zeroed: with
tied embeddings their logits are then 0 while ordinary tokens' maxima are
positive, so greedy decoding never emits <eos> and tests control the length.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

VOCAB_SIZE = 512
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
IMAGE_SIZE = 32
PATCH_SIZE = 8
TOKENS_PER_IMAGE = 4

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ray Serve places each model on the GPU the planner chose.",
    "A small model answers questions about medicine and summaries.",
    "user: hello there\nassistant: hi, how can I help you today?",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ; ! ? ( ) - ' \" / = + *",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz",
    "Left padding keeps the last prompt token of every row at the same place.",
    "Streaming sends text pieces while the model is still generating tokens.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """BPE (Metaspace, like SentencePiece) trained on `_CORPUS`, Gemma3 special tokens, chat template."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # Metaspace keeps spaces and newlines exact on decode (ASCII corpus).
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def _text_config(tokenizer: PreTrainedTokenizerFast) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def _zero_special_rows(embeddings: torch.nn.Embedding, tokenizer: PreTrainedTokenizerFast) -> None:
    with torch.no_grad():
        for token in SPECIAL_TOKENS:
            embeddings.weight[tokenizer.convert_tokens_to_ids(token)] = 0.0


def build_text_model(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random Gemma3ForCausalLM + tokenizer to `directory` (float32)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = Gemma3ForCausalLM(_text_config(tokenizer)).eval()
    _zero_special_rows(model.get_input_embeddings(), tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_vision_model(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random Gemma3ForConditionalGeneration + Gemma3Processor to `directory`."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = Gemma3Config(
        text_config=_text_config(tokenizer),
        vision_config=vision,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    _zero_special_rows(model.get_input_embeddings(), tokenizer)
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=TOKENS_PER_IMAGE,
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
