"""bitsandbytes byte costs, which linears it skips, and which scheme a model gets.

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
from typing import Any, Literal

Scheme = Literal["nf4", "int8", "none"]

NF4_BLOCK = 64  # bnb 4-bit block size (transformers' default, and what unsloth saves)
NF4_NESTED_BLOCK = 256  # double quantization groups this many absmaxes under one fp32 scale
NF4_CODEBOOK_BYTES = 16 * 4  # fp32 NF4 code values, one copy per tensor
NF4_NESTED_CODEBOOK_BYTES = 256 * 4  # fp32 code values for the uint8 absmax
# Assume load-time NF4 uses double quantization, as unsloth's published bnb-4bit checkpoints do.
DEFAULT_NF4_DOUBLE_QUANT = True
# Transformers never quantizes the output head; keep it out whatever the skip list says.
ALWAYS_SKIPPED = ("lm_head",)

DTYPE_BYTES: Mapping[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}

_SCHEMES: Mapping[str, Scheme] = {"nf4": "nf4", "int8": "int8", "none": "none"}
_NAME_4BIT = re.compile(r"(?:bnb[-_]?)?4[-_]?bit", re.IGNORECASE)
_NAME_8BIT = re.compile(r"(?:bnb[-_]?)?8[-_]?bit", re.IGNORECASE)


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


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a checkpoint's `quantization_config` says."""

    scheme: Scheme  # "none" when absent or not bitsandbytes
    method: str | None  # quant_method as written ("bitsandbytes", "gptq", ...), None when absent
    double_quant: bool
    skip_modules: tuple[str, ...]


def read_checkpoint_quantization(config: Mapping[str, Any] | None) -> CheckpointQuantization:
    """Read `quantization_config` from a config.json dict (top level)."""
    qc = (config or {}).get("quantization_config") or {}
    method = qc.get("quant_method")
    if not qc:
        return CheckpointQuantization("none", None, False, ())
    is_bnb = method in (None, "bitsandbytes")
    scheme: Scheme = "none"
    if is_bnb and (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        scheme = "nf4"  # fp4 has the same storage cost as nf4
    elif is_bnb and (qc.get("load_in_8bit") or qc.get("_load_in_8bit")):
        scheme = "int8"
    return CheckpointQuantization(
        scheme=scheme,
        method=method or ("bitsandbytes" if scheme != "none" else None),
        double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
        skip_modules=tuple(qc.get("llm_int8_skip_modules") or ()),
    )


def scheme_from_name(name: str) -> Scheme:
    """'bnb-4bit' / '4bit' in a model name means a 4-bit checkpoint; '8bit' an int8 one."""
    if _NAME_4BIT.search(name):
        return "nf4"
    if _NAME_8BIT.search(name):
        return "int8"
    return "none"


def resolve_scheme(
    requested: str, checkpoint: CheckpointQuantization, model_name: str
) -> tuple[Scheme, tuple[str, ...]]:
    """The scheme the model will be held in, and notes on why.

    A pre-quantized bnb checkpoint wins over any request: transformers loads it
    as saved.
    """
    if checkpoint.scheme != "none":
        notes = [f"checkpoint is pre-quantized ({checkpoint.method}, {checkpoint.scheme})"]
        if requested not in ("auto", checkpoint.scheme):
            notes.append(f"requested quantization {requested!r} ignored: the checkpoint loads as saved")
        return checkpoint.scheme, tuple(notes)
    if requested == "auto":
        scheme = scheme_from_name(model_name)
        if scheme != "none":
            return scheme, (f"quantization auto → {scheme}: the model name says so",)
        return "none", ("quantization auto → none: no bnb quantization_config and no '4bit'/'8bit' in the name",)
    if requested not in _SCHEMES:
        raise ValueError(f"unknown quantization {requested!r}: use auto, nf4, int8 or none")
    return _SCHEMES[requested], ()
