"""The result of sizing one model: bytes on its device, with a breakdown."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from placement.kv_geometry import KvBudget
    from placement.quantization import QuantizationPlan

EstimateSource = Literal["memory_gb", "safetensors", "gguf", "config", "params_b", "name_guess"]


@dataclass(frozen=True)
class MemoryEstimate:
    """How much device memory one replica of a model needs, and why.

    `source` says where the numbers came from; `is_guess` is true when they came
    from the model's name alone, and the plan says so loudly.
    """

    source: EstimateSource
    params: int  # logical parameter count (before quantization)
    weights_bytes: int  # weights as held on the device (quantized where quantized)
    quant_overhead_bytes: int  # bnb absmax / scales / quant maps
    kv_cache_bytes: int  # KV cache for context_length × batch
    # Activations, workspace, allocator slack; logprob_workspace_bytes and rules_workspace_bytes included.
    runtime_bytes: int
    quantization: str  # "nf4" | "int8" | "none"
    context_length: int
    batch_size: int
    is_guess: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Of runtime_bytes: what logprob requests hold (placement.sizing.logprob_workspace).
    logprob_workspace_bytes: int = 0
    # Of runtime_bytes: what the per-request logits rules hold (placement.sizing.rules_workspace).
    rules_workspace_bytes: int = 0
    # Of runtime_bytes: what one request's images hold (placement.sizing.image_workspace; 0 for text models).
    image_workspace_bytes: int = 0
    # What the engine builds from this estimate (deployments.engine obeys; placement.replica carries them):
    # the quantization decision with its load arguments, the weights' dtype, and the exact KV geometry
    # (None when the attention shape was unknown: KV then estimated from the parameter count).
    quant: QuantizationPlan | None = None
    dtype: str = "bfloat16"
    kv_budget: KvBudget | None = None
    # Set when a replica's measured peak replaced the estimated total (placement.calibration): the bytes
    # it held at its peak. On CPU that is the process's peak RSS, so the planner adds no process bytes.
    measured_peak_bytes: int | None = None

    @property
    def source_label(self) -> str:
        """The source as the plan shows it: 'measured (gguf)' once corrected by a measurement."""
        return self.source if self.measured_peak_bytes is None else f"measured ({self.source})"

    @property
    def is_exact(self) -> bool:
        """Sized from the model's own files or config (shapes known), not from a count, a name or an override."""
        return self.source in ("safetensors", "gguf", "config")

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.quant_overhead_bytes + self.kv_cache_bytes + self.runtime_bytes

    @classmethod
    def lump(
        cls,
        total_bytes: int,
        *,
        source: EstimateSource = "memory_gb",
        params: int = 0,
        quantization: str = "none",
        context_length: int = 0,
        batch_size: int = 1,
        is_guess: bool = False,
        notes: tuple[str, ...] = (),
        quant: QuantizationPlan | None = None,
        dtype: str = "bfloat16",
    ) -> MemoryEstimate:
        """An estimate with no breakdown: the whole amount booked as weights
        (a `memory_gb` override, or a size given by hand)."""
        return cls(
            source=source,
            params=params,
            weights_bytes=total_bytes,
            quant_overhead_bytes=0,
            kv_cache_bytes=0,
            runtime_bytes=0,
            quantization=quantization,
            context_length=context_length,
            batch_size=batch_size,
            is_guess=is_guess,
            notes=notes,
            quant=quant,
            dtype=dtype,
        )
