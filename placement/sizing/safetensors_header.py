"""Read safetensors headers — shapes and dtypes without loading any weight.

A safetensors file starts with an 8-byte little-endian header length, then that
many bytes of JSON: {name: {dtype, shape, data_offsets}}, offsets relative to
the end of the header. bitsandbytes 4-bit saves keep the packed weight as a
uint8 [n/2, 1] tensor; its logical shape lives in a small JSON blob stored as
the uint8 tensor `<weight>.quant_state.bitsandbytes__nf4` (or `__fp4`), which
is read (tens of bytes each) to recover the parameter count.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from placement.sizing.quantization import Scheme, is_skipped
from placement.sizing.tensors import WeightTensor

DTYPE_SIZES: Mapping[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# A header larger than this is not a safetensors header (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_QUANT_STATE = ".quant_state.bitsandbytes__"
# Side tensors bnb stores next to a quantized weight `<w>`: `<w>.absmax`, `<w>.quant_map`,
# `<w>.nested_absmax`, `<w>.nested_quant_map`, `<w>.quant_state...`; LLM.int8 keeps `<m>.SCB`.
_BNB_SIDE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_INT8_SIDE_SUFFIXES = (".SCB", ".weight_format")
# Weights that are never nn.Linear weights, whatever their shape.
_NOT_LINEAR = re.compile(r"(embed|embd|wte|wpe|norm|ln_|layernorm|patch|position|pos_emb|lm_head|^output\.weight$)")


@dataclass(frozen=True)
class TensorHeader:
    file: Path
    data_start: int  # absolute offset of the tensor's bytes in the file
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: Path) -> dict[str, TensorHeader]:
    """Every tensor's header entry in one safetensors file."""
    with path.open("rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", raw_length)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {length} is not plausible; not a safetensors file?")
        header: dict[str, Any] = json.loads(handle.read(length))
    base = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        tensors[name] = TensorHeader(path, base + start, entry["dtype"], tuple(entry["shape"]), end - start)
    return tensors


def read_tensor_bytes(tensor: TensorHeader) -> bytes:
    with tensor.file.open("rb") as handle:
        handle.seek(tensor.data_start)
        return handle.read(tensor.nbytes)


def looks_like_linear_weight(name: str, shape: Sequence[int]) -> bool:
    """A 2-D `*.weight` that is not an embedding, a norm or the output head."""
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    return not _NOT_LINEAR.search(name)


@dataclass(frozen=True)
class CheckpointScan:
    """A checkpoint's tensors, priced-ready, plus what the scan saw."""

    tensors: tuple[WeightTensor, ...]
    stored_bytes: int  # every tensor's bytes as saved (quant-state blobs included)
    prequantized: Scheme  # "none" unless bnb side tensors were found
    double_quant: bool


def scan_checkpoint(files: Iterable[Path], *, skip_modules: Sequence[str] = ()) -> CheckpointScan:
    """Turn safetensors headers into `WeightTensor`s.

    Pre-quantized bnb weights carry their stored bytes (packed weight + side
    tensors as overhead) and their logical shape; other tensors are left to be
    priced in the compute dtype, or quantized when they look like linear weights.
    """
    headers: dict[str, TensorHeader] = {}
    for path in files:
        headers.update(read_header(path))
    stored = sum(t.nbytes for t in headers.values())

    quant_states = {name[: name.index(_QUANT_STATE)]: t for name, t in headers.items() if _QUANT_STATE in name}
    int8_scales = {name[: -len(".SCB")]: t for name, t in headers.items() if name.endswith(".SCB")}
    double_quant = any(name.endswith(".nested_absmax") for name in headers)
    prequantized: Scheme = "nf4" if quant_states else ("int8" if int8_scales else "none")

    side_bytes: dict[str, int] = {}  # quantized weight name → its side tensors' bytes
    for name, tensor in headers.items():
        for suffix in _BNB_SIDE_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in quant_states:
                side_bytes[name[: -len(suffix)]] = side_bytes.get(name[: -len(suffix)], 0) + tensor.nbytes

    weights: list[WeightTensor] = []
    for name, tensor in headers.items():
        if _is_side_tensor(name, quant_states):
            continue
        if name in quant_states:
            state = json.loads(read_tensor_bytes(quant_states[name]))
            weights.append(
                WeightTensor(name, tuple(state["shape"]), True, tensor.nbytes, overhead_bytes=side_bytes.get(name, 0))
            )
            continue
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in int8_scales and tensor.dtype == "I8":
            weights.append(WeightTensor(name, tensor.shape, True, tensor.nbytes, int8_scales[module].nbytes))
            continue
        # In a pre-quantized checkpoint, what was not quantized when saving stays as it is.
        quantizable = (
            prequantized == "none"
            and looks_like_linear_weight(name, tensor.shape)
            and not is_skipped(module, skip_modules)
        )
        floating = tensor.dtype in _FLOAT_DTYPES
        weights.append(
            WeightTensor(name, tensor.shape, quantizable, None if floating else tensor.nbytes, floating=floating)
        )

    return CheckpointScan(tuple(weights), stored, prequantized, double_quant)


def _is_side_tensor(name: str, quant_states: Mapping[str, TensorHeader]) -> bool:
    if _QUANT_STATE in name or name.endswith(_INT8_SIDE_SUFFIXES):
        return True
    return any(name.endswith(suffix) and name[: -len(suffix)] in quant_states for suffix in _BNB_SIDE_SUFFIXES)
