"""Which quantization a model is held in: decided once, here, for the plan and the load.

Sizing prices the weights in the scheme `decide_quantization` returns, and the
loader (deployments.engine.loading) loads them in the scheme the replica plan carries,
which is that same decision. No other code reads a model's name or its
`quantization_config` to choose a scheme. Kept free of torch and transformers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

Scheme = Literal["nf4", "int8", "none"]

# Assume load-time NF4 uses double quantization, as unsloth's published bnb-4bit checkpoints do.
DEFAULT_NF4_DOUBLE_QUANT = True
# Transformers never quantizes the output head; keep it out whatever the skip list says.
ALWAYS_SKIPPED = ("lm_head",)

_SCHEMES: Mapping[str, Scheme] = {"nf4": "nf4", "int8": "int8", "none": "none"}
_NAME_4BIT = re.compile(r"(?:bnb[-_]?)?4[-_]?bit", re.IGNORECASE)
_NAME_8BIT = re.compile(r"(?:bnb[-_]?)?8[-_]?bit", re.IGNORECASE)


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a checkpoint's `quantization_config` says."""

    scheme: Scheme  # "none" when absent or not bitsandbytes
    method: str | None  # quant_method as written ("bitsandbytes", "gptq", ...), None when absent
    double_quant: bool
    skip_modules: tuple[str, ...]


NOT_QUANTIZED = CheckpointQuantization("none", None, False, ())


def read_checkpoint_quantization(config: Mapping[str, Any] | None) -> CheckpointQuantization:
    """Read `quantization_config` from a config.json dict (top level)."""
    qc = (config or {}).get("quantization_config") or {}
    if not isinstance(qc, Mapping):
        qc = qc.to_dict()
    method = qc.get("quant_method")
    if not qc:
        return NOT_QUANTIZED
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


@dataclass(frozen=True)
class QuantizationPlan:
    """How a replica holds its weights: the scheme and everything the loader passes for it.

    `prequantized`: the checkpoint carries bitsandbytes weights and loads as
    saved (no quantization arguments). Otherwise a scheme other than "none" is
    applied at load time with exactly `double_quant` and `skip_modules`.
    """

    scheme: Scheme
    prequantized: bool
    double_quant: bool
    skip_modules: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """'nf4', 'int8', 'none', or 'nf4 (pre-quantized)', as logs and /v1/placement show it."""
        return f"{self.scheme} (pre-quantized)" if self.prequantized else self.scheme

    def load_arguments(self) -> dict[str, Any] | None:
        """bitsandbytes arguments for a load-time scheme (BitsAndBytesConfig's keywords), or None:
        a pre-quantized checkpoint or an unquantized one takes none."""
        if self.prequantized or self.scheme == "none":
            return None
        skip = list(dict.fromkeys((*ALWAYS_SKIPPED, *self.skip_modules)))
        if self.scheme == "nf4":
            return {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": self.double_quant,
                "bnb_4bit_compute_dtype": "bfloat16",
                "llm_int8_skip_modules": skip,
            }
        return {"load_in_8bit": True, "llm_int8_skip_modules": skip}

    def with_checkpoint(self, checkpoint: CheckpointQuantization) -> QuantizationPlan:
        """The same decision seen against the checkpoint the loader found (a plan made without the
        files, from the name): a bitsandbytes checkpoint of the planned scheme loads as saved."""
        if checkpoint.scheme != "none" and checkpoint.scheme == self.scheme and not self.prequantized:
            return replace(self, prequantized=True, double_quant=checkpoint.double_quant)
        return self


def decide_quantization(requested: str, checkpoint: CheckpointQuantization, model_name: str) -> QuantizationPlan:
    """The scheme the model will be held in, with notes on why. The one place this is decided.

    - A pre-quantized bitsandbytes checkpoint wins over any request: transformers loads it as saved.
    - A checkpoint quantized by another method (GPTQ, AWQ, ...) is held as stored: never re-quantized.
    - `auto` otherwise reads the name: '4bit' → nf4, '8bit' → int8 (quantized at load), else none.
    - `nf4` / `int8` / `none` as asked.
    """
    if checkpoint.scheme != "none":
        notes = [f"checkpoint is pre-quantized ({checkpoint.method}, {checkpoint.scheme})"]
        if requested not in ("auto", checkpoint.scheme):
            notes.append(f"requested quantization {requested!r} ignored: the checkpoint loads as saved")
        return QuantizationPlan(checkpoint.scheme, True, checkpoint.double_quant, checkpoint.skip_modules, tuple(notes))
    if requested not in ("auto", *_SCHEMES):
        raise ValueError(f"unknown quantization {requested!r}: use auto, nf4, int8 or none")
    if checkpoint.method is not None:
        note = f"checkpoint quantized by {checkpoint.method!r}: held as stored, not re-quantized"
        if requested not in ("auto", "none"):
            note += f" (requested {requested!r} ignored)"
        return QuantizationPlan("none", False, False, (), (note,))
    if requested == "auto":
        scheme = scheme_from_name(model_name)
        if scheme != "none":
            note = f"quantization auto → {scheme}: the model name says so (quantized at load unless pre-quantized)"
            return QuantizationPlan(scheme, False, DEFAULT_NF4_DOUBLE_QUANT, (), (note,))
        note = "quantization auto → none: no bnb quantization_config and no '4bit'/'8bit' in the name"
        return QuantizationPlan("none", False, False, (), (note,))
    return QuantizationPlan(_SCHEMES[requested], False, DEFAULT_NF4_DOUBLE_QUANT, (), ())
