"""Load one model onto the device its plan entry names.

Steps, each logged on one line: resolve the source (hub id, local dir, or a
GGUF file), convert a GGUF once to a cached safetensors directory, load with
the replica plan's dtype, quantization and device map, done. Nothing is
decided here (placement.replica decided it); the one check is that the
checkpoint found is the one the plan's quantization was decided for.
No Ray here: the engine's host calls `load_model` after Ray has pinned
`CUDA_VISIBLE_DEVICES` to the planned GPU(s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from placement.cache import rayfit_cache_dir
from placement.config import ModelSpec
from placement.quantization import QuantizationPlan, read_checkpoint_quantization
from placement.replica import ReplicaPlan

logger = logging.getLogger(__name__)

# Marks a finished GGUF conversion; written last, so a crash mid-save is redone.
_CONVERSION_DONE = "rayfit-conversion.json"

# dtype of the cached safetensors of a converted GGUF.
CONVERSION_DTYPE = torch.bfloat16

_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to generate, with what is needed to feed it.

    `processor` is set for image+text models (it owns the image preprocessing
    and the chat template); `tokenizer` is always set (the processor's own for
    those). `source` says where the weights came from, for logs and /models.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    processor: ProcessorMixin | None
    is_multimodal: bool
    load_seconds: float
    source: str
    quantization: str  # the plan's, as loaded: "nf4", "int8", "none", "nf4 (pre-quantized)"
    device_map: str  # as passed to from_pretrained, for logs


@dataclass(frozen=True)
class ResolvedSource:
    """What `from_pretrained` is called with."""

    path: str  # hub id or local directory
    gguf_file: Path | None  # the GGUF file, when the spec names one
    revision: str | None


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message names the source and the cause."""


def resolve_source(spec: ModelSpec) -> ResolvedSource:
    """Hub id, local directory, or GGUF file (`model: x.gguf`, or a dir + `gguf_file`)."""
    model = os.path.expanduser(spec.model)
    if spec.gguf_file is not None:
        gguf = Path(model) / spec.gguf_file
        if not gguf.is_file():
            raise ModelLoadError(f"gguf_file {spec.gguf_file!r} not found in {model!r} (looked for {gguf})")
        return ResolvedSource(path=model, gguf_file=gguf.resolve(), revision=spec.revision)
    if model.endswith(".gguf"):
        gguf = Path(model)
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file {model!r} does not exist")
        return ResolvedSource(path=str(gguf.parent), gguf_file=gguf.resolve(), revision=spec.revision)
    return ResolvedSource(path=model, gguf_file=None, revision=spec.revision)


def gguf_cache_dir(gguf_file: Path, cache_root: Path | None = None) -> Path:
    """Conversion directory for one GGUF file, keyed by its path, size and mtime
    (a replaced file gets a fresh conversion; an unchanged one reuses it)."""
    if cache_root is None:
        cache_root = rayfit_cache_dir()
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root / "gguf" / f"{gguf_file.stem}-{key}"


def convert_gguf(gguf_file: Path, cache_root: Path | None = None) -> tuple[Path, bool]:
    """Return (safetensors dir, reused): convert the GGUF once, reuse it after.

    transformers de-quantizes a GGUF at every load (15-40 s for the demo
    models); the saved safetensors reload in about a second. Callers that
    ask for one file at once (replicas starting together) convert it once:
    the others wait for the first, then reuse its result.
    """
    target = gguf_cache_dir(gguf_file, cache_root)
    if (target / _CONVERSION_DONE).is_file():
        return target, True
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter per file: a replica (or process) that starts meanwhile waits for it, then reuses its
    # result, instead of spending the same CPU minute on a copy that loses the rename below.
    with FileLock(f"{target}.lock"):
        if (target / _CONVERSION_DONE).is_file():
            return target, True
        return _convert(gguf_file, target), False


