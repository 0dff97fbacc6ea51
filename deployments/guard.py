"""What the HTTP ingress checks before a request touches a model: the API key
and the body (size, JSON, schema). Every failure is a typed `RayfitError`.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from deployments.errors import AuthenticationError, BadRequestError, PayloadTooLargeError

# Big enough for a chat with a few base64 images; small enough that one
# request cannot make the ingress buffer gigabytes.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
API_KEY_ENV = "RAYFIT_API_KEY"

Body = TypeVar("Body", bound=BaseModel)


@dataclass(frozen=True)
class IngressSettings:
    """Set once by the app builder. `api_key=None` means no key is required."""

    api_key: str | None = field(default=None, repr=False)  # never in logs or reprs
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_tokens_caps: dict[str, int] = field(default_factory=dict)  # role → ModelSpec.max_tokens_cap


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
