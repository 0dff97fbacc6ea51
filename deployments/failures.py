"""Why a model role has no working replica, as Serve's controller reports it.

A model that fails to load raises in its replica's constructor; Serve retries
a few times, then marks the deployment DEPLOY_FAILED with the traceback in its
status message, while the app's other deployments keep serving (measured on
Ray 2.60). The ingress reads that message here for /v1/placement and for the
503 it answers to requests for the failed role.
"""

from __future__ import annotations

import asyncio
from typing import Any


def failure_reason(message: str) -> str:
    """The exception line of a Serve status message (its last non-blank line), e.g.
    "ModelLoadError: cannot load '/models/x': ..."; the whole message when it has none."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        head, colon, tail = line.partition(":")
        if colon and " " not in head and head.endswith(("Error", "Exception")):
            return f"{head.rsplit('.', 1)[-1]}:{tail}"  # drop the module path
    return lines[-1] if lines else message


def _problems(roles: list[str]) -> dict[str, dict[str, Any]]:
    from ray import serve

    app_name = serve.get_replica_context().app_name
    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for role in roles:
        deployment = app.deployments.get(role)
        if deployment is None or str(deployment.status.value) == "HEALTHY":
            continue
        out[role] = {
            "status": str(deployment.status.value),
            "reason": failure_reason(deployment.message) if deployment.message else "",
        }
    return out


async def deployment_problems(roles: list[str]) -> dict[str, dict[str, Any]]:
    """role → {"status", "reason"} for each of `roles` whose deployment is not HEALTHY.

    Call from inside a Serve replica (the ingress); it asks the controller once.
    """
    return await asyncio.to_thread(_problems, roles)