def _convert(gguf_file: Path, target: Path) -> Path:
    """De-quantize `gguf_file` and save it as safetensors (+ its tokenizer) in `target`."""
    logger.info("converting %s to safetensors in %s (once; later loads reuse it)", gguf_file, target)
    started = time.perf_counter()
    directory, name = str(gguf_file.parent), gguf_file.name
    # Store bfloat16: half the disk of float32, and 4-5 bit GGUF blocks lose
    # nothing that matters in it; the spec's dtype is applied when loading.
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=CONVERSION_DTYPE, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if getattr(quantizer, "packed_modules", None):
            # Weights kept in GGUF blocks (a matmul kernel was available) cannot
            # be written as plain tensors: de-quantize them first.
            model = model.dequantize()
        else:
            # The weights are already plain tensors, but the GGUF quantizer's
            # marks (hf_quantizer, config.quantization_config, is_quantized)
            # make save_pretrained refuse; remove_quantization_config clears them.
            quantizer.remove_quantization_config(model)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / _CONVERSION_DONE).write_text(
        json.dumps({"gguf_file": str(gguf_file), "seconds": round(time.perf_counter() - started, 2)})
    )
    # Rename is atomic: a converter killed half-way leaves only its partial directory. Losing the rename
    # to another converter is still handled: a file lock may not hold across hosts (a shared NFS cache).
    try:
        partial.rename(target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / _CONVERSION_DONE).is_file():
            raise
    logger.info("converted %s in %.1f s", gguf_file.name, time.perf_counter() - started)
    return target


def bnb_config(quantization: QuantizationPlan) -> BitsAndBytesConfig | None:
    """The plan's load-time bitsandbytes arguments as a BitsAndBytesConfig; None when it has none."""
    arguments = quantization.load_arguments()
    if arguments is None:
        return None
    if "bnb_4bit_compute_dtype" in arguments:
        arguments = {**arguments, "bnb_4bit_compute_dtype": _DTYPES[arguments["bnb_4bit_compute_dtype"]]}
    return BitsAndBytesConfig(**arguments)


def checked_quantization(plan: ReplicaPlan, config: PretrainedConfig) -> QuantizationPlan:
    """The plan's quantization, held against the checkpoint found: a bitsandbytes checkpoint of another
    scheme than planned (the plan sized other files), or a plan for a pre-quantized checkpoint that
    is not, is a ModelLoadError naming both."""
    raw = getattr(config, "quantization_config", None)
    checkpoint = read_checkpoint_quantization({"quantization_config": raw} if raw is not None else None)
    quant = plan.quantization.with_checkpoint(checkpoint)
    if checkpoint.scheme != "none" and checkpoint.scheme != quant.scheme:
        raise ModelLoadError(
            f"{plan.model!r}: the checkpoint is pre-quantized {checkpoint.scheme}, but the plan budgets "
            f"{quant.label}; plan again with the files present"
        )
    if quant.prequantized and checkpoint.scheme == "none":
        raise ModelLoadError(
            f"{plan.model!r}: the plan budgets a pre-quantized {quant.scheme} checkpoint, but the files "
            "carry no bitsandbytes quantization_config; plan again with the files present"
        )
    return quant


def _quantization_dict(config: PretrainedConfig) -> dict[str, Any]:
    raw = getattr(config, "quantization_config", None) or {}
    return dict(raw) if isinstance(raw, dict) else raw.to_dict()


def _anchor_skip_modules(quantization: QuantizationPlan, config: PretrainedConfig) -> tuple[str, ...] | None:
    """The skip list as transformers 5 needs it to keep the planned modules unquantized
    (placement.sizing.quantization.anchored_skip_modules, which sizing applies too), or None when
    it needs no change."""
    if quantization.scheme == "none" or not quantization.skip_modules:
        return None
    from placement.sizing.meta_model import build_meta_model
    from placement.sizing.quantization import anchored_skip_modules

    names = [name for name, _ in build_meta_model(config).named_modules()]
    anchored = anchored_skip_modules(quantization.skip_modules, names)
    if anchored == quantization.skip_modules:
        return None
    logger.info(
        "quantization skip list %s anchored as transformers 5 matches it: %s", quantization.skip_modules, anchored
    )
    return anchored


