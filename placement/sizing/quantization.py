"""bitsandbytes byte costs, and which linears it skips (the scheme itself: placement.quantization).

Costs are worked out per tensor from bitsandbytes' storage layout:
- NF4: two weights per byte, one absmax per 64-weight block. Without double
  quantization absmax is fp32 (0.5 + 4/64 B/param); with it absmax is uint8 and
  every 256 absmaxes share an fp32 scale (0.5 + 1/64 + 4/(64*256) B/param), plus
  a 16-entry fp32 code book per tensor (and a 256-entry one for the nested level).
- int8 (LLM.int8): one byte per weight plus an fp32 scale (SCB) per output row.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from placement.quantization import ALWAYS_SKIPPED, DEFAULT_NF4_DOUBLE_QUANT, Scheme

__all__ = [
    "ALWAYS_SKIPPED",
    "DEFAULT_NF4_DOUBLE_QUANT",
    "QuantCost",
    "Scheme",
    "anchored_skip_modules",
    "is_skipped",
    "quant_cost",
]

NF4_BLOCK = 64  # bnb 4-bit block size (transformers' default, and what unsloth saves)
NF4_NESTED_BLOCK = 256  # double quantization groups this many absmaxes under one fp32 scale
NF4_CODEBOOK_BYTES = 16 * 4  # fp32 NF4 code values, one copy per tensor
NF4_NESTED_CODEBOOK_BYTES = 256 * 4  # fp32 code values for the uint8 absmax

DTYPE_BYTES: Mapping[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class QuantCost:
    """Device bytes of one quantized weight: packed values, and side tensors."""

    weight_bytes: int
    overhead_bytes: int


def nf4_cost(numel: int, *, double_quant: bool = DEFAULT_NF4_DOUBLE_QUANT) -> QuantCost:
    blocks = math.ceil(numel / NF4_BLOCK)
    if double_quant:
        nested = math.ceil(blocks / NF4_NESTED_BLOCK)
        overhead = blocks + 4 * nested + NF4_NESTED_CODEBOOK_BYTES + NF4_CODEBOOK_BYTES
    else:
        overhead = 4 * blocks + NF4_CODEBOOK_BYTES
    return QuantCost(weight_bytes=math.ceil(numel / 2), overhead_bytes=overhead)


def int8_cost(shape: Sequence[int]) -> QuantCost:
    rows = shape[0] if shape else 1
    return QuantCost(weight_bytes=math.prod(shape), overhead_bytes=4 * rows)


def quant_cost(scheme: Scheme, shape: Sequence[int], *, double_quant: bool = DEFAULT_NF4_DOUBLE_QUANT) -> QuantCost:
    if scheme == "nf4":
        return nf4_cost(math.prod(shape), double_quant=double_quant)
    if scheme == "int8":
        return int8_cost(shape)
    raise ValueError(f"no quantized cost for scheme {scheme!r}")


def is_skipped(module_name: str, patterns: Iterable[str]) -> bool:
    """Same matching as transformers' `should_convert_module`, inverted.

    A pattern matches from the start up to a module boundary ("layers.1" hits
    "layers.1.mlp" but not "layers.11.mlp"), as a regex with that boundary, or as
    a suffix ("lm_head" hits "model.lm_head").
    """
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for pattern in patterns:
        if module_name.endswith(pattern):
            return True
        try:
            if re.match(rf"(?:{pattern}){boundary}", module_name):
                return True
        except re.error:  # a literal name with regex metacharacters: the suffix test above covers it
            continue
    return False


def anchored_skip_modules(patterns: Sequence[str], module_names: Iterable[str]) -> tuple[str, ...]:
    """`patterns` as transformers 5 must be given them to skip what the checkpoint meant.

    transformers 5 matches a skip name from the start of a module's name
    (`is_skipped`); transformers 4 matched it anywhere. unsloth's image+text
    checkpoints list bare names ("vision_tower", "multi_modal_projector") for
    modules that live at "model.vision_tower": read the new way they match
    that module's own name (as a suffix) but none of its linears, the bf16
    tower is loaded into 4-bit layers without a quantization state and the
    first image fails (unsloth issue #4208). A bare pattern that
    names a path component of modules it does not reach gets the path up to
    that component added. Sizing and loading both call this, so the plan
    prices and the loader keeps the same modules unquantized.
    """
    anchored = list(dict.fromkeys(patterns))
    for name in module_names:
        parts = name.split(".")
        for pattern in patterns:
            # A module inside one the pattern names ("model.vision_tower.encoder…" for "vision_tower")
            # that the pattern does not reach the new way.
            if "." not in pattern and pattern in parts[:-1] and not is_skipped(name, anchored):
                anchored.append(".".join(parts[: parts.index(pattern) + 1]))
    return tuple(anchored)
