"""The common currency of every source: a list of weight tensors, and their counts.

Each source (safetensors headers, a meta-device model, a GGUF header) turns what
it reads into `WeightTensor`s; `pricing.py` then prices one list the same way
whatever its origin.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class WeightTensor:
    """One logical weight tensor.

    `quantizable`: an nn.Linear weight that bitsandbytes would quantize at load.
    `stored_bytes`: bytes it already takes as saved (pre-quantized checkpoints),
    None when it will be materialised in the compute dtype or quantized at load.
    `overhead_bytes`: quantization side tensors (absmax, quant maps, SCB) kept with it.
    """

    name: str
    shape: tuple[int, ...]
    quantizable: bool = False
    stored_bytes: int | None = None
    overhead_bytes: int = 0
    floating: bool = True  # integer buffers (e.g. position ids) keep their stored size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParamCounts:
    """Logical parameter counts: `quantizable` are nn.Linear weights bnb would quantize."""

    total: int
    quantizable: int
    other: int  # embeddings, norms, biases, and linears that are skipped (lm_head, ...)

    @classmethod
    def of(cls, tensors: Iterable[WeightTensor]) -> ParamCounts:
        total = quantizable = 0
        for tensor in tensors:
            total += tensor.numel
            quantizable += tensor.numel if tensor.quantizable else 0
        return cls(total=total, quantizable=quantizable, other=total - quantizable)
