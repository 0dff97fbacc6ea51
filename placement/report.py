"""The per-GPU report: the app's `/v1/placement` JSON → findings and per-GPU usage.

Pure functions over plain data (no HTTP, no Ray), so the checks can be tested
on any JSON. `python -m placement report --url ...` fetches and prints them.

`/v1/placement` looks like:
  {"models": {role: {"status", "reason", "plan": {...}, "replica": {"planned", "actual"} | {"error"},
                     "replicas": [{"replica_id", "state", "node_id", "gpu_label", "gpu_indices"}]}},
   "gpus": [{"node_id", "index", "name", "total_bytes", "usable_bytes", "planned_bytes", "roles"}]}

A model's actual memory is what torch holds for it: reserved bytes summed over
its GPUs; on CPU the loaded weights (`weights_bytes`), because a CPU replica's
RSS is mostly the Python/torch runtime, which the plan does not budget per model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from placement.inventory import LOCAL_NODE

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


def _cuda_bytes(memory: Mapping[str, Any], kind: str) -> dict[int, int]:
    """'cuda:<local>_<kind>_bytes' → {local index: bytes}."""
    out = {}
    for key, value in memory.items():
        if key.startswith("cuda:") and key.endswith(f"_{kind}_bytes") and isinstance(value, int):
            out[int(key[len("cuda:") :].split("_", 1)[0])] = value
    return out


def actual_bytes(memory: Mapping[str, Any]) -> int | None:
    """What the model holds: CUDA reserved over its GPUs, else its weights on CPU."""
    reserved = _cuda_bytes(memory, "reserved")
    if reserved:
        return sum(reserved.values())
    weights = memory.get("weights_bytes")
    return weights if isinstance(weights, int) and weights > 0 else None


def check_replica(role: str, plan: Mapping[str, Any], replica: Mapping[str, Any]) -> list[Finding]:
    """Is the replica where the plan put it, and within its budget? (plan: /v1/placement's `plan` entry)"""
    findings: list[Finding] = []
    actual = replica.get("actual", {})
    planned_node = plan.get("node_id")
    slots = plan.get("slots") or []
    if slots:
        # Per-GPU mode: any GPU node the plan budgeted a replica on, by label (its node id may be new).
        label = actual.get("gpu_label")
        mine = [slot for slot in slots if slot.get("gpu_label") == label]
        if not mine:
            allowed = ", ".join(sorted({str(slot.get("gpu_label")) for slot in slots}))
            findings.append(Finding("error", "node", role, f"runs on GPU node {label!r}, planned on {allowed}"))
        if mine:
            plan = {**plan, "cuda_visible_devices": mine[0].get("cuda_visible_devices")}
    elif planned_node and planned_node != LOCAL_NODE and actual.get("node_id") != planned_node:
        findings.append(
            Finding(
                "error", "node", role, f"runs on node {str(actual.get('node_id'))[:12]}, planned {planned_node[:12]}"
            )
        )
    planned_visible = plan.get("cuda_visible_devices") or ""
    visible = (actual.get("cuda_visible_devices") or "").replace(" ", "")
    if visible != planned_visible:
        findings.append(
            Finding(
                "error",
                "gpu",
                role,
                f"sees CUDA_VISIBLE_DEVICES={visible!r}, planned {planned_visible!r} ({plan.get('device')})",
            )
        )
    if actual.get("cpu_fallback"):
        findings.append(
            Finding(
                "warning",
                "fallback",
                role,
                f"planned on {plan.get('device')} but runs on CPU (RAYFIT_ALLOW_CPU_FALLBACK)",
            )
        )
    budget = plan.get("memory_budget_bytes")
    used = actual_bytes(actual.get("memory", {}))
    if isinstance(budget, int) and used is not None and used > budget:
        findings.append(
            Finding(
                "error", "memory", role, f"uses {used / 2**30:.2f} GiB, over its budget of {budget / 2**30:.2f} GiB"
            )
        )
    kv_planned = plan.get("kv_cache_bytes")
    kv_actual = actual.get("memory", {}).get("kv_built_bytes")
    if isinstance(kv_planned, int) and isinstance(kv_actual, int) and kv_actual > kv_planned:
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


def _model_row(role: str, entry: Mapping[str, Any]) -> tuple[ModelRow, list[Finding]]:
    plan = entry.get("plan") or {}
    replica = entry.get("replica") or {}
    status = entry.get("status") or ("ok" if "actual" in replica else "unavailable")
    findings: list[Finding] = []
    if "actual" not in replica:
        reason = entry.get("reason") or replica.get("error") or "no replica answered"
        findings.append(Finding("error", "unavailable", role, f"{status}: {reason}"))
    else:
        findings.extend(check_replica(role, plan, replica))
    actual = replica.get("actual", {})
    memory = actual.get("memory", {})
    rss = memory.get("rss_bytes")
    row = ModelRow(
        role=role,
        model=str(plan.get("model") or replica.get("model") or "?"),
        status=status,
        planned_node=plan.get("node_id"),
        planned_device=plan.get("device"),
        actual_node=actual.get("node_id"),
        actual_device=actual.get("device"),
        cuda_visible_devices=actual.get("cuda_visible_devices"),
        budget_bytes=plan.get("memory_budget_bytes"),
        actual_bytes=actual_bytes(memory) if actual else None,
        rss_bytes=rss if isinstance(rss, int) else None,
        kv_planned_bytes=plan.get("kv_cache_bytes"),
        kv_actual_bytes=memory.get("kv_built_bytes") if isinstance(memory.get("kv_built_bytes"), int) else None,
    )
    return row, findings


def _gpu_rows(gpus: list[Mapping[str, Any]], models: Mapping[str, Mapping[str, Any]]) -> tuple[GpuRow, ...]:
    # Host (node, GPU index) → what the replicas on it report; a replica's local cuda:i is its plan's gpu_indices[i].
    allocated: dict[tuple[str, int], int] = {}
    reserved: dict[tuple[str, int], int] = {}
    free: dict[tuple[str, int], int] = {}
    for entry in models.values():
        plan = entry.get("plan") or {}
        actual = (entry.get("replica") or {}).get("actual")
        if not actual:
            continue
        memory = actual.get("memory", {})
        node_id, indices = plan.get("node_id"), plan.get("gpu_indices") or []
        for slot in plan.get("slots") or []:  # per-GPU mode: the GPU node this replica runs on
            if slot.get("gpu_label") == actual.get("gpu_label"):
                node_id, indices = slot.get("node_id"), slot.get("gpu_indices") or []
        for target, kind in ((allocated, "allocated"), (reserved, "reserved"), (free, "free")):
            for local, value in _cuda_bytes(memory, kind).items():
                if local < len(indices):
                    key = (node_id, indices[local])
                    # Free is device-wide: every replica on the GPU sees the same number.
                    target[key] = value if kind == "free" else target.get(key, 0) + value
    rows = []
    for gpu in gpus:
        key = (gpu["node_id"], gpu["index"])
        rows.append(
            GpuRow(
                node_id=gpu["node_id"],
                index=gpu["index"],
                name=gpu.get("name"),
                total_bytes=gpu["total_bytes"],
                planned_bytes=gpu.get("planned_bytes", 0),
                allocated_bytes=allocated.get(key),
                reserved_bytes=reserved.get(key),
                free_bytes=free.get(key),
                roles=tuple(gpu.get("roles", ())),
            )
        )
    return tuple(rows)


def build_report(placement: Mapping[str, Any]) -> Report:
    """Findings and per-GPU usage from the app's /v1/placement JSON."""
    models = placement.get("models", {})
    rows, findings = [], []
    for role in sorted(models):
        row, found = _model_row(role, models[role])
        rows.append(row)
        findings.extend(found)
    replicas = tuple(
        ReplicaRow(
            role=role,
            replica_id=row.get("replica_id"),
            state=row.get("state"),
            node_id=row.get("node_id"),
            gpu_label=row.get("gpu_label"),
            gpu_indices=tuple(row["gpu_indices"]) if row.get("gpu_indices") is not None else None,
        )
        for role in sorted(models)
        for row in models[role].get("replicas") or []
    )
    gpus = _gpu_rows(placement.get("gpus", []), models)
    return Report(models=tuple(rows), gpus=gpus, findings=tuple(findings), replicas=replicas)
