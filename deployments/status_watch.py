"""One cached view of the app's deployment statuses per ingress replica.

Reading the statuses is a controller RPC. Requests waiting for a model used to
call `serve.status()` every few seconds each (256 long requests ≈ 50 calls/s); now one
background task per ingress replica reads it every `REFRESH_S` and every
request reads the cache (`StatusWatch.state`). `wait_for_role` is the wait
itself: a call to a role is awaited as long as the role has a running replica
(a busy model is waited for, its own queue bounds the wait), fails at once when
its deployment failed, and gives up with a 503 + Retry-After once the role has
had no running replica (loading, restarting, pending on a node that left) for
the request's `unavailable_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from deployments.engine.errors import OverloadedError
from deployments.failures import failure_reason

logger = logging.getLogger("ray.serve")

# One controller call per ingress replica per second, whatever the load.
REFRESH_S = 1.0
# How often a waiting request looks at the cache (no RPC: a dict read).
POLL_S = 0.5
# A cache older than this (the controller did not answer) says nothing: requests then just wait for their call.
STALE_S = 15.0
# Retry-After for a role whose deployment failed: only a redeploy brings it back.
FAILED_RETRY_AFTER_S = 30.0
# Retry-After for a role with no running replica: a restart takes seconds.
UNAVAILABLE_RETRY_AFTER_S = 5.0

# What /v1/models and the 503s call a role's state.
READY, LOADING, UNAVAILABLE, FAILED, UNKNOWN = "ready", "loading", "unavailable", "failed", "unknown"

# Before the first read, or with a stale cache.
UNKNOWN_STATUS = "UNKNOWN"

T = TypeVar("T")


@dataclass(frozen=True)
class RoleState:
    """One deployment as the controller last reported it."""

    status: str  # Serve's DeploymentStatus: HEALTHY, UPDATING, UNHEALTHY, DEPLOY_FAILED, UPSCALING, DOWNSCALING
    running: int  # replicas RUNNING (able to take a request)
    reason: str = ""  # the exception line of Serve's message for a failed deployment, else its message

    @property
    def phase(self) -> str:
        """ready (a replica runs), loading (being deployed, none runs yet), unavailable (none runs:
        restarting, or pending where it cannot start), failed (DEPLOY_FAILED and none runs)."""
        if self.status == UNKNOWN_STATUS:
            return UNKNOWN
        if self.running:
            return READY  # also a failed rolling update whose old replica still serves
        if self.status == "DEPLOY_FAILED":
            return FAILED
        if self.status in ("UPDATING", "UPSCALING"):
            return LOADING
        return UNAVAILABLE


UNKNOWN_STATE = RoleState(status=UNKNOWN_STATUS, running=0)  # not (yet) known: requests wait for their call


def read_states(app_name: str) -> dict[str, RoleState]:
    """deployment name → RoleState for `app_name`, from one read of the controller's details (blocking).

    The raw details, not `serve.status()`: that builds the same data into pydantic models and
    cloudpickles each deployment's request router on the way, 46 ms of CPU a call against 0.8 ms
    (measured here, Ray 2.60); at one read a second that was 5% of a core on every ingress replica.
    Serve 2.60 has no public call for the raw details (deployments.placement_status reads them too).
    """
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = (details.get("applications") or {}).get(app_name)
    if app is None:
        return {}
    out = {}
    for name, deployment in (app.get("deployments") or {}).items():
        status = str(_value(deployment.get("status")))
        message = deployment.get("message") or ""
        running = sum(1 for replica in deployment.get("replicas") or [] if _value(replica.get("state")) == "RUNNING")
        out[name] = RoleState(
            status=status,
            running=running,
            reason=failure_reason(message) if status == "DEPLOY_FAILED" and message else message.strip(),
        )
    return out


def _value(field: Any) -> Any:
    """An enum field of the details as its string value (they may arrive as enums or as strings)."""
    return getattr(field, "value", field)


class StatusWatch:
    """The cached statuses of one app, refreshed by one background task (started by the first reader).

    `read` is the blocking status reader (`read_states` bound to the app); it runs in a thread.
    """

    def __init__(self, read: Callable[[], dict[str, RoleState]], refresh_s: float = REFRESH_S):
        self._read = read
        self._refresh_s = refresh_s
        self._states: dict[str, RoleState] = {}
        self._read_at: float | None = None  # monotonic time of the last successful read
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()

    def start(self) -> None:
        """Start (or restart) the refresh task on the running loop; cheap to call on every request."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._refresh_forever(), name="rayfit-status-watch")

    async def _refresh_forever(self) -> None:
        failing = False
        while True:
            try:
                await self.refresh()
                if failing:
                    logger.info("status watch: reading deployment statuses again")
                failing = False
            except Exception as exc:  # the controller restarting: keep the last view, say so once
                if not failing:
                    logger.warning("status watch: cannot read deployment statuses (%s); retrying", exc)
                failing = True
            await asyncio.sleep(self._refresh_s)

    async def refresh(self) -> dict[str, RoleState]:
        """Read the statuses now (one controller call) and update the cache."""
        states = await asyncio.to_thread(self._read)
        self._states, self._read_at = states, time.monotonic()
        self._first.set()
        return states

    async def states(self, first_wait_s: float = 5.0) -> dict[str, RoleState]:
        """The cached statuses; the first caller waits (bounded) for the first read."""
        self.start()
        if not self._first.is_set():
            try:
                await asyncio.wait_for(self._first.wait(), first_wait_s)
            except TimeoutError:
                pass
        return dict(self._states) if self._fresh() else {}

    def _fresh(self) -> bool:
        return self._read_at is not None and time.monotonic() - self._read_at < STALE_S

    def state(self, role: str) -> RoleState:
        """The cached state of `role` (no RPC); UNKNOWN_STATE before the first read or when the cache is stale."""
        if not self._fresh():
            return UNKNOWN_STATE
        return self._states.get(role, UNKNOWN_STATE)

    def problems(self, roles: list[str]) -> dict[str, dict[str, Any]]:
        """role → {"status", "reason"} for each of `roles` whose deployment is not HEALTHY (cached)."""
        out = {}
        for role in roles:
            state = self.state(role)
            if state.status not in ("HEALTHY", UNKNOWN_STATUS):
                out[role] = {"status": state.status, "reason": state.reason}
        return out


