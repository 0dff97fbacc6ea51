"""The per-GPU report: the app's `/v1/placement` JSON → findings and per-GPU usage.

Pure functions over the document (no HTTP, no Ray), so the checks can be tested
on any JSON. `python -m placement report --url ...` fetches and prints them.
The document's shape is placement.placement_document.PlacementDocument; JSON
is validated into it first.

A model's actual memory is what torch holds for it: reserved bytes summed over
its GPUs; on CPU the loaded weights (`weights_bytes`), because a CPU replica's
RSS is mostly the Python/torch runtime, which the plan does not budget per model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from placement.inventory import LOCAL_NODE
from placement.placement_document import (
    PlacementDocument,
    PlannedGpu,
    PlannedRole,
    ReplicaError,
    ReplicaMemory,
    ReplicaReport,
    RolePlacement,
)

Severity = Literal["error", "warning"]
# What a finding is about: the replica's node, its GPUs, its memory, a CPU fallback, or no replica at all.
Kind = Literal["node", "gpu", "memory", "fallback", "unavailable"]
MISPLACED_KINDS = ("node", "gpu")


@dataclass(frozen=True)
class Finding:
    severity: Severity
    kind: Kind
    role: str
    message: str


@dataclass(frozen=True)
class ModelRow:
    role: str
    model: str
    status: str  # "ok", "misplaced", "unplaced", "unavailable"
    planned_node: str | None
    planned_device: str | None
    actual_node: str | None
    actual_device: str | None  # the replica's torch device ("cuda:0" is local, see cuda_visible_devices)
    cuda_visible_devices: str | None
    budget_bytes: int | None
    actual_bytes: int | None
    rss_bytes: int | None
    kv_planned_bytes: int | None = None  # the plan's KV bytes (None: not itemized)
    kv_actual_bytes: int | None = None  # the engine's worst case over all paths, as the replica reports it


@dataclass(frozen=True)
class GpuRow:
    node_id: str
    index: int
    name: str | None
    total_bytes: int
    planned_bytes: int
    allocated_bytes: int | None  # None: no replica on it reported CUDA memory (declared GPUs, CPU fallback)
    reserved_bytes: int | None
    free_bytes: int | None  # device-wide, from the driver; None when unknown
    roles: tuple[str, ...]

    @property
    def used_percent(self) -> float | None:
        """Share of the GPU in use: by the driver's free count, else by what rayfit reserved."""
        if not self.total_bytes:
            return None
        if self.free_bytes is not None:
            return 100.0 * (self.total_bytes - self.free_bytes) / self.total_bytes
        if self.reserved_bytes is not None:
            return 100.0 * self.reserved_bytes / self.total_bytes
        return None


@dataclass(frozen=True)
class ReplicaRow:
    """One replica of a role as Ray sees it: Serve's state, its node, and the GPU node label and indices."""

    role: str
    replica_id: str | None
    state: str | None
    node_id: str | None
    gpu_label: str | None  # per-GPU mode: the node's `rayfit.io/gpu`; None on other nodes
    gpu_indices: tuple[int, ...] | None  # from that label; None when the node says nothing (see the model row)


