"""A replica's device memory: capped at the plan's budget, recovered after an out-of-memory.

The cap: `torch.cuda.set_per_process_memory_fraction` caps torch's caching allocator
in this process: an allocation past the cap raises an out-of-memory error
HERE (answered 503, `recover` below), instead of succeeding and leaving the
neighbour on a shared GPU to run out. The cap is the plan's budget for the
replica on each visible GPU (`ReplicaPlan.gpu_budgets`: on a split, cuda:0's
holds its weights share, the whole KV cache and the runtime; the others their
weights share and their layers' runtime), as a fraction of that GPU's total
memory. The CUDA context this process opens on each GPU sits outside torch's
allocator, so the cap leaves it out: the planner charges it beside the budget,
one per replica on each GPU it uses (`placement.inventory.Reserve`). On CPU
nothing is capped; the replica only reports its memory.

Recovery: a CUDA OOM in one generation leaves the model's weights intact:
only that batch's activations and KV cache were lost. Releasing them (gc,
then the caching allocator's free blocks) lets the replica serve the next
request, so the replica stays up and the request gets a retryable 503, not a
500.
"""

from __future__ import annotations

import gc
import logging
import sys

from deployments.engine.errors import GenerationOutOfMemory
from placement.replica import ReplicaPlan

logger = logging.getLogger("ray.serve")


def cap_gpu_memory(plan: ReplicaPlan) -> dict[int, int]:
    """Cap each visible GPU at the replica plan's budget for it; local index → capped bytes ({} on CPU)."""
    import torch

    if plan.device != "gpu" or not torch.cuda.is_available():
        return {}
    caps: dict[int, int] = {}
    for local, planned in enumerate(plan.gpu_budgets[: torch.cuda.device_count()]):
        total = torch.cuda.get_device_properties(local).total_memory
        budget = min(planned, total)
        torch.cuda.set_per_process_memory_fraction(budget / total, local)
        caps[local] = budget
    logger.info("%s: torch allocator capped at %s bytes per local GPU (the plan's budget)", plan.role, caps)
    return caps


def is_out_of_memory(exc: BaseException) -> bool:
    # Not loaded here (a replica whose engine runs apart): no torch error can have been raised here.
    torch = sys.modules.get("torch")
    # torch.cuda.OutOfMemoryError is torch.OutOfMemoryError (also on CPU builds).
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def release_memory() -> None:
    """Drop the failed batch's tensors and return cached blocks to the device."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def recover(role: str, exc: BaseException) -> GenerationOutOfMemory:
    """Free memory after `exc` and return the error each request of the batch gets."""
    release_memory()
    logger.warning("%s: out of device memory during generation; memory released, replica stays up", role)
    return GenerationOutOfMemory(
        f"out of device memory while generating ({str(exc).splitlines()[0] if str(exc) else 'OOM'}); "
        "the memory was released: retry, or send a shorter prompt or a smaller max_tokens"
    )


def out_of_memory_answer(role: str, exc: BaseException) -> GenerationOutOfMemory | None:
    """What a request gets for `exc` when it is an out-of-memory error (the memory freed first), else None.
    An engine process frees its memory itself and sends the answer (GenerationOutOfMemory) as it is."""
    if isinstance(exc, GenerationOutOfMemory):
        return exc
    return recover(role, exc) if is_out_of_memory(exc) else None
