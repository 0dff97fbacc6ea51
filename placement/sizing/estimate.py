"""Orchestration: try each source in order and assemble one `MemoryEstimate`.

Sources, best first: the spec's `memory_gb` override; local safetensors
headers (exact); config.json built on the meta device (exact shapes); the
spec's `params_b`; the model's name (a guess, said loudly).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from placement.config import ModelSpec
from placement.estimate import EstimateSource, MemoryEstimate
from placement.quantization import (
    ALWAYS_SKIPPED,
    NOT_QUANTIZED,
    CheckpointQuantization,
    QuantizationPlan,
    Scheme,
    decide_quantization,
    read_checkpoint_quantization,
)
from placement.sizing.errors import SizingError
from placement.sizing.gguf_header import read_gguf_header
from placement.sizing.image_workspace import DEFAULT_MAX_IMAGES, image_workspace
from placement.sizing.kv_budget import SIDE_SEQUENCES, config_from_shape, kv_budget
from placement.sizing.kv_cache import (
    DEFAULT_CONTEXT_CAP,
    AttentionShape,
    attention_shape,
    default_context_length,
    kv_cache_bytes_from_params,
)
from placement.sizing.logprob_workspace import ASSUMED_VOCAB_SIZE, LogprobWorkspace
from placement.sizing.meta_model import build_meta_model, to_config, weight_tensors
from placement.sizing.pricing import price
from placement.sizing.quantization import DTYPE_BYTES
from placement.sizing.rules_workspace import RulesWorkspace
from placement.sizing.safetensors_header import scan_checkpoint
from placement.sizing.sources import LocalFiles, fetch_config_from_hub, find_local_files
from placement.sizing.tensors import ParamCounts, WeightTensor
from placement.units import GIB, MIB, gib

# Activations of one forward pass, cuBLAS/attention workspaces and allocator
# slack: a fixed floor plus a share of the weights (bigger layers, bigger buffers).
RUNTIME_BASE_BYTES = 256 * MIB
RUNTIME_WEIGHT_SHARE = 0.05
# With only a parameter count, assume this share sits in quantizable nn.Linear
# weights (Llama-3.1-8B: 93%, Gemma-3-27B text: 95%, Gemma-3-4B: 84%).
PARAMS_B_LINEAR_SHARE = 0.92
# A synthetic linear's row width when only a count is known (sets int8's per-row scales).
_ASSUMED_ROW_WIDTH = 4096
# Token-embedding weights by name (transformers, GGUF, GPT-2): their rows are the vocabulary.
_EMBEDDING_NAMES = ("embed_tokens.weight", "token_embd.weight", "wte.weight", "word_embeddings.weight")


@dataclass(frozen=True)
class _Sized:
    """One source's findings, before KV and runtime are added."""

    source: EstimateSource
    tensors: tuple[WeightTensor, ...]
    quant: QuantizationPlan
    attention: AttentionShape | None  # None: KV from the parameter count
    notes: tuple[str, ...]
    is_guess: bool = False
    config: Mapping[str, Any] | None = None  # config.json as read, when a source had one (images are priced from it)


def estimate_memory(spec: ModelSpec, *, cache_dir: Path | None = None, fetch: bool = True) -> MemoryEstimate:
    """Size one model from the best source available; raise SizingError when none works.

    `cache_dir`: the Hugging Face hub cache to look in (default: huggingface_hub's own).
    `fetch`: may download a hub model's config.json when nothing is local.
    """
    if spec.memory_gb is not None:
        return _override(spec, cache_dir)
    tried: list[str] = []
    files, why = find_local_files(spec, cache_dir=cache_dir)
    if files is None and fetch and fetch_config_from_hub(spec, cache_dir=cache_dir):
        # A few KB of config.json size a hub model far better than its name.
        files, why = find_local_files(spec, cache_dir=cache_dir)
    if files is None:
        tried.append(why)
    else:
        sized = _from_files(spec, files, tried)
        if sized is not None:
            return _finish(sized, spec)
    if spec.params_b is not None:
        return _finish(_from_count(spec, int(spec.params_b * 1e9), "params_b"), spec)
    tried.append("no `params_b` in the spec")
    guessed = _guess_from_name(spec)
    if guessed is not None:
        return _finish(guessed, spec)
    tried.append(f"no size like '27b' or '135m' in the name {spec.model!r}")
    raise SizingError(
        f"cannot size model {spec.model!r}: " + "; ".join(tried) + ". Set `params_b` or `memory_gb` for it."
    )


