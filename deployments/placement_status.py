"""Where each role's replica is right now, next to the plan: the body of `/v1/placement`.

A role is "ok" when its replica answers from the planned node and GPUs,
"misplaced" when it answers from elsewhere, "unplaced" when its planned node
has left the cluster, and "unavailable" when no replica answers in time.
"unplaced" is by design: each replica carries a `label_selector` on its
planned node's id, so Serve keeps the replacement pending rather than moving
the model onto a GPU the plan did not size for. An operator re-plans (redeploys)
or brings the node back. In the per-GPU mode (placement.gpu_nodes) a role is
"unplaced" only while none of its GPU nodes (by `rayfit.io/gpu` label) is alive:
a replacement node started with the same labels takes its replicas back.

`replica_locations` lists every replica of every role as Ray sees it (state,
node, GPU node label and GPU indices), for /v1/placement and the report.
`role_placement` puts one role's part of the document together
(placement.placement_document); `with_status` does the same on plain JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray
from pydantic import TypeAdapter

from placement.gpu_nodes import GPU_LABEL, gpu_node_of
from placement.inventory import LOCAL_NODE
from placement.placement_document import (
    PlannedRole,
    Replica,
    ReplicaError,
    ReplicaLocation,
    ReplicaReport,
    RolePlacement,
    RoleStatus,
)
from placement.report import MISPLACED_KINDS, check_replica

HEALTHY = "ok"
_REPLICA: TypeAdapter[ReplicaReport | ReplicaError] = TypeAdapter(Replica)


def alive_nodes() -> set[str]:
    """Ids of the Ray nodes alive now, and the GPU node labels (`rayfit.io/gpu`) they carry
    (a GCS call: run it in a thread from async code)."""
    alive = [node for node in ray.nodes() if node.get("Alive")]
    labels = {(node.get("Labels") or {}).get(GPU_LABEL) for node in alive}
    return {node["NodeID"] for node in alive} | {label for label in labels if label}


def _gone(plan: PlannedRole, alive: set[str]) -> str | None:
    """Why the role's planned place has left the cluster, or None while it (or one of its GPU nodes) is alive."""
    if plan.gpu_labels:
        if any(label in alive for label in plan.gpu_labels):
            return None
        return f"none of its GPU nodes ({', '.join(plan.gpu_labels)}) is in the cluster"
    node = plan.node_id
    if node and node != LOCAL_NODE and node not in alive:
        return f"planned node {node[:12]} has left the cluster"
    return None


def replica_locations(app_name: str) -> dict[str, list[ReplicaLocation]]:
    """role → every replica Serve has for it, with its state, node, and GPU node label and indices.

    Read from the Serve controller's details (the same data `serve status` and the dashboard show;
    Serve 2.60 has no public call for it) and Ray's node table (the node's labels name its GPU).
    A blocking call: run it in a thread from async code.
    """
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = (details.get("applications") or {}).get(app_name) or {}
    labels = {node["NodeID"]: node.get("Labels") or {} for node in ray.nodes()}
    out: dict[str, list[ReplicaLocation]] = {}
    for role, deployment in (app.get("deployments") or {}).items():
        rows = []
        for replica in deployment.get("replicas") or []:
            node_id = replica.get("node_id")
            gpu_node = gpu_node_of(labels.get(node_id, {})) if node_id else None
            state = replica.get("state")
            rows.append(
                ReplicaLocation(
                    replica_id=replica.get("replica_id"),
                    state=getattr(state, "value", state),
                    node_id=node_id,
                    gpu_label=gpu_node.gpu_label if gpu_node else None,
                    gpu_indices=list(gpu_node.indices) if gpu_node else None,
                    pid=replica.get("pid"),
                )
            )
        out[role] = sorted(rows, key=lambda row: (str(row.gpu_label), str(row.replica_id)))
    return out


def role_status(
    role: str,
    plan: PlannedRole | Mapping[str, Any] | None,
    replica: ReplicaReport | ReplicaError | Mapping[str, Any],
    alive: set[str],
) -> tuple[RoleStatus, str]:
    """(status, reason) for one role from its plan entry and its replica's report (or {"error": ...})."""
    plan = PlannedRole.model_validate(plan or {})
    gone = _gone(plan, alive)
    if gone:
        return "unplaced", (
            f"its {gone}; Serve keeps the replica pending there instead of moving it to a GPU the plan "
            "did not size for (re-plan, or bring the node back)"
        )
    replica = _REPLICA.validate_python(replica)
    if isinstance(replica, ReplicaError):
        return "unavailable", replica.error or "no replica answered"
    misplaced = [f.message for f in check_replica(role, plan, replica) if f.kind in MISPLACED_KINDS]
    if misplaced:
        return "misplaced", "; ".join(misplaced)
    return HEALTHY, ""


def role_placement(
    role: str,
    plan: PlannedRole | None,
    replica: ReplicaReport | ReplicaError,
    replicas: list[ReplicaLocation],
    alive: set[str],
) -> RolePlacement:
    """One role's part of /v1/placement: its status and reason next to the plan and what its replicas report."""
    status, reason = role_status(role, plan, replica, alive)
    return RolePlacement(status=status, reason=reason, plan=plan, replica=replica, replicas=replicas)


def with_status(models: dict[str, dict[str, Any]], alive: set[str]) -> dict[str, dict[str, Any]]:
    """The same on JSON: /v1/placement's `models` ({role: {plan, replica}}) with each role's status and reason."""
    out = {}
    for role, entry in models.items():
        status, reason = role_status(role, entry.get("plan"), entry.get("replica") or {}, alive)
        out[role] = {"status": status, "reason": reason, **entry}
    return out


def unplaced_roles(plan: Mapping[str, PlannedRole | Mapping[str, Any]], alive: set[str]) -> dict[str, str]:
    """role → reason, for roles whose planned node is gone (for /health, without asking replicas)."""
    out = {}
    for role, entry in plan.items():
        gone = _gone(PlannedRole.model_validate(entry), alive)
        if gone:
            out[role] = gone
    return out
