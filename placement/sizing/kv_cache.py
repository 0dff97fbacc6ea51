"""The KV-relevant shape of a model config, and a rough size without one.

The bytes a replica's engine allocates are computed from this shape by
`placement.sizing.kv_budget` (transformers' own cache geometry). Per layer
and token the cache holds K and V: 2 × kv_heads × head_dim values.
Layers whose `layer_types` entry is "sliding_attention" keep at most
`sliding_window` tokens (Gemma 3: 5 of every 6 layers). Multimodal configs keep
the language model's shape under `text_config`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Sizing for a context longer than this is rarely what a replica is run with;
# the user can ask for more with `context_length`.
DEFAULT_CONTEXT_CAP = 4096


@dataclass(frozen=True)
class AttentionShape:
    """What the KV cache depends on, read once from a config."""

    num_layers: int
    kv_heads: int
    head_dim: int
    max_positions: int | None
    sliding_window: int | None
    layer_types: tuple[str, ...]  # empty when the config has none: every layer is full attention

    def sliding_layers(self) -> int:
        if self.sliding_window is None:
            return 0
        return sum(1 for kind in self.layer_types if kind == "sliding_attention")


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    return config.to_dict()


def text_config_dict(config: Any) -> dict[str, Any]:
    """The language model's part of a config (itself when it is text-only)."""
    data = _as_dict(config)
    text = data.get("text_config")
    return _as_dict(text) if text else data


def attention_shape(config: Any) -> AttentionShape:
    """Read the KV-relevant fields; raise KeyError naming the first one missing."""
    text = text_config_dict(config)
    layers = int(_first(text, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_first(text, "num_attention_heads", "n_head"))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = text.get("head_dim") or int(_first(text, "hidden_size", "n_embd")) // heads
    window = text.get("sliding_window")
    layer_types = tuple(text.get("layer_types") or ())
    max_positions = text.get("max_position_embeddings") or text.get("n_positions")
    return AttentionShape(
        num_layers=layers,
        kv_heads=kv_heads,
        head_dim=int(head_dim),
        max_positions=int(max_positions) if max_positions else None,
        sliding_window=int(window) if window else None,
        layer_types=layer_types,
    )


def _first(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if data.get(key) is not None:
            return data[key]
    raise KeyError(f"config has none of {', '.join(keys)}")


def default_context_length(shape: AttentionShape) -> int:
    """min(max_position_embeddings, 4096): what a replica is sized for unless the spec says."""
    if shape.max_positions is None:
        return DEFAULT_CONTEXT_CAP
    return min(shape.max_positions, DEFAULT_CONTEXT_CAP)


# Without a config the shape is unknown. Full-attention bf16 KV per token grows
# about as the square root of the parameter count: SmolLM2-135M 23 KB,
# Llama-3.1-8B 128 KB, Gemma-3-4B 139 KB, Qwen2.5-32B 262 KB, Llama-3-70B 327 KB
# (1.3-2.2 × sqrt(params)). Sliding-window models (Gemma 3) hold far less than
# their full-attention figure, so a typical 1.5 × sqrt(params) is used rather
# than the upper bound: a guess that refuses the models a GPU really holds
# helps nobody, and the plan flags every guess.
KV_BYTES_PER_SQRT_PARAM = 1.5


def kv_cache_bytes_from_params(params: int, *, context_length: int, batch_size: int) -> int:
    """A rough KV size when only the parameter count is known."""
    return int(KV_BYTES_PER_SQRT_PARAM * math.sqrt(params) * context_length * batch_size)