def estimate_from_config(
    config: Mapping[str, Any] | PretrainedConfig,
    *,
    quantization: str,
    dtype: str = "bfloat16",
    context_length: int | None = None,
    batch_size: int = 4,
    skip_modules: Sequence[str] = (),
) -> MemoryEstimate:
    """Size a model from its config alone (meta-device build; no weights read).

    `skip_modules` match module names as transformers' bnb integration does: a
    prefix of the full name up to a dot ("model.vision_tower"), a regex, or a
    suffix ("lm_head"). lm_head is always skipped.
    """
    data = config.to_dict() if isinstance(config, PretrainedConfig) else dict(config)
    name = str(data.get("_name_or_path") or "")
    sized = _from_config(data, quantization, name, skip_modules, origin="the given config")
    return _finish(sized, None, dtype=dtype, context_length=context_length, batch_size=batch_size)


def count_parameters(config: Mapping[str, Any] | PretrainedConfig, *, skip_modules: Sequence[str] = ()) -> ParamCounts:
    """Logical parameter counts of a config's model, built on the meta device."""
    return ParamCounts.of(weight_tensors(build_meta_model(config), skip_modules=skip_modules))


def _override(spec: ModelSpec, cache_dir: Path | None) -> MemoryEstimate:
    assert spec.memory_gb is not None
    # The total is the user's; what the replica builds still comes from the best source: the
    # parameter count (size rules match on it: a 27B stays "large"), the context (never past the
    # model's positions) and the quantization decision.
    try:
        underlying = estimate_memory(spec.model_copy(update={"memory_gb": None}), cache_dir=cache_dir, fetch=False)
    except SizingError:
        underlying = None
    quant = underlying.quant if underlying and underlying.quant else None
    quant = quant or decide_quantization(spec.quantization, NOT_QUANTIZED, spec.model)
    return MemoryEstimate.lump(
        int(spec.memory_gb * GIB),
        source="memory_gb",
        params=underlying.params if underlying else 0,
        quantization=quant.scheme,
        quant=quant,
        dtype=spec.dtype,
        context_length=underlying.context_length if underlying else spec.context_length or DEFAULT_CONTEXT_CAP,
        batch_size=spec.max_batch_size,
        notes=(f"`memory_gb: {spec.memory_gb}` override: the whole amount is booked as weights; nothing was computed",),
    )


def _from_files(spec: ModelSpec, files: LocalFiles, tried: list[str]) -> _Sized | None:
    if files.gguf is not None:
        return _from_gguf(spec, files.gguf, files)
    if spec.gguf_file:
        tried.append(f"GGUF file {spec.gguf_file!r} not found in {files.origin}")
    if files.safetensors and not files.missing_shards:
        return _from_safetensors(spec, files)
    if files.missing_shards:
        tried.append(f"{files.origin}: {len(files.missing_shards)} safetensors shard(s) missing (partial download)")
    else:
        tried.append(f"{files.origin}: no safetensors files")
    if files.config is not None:
        try:
            return _from_config(
                files.config, spec.quantization, spec.model, (), origin=f"config.json in {files.origin}"
            )
        except Exception as exc:  # unknown architecture, remote code, ...: fall back to cruder sources
            tried.append(f"{files.origin}: config.json could not be built on the meta device ({exc})")
    else:
        tried.append(f"{files.origin}: no config.json")
    return None


def _from_safetensors(spec: ModelSpec, files: LocalFiles) -> _Sized:
    checkpoint = read_checkpoint_quantization(files.config)
    skips = (*ALWAYS_SKIPPED, *checkpoint.skip_modules)
    scan = scan_checkpoint(files.safetensors, skip_modules=skips)
    if scan.prequantized != "none" and checkpoint.scheme == "none":
        # Side tensors say bnb even if config.json does not: trust the weights.
        checkpoint = CheckpointQuantization(
            scan.prequantized, "bitsandbytes", scan.double_quant, checkpoint.skip_modules
        )
    quant = decide_quantization(spec.quantization, checkpoint, spec.model)
    if scan.prequantized != "none":
        quant = replace(quant, double_quant=scan.double_quant)  # the stored side tensors are the truth
    scheme, double_quant, notes = quant.scheme, quant.double_quant, quant.notes
    notes = (
        f"{len(files.safetensors)} safetensors file(s) in {files.origin}: shapes from headers, "
        f"{gib(scan.stored_bytes)} stored",
        *notes,
    )
    if scan.prequantized != "none":
        notes += ("quantized weights at their stored bytes; logical shapes from quant_state",)
    elif scheme != "none":
        notes += (_load_time_note(scheme, double_quant, skips, linear_rule="2-D *.weight tensors"),)
    if checkpoint.method is not None and checkpoint.scheme == "none":
        notes += (f"quantization_config says {checkpoint.method!r}: not bitsandbytes, tensors sized as stored",)
    attention = _attention_or_none(files.config)
    if attention is None:
        notes += ("no usable config.json: KV cache estimated from the parameter count (rough)",)
    return _Sized("safetensors", scan.tensors, quant, attention, notes, config=files.config)