def is_multimodal_config(config: PretrainedConfig) -> bool:
    return getattr(config, "vision_config", None) is not None


def load_model(spec: ModelSpec, plan: ReplicaPlan) -> LoadedModel:
    """Load `spec`'s files as `plan` says (device map, dtype, quantization); see the module docstring."""
    started = time.perf_counter()
    source = resolve_source(spec)
    logger.info("resolving %s (revision %s)", spec.model, source.revision or "default")
    path, revision, description = source.path, source.revision, spec.model
    if source.gguf_file is not None:
        converted, reused = convert_gguf(source.gguf_file)
        path, revision = str(converted), None
        description = f"{source.gguf_file} (safetensors {'cache' if reused else 'conversion'} at {converted})"
        if reused:
            logger.info("reusing GGUF conversion %s", converted)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        if not spec.trust_remote_code and "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{spec.model!r} needs its own Python code to load; rayfit refuses to run it unless the model's "
                "entry in model_configs.yaml sets `trust_remote_code: true`"
            ) from exc
        raise ModelLoadError(f"cannot read the config of {spec.model!r}: {exc}") from exc

    quantization = checked_quantization(plan, config)
    config_override = _anchor_skip_modules(quantization, config)
    if config_override is not None:
        quantization = replace(quantization, skip_modules=config_override)
    # A split: accelerate places the weights within the plan's per-GPU weights (placement.replica), so the
    # KV and runtime the plan put on cuda:0 beside them stay free.
    device_map, max_memory = plan.device_map, plan.accelerate_max_memory
    multimodal = is_multimodal_config(config)
    kwargs: dict[str, Any] = {
        "revision": revision,
        "trust_remote_code": spec.trust_remote_code,
        "dtype": _DTYPES[plan.dtype],
        "device_map": device_map,
    }
    if max_memory:
        kwargs["max_memory"] = max_memory
    if config_override is not None and quantization.prequantized:
        # A pre-quantized checkpoint ignores a quantization_config argument: the skip list rides on its config.
        config.quantization_config = {**_quantization_dict(config), "llm_int8_skip_modules": list(config_override)}
        kwargs["config"] = config
    quantization_config = bnb_config(quantization)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    logger.info(
        "loading %s on %s (device_map=%s, quantization=%s, dtype=%s, %s)",
        spec.model,
        plan.device,
        device_map,
        quantization.label,
        plan.dtype,
        "image+text" if multimodal else "text",
    )
    auto_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    try:
        model = auto_class.from_pretrained(path, **kwargs)
        processor = None
        if multimodal:
            processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=spec.trust_remote_code)
            tokenizer = processor.tokenizer
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=spec.trust_remote_code)
    except torch.OutOfMemoryError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        where = plan.device
        raise ModelLoadError(f"out of device memory loading {spec.model!r} on {where}: {first_line}") from exc
    except Exception as exc:  # missing or corrupt weights: OSError, SafetensorError, ValueError, ...
        raise ModelLoadError(f"cannot load {spec.model!r}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    if spec.chat_template is not None:
        _use_chat_template(spec.chat_template, tokenizer, processor)
    seconds = time.perf_counter() - started
    logger.info("loaded %s in %.1f s", spec.model, seconds)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        is_multimodal=multimodal,
        load_seconds=seconds,
        source=description,
        quantization=quantization.label,
        device_map=str(device_map),
    )


def _use_chat_template(path: str, tokenizer: PreTrainedTokenizerBase, processor: Any) -> None:
    """The config's template file replaces the model's own (the processor's too: it renders image chats)."""
    try:
        template = Path(path).expanduser().read_text()
    except OSError as exc:
        raise ModelLoadError(f"cannot read chat_template {path!r}: {exc.strerror}") from exc
    tokenizer.chat_template = template
    if processor is not None:
        processor.chat_template = template
