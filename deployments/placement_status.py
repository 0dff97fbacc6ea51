"""Where each role's replica is right now, next to the plan: the body of `/v1/placement`.

A role is "ok" when its replica answers from the planned node and GPUs,
"misplaced" when it answers from elsewhere, "unplaced" when its planned node
has left the cluster, and "unavailable" when no replica answers in time.
"unplaced" is by design: each replica carries a `label_selector` on its
planned node's id, so Serve keeps the replacement pending rather than moving
the model onto a GPU the plan did not size for. An operator re-plans (redeploys)
or brings the node back.
"""

from __future__ import annotations

from typing import Any

import ray

from placement.inventory import LOCAL_NODE
from placement.report import MISPLACED_KINDS, check_replica

HEALTHY = "ok"


def alive_node_ids() -> set[str]:
    """Ids of the Ray nodes alive now (a GCS call: run it in a thread from async code)."""
    return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}


def role_status(role: str, plan: dict[str, Any] | None, replica: dict[str, Any], alive: set[str]) -> tuple[str, str]:
    """(status, reason) for one role from its plan entry and its replica's report (or {"error": ...})."""
    planned_node = (plan or {}).get("node_id")
    if planned_node and planned_node != LOCAL_NODE and planned_node not in alive:
        return "unplaced", (
            f"its planned node {planned_node[:12]} has left the cluster; Serve keeps the replica pending "
            "there instead of moving it to a GPU the plan did not size for (re-plan, or bring the node back)"
        )
    if "actual" not in replica:
        return "unavailable", str(replica.get("error") or "no replica answered")
    misplaced = [f.message for f in check_replica(role, plan or {}, replica) if f.kind in MISPLACED_KINDS]
    if misplaced:
        return "misplaced", "; ".join(misplaced)
    return HEALTHY, ""


def with_status(models: dict[str, dict[str, Any]], alive: set[str]) -> dict[str, dict[str, Any]]:
    """/v1/placement's `models` ({role: {plan, replica}}) with each role's status and reason added."""
    out = {}
    for role, entry in models.items():
        status, reason = role_status(role, entry.get("plan"), entry.get("replica") or {}, alive)
        out[role] = {"status": status, "reason": reason, **entry}
    return out


def unplaced_roles(plan: dict[str, dict[str, Any]], alive: set[str]) -> dict[str, str]:
    """role → reason, for roles whose planned node is gone (for /health, without asking replicas)."""
    out = {}
    for role, entry in plan.items():
        node = entry.get("node_id")
        if node and node != LOCAL_NODE and node not in alive:
            out[role] = f"planned node {node[:12]} has left the cluster"
    return out
