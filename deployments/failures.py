"""Why a model role has no working replica, as Serve's controller reports it.

A model that fails to load raises in its replica's constructor; Serve retries
a few times, then marks the deployment DEPLOY_FAILED with the traceback in its
status message, while the app's other deployments keep serving (measured on
Ray 2.60). The ingress's status watcher (deployments.status_watch) reads that
message through `failure_reason` for /v1/placement and for the 503 it answers
to requests for the failed role.
"""

from __future__ import annotations


def failure_reason(message: str) -> str:
    """The exception line of a Serve status message (its last non-blank line), e.g.
    "ModelLoadError: cannot load '/models/x': ..."; the whole message when it has none."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        head, colon, tail = line.partition(":")
        if colon and " " not in head and head.endswith(("Error", "Exception")):
            return f"{head.rsplit('.', 1)[-1]}:{tail}"  # drop the module path
    return lines[-1] if lines else message
