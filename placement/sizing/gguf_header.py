"""Read a GGUF file's header: tensor shapes and the attention shape, no weights.

rayfit converts GGUF checkpoints to bf16 safetensors before transformers loads
them, so the GGUF's own quantization (Q4_K, ...) does not matter: only logical
shapes do. GGUF lists shapes fastest-dimension first; they are reversed here to
torch order so an int8 row count means the same as for a safetensors weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from placement.sizing.safetensors_header import looks_like_linear_weight
from placement.sizing.tensors import WeightTensor

# llama.cpp's sliding-window layout per architecture: every Nth layer is global.
_GLOBAL_EVERY = {"gemma3": 6, "gemma2": 2}


@dataclass(frozen=True)
class GgufHeader:
    architecture: str
    tensors: tuple[WeightTensor, ...]
    attention_config: dict[str, Any]  # a config.json-like dict that `kv_cache.attention_shape` reads


def read_gguf_header(path: Path) -> GgufHeader:
    import gguf  # only GGUF models need it

    reader = gguf.GGUFReader(str(path))

    def field(key: str) -> Any:
        found = reader.fields.get(key)
        return found.contents() if found is not None else None

    arch = str(field("general.architecture") or "unknown")
    tensors = tuple(
        WeightTensor(t.name, shape, looks_like_linear_weight(t.name, shape))
        for t in reader.tensors
        for shape in [tuple(int(d) for d in reversed(t.shape.tolist()))]
    )
    layers = field(f"{arch}.block_count")
    heads = field(f"{arch}.attention.head_count")
    kv_heads = field(f"{arch}.attention.head_count_kv")
    window = field(f"{arch}.attention.sliding_window")
    config: dict[str, Any] = {
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(kv_heads) if isinstance(kv_heads, list) else kv_heads,
        "head_dim": field(f"{arch}.attention.key_length"),
        "hidden_size": field(f"{arch}.embedding_length"),
        "max_position_embeddings": field(f"{arch}.context_length"),
        "sliding_window": window,
    }
    if window and layers and arch in _GLOBAL_EVERY:
        every = _GLOBAL_EVERY[arch]
        config["layer_types"] = [
            "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(int(layers))
        ]
    return GgufHeader(arch, tensors, config)
