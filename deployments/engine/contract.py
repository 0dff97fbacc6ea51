"""The plan is a contract: check what the engine built against its replica plan before it serves.

- The KV pool is the tensor transformers allocated for the plan's geometry:
  its bytes must equal the plan's pool bytes exactly.
- The weights as loaded (parameters, buffers and bitsandbytes' quantization
  side tensors) must be within `WEIGHTS_TOLERANCE` of an exact plan, or, for
  a plan sized from a count or a name, leave room for the plan's KV and runtime.

A replica that breaks either raises PlanContractError from its constructor:
Serve reports the deployment as failed and it never takes traffic.
"""

from __future__ import annotations

from typing import Any

import torch

from deployments.engine.errors import PlanContractError
from placement.replica import WEIGHTS_TOLERANCE, ReplicaPlan
from placement.units import gib

# bitsandbytes keeps a 4-bit weight's absmax, nested absmax/scale and code books on its QuantState, not
# as parameters or buffers: get_memory_footprint misses them.
_QUANT_STATE_TENSORS = ("absmax", "code", "offset")


def held_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the loaded weights hold on their devices: every distinct parameter and buffer storage,
    plus bitsandbytes' quantization side tensors (tied weights counted once)."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if key in seen:
            return
        seen.add(key)
        total += tensor.untyped_storage().nbytes()

    for tensor in (*model.parameters(), *model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            for name in _QUANT_STATE_TENSORS:
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
    for module in model.modules():  # LLM.int8: the per-row scales live on the weight's module
        add(getattr(getattr(module, "weight", None), "SCB", None))
    return total


def check_built(plan: ReplicaPlan, *, weights_bytes: int, pool_bytes: int) -> None:
    """Raise PlanContractError naming both numbers when the engine's build breaks `plan`."""
    assert plan.kv is not None, "the host completes the KV geometry before the engine is built"
    if pool_bytes != plan.kv.pool_bytes:
        raise PlanContractError(
            f"{plan.role}: the KV pool holds {pool_bytes} bytes but the plan budgets {plan.kv.pool_bytes} "
            f"({plan.kv.describe()}); refusing to serve outside the plan"
        )
    planned = plan.weights_bytes
    if plan.weights_exact:
        if abs(weights_bytes - planned) > WEIGHTS_TOLERANCE * planned:
            raise PlanContractError(
                f"{plan.role}: loaded weights hold {weights_bytes} bytes ({gib(weights_bytes)}) but the plan "
                f"sized {planned} ({gib(planned)}), more than {WEIGHTS_TOLERANCE:.0%} apart: the plan sized "
                "other files or another quantization; refusing to serve outside the plan"
            )
        return
    room = plan.memory_budget_bytes - plan.kv.total_bytes
    if weights_bytes > room:
        raise PlanContractError(
            f"{plan.role}: loaded weights hold {weights_bytes} bytes ({gib(weights_bytes)}) but the plan, "
            f"sized from {'a parameter count' if planned else 'an override'}, leaves {room} ({gib(room)}) "
            "beside its KV cache; set `params_b` or `memory_gb` closer to the model, or make its files "
            "available when planning"
        )
