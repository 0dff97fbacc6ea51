"""Read a GGUF file's header: tensor shapes and the attention shape, no weights.

rayfit converts GGUF checkpoints to bf16 safetensors before transformers loads
them, so the GGUF's own quantization (Q4_K, ...) does not matter: only logical
shapes do. GGUF lists shapes fastest-dimension first; they are reversed here to
torch order so an int8 row count means the same as for a safetensors weight.

Why not `gguf.GGUFReader`: it turns every metadata value into numpy memmap
views, including the tokenizer's vocabulary, scores and merges (~900k parts
for the two demo models), which took ~10 s per file. This reader walks the
same layout (GGUF v2/v3: magic, version, tensor count, key/value count, the
key/values, then the tensor infos) and skips arrays of strings by their
lengths; the header of a 250 MB file reads in well under a second.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from placement.sizing.safetensors_header import looks_like_linear_weight
from placement.sizing.tensors import WeightTensor

# llama.cpp's sliding-window layout per architecture: every Nth layer is global.
_GLOBAL_EVERY = {"gemma3": 6, "gemma2": 2}

_MAGIC = b"GGUF"
# GGUF metadata value types → struct format of one scalar (STRING=8, ARRAY=9 handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Numeric arrays up to this length are read (e.g. per-layer head counts); longer ones are skipped.
_MAX_READ_ARRAY = 4096


class GgufFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class GgufHeader:
    architecture: str
    tensors: tuple[WeightTensor, ...]
    attention_config: dict[str, Any]  # a config.json-like dict that `kv_cache.attention_shape` reads


class _Reader:
    """Little-endian reads from a buffered file."""

    def __init__(self, handle: BinaryIO, path: Path):
        self.handle = handle
        self.path = path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        data = self.handle.read(size)
        if len(data) != size:
            raise GgufFormatError(f"{self.path}: truncated GGUF header")
        return struct.unpack("<" + fmt, data)[0]

    def string(self) -> str:
        return self.handle.read(self.take("Q")).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.handle.seek(self.take("Q"), 1)

    def value(self, kind: int) -> Any:
        """One metadata value; long arrays and arrays of strings come back as None (skipped)."""
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise GgufFormatError(f"{self.path}: unknown GGUF value type {kind}")
        item_kind, count = self.take("I"), self.take("Q")
        if item_kind in _SCALARS:
            fmt = _SCALARS[item_kind]
            size = struct.calcsize("<" + fmt) * count
            if count > _MAX_READ_ARRAY:
                self.handle.seek(size, 1)
                return None
            return list(struct.unpack(f"<{count}{fmt}", self.handle.read(size)))
        if item_kind == _STRING:
            for _ in range(count):
                self.skip_string()
            return None
        for _ in range(count):  # nested arrays: rare; walk them
            self.value(item_kind)
        return None


def read_gguf_header(path: Path) -> GgufHeader:
    with open(path, "rb", buffering=1 << 20) as handle:
        reader = _Reader(handle, path)
        if handle.read(4) != _MAGIC:
            raise GgufFormatError(f"{path} is not a GGUF file (no GGUF magic)")
        version = reader.take("I")
        if version < 2:
            raise GgufFormatError(f"{path}: GGUF version {version} is not supported (2 or later)")
        tensor_count, kv_count = reader.take("Q"), reader.take("Q")
        fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = reader.string()
            fields[key] = reader.value(reader.take("I"))
        tensors = []
        for _ in range(tensor_count):
            name = reader.string()
            dims = [reader.take("Q") for _ in range(reader.take("I"))]
            reader.take("I")  # ggml type: irrelevant, the conversion re-materialises in the spec's dtype
            reader.take("Q")  # data offset
            shape = tuple(int(d) for d in reversed(dims))
            tensors.append(WeightTensor(name, shape, looks_like_linear_weight(name, shape)))

    arch = str(fields.get("general.architecture") or "unknown")
    layers = fields.get(f"{arch}.block_count")
    kv_heads = fields.get(f"{arch}.attention.head_count_kv")
    window = fields.get(f"{arch}.attention.sliding_window")
    config: dict[str, Any] = {
        "num_hidden_layers": layers,
        "num_attention_heads": fields.get(f"{arch}.attention.head_count"),
        "num_key_value_heads": max(kv_heads) if isinstance(kv_heads, list) else kv_heads,
        "head_dim": fields.get(f"{arch}.attention.key_length"),
        "hidden_size": fields.get(f"{arch}.embedding_length"),
        "max_position_embeddings": fields.get(f"{arch}.context_length"),
        "sliding_window": window,
    }
    if window and layers and arch in _GLOBAL_EVERY:
        every = _GLOBAL_EVERY[arch]
        config["layer_types"] = [
            "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(int(layers))
        ]
    return GgufHeader(arch, tuple(tensors), config)
