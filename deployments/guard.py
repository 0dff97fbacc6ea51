"""What the HTTP ingress checks before a request touches a model: its own
capacity (`Admission`), the API key and the body (size, JSON, schema). Every
failure is a typed `RayfitError`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from deployments.engine.errors import (
    RETRY_AFTER_S,
    AuthenticationError,
    BadRequestError,
    OverloadedError,
    PayloadTooLargeError,
)

# Big enough for a chat with a few base64 images; small enough that one
# request cannot make the ingress buffer gigabytes.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
API_KEY_ENV = "RAYFIT_API_KEY"
# Generation requests the ingress works on at once, and more that wait for a turn (AppArgs' defaults).
DEFAULT_MAX_ONGOING = 256
DEFAULT_MAX_QUEUED = 1024
# A request for a model with no running replica (loading, restarting) waits this long, then gets a 503.
DEFAULT_UNAVAILABLE_TIMEOUT_S = 30.0

Body = TypeVar("Body", bound=BaseModel)


@dataclass(frozen=True)
class IngressSettings:
    """Set once by the app builder. `api_key=None` means no key is required."""

    api_key: str | None = field(default=None, repr=False)  # never in logs or reprs
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_tokens_caps: dict[str, int] = field(default_factory=dict)  # role → ModelSpec.max_tokens_cap
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING
    max_queued_requests: int = DEFAULT_MAX_QUEUED
    unavailable_timeout_s: float = DEFAULT_UNAVAILABLE_TIMEOUT_S


class Ticket:
    """One admitted request's turn; `release` is idempotent (a stream's end and its cleanup may both call it)."""

    def __init__(self, admission: Admission):
        self._admission: Admission | None = admission
        self.handed_over = False  # set by the ingress when a streamed body holds the turn until it ends

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._leave()


class Admission:
    """The ingress's own bound on generation requests: `ongoing` at once, `queued` more waiting in
    arrival order, and past that an immediate OverloadedError (503 + Retry-After in OpenAI's shape).

    Serve's proxy answers a plain-text 503 when a deployment's own queue is full, so the ingress
    deployment is given room beyond this bound (`deployments.app.ingress_limits`): requests reach
    the ingress and are turned away here, in JSON, before the proxy's limit is hit.
    """

    def __init__(self, ongoing: int, queued: int):
        self.ongoing, self.queued = ongoing, queued
        self._turns = asyncio.Semaphore(ongoing)
        self.held = 0  # admitted requests: working or waiting for a turn

    @asynccontextmanager
    async def enter(self) -> AsyncIterator[Ticket]:
        """A turn for one request; released on exit unless handed to a stream (`Ticket.release` then)."""
        if self.held >= self.ongoing + self.queued:
            raise OverloadedError(
                f"the server is at capacity ({self.ongoing} in progress, {self.queued} waiting); retry later",
                retry_after_s=RETRY_AFTER_S,
            )
        self.held += 1
        try:
            await self._turns.acquire()
        except BaseException:  # cancelled while waiting: the client left
            self.held -= 1
            raise
        ticket = Ticket(self)
        try:
            yield ticket
        except BaseException:
            ticket.release()
            raise
        if not ticket.handed_over:
            ticket.release()

    def _leave(self) -> None:
        self.held -= 1
        self._turns.release()


def authorize(request: Request, api_key: str | None) -> None:
    """Raise AuthenticationError unless the request carries `Authorization: Bearer <api_key>`."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not reveal how much of the key matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise AuthenticationError("missing or invalid API key: send `Authorization: Bearer <key>`")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 past `max_bytes` (by Content-Length, and by what actually arrives)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"request body is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:  # chunked or lying Content-Length
            raise PayloadTooLargeError(f"request body exceeds the limit of {max_bytes} bytes")
    return bytes(body)


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """JSON → the request model; every failure is a 400 naming the field (never FastAPI's 422)."""
    try:
        data = json.loads(raw, parse_constant=_no_constants)  # NaN/Infinity are not JSON
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequestError(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise BadRequestError(message, param=param) from exc
    except RecursionError as exc:
        raise BadRequestError("request body is nested too deeply") from exc


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """(message, param) for a pydantic error: the first few problems, each with its field path."""
    parts, param = [], None
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        param = param or loc or None
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request body", param
