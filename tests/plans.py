"""Plan entries for tests that build an engine without Ray, made by the planner itself.

A test's engine gets what a replica gets in production: the entry the planner
made for its spec, with the replica plan (placement.replica) every number of
the engine comes from. No hand-made entries: a hand-made entry is exactly the
kind of second decision the replica plan exists to remove.
"""

from __future__ import annotations

from placement.config import ModelSpec
from placement.inventory import parse_gpu_spec
from placement.plan import PlanEntry
from placement.planner import make_plan
from placement.replica import ReplicaPlan
from placement.units import GIB

# Room enough on the declared CPU node for any test model.
_TEST_CPU_BYTES = 64 * GIB


def planned_entry(spec: ModelSpec, role: str = "tiny", gpus: str = "none") -> PlanEntry:
    """The planner's entry for `spec` alone on a machine with `gpus` ('none': CPU; '1x80GB': one GPU)."""
    inventory = parse_gpu_spec(gpus, cpu_memory_bytes=_TEST_CPU_BYTES)
    return make_plan({role: spec}, inventory).entry(role)


def replica_plan(spec: ModelSpec, role: str = "tiny") -> ReplicaPlan:
    """The replica plan of `spec` planned on CPU (what its engine builds with)."""
    plan = planned_entry(spec, role).replica
    assert plan is not None
    return plan


def engine_plan(spec: ModelSpec, **changes: object) -> ReplicaPlan:
    """The replica plan of `spec` with `changes` to its fields (e.g. max_batch_size=2, continuous_batching=False):
    one loaded model, engines planned several ways."""
    return replica_plan(spec.model_copy(update=changes))
