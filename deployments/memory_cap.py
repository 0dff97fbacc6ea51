"""Hold a GPU replica to the memory its plan gave it.

`torch.cuda.set_per_process_memory_fraction` caps torch's caching allocator
in this process: an allocation past the cap raises an out-of-memory error
HERE (answered 503, deployments.oom), instead of succeeding and leaving the
neighbour on a shared GPU to run out. The cap is the plan's budget for the
replica on each visible GPU, as a fraction of that GPU's total memory. The
CUDA context (outside torch's allocator) is not counted: the planner holds
it back per GPU (`placement.inventory.Reserve`). On CPU nothing is capped;
the replica only reports its memory.
"""

from __future__ import annotations

import logging

from placement.plan import PlanEntry

logger = logging.getLogger("ray.serve")


def cap_gpu_memory(entry: PlanEntry) -> dict[int, int]:
    """Cap each visible GPU at the plan's budget; local index → capped bytes ({} on CPU)."""
    import torch

    if entry.device != "gpu" or not torch.cuda.is_available():
        return {}
    caps: dict[int, int] = {}
    for local in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(local).total_memory
        budget = min(entry.gpu_budget_bytes(local), total)
        torch.cuda.set_per_process_memory_fraction(budget / total, local)
        caps[local] = budget
    logger.info("%s: torch allocator capped at %s bytes per local GPU (the plan's budget)", entry.role, caps)
    return caps