@dataclass(frozen=True)
class Report:
    models: tuple[ModelRow, ...]
    gpus: tuple[GpuRow, ...]
    findings: tuple[Finding, ...] = field(default=())
    replicas: tuple[ReplicaRow, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


def actual_bytes(memory: ReplicaMemory) -> int | None:
    """What the model holds: CUDA reserved over its GPUs, else its weights on CPU."""
    reserved = memory.cuda_bytes("reserved")
    if reserved:
        return sum(reserved.values())
    weights = memory.weights_bytes
    return weights if weights is not None and weights > 0 else None


def check_replica(
    role: str, plan: PlannedRole | Mapping[str, Any] | None, replica: ReplicaReport | Mapping[str, Any]
) -> list[Finding]:
    """Is the replica where the plan put it, and within its budget? (plan: /v1/placement's `plan` entry)"""
    plan = PlannedRole.model_validate(plan or {})
    actual = ReplicaReport.model_validate(replica).actual
    findings: list[Finding] = []
    planned_visible = plan.cuda_visible_devices or ""
    if plan.slots:
        # Per-GPU mode: any GPU node the plan budgeted a replica on, by label (its node id may be new).
        slot = plan.slot_on(actual.gpu_label)
        if slot is None:
            allowed = ", ".join(sorted({slot.gpu_label for slot in plan.slots}))
            findings.append(
                Finding("error", "node", role, f"runs on GPU node {actual.gpu_label!r}, planned on {allowed}")
            )
        else:
            planned_visible = slot.cuda_visible_devices or ""
    elif plan.node_id and plan.node_id != LOCAL_NODE and actual.node_id != plan.node_id:
        findings.append(
            Finding("error", "node", role, f"runs on node {str(actual.node_id)[:12]}, planned {plan.node_id[:12]}")
        )
    visible = (actual.cuda_visible_devices or "").replace(" ", "")
    if visible != planned_visible:
        findings.append(
            Finding(
                "error",
                "gpu",
                role,
                f"sees CUDA_VISIBLE_DEVICES={visible!r}, planned {planned_visible!r} ({plan.device})",
            )
        )
    if actual.cpu_fallback:
        findings.append(
            Finding(
                "warning",
                "fallback",
                role,
                f"planned on {plan.device} but runs on CPU (the app's allow_cpu_fallback)",
            )
        )
    budget = plan.memory_budget_bytes
    used = actual_bytes(actual.memory)
    if budget is not None and used is not None and used > budget:
        findings.append(
            Finding(
                "error", "memory", role, f"uses {used / 2**30:.2f} GiB, over its budget of {budget / 2**30:.2f} GiB"
            )
        )
    kv_planned, kv_actual = plan.kv_cache_bytes, actual.memory.kv_built_bytes
    if kv_planned is not None and kv_actual is not None and kv_actual > kv_planned:
        findings.append(
            Finding(
                "error",
                "memory",
                role,
                f"its engine may hold {kv_actual / 2**30:.3f} GiB of KV cache, over the plan's "
                f"{kv_planned / 2**30:.3f} GiB",
            )
        )
    return findings


def _model_row(role: str, entry: RolePlacement) -> tuple[ModelRow, list[Finding]]:
    plan = entry.plan or PlannedRole()
    replica = entry.replica
    findings: list[Finding] = []
    if isinstance(replica, ReplicaError):
        reason = entry.reason or replica.error or "no replica answered"
        findings.append(Finding("error", "unavailable", role, f"{entry.status}: {reason}"))
        actual, model = None, None
    else:
        findings.extend(check_replica(role, plan, replica))
        actual, model = replica.actual, replica.model
    memory = actual.memory if actual else ReplicaMemory()
    row = ModelRow(
        role=role,
        model=str(plan.model or model or "?"),
        status=entry.status,
        planned_node=plan.node_id,
        planned_device=plan.device,
        actual_node=actual.node_id if actual else None,
        actual_device=actual.device if actual else None,
        cuda_visible_devices=actual.cuda_visible_devices if actual else None,
        budget_bytes=plan.memory_budget_bytes,
        actual_bytes=actual_bytes(memory) if actual else None,
        rss_bytes=memory.rss_bytes,
        kv_planned_bytes=plan.kv_cache_bytes,
        kv_actual_bytes=memory.kv_built_bytes,
    )
    return row, findings


def _gpu_rows(gpus: list[PlannedGpu], models: Mapping[str, RolePlacement]) -> tuple[GpuRow, ...]:
    # Host (node, GPU index) → what the replicas on it report; a replica's local cuda:i is its plan's gpu_indices[i].
    allocated: dict[tuple[str | None, int], int] = {}
    reserved: dict[tuple[str | None, int], int] = {}
    free: dict[tuple[str | None, int], int] = {}
    for entry in models.values():
        if not isinstance(entry.replica, ReplicaReport):
            continue
        plan, actual = entry.plan or PlannedRole(), entry.replica.actual
        node_id, indices = plan.node_id, plan.gpu_indices
        slot = plan.slot_on(actual.gpu_label)  # per-GPU mode: the GPU node this replica runs on
        if slot is not None:
            node_id, indices = slot.node_id, slot.gpu_indices
        for target, kind in ((allocated, "allocated"), (reserved, "reserved"), (free, "free")):
            for local, value in actual.memory.cuda_bytes(kind).items():
                if local < len(indices):
                    key = (node_id, indices[local])
                    # Free is device-wide: every replica on the GPU sees the same number.
                    target[key] = value if kind == "free" else target.get(key, 0) + value
    rows = []
    for gpu in gpus:
        key = (gpu.node_id, gpu.index)
        rows.append(
            GpuRow(
                node_id=gpu.node_id,
                index=gpu.index,
                name=gpu.name,
                total_bytes=gpu.total_bytes,
                planned_bytes=gpu.planned_bytes,
                allocated_bytes=allocated.get(key),
                reserved_bytes=reserved.get(key),
                free_bytes=free.get(key),
                roles=tuple(gpu.roles),
            )
        )
    return tuple(rows)


def build_report(placement: PlacementDocument | Mapping[str, Any]) -> Report:
    """Findings and per-GPU usage from the app's /v1/placement JSON (a pydantic ValidationError, naming the
    field, when it is not that document)."""
    document = PlacementDocument.model_validate(placement)
    models = document.models
    rows, findings = [], []
    for role in sorted(models):
        row, found = _model_row(role, models[role])
        rows.append(row)
        findings.extend(found)
    replicas = tuple(
        ReplicaRow(
            role=role,
            replica_id=row.replica_id,
            state=row.state,
            node_id=row.node_id,
            gpu_label=row.gpu_label,
            gpu_indices=tuple(row.gpu_indices) if row.gpu_indices is not None else None,
        )
        for role in sorted(models)
        for row in models[role].replicas
    )
    gpus = _gpu_rows(document.gpus, models)
    return Report(models=tuple(rows), gpus=gpus, findings=tuple(findings), replicas=replicas)
