"""Build a model on the meta device and list its weights: shapes, no memory.

`accelerate.init_empty_weights` double counts a tied lm_head under transformers
5, so the model is built under `torch.device("meta")` instead, where tying
works as in a real load. Only `nn.Linear` (and GPT-2's Conv1D) weights are
marked quantizable, minus the modules transformers' bnb integration skips.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from placement.hf_internals import model_from_config
from placement.sizing.quantization import ALWAYS_SKIPPED, anchored_skip_modules, is_skipped
from placement.sizing.tensors import WeightTensor


def to_config(config: Mapping[str, Any] | PretrainedConfig) -> PretrainedConfig:
    """A PretrainedConfig from a config.json dict (needs `model_type`)."""
    if isinstance(config, PretrainedConfig):
        return config
    data = dict(config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError("config has no `model_type`; cannot tell which architecture it describes")
    # A saved checkpoint's quantization_config would make from_config try to quantize.
    data.pop("quantization_config", None)
    return AutoConfig.for_model(model_type, **data)


def _model_class(config: PretrainedConfig) -> Any:
    """The class named in `architectures` when transformers has it; else the Auto class for the shape."""
    for name in config.architectures or ():
        cls = getattr(transformers, name, None)
        if cls is not None and hasattr(cls, "_from_config"):
            return cls
    if getattr(config, "vision_config", None) is not None:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def build_meta_model(config: Mapping[str, Any] | PretrainedConfig) -> nn.Module:
    cfg = to_config(config)
    cls = _model_class(cfg)
    with torch.device("meta"):
        if cls in (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM):
            return cls.from_config(cfg)
        return model_from_config(cls, cfg)


def default_skips(model: nn.Module) -> tuple[str, ...]:
    """Modules transformers' bnb integration leaves unquantized by default.

    The output head, tied weights, the module of the last parameter, and
    `_keep_in_fp32_modules` (see `transformers.quantizers.base.get_keys_to_not_convert`).
    """
    skips: set[str] = set(ALWAYS_SKIPPED)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    named = list(model.named_parameters())
    for name, module in model.named_modules():
        if output is not None and module is output:
            skips.add(name)
    tied: Mapping[str, str] = getattr(model, "all_tied_weights_keys", None) or {}
    skips.update(key.removesuffix(".weight") for pair in tied.items() for key in pair)
    if named:
        skips.add(named[-1][0].removesuffix(".weight"))
    skips.update(getattr(model, "_keep_in_fp32_modules", None) or ())
    return tuple(sorted(skips))


def weight_tensors(model: nn.Module, *, skip_modules: Sequence[str] = ()) -> list[WeightTensor]:
    """Every distinct parameter with its quantizable flag (buffers are left out: rotary tables, a few KiB)."""
    module_names = [name for name, _ in model.named_modules()]
    skips = (*default_skips(model), *anchored_skip_modules(skip_modules, module_names))
    linear_weights: set[int] = set()
    for name, module in model.named_modules():
        is_linear = type(module) is nn.Linear or isinstance(module, Conv1D)
        if is_linear and not is_skipped(name, skips):
            linear_weights.add(id(module.weight))
    # named_parameters() yields a tied weight once, as a real load holds it once.
    return [
        WeightTensor(name, tuple(param.shape), id(param) in linear_weights) for name, param in model.named_parameters()
    ]