def _from_config(
    config: Mapping[str, Any], quantization: str, name: str, skip_modules: Sequence[str], *, origin: str
) -> _Sized:
    checkpoint = read_checkpoint_quantization(config)
    quant = decide_quantization(quantization, checkpoint, name)
    if skip_modules and not quant.prequantized:
        quant = replace(quant, skip_modules=(*quant.skip_modules, *skip_modules))
    skips = (*ALWAYS_SKIPPED, *quant.skip_modules)
    tensors = tuple(weight_tensors(build_meta_model(config), skip_modules=skips))
    notes = (f"shapes from {origin}, built on the meta device", *quant.notes)
    if quant.scheme != "none":
        notes += (_load_time_note(quant.scheme, quant.double_quant, skips, linear_rule="nn.Linear weights"),)
    return _Sized("config", tensors, quant, attention_shape(to_config(config)), notes, config=config)


def _from_gguf(spec: ModelSpec, path: Path, files: LocalFiles) -> _Sized:
    header = read_gguf_header(path)
    quant = decide_quantization(spec.quantization, NOT_QUANTIZED, spec.model)
    scheme = quant.scheme
    notes = (
        f"GGUF header {path.name} ({header.architecture}, {len(header.tensors)} tensors) in {files.origin}; "
        f"rayfit converts GGUF to {spec.dtype} safetensors, so it is sized as {spec.dtype}"
        + (f" quantized to {scheme} at load" if scheme != "none" else ""),
        *quant.notes,
    )
    attention = _attention_or_none(files.config) or _attention_or_none(header.attention_config)
    return _Sized("gguf", header.tensors, quant, attention, notes, config=files.config)


