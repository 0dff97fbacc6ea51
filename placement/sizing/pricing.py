"""Device bytes of a list of weight tensors under one quantization scheme."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from placement.sizing.quantization import DEFAULT_NF4_DOUBLE_QUANT, Scheme, quant_cost
from placement.sizing.tensors import WeightTensor


@dataclass(frozen=True)
class WeightBytes:
    weights: int  # packed quantized weights + everything held in the compute dtype
    quant_overhead: int  # absmax, code books, int8 row scales


def price(
    tensors: Iterable[WeightTensor],
    *,
    scheme: Scheme,
    dtype_bytes: int,
    double_quant: bool = DEFAULT_NF4_DOUBLE_QUANT,
) -> WeightBytes:
    """Stored bytes where a tensor already has them; quantized bytes for linears
    when `scheme` quantizes at load; numel × dtype bytes for the rest."""
    weights = overhead = 0
    for tensor in tensors:
        if tensor.stored_bytes is not None:
            weights += tensor.stored_bytes
            overhead += tensor.overhead_bytes
        elif tensor.quantizable and scheme != "none":
            cost = quant_cost(scheme, tensor.shape, double_quant=double_quant)
            weights += cost.weight_bytes
            overhead += cost.overhead_bytes
        else:
            weights += tensor.numel * dtype_bytes
    return WeightBytes(weights, overhead)
