"""Typed errors that a caller can act on, and the one mapping from what a
replica raised to them.

The HTTP ingress turns a `RayfitError` into OpenAI's error shape with its
status; the handle client (`deployments.client`) raises it as is. Both call
`classify`, so a request that is a 400 over HTTP is a `BadRequestError`
through a handle, and an overloaded model is a 503 either way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from pydantic import ValidationError

# Seconds a client should wait before retrying an overloaded or restarting model.
RETRY_AFTER_S = 1

T = TypeVar("T")


class RayfitError(Exception):
    """A request that failed in a way the caller is told about; `status` is the HTTP status."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s


class BadRequestError(RayfitError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(RayfitError):
    status = 401
    type = "authentication_error"


class NotFoundError(RayfitError):
    status = 404
    type = "not_found_error"


class PayloadTooLargeError(RayfitError):
    status = 413
    type = "invalid_request_error"


class OverloadedError(RayfitError):
    """Retryable: the model's queue is full, it ran out of memory, or its replica is restarting."""

    status = 503
    type = "overloaded_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: float | None = RETRY_AFTER_S):
        super().__init__(message, param=param, retry_after_s=retry_after_s)


class ServerError(RayfitError):
    status = 500
    type = "server_error"


class InvalidRequest(ValueError):
    """Raised by a replica's engine: the request cannot be served as asked (a 400 for the caller)."""


class PlanContractError(RuntimeError):
    """A replica built something other than its replica plan (KV pool, weights): it refuses to start,
    and the message names the planned and the built bytes."""


class RetryableGenerationError(RuntimeError):
    """A generation lost through no fault of the request (the replica recovered): answered 503 + Retry-After."""


class GenerationOutOfMemory(RetryableGenerationError):
    """Raised by a replica whose generation ran out of device memory; it freed the memory and stays up."""


def _cause(exc: BaseException) -> BaseException:
    # Ray wraps a replica's exception in RayTaskError, keeping the original as `.cause`.
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def returned(value: T, role: str) -> T:
    """`value` as a replica answered a call to `role`. A replica returns (or yields) a client's bad
    request as its exception instead of raising it, because Serve logs every exception a replica
    method raises as ERROR with its traceback; it is raised here as the caller's error."""
    if isinstance(value, BaseException):
        raise classify(value, role)
    return value


def classify(exc: BaseException, role: str) -> RayfitError:
    """What a handle call to `role` raised, as the error the caller should see."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, RayfitError):
        return exc
    cause = _cause(exc)
    if isinstance(cause, InvalidRequest) or isinstance(exc, InvalidRequest):
        return BadRequestError(str(cause))
    if isinstance(cause, BackPressureError):
        return OverloadedError(
            f"model {role!r} is at capacity ({cause.message}); retry later",
            retry_after_s=cause.retry_after_s or RETRY_AFTER_S,
        )
    if isinstance(cause, RetryableGenerationError):
        return OverloadedError(f"model {role!r}: {cause}")
    if isinstance(cause, DeploymentUnavailableError):
        return OverloadedError(f"model {role!r} is unavailable (its deployment failed or is restarting)")
    if isinstance(cause, TimeoutError):
        return OverloadedError(f"model {role!r} did not answer in time (starting, failed or busy); retry later")
    if isinstance(cause, RayActorError):
        # The replica died with the request on it; Serve starts a new one.
        return OverloadedError(f"model {role!r}: the replica serving this request died; it is being restarted")
    return ServerError(f"model {role!r}: {type(cause).__name__}: {cause}")


def field_path(loc: tuple[int | str, ...] | list[int | str], data: Any, *, missing: bool = False) -> str:
    """The request field a pydantic error's `loc` points at, as a dotted path through `data` (the
    body as sent): the labels pydantic puts in a loc for union members (`str`, `list[...]`) and
    tagged-union tags are not in the body, so they are left out. `missing`: the error is a missing
    field, whose name (the loc's last entry) is not in the body either."""
    return ".".join(_walk(loc, data, missing)[0])


def _walk(loc: Sequence[int | str], data: Any, missing: bool) -> tuple[list[str], tuple[int | str, ...]]:
    """(the field path, the loc up to its first label: which union member the error is in)."""
    path: list[str] = []
    member: tuple[int | str, ...] = ()
    node = data
    for index, part in enumerate(loc):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(str(part))
            node = node[part]
        elif missing and index == len(loc) - 1 and isinstance(node, dict):
            path.append(str(part))
        elif not member:
            member = tuple(loc[: index + 1])
    return path, member


def validation_error(
    exc: ValidationError, data: Any, *, prefix: str = "", rename: Callable[[str], str] | None = None
) -> BadRequestError:
    """A 400 for a pydantic error in validating `data`, naming the field (`param`) as the client sent it:
    `prefix` is where `data` sits in the request; `rename` maps a path to the client's field names
    (a request converted to another, such as a Responses request to chat)."""
    found: list[tuple[str, str, tuple[int | str, ...]]] = []
    for error in exc.errors(include_url=False):
        parts, member = _walk(error.get("loc", ()), data, error.get("type") == "missing")
        path = ".".join(p for p in (prefix, *parts) if p)
        found.append((rename(path) if rename is not None else path, str(error.get("msg")), member))
    # Of a union's members, the one the value was meant as is the one that got furthest (`input.0.role`,
    # not `input: Input should be a valid string` for a list of items), then the one with fewest errors
    # (`prompt.1: Input should be greater than or equal to 0` for token ids, not `should be a valid string`).
    errors_in = Counter(member for _, _, member in found)
    found.sort(key=lambda item: (-len(item[0].split(".")) if item[0] else 0, errors_in[item[2]]))
    # A union's other members fail at the field itself: said only when nothing deeper inside it failed.
    paths = [path for path, _, _ in found]
    kept = [(p, m) for p, m, _ in found if not any(q.startswith(f"{p}.") or (q and not p) for q in paths)]
    kept = kept or [(p, m) for p, m, _ in found]
    messages = list(dict.fromkeys(f"{path or 'body'}: {message}" for path, message in kept))[:5]
    param = kept[0][0] or None if kept else None
    return BadRequestError("; ".join(messages) or "invalid request", param=param)