def _from_count(spec: ModelSpec, params: int, source: EstimateSource) -> _Sized:
    quant = decide_quantization(spec.quantization, NOT_QUANTIZED, spec.model)
    linear = int(params * PARAMS_B_LINEAR_SHARE)
    tensors = (
        WeightTensor("linear (assumed)", (max(1, linear // _ASSUMED_ROW_WIDTH), _ASSUMED_ROW_WIDTH), True),
        WeightTensor("other (assumed)", (params - max(1, linear // _ASSUMED_ROW_WIDTH) * _ASSUMED_ROW_WIDTH,)),
    )
    notes = (
        f"{params / 1e9:.2f}B params; assumed {PARAMS_B_LINEAR_SHARE:.0%} sit in quantizable linear layers",
        *quant.notes,
        "no config: KV cache estimated from the parameter count (rough)",
    )
    return _Sized(source, tensors, quant, None, notes)


def _guess_from_name(spec: ModelSpec) -> _Sized | None:
    from placement.sizing.name_guess import guess_params_from_name

    params = guess_params_from_name(spec.model)
    if params is None:
        return None
    sized = _from_count(spec, params, "name_guess")
    loud = (
        f"GUESS: no local files, config or params_b for {spec.model!r}; size read from its name "
        f"({params / 1e9:.2f}B). Set `params_b` or `memory_gb` to be sure"
    )
    return _Sized(sized.source, sized.tensors, sized.quant, None, (loud, *sized.notes), True)


def _attention_or_none(config: Mapping[str, Any] | None) -> AttentionShape | None:
    """The KV shape, read through transformers' config class when it knows the model type:
    it fills in derived fields such as Gemma 3's `layer_types` that older config.json files lack."""
    if config is None:
        return None
    try:
        return attention_shape(to_config(config))
    except Exception:  # unknown model type or no model_type (GGUF): read the dict as written
        pass
    try:
        return attention_shape(config)
    except (KeyError, TypeError, ValueError):
        return None


def _load_time_note(scheme: Scheme, double_quant: bool, skips: Sequence[str], *, linear_rule: str) -> str:
    detail = f"double quant {'on' if double_quant else 'off'}" if scheme == "nf4" else "fp32 scale per output row"
    kept = ", ".join(sorted(set(skips)))
    return f"{scheme} at load ({detail}) for {linear_rule}; embeddings, norms, biases and {kept} stay unquantized"


def _finish(
    sized: _Sized,
    spec: ModelSpec | None,
    *,
    dtype: str | None = None,
    context_length: int | None = None,
    batch_size: int | None = None,
) -> MemoryEstimate:
    """Price the weights, add KV cache and runtime, and write the notes."""
    dtype = dtype or (spec.dtype if spec else "bfloat16")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    dtype_bytes = DTYPE_BYTES[dtype]
    context_length = context_length or (spec.context_length if spec else None)
    batch = batch_size or (spec.max_batch_size if spec else 4)
    counts = ParamCounts.of(sized.tensors)
    cost = price(
        sized.tensors, scheme=sized.quant.scheme, dtype_bytes=dtype_bytes, double_quant=sized.quant.double_quant
    )
    notes = list(sized.notes)
    notes.append(
        f"{counts.total / 1e9:.3f}B params: {counts.quantizable / 1e9:.3f}B in quantizable linears, "
        f"{counts.other / 1e9:.3f}B other; weights {gib(cost.weights)} + quant overhead {gib(cost.quant_overhead)}"
    )
    budget = None
    if sized.attention is not None:
        context = context_length or default_context_length(sized.attention)
        # The bytes the engine allocates: transformers' paged pool for the batch plus the side slots.
        budget = kv_budget(
            config_from_shape(sized.attention),
            batch_sequences=batch,
            context_length=context,
            dtype=dtype_bytes,
            continuous=spec.continuous_batching if spec else True,
        )
        kv = budget.total_bytes
        sliding = sized.attention.sliding_layers()
        window = f", {sliding} sliding layers capped at {sized.attention.sliding_window}" if sliding else ""
        notes.append(
            f"KV cache {gib(kv)}: {budget.describe()}; {sized.attention.num_layers} layers × "
            f"{sized.attention.kv_heads} KV heads × head_dim {sized.attention.head_dim} in {dtype}{window}"
        )
    else:
        context = context_length or DEFAULT_CONTEXT_CAP
        sequences = batch + SIDE_SEQUENCES
        kv = kv_cache_bytes_from_params(counts.total, context_length=context, batch_size=sequences)
        notes.append(
            f"KV cache {gib(kv)}: {context} tokens × {sequences} sequences (batch {batch} + "
            f"{SIDE_SEQUENCES} side), from the parameter count"
        )
    # Logprob requests' logits workspace (placement.sizing.logprob_workspace), for every row that may decode.
    vocab = _vocab_size(sized.tensors)
    logprobs = LogprobWorkspace(vocab or ASSUMED_VOCAB_SIZE, dtype_bytes, batch + SIDE_SEQUENCES)
    # Grammars, penalties and the other per-request rules (placement.sizing.rules_workspace), same rows.
    rules = RulesWorkspace(vocab or ASSUMED_VOCAB_SIZE, batch + SIDE_SEQUENCES)
    # An image request's pixels, vision-tower activations and features (placement.sizing.image_workspace).
    max_images = spec.max_images_per_request if spec else DEFAULT_MAX_IMAGES
    images = image_workspace(sized.config, dtype_bytes=dtype_bytes, max_images=max_images) if sized.config else None
    image_bytes = images.total_bytes if images else 0
    runtime = (
        RUNTIME_BASE_BYTES
        + math.ceil(RUNTIME_WEIGHT_SHARE * (cost.weights + cost.quant_overhead))
        + logprobs.total_bytes
        + rules.total_bytes
        + image_bytes
    )
    assumed = "" if vocab else f" (vocabulary unknown: {ASSUMED_VOCAB_SIZE} assumed)"
    notes.append(
        f"runtime {gib(runtime)}: 256 MiB + {RUNTIME_WEIGHT_SHARE:.0%} of weights + {logprobs.describe()} + "
        f"{rules.describe()}{assumed}" + (f" + {images.describe()}" if images else "")
    )
    return MemoryEstimate(
        source=sized.source,
        params=counts.total,
        weights_bytes=cost.weights,
        quant_overhead_bytes=cost.quant_overhead,
        kv_cache_bytes=kv,
        runtime_bytes=runtime,
        logprob_workspace_bytes=logprobs.total_bytes,
        rules_workspace_bytes=rules.total_bytes,
        image_workspace_bytes=image_bytes,
        quantization=sized.quant.scheme,
        quant=sized.quant,
        dtype=dtype,
        kv_budget=budget,
        context_length=context,
        batch_size=batch,
        is_guess=sized.is_guess,
        notes=tuple(notes),
    )


def _vocab_size(tensors: Sequence[WeightTensor]) -> int | None:
    """Rows of the token embedding (the largest, for image+text models), or None without one."""
    rows = [t.shape[0] for t in tensors if t.name.endswith(_EMBEDDING_NAMES) and len(t.shape) == 2]
    return max(rows, default=None)
