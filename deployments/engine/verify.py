"""Check, inside a replica at start-up, that it runs where the plan put it.

Ray hands GPUs out by its own rules (DESIGN.md: lowest free index, first fit);
rayfit pins `CUDA_VISIBLE_DEVICES` per replica. This module checks the pin
took effect — the environment names the planned indices and, on a real GPU,
the visible device is the planned physical one (by UUID, which survives index
renumbering) — and reports memory for the logs.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from placement.plan import PlanEntry, placement_log_line

if TYPE_CHECKING:
    import torch

# torch is imported inside the checks that need it: a replica whose engine runs in a process of
# its own imports this module for the plan's side (entry_for_this_node) and never loads torch.

__all__ = ["placement_log_line"]  # the log line format lives with the plan; replicas import it from here too

_GIB = 1024**3
# The environment variable that `deployments.app.AppArgs.allow_cpu_fallback` defaults from (read there
# only; `placed_entry` gets the value): a GPU-planned replica on a machine without CUDA loads on CPU
# instead of refusing. Never set in production: there it hides a broken pin.
CPU_FALLBACK_ENV = "RAYFIT_ALLOW_CPU_FALLBACK"

logger = logging.getLogger("ray.serve")


class PlacementMismatch(RuntimeError):
    """The replica is not on the device its plan entry names."""


@dataclass(frozen=True)
class ActualPlacement:
    """Where the replica found itself."""

    cuda_visible_devices: str  # as in the environment ("" when unset or blank)
    device_uuids: tuple[str, ...]  # visible GPUs' UUIDs, when a GPU is visible and readable
    cuda_available: bool


def _normalize_uuid(uuid: str) -> str:
    # torch gives a bare hex UUID, nvidia-smi/pynvml prefix 'GPU-'; compare the hex.
    return re.sub(r"^(GPU|MIG)-", "", uuid.strip(), flags=re.IGNORECASE).lower()


def visible_gpu_uuids() -> tuple[str, ...]:
    """UUIDs of the GPUs this process sees, in local index order ('GPU-…' form)."""
    import torch

    if not torch.cuda.is_available():
        return ()
    uuids = []
    for index in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is None:
            return ()
        text = str(uuid)
        uuids.append(text if text.upper().startswith(("GPU-", "MIG-")) else f"GPU-{text}")
    return tuple(uuids)


def check_placement(entry: PlanEntry) -> ActualPlacement:
    """Raise PlacementMismatch unless the replica sees exactly the planned GPU(s) (or none, on CPU)."""
    import torch

    actual_env = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(" ", "")
    planned_env = entry.cuda_visible_devices
    if actual_env != planned_env:
        raise PlacementMismatch(
            f"{entry.role}: planned {entry.device_label} (CUDA_VISIBLE_DEVICES={planned_env!r}) "
            f"but the replica has CUDA_VISIBLE_DEVICES={actual_env!r}; "
            "was `ray_actor_options` overridden (e.g. in serve_config.yaml)?"
        )
    cuda = torch.cuda.is_available()
    uuids = visible_gpu_uuids() if entry.device == "gpu" else ()
    if entry.device == "gpu":
        if not cuda:
            raise PlacementMismatch(
                f"{entry.role}: planned {entry.device_label} but CUDA is not available in the replica"
            )
        if torch.cuda.device_count() != len(entry.gpu_indices):
            raise PlacementMismatch(
                f"{entry.role}: planned {len(entry.gpu_indices)} GPU(s) ({entry.device_label}) "
                f"but the replica sees {torch.cuda.device_count()}"
            )
        for local, (planned, seen) in enumerate(zip(entry.gpu_uuids, uuids, strict=False)):
            if planned and _normalize_uuid(planned) != _normalize_uuid(seen):
                raise PlacementMismatch(
                    f"{entry.role}: planned GPU {entry.gpu_indices[local]} with UUID {planned} "
                    f"but local cuda:{local} is {seen}"
                )
    return ActualPlacement(cuda_visible_devices=actual_env, device_uuids=uuids, cuda_available=cuda)


def placed_entry(entry: PlanEntry, allow_cpu_fallback: bool = False) -> tuple[PlanEntry, bool]:
    """Check that this process sits where `entry` says (check_placement; raises PlacementMismatch) and
    return the entry to load with, and whether it is the CPU fallback's: a GPU plan on a CUDA-less
    machine loads on CPU only when `allow_cpu_fallback` (dev/test), after checking the pin still arrived."""
    import torch

    if entry.device != "gpu" or torch.cuda.is_available() or not allow_cpu_fallback:
        check_placement(entry)
        return entry, False
    # The GPU half of check_placement cannot run without CUDA; the pin can still be checked.
    actual = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(" ", "")
    if actual != entry.cuda_visible_devices:
        raise PlacementMismatch(
            f"{entry.role}: planned {entry.device_label} but the replica has CUDA_VISIBLE_DEVICES={actual!r}. "
            f"Remove `ray_actor_options` for '{entry.role}' from the serve config: Serve replaces rayfit's "
            "options (and its GPU pin) with them instead of merging."
        )
    logger.warning(
        "%s: planned on %s but CUDA is unavailable; loading on CPU because the app allows it "
        "(allow_cpu_fallback, %s=1: dev/test only)",
        entry.role,
        entry.device_label,
        CPU_FALLBACK_ENV,
    )
    return entry.on_cpu(), True


def entry_for_this_node(entry: PlanEntry) -> PlanEntry:
    """The plan entry as it applies to this replica: in the per-GPU mode, the slot of the GPU node it
    landed on (any of `entry.slots`, by its `rayfit.io/gpu` label); otherwise `entry` itself.

    Raises PlacementMismatch when that node is not one the plan budgeted the role on, or when the GPUs
    Ray assigned (`ray.get_gpu_ids()`) are not that slot's.
    """
    if not entry.slots:
        return entry
    import ray

    from placement.gpu_nodes import GPU_LABEL

    label = ray.get_runtime_context().get_node_labels().get(GPU_LABEL, "")
    try:
        mine = entry.on_gpu_node(label)
    except ValueError as exc:
        raise PlacementMismatch(str(exc)) from None
    assigned = sorted(str(gpu) for gpu in ray.get_gpu_ids())
    if assigned != sorted(str(i) for i in mine.gpu_indices):
        raise PlacementMismatch(
            f"{entry.role}: on GPU node {label} Ray assigned GPU ids {assigned}, planned {list(mine.gpu_indices)}; "
            "was `ray_actor_options` overridden (e.g. in serve_config.yaml)?"
        )
    return mine


def _rss_bytes(field: str = "VmRSS") -> int:
    """Resident set size of this process (Linux /proc; psutil elsewhere); `VmHWM`: its peak so far."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # Ray depends on it, so it is present wherever replicas run

    info = psutil.Process().memory_info()
    return int(getattr(info, "peak_wset", info.rss) if field == "VmHWM" else info.rss)