def unavailable_error(role: str, state: RoleState, waited_s: float) -> OverloadedError:
    """The 503 for a request given up on: its role failed to deploy, or has had no running replica."""
    if state.phase == FAILED:
        return OverloadedError(f"model {role!r} failed to deploy: {state.reason}", retry_after_s=FAILED_RETRY_AFTER_S)
    detail = f" ({state.reason})" if state.reason else ""
    return OverloadedError(
        f"model {role!r} is {state.phase}: no replica running after {waited_s:.0f} s{detail}; retry later",
        retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
    )


async def wait_for_role(watch: StatusWatch, role: str, call: Awaitable[T], unavailable_timeout_s: float) -> T:
    """`call` (a handle call to `role`), given up on with OverloadedError when `role` failed to deploy,
    or when it has no running replica `unavailable_timeout_s` after the call began. The call is
    cancelled when this returns or raises (client gone, or given up)."""
    watch.start()
    task = asyncio.ensure_future(call)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            state = watch.state(role)
            waited = loop.time() - started
            if state.phase == FAILED or (state.phase in (LOADING, UNAVAILABLE) and waited >= unavailable_timeout_s):
                raise unavailable_error(role, state, waited)
    finally:
        if not task.done():
            task.cancel()
            # Cancelling the task awaiting a handle call does not reach the replica (Serve 2.60's
            # DeploymentResponse re-raises CancelledError and nothing more): cancel the call itself.
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()
