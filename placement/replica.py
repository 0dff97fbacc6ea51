"""The replica plan: every number a replica's engine builds with, decided here and nowhere else.

The planner attaches one `ReplicaPlan` to each plan entry (`PlanEntry.replica`).
It crosses to the Serve replica and to the engine's own process unchanged, and
the engine (deployments.engine) derives none of these numbers: it loads with
the plan's dtype, quantization and device map, caps each GPU at the plan's
budget, builds exactly the plan's KV pool and side slots, and refuses to start
when what it built differs (deployments.engine.contract).

One decision is left to the replica, and it is made here too: a model whose
attention shape was unknown when planning (sized from a parameter count or a
name) gets its KV geometry from `complete_kv` once its config is loaded,
bounded by the KV bytes the plan reserved.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from placement.kv_geometry import KvBudget
from placement.quantization import QuantizationPlan

if TYPE_CHECKING:
    from placement.config import ModelSpec
    from placement.estimate import MemoryEstimate

# The weights a replica loads may differ from an exact plan (sized from the model's own shapes) by this
# share: bitsandbytes' code books and alignment, buffers such as rotary tables. Measured on real loads:
# 368 vs 369.4 MiB, 105 vs 106.3 MiB (DESIGN.md). A larger gap means the plan sized another model.
WEIGHTS_TOLERANCE = 0.02
# transformers' quantizers (bitsandbytes 4- and 8-bit among them) hand accelerate this share of each
# max_memory figure (`HfQuantizer.adjust_max_memory`, "buffers created during quantization").
QUANTIZER_MAX_MEMORY_FACTOR = 0.9


@dataclass(frozen=True)
class ReplicaPlan:
    """What one replica of a role loads and allocates. Frozen, plain data, pickled as is."""

    role: str
    model: str
    device: Literal["gpu", "cpu"]
    dtype: str  # the weights' and the KV cache's dtype ("bfloat16", ...)
    quantization: QuantizationPlan
    context_length: int  # tokens per sequence: prompt + answer
    batch_sequences: int  # sequences the KV cache holds at once (the pool's batch, or side slots without a pool)
    continuous: bool  # unseeded text requests join transformers' continuous-batching pool
    kv: KvBudget | None  # the exact pool and side slots; None until `complete_kv` (shape unknown when planned)
    kv_budget_bytes: int | None  # the KV bytes the plan reserved; None: a `memory_gb` lump, not itemized
    weights_bytes: int  # planned weights + quantization side tensors, as held on the device
    weights_exact: bool  # sized from the model's shapes: held to WEIGHTS_TOLERANCE; else only to the budget
    memory_budget_bytes: int  # everything this replica may hold on its device (weights, KV, runtime)
    # Per local GPU (after CUDA_VISIBLE_DEVICES): torch's allocator cap. A split's cuda:0 holds its weights
    # share + the whole KV + the runtime; the others their weights + their layers' runtime share. Sums to
    # the budget; the CUDA context of the replica's process is outside it (the planner charges it per GPU).
    gpu_budgets: tuple[int, ...]
    max_tokens_cap: int  # the largest max_tokens a request may ask for (400 above it)
    max_images: int  # images one request may carry (400 above it); their bytes are in the plan's runtime
    # A split's weights per local GPU, as held (quantization side tensors included): what accelerate may
    # place there. () unless split. On cuda:0 it leaves exactly the KV + runtime of its cap free.
    weights_max_memory: tuple[int, ...] = ()
    quant_overhead_bytes: int = 0  # of weights_bytes: bitsandbytes' absmax, scales and code books

    @property
    def is_split(self) -> bool:
        return len(self.gpu_budgets) > 1

    @property
    def device_map(self) -> str | dict[str, int]:
        """What from_pretrained gets: "cpu"; {"": 0} for one GPU (the pin makes the planned GPU local
        cuda:0); "auto" for a split, bounded by `accelerate_max_memory`."""
        if self.device == "cpu":
            return "cpu"
        return "auto" if self.is_split else {"": 0}

    @property
    def accelerate_max_memory(self) -> dict[int, int] | None:
        """The `max_memory` from_pretrained gets for a split (local indices), None otherwise:
        `weights_max_memory` in accelerate's own accounting.

        - accelerate counts a quantized weight at its packed size only, without bitsandbytes' side
          tensors: each figure is scaled by (weights - overhead) / weights;
        - transformers' bitsandbytes quantizer then hands accelerate 90% of each figure
          (QUANTIZER_MAX_MEMORY_FACTOR): divided back out, so accelerate may fill what the plan says;
        - accelerate fills the GPUs in order with whole decoder layers, keeps the largest layer's size
          free on the first, and sends what the last cannot take to disk (which bitsandbytes refuses):
          the last GPU is offered its whole allocator budget, not only its weights share, so the few
          layers the earlier GPUs leave over land there. Every earlier GPU, cuda:0 with its KV first,
          gets no more weights than the plan's share; the allocator cap bounds the last.
        """
        if not self.is_split:
            return None
        held = self.weights_bytes
        counted = (held - self.quant_overhead_bytes) / held if held else 1.0
        factor = QUANTIZER_MAX_MEMORY_FACTOR if self.quantization.scheme != "none" else 1.0
        offered = (*self.weights_max_memory[:-1], self.gpu_budgets[-1])
        return {local: int(allowed * counted / factor) for local, allowed in enumerate(offered)}

    def on_cpu(self) -> ReplicaPlan:
        """The same replica loaded on CPU (the dev/test fallback on a machine without CUDA)."""
        return replace(self, device="cpu", gpu_budgets=(), weights_max_memory=())

    def describe(self) -> str:
        """One line for the replica's log."""
        kv = self.kv.describe() if self.kv else f"KV within {self.kv_budget_bytes} bytes (geometry at load)"
        return (
            f"{self.model} on {self.device} in {self.dtype}, quantization {self.quantization.label}, "
            f"context {self.context_length}, batch {self.batch_sequences}; {kv}"
        )