def memory_report(model: torch.nn.Module, weights: int | None = None) -> dict[str, int | str]:
    """Memory the loaded model holds: CUDA allocated/reserved per visible GPU, or process RSS on CPU.
    `weights`: the model's `weights_bytes`, when the caller has it already."""
    import torch

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    report: dict[str, int | str] = {"device": str(device)}
    if weights is None:
        from deployments.engine.contract import held_weight_bytes  # a walk over every tensor: callers pass it

        weights = held_weight_bytes(model)
    report["weights_bytes"] = weights
    if device.type == "cuda":
        for index in range(torch.cuda.device_count()):
            report[f"cuda:{index}_allocated_bytes"] = int(torch.cuda.memory_allocated(index))
            report[f"cuda:{index}_reserved_bytes"] = int(torch.cuda.memory_reserved(index))
            # The most the allocator held since the process started, the load included (placement.calibration).
            report[f"cuda:{index}_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(index))
            # Device-wide (every process on the GPU), from the driver: what the report calls free.
            free, total = torch.cuda.mem_get_info(index)
            report[f"cuda:{index}_free_bytes"] = int(free)
            report[f"cuda:{index}_total_bytes"] = int(total)
    else:
        report["rss_bytes"] = _rss_bytes()
        report["peak_rss_bytes"] = _rss_bytes("VmHWM")  # the process's peak, the load included
    return report
