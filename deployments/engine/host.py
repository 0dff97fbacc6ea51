"""Check the placement, load one model and build its engine, in the process that will run it.

The replica does this itself (`engine_process: false`), or has a process of
its own do it (the default; deployments.engine.process and
deployments.engine.child). Both call `build_engine`, so the placement check,
the plan's memory cap, the load and the engine's KV budget are the same
either way, and only the process that holds the model imports torch.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

from deployments.engine.generation import ModelFacts
from placement.config import ModelSpec
from placement.plan import PlanEntry

logger = logging.getLogger("ray.serve")

# The environment variable that `deployments.app.AppArgs.engine_wrapper` defaults from (read there only).
ENGINE_WRAPPER_ENV = "RAYFIT_ENGINE_WRAPPER"


@dataclass(frozen=True)
class EngineOptions:
    """The app's dev/test switches for building an engine (deployments.app.AppArgs, read once there), as
    the replica hands them on: to `build_engine`, or to its engine process in `messages.Start`."""

    # A GPU-planned model loads on CPU when this process has no CUDA (the pin is still checked). Dev/test
    # only: in production it would hide a broken pin.
    allow_cpu_fallback: bool = False
    # "module:callable", importable where the engine runs: the engine is passed through it once built
    # (tests wrap it with fault injection, tests/fault_injection.py). None in production.
    wrapper: str | None = None


def build_engine(spec: ModelSpec, entry: PlanEntry, options: EngineOptions = EngineOptions()) -> tuple[Any, ModelFacts]:
    """Check that this process sits where `entry` says, cap its GPU memory at the replica plan's budget,
    load `spec` as the plan says and build its engine (wrapped by `options.wrapper` when set).
    Raises PlacementMismatch, ModelLoadError, or PlanContractError (the build differs from the plan)."""
    import torch

    from deployments.engine.core import Engine
    from deployments.engine.loading import load_model
    from deployments.engine.memory import cap_gpu_memory
    from deployments.engine.verify import placed_entry
    from placement.replica import complete_kv

    # Raises PlacementMismatch with the reason (a missing pin names the serve YAML's
    # ray_actor_options); Serve then reports the deployment as failed.
    entry, cpu_fallback = placed_entry(entry, allow_cpu_fallback=options.allow_cpu_fallback)
    if entry.replica is None:
        raise ValueError(f"{entry.role}: plan entry without a replica plan (make plans with placement.planner)")
    plan = entry.replica
    # The plan's budget becomes a hard cap before the first weight lands (GPU only).
    memory_caps = cap_gpu_memory(plan)
    loaded = load_model(spec, plan)
    # Only a plan made without the model's attention shape gets its KV geometry now (placement decides it).
    plan = complete_kv(plan, loaded.model.config.get_text_config(), loaded.model.dtype.itemsize)
    logger.info("%s: replica plan: %s", entry.role, plan.describe())
    engine = Engine(loaded, plan, tool_format=spec.tool_format)
    cuda = torch.cuda.is_available()
    facts = ModelFacts(
        device=str(loaded.model.device),
        context_length=plan.context_length,
        is_multimodal=loaded.is_multimodal,
        load_seconds=loaded.load_seconds,
        quantization=loaded.quantization,
        memory_caps=memory_caps,
        torch_threads=torch.get_num_threads(),
        gpu_uuids=tuple(str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count()))
        if cuda
        else (),
        cpu_fallback=cpu_fallback,
    )
    return _wrapped(engine, options.wrapper), facts


def _wrapped(engine: Any, target: str | None) -> Any:
    """`engine` passed through the callable `target` names ("module:callable"), if any."""
    if not target:
        return engine
    module, _, name = target.partition(":")
    if not name:
        raise ValueError(f"engine wrapper {target!r}: expected 'module:callable'")
    logger.warning("engine wrapped by %s (the app's engine_wrapper; never in production)", target)
    return getattr(importlib.import_module(module), name)(engine)
