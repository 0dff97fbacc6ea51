"""Measured, then corrected: what each replica really held, kept per model and used by later plans.

`python -m placement calibrate` reads the running app's `/v1/placement`: each
replica reports the weights it holds (`weights_bytes`), its KV cache as built
(`kv_built_bytes`: pool + side slots) and its peak: torch's allocator peak
(`max_memory_reserved`, summed over the replica's GPUs) on a GPU, the engine
process's peak RSS (`VmHWM`) on CPU. Both peaks count from the process's start,
so they cover the load and the largest request it has served so far:
calibrate after representative traffic.

The figures are stored in a small JSON file (`default_path`), one record per
model id (as written in the config), revision, quantization, context length
and device kind (the GPU's name as NVML gives it, or "cpu"). A later plan of a
model with the same key on a cluster of that one device kind uses the peak as
the model's total (`measured_estimate`); the plan's "source" column then says
`measured (...)`. On CPU the peak RSS already holds the process itself
(Python, torch, Ray's worker), so the planner adds no process bytes to it. On a
GPU the CUDA context stays outside torch's allocator and is still charged
beside it. Any other model keeps its estimate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from placement.cache import rayfit_cache_dir
from placement.config import ModelSpec
from placement.estimate import MemoryEstimate
from placement.inventory import Inventory
from placement.placement_document import PlacementDocument, PlannedRole, ReplicaReport

CALIBRATION_ENV = "RAYFIT_CALIBRATION"
FILE_VERSION = 1
CPU_KIND = "cpu"


def default_path() -> Path:
    """`$RAYFIT_CALIBRATION`, else `<rayfit cache>/calibration.json` (read at call time)."""
    value = os.environ.get(CALIBRATION_ENV)
    return Path(value) if value else rayfit_cache_dir() / "calibration.json"


@dataclass(frozen=True, order=True)
class CalibrationKey:
    """What a measurement holds for: the same files, loaded the same way, at the same context, on the same kind."""

    model: str  # as written in the config (`demo:...`, a hub id, a path)
    revision: str | None
    quantization: str  # the plan's label: "nf4", "nf4 (pre-quantized)", "none", ...
    context_length: int
    device_kind: str  # the GPU's name, or "cpu"


@dataclass(frozen=True)
class Measurement:
    key: CalibrationKey
    weights_bytes: int
    kv_bytes: int  # pool + side slots as the engine built them
    peak_bytes: int  # torch's peak reserved bytes (GPU) or the engine process's peak RSS (CPU)
    estimated_bytes: int  # what the plan budgeted, for comparison
    role: str
    measured_at: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        return cls(**{**data, "key": CalibrationKey(**data["key"])})


class CalibrationError(ValueError):
    """The calibration file cannot be read."""


def load_measurements(path: Path) -> dict[CalibrationKey, Measurement]:
    """The stored measurements ({} when the file does not exist)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        items = [Measurement.from_dict(item) for item in data["measurements"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CalibrationError(f"{path}: not a rayfit calibration file ({exc})") from exc
    return {item.key: item for item in items}


def save_measurements(path: Path, new: list[Measurement]) -> dict[CalibrationKey, Measurement]:
    """Merge `new` into the file (a later measurement of a key replaces the earlier one); the result."""
    merged = {**load_measurements(path), **{item.key: item for item in new}}
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": FILE_VERSION, "measurements": [merged[key].as_dict() for key in sorted(merged)]}
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(body, indent=2) + "\n")
    temporary.replace(path)  # readers never see half a file
    return merged


def quantization_label(estimate: MemoryEstimate) -> str:
    return estimate.quant.label if estimate.quant is not None else estimate.quantization


def key_for(spec: ModelSpec, estimate: MemoryEstimate, device_kind: str) -> CalibrationKey:
    """`spec`: as written in the config (its model id unresolved)."""
    return CalibrationKey(spec.model, spec.revision, quantization_label(estimate), estimate.context_length, device_kind)


def device_kind(spec: ModelSpec, inventory: Inventory) -> str | None:
    """The kind of device the model will run on, where the inventory leaves one choice: "cpu" with no GPU
    (or `cpu: true`), the GPUs' name when all are one kind; None on a mix or unnamed (declared) GPUs."""
    names = {gpu.name for node in inventory.nodes for gpu in node.gpus}
    if spec.cpu or not names:
        return CPU_KIND
    return names.pop() if len(names) == 1 and None not in names else None


def measured_estimate(estimate: MemoryEstimate, measured: Measurement) -> MemoryEstimate:
    """`estimate` corrected to what a replica held: its weights as loaded, the planned KV (the engine builds it
    exactly), and the rest of its peak as runtime. The total is the peak (never below weights + KV)."""
    held = measured.weights_bytes + estimate.kv_cache_bytes
    return replace(
        estimate,
        weights_bytes=measured.weights_bytes,
        quant_overhead_bytes=0,  # held_weight_bytes counts the quantization state with the weights
        runtime_bytes=max(0, measured.peak_bytes - held),
        measured_peak_bytes=measured.peak_bytes,
    )


def calibrated(
    written: Mapping[str, ModelSpec],
    estimates: Mapping[str, MemoryEstimate],
    inventory: Inventory,
    measurements: Mapping[CalibrationKey, Measurement],
) -> dict[str, MemoryEstimate]:
    """Each role's estimate, replaced by its measured one where a measurement of its key exists.
    `written`: the specs as written in the config (the keys use the model id the user wrote)."""
    out = dict(estimates)
    for role, estimate in estimates.items():
        kind = device_kind(written[role], inventory)
        found = measurements.get(key_for(written[role], estimate, kind)) if kind else None
        if found is not None:
            out[role] = measured_estimate(estimate, found)
    return out


def _gpu_name(placement: PlacementDocument, plan: PlannedRole) -> str | None:
    """The name of the first GPU the role was planned on (its card, e.g. "NVIDIA H100 80GB HBM3")."""
    if not plan.gpu_indices:
        return None
    for gpu in placement.gpus:
        if gpu.node_id == plan.node_id and gpu.index == plan.gpu_indices[0]:
            return gpu.name
    return None


def measurements_from_placement(
    placement: Mapping[str, Any] | PlacementDocument,
    written: Mapping[str, ModelSpec],
    estimates: Mapping[str, MemoryEstimate],
    now: datetime | None = None,
) -> tuple[list[Measurement], list[str]]:
    """(the measurements, notes on the roles skipped) from a `/v1/placement` body (read as its
    PlacementDocument: a body that is not one raises pydantic's ValidationError, a ValueError).

    A role is skipped when its replica did not answer, when it was planned at another context than the
    config now gives (the running app is not this config), or when its GPU has no name."""
    document = placement if isinstance(placement, PlacementDocument) else PlacementDocument.model_validate(placement)
    stamp = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    found: list[Measurement] = []
    notes: list[str] = []
    for role, item in sorted(document.models.items()):
        if role not in written:
            notes.append(f"{role}: not in this config; skipped")
            continue
        plan, replica = item.plan or PlannedRole(), item.replica
        if not isinstance(replica, ReplicaReport):
            notes.append(f"{role}: no replica report ({replica.error}); skipped")
            continue
        estimate = estimates[role]
        planned_context = plan.replica_plan.context_length if plan.replica_plan else None
        if planned_context != estimate.context_length:
            notes.append(
                f"{role}: the running replica was planned at context {planned_context}, the config gives "
                f"{estimate.context_length}; skipped (redeploy, then calibrate)"
            )
            continue
        actual = replica.actual
        memory = actual.memory
        if actual.device == CPU_KIND or str(memory.device or "").startswith("cpu"):
            kind, peak = CPU_KIND, memory.peak_rss_bytes
        else:
            kind = _gpu_name(document, plan)
            peaks = memory.cuda_bytes("peak_reserved")
            peak = sum(peaks.values()) if peaks else None
        if kind is None or peak is None or memory.weights_bytes is None:
            notes.append(f"{role}: its device has no name or its replica reports no peak; skipped")
            continue
        found.append(
            Measurement(
                key=key_for(written[role], estimate, kind),
                weights_bytes=memory.weights_bytes,
                kv_bytes=memory.kv_built_bytes or 0,
                peak_bytes=int(peak),
                estimated_bytes=plan.memory_budget_bytes or 0,
                role=role,
                measured_at=stamp,
            )
        )
    return found, notes
