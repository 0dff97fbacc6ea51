"""Estimate the device memory one model needs: weights, quantization overhead, KV cache, runtime.

`estimate_memory(spec)` picks the best source on this machine (never the
network); `estimate_from_config` and `count_parameters` work from a config alone.
"""

from placement.sizing.errors import SizingError
from placement.sizing.estimate import count_parameters, estimate_from_config, estimate_memory
from placement.sizing.tensors import ParamCounts

__all__ = ["ParamCounts", "SizingError", "count_parameters", "estimate_from_config", "estimate_memory"]