def plan_replica(
    role: str,
    spec: ModelSpec,
    estimate: MemoryEstimate,
    *,
    device: Literal["gpu", "cpu"],
    gpu_budgets: tuple[int, ...],
    weights_max_memory: tuple[int, ...] = (),
) -> ReplicaPlan:
    """The replica plan of one role, from its spec and estimate (the planner calls this per entry, with
    the allocator caps and a split's weights per GPU as it laid them out)."""
    from placement.quantization import decide_quantization, read_checkpoint_quantization

    quant = estimate.quant or decide_quantization(spec.quantization, read_checkpoint_quantization(None), spec.model)
    itemized = not (estimate.source == "memory_gb" and estimate.kv_cache_bytes == 0)
    return ReplicaPlan(
        role=role,
        model=spec.model,
        device=device,
        dtype=spec.dtype,
        quantization=quant,
        context_length=estimate.context_length,
        batch_sequences=estimate.batch_size,
        continuous=spec.continuous_batching,
        kv=estimate.kv_budget,
        kv_budget_bytes=estimate.kv_cache_bytes if itemized else None,
        weights_bytes=estimate.weights_bytes + estimate.quant_overhead_bytes,
        weights_exact=estimate.is_exact,
        memory_budget_bytes=estimate.total_bytes,
        gpu_budgets=gpu_budgets,
        max_tokens_cap=spec.max_tokens_cap,
        max_images=spec.max_images_per_request,
        weights_max_memory=weights_max_memory,
        quant_overhead_bytes=estimate.quant_overhead_bytes,
    )


def complete_kv(plan: ReplicaPlan, text_config: Any, dtype_bytes: int) -> ReplicaPlan:
    """`plan` with its KV geometry, for a model whose attention shape the planner could not read.

    The pool and side slots are computed from the loaded config at the plan's
    context, with as many of the plan's batch sequences as fit the KV bytes it
    reserved (at least one; the contract check then refuses a replica whose
    one sequence does not fit). A plan that has its geometry is returned as is.
    """
    if plan.kv is not None:
        return plan
    from placement.sizing.kv_budget import fit_budget

    budget = fit_budget(
        text_config,
        planned_bytes=plan.kv_budget_bytes,
        batch_sequences=plan.batch_sequences,
        context_length=plan.context_length,
        dtype=dtype_bytes,
        continuous=plan.continuous,
    )
    sequences = budget.pool.sequences if budget.pool else budget.side_sequences
    return replace(plan, kv=budget, batch_sequences=sequences)
