"""OpenAI-compatible HTTP ingress: routes each request to its role's deployment.

The ingress receives one `DeploymentHandle` per role in its constructor (Ray's
model-composition pattern) and holds no model. `model` in a request is the role
name (`summarizer`) or the model id from the config; anything else is a 404 in
OpenAI's error shape naming the models that exist.
"""

# No `from __future__ import annotations`: FastAPI must see the request
# models as classes on methods that @serve.ingress rewraps.
import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.generation import GenerationInput, StreamDelta
from deployments.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamConverter,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamConverter,
    ModelCard,
    ModelList,
    chat_response,
    completion_response,
    error_body,
    now,
    sse_lines,
)

logger = logging.getLogger("ray.serve")

app = FastAPI(title="rayfit", description="OpenAI-compatible API over rayfit's model deployments")


class APIError(Exception):
    """An error the client should see in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param


def _error(status: int, message: str, type: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, type=type, code=status, param=param))


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.type, exc.param)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # OpenAI answers a malformed body with 400, not FastAPI's 422.
    errors = exc.errors()
    parts, param = [], None
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = param or (".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return _error(400, "; ".join(parts) or "invalid request body", "invalid_request_error", param)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error(exc.status_code, str(exc.detail), kind)


@app.exception_handler(Exception)
async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    # Anything unexpected (a replica died, a load error) still answers in OpenAI's shape.
    logger.exception("request failed")
    return _error(500, f"{type(exc).__name__}: {_message_of(exc)}", "server_error")


def _is_invalid_request(exc: BaseException) -> bool:
    """The engine's InvalidRequest, also when it arrives wrapped by Ray."""
    from deployments.engine import InvalidRequest

    if isinstance(exc, InvalidRequest):
        return True
    cause = getattr(exc, "cause", None)
    return isinstance(cause, InvalidRequest)


def _message_of(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    return str(cause if cause is not None else exc)


@serve.deployment(
    # The router only forwards: a small CPU share lets it schedule next to the
    # models on a small machine.
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=256,
)
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        models: dict[str, DeploymentHandle],
        model_ids: dict[str, str],
        plan: dict[str, dict[str, Any]] | None = None,
    ):
        """`models`: role → handle; `model_ids`: role → model id as in the config;
        `plan`: role → the planned entry as JSON (shown by /v1/placement)."""
        self.models = models
        self.model_ids = model_ids
        self.plan = plan or {}
        self._info: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------ helpers

    def _resolve(self, name: str) -> str:
        if name in self.models:
            return name
        matches = [role for role, model_id in self.model_ids.items() if model_id == name]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(f"{role} ({self.model_ids.get(role, '?')})" for role in sorted(self.models))
        if matches:
            raise APIError(
                400,
                f"model {name!r} is served by several roles ({', '.join(sorted(matches))}); use the role name",
                type="invalid_request_error",
                param="model",
            )
        raise APIError(
            404, f"The model {name!r} does not exist. Available: {known}", type="not_found_error", param="model"
        )

    async def _generate(self, role: str, request: GenerationInput):
        try:
            return await self.models[role].generate.remote(request)
        except Exception as exc:
            if _is_invalid_request(exc):
                raise APIError(400, _message_of(exc), type="invalid_request_error") from exc
            raise

    async def _stream(self, role: str, request: GenerationInput, convert, include_done: bool = True):
        """Start the stream and read its first delta before answering, so a bad
        request is a plain 400 rather than an error inside a 200 stream."""
        handle = self.models[role].options(stream=True)
        deltas: AsyncIterator[StreamDelta] = handle.stream.remote(request)
        try:
            first = await deltas.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            if _is_invalid_request(exc):
                raise APIError(400, _message_of(exc), type="invalid_request_error") from exc
            raise

        async def body() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield sse_lines(convert(first))
                    async for delta in deltas:
                        yield sse_lines(convert(delta))
            except asyncio.CancelledError:
                raise  # client went away: Serve cancels the replica's generator
            except Exception as exc:
                # Headers are sent: report in-band as OpenAI-style servers do, then end.
                logger.exception("%s: stream failed", role)
                yield f"data: {json.dumps(error_body(_message_of(exc), type='server_error', code=500))}\n\n"
            yield SSE_DONE

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------ routes

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(self, request: ChatCompletionRequest):
        role = self._resolve(request.model)
        generation = request.to_generation_input()
        if request.stream:
            converter = ChatStreamConverter(request.model, include_usage=request.include_usage)
            return await self._stream(role, generation, converter.convert)
        output = await self._generate(role, generation)
        return chat_response(output, request.model)

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(self, request: CompletionRequest):
        role = self._resolve(request.model)
        generation = request.to_generation_input()
        if request.stream:
            converter = CompletionStreamConverter(request.model, include_usage=request.include_usage)
            return await self._stream(role, generation, converter.convert)
        output = await self._generate(role, generation)
        return completion_response(output, request.model)

    async def _role_info(self, role: str) -> dict[str, Any]:
        if role not in self._info:
            self._info[role] = await self.models[role].info.remote()
        return self._info[role]

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(self) -> ModelList:
        infos = await asyncio.gather(*(self._role_info(role) for role in sorted(self.models)))
        created = now()
        return ModelList(
            data=[
                ModelCard(
                    id=info["role"],
                    created=created,
                    root=self.model_ids.get(info["role"], info["model"]),
                    max_model_len=info.get("context_length"),
                    multimodal=bool(info.get("multimodal")),
                )
                for info in infos
            ]
        )

    @app.get("/v1/placement")
    async def placement(self) -> dict[str, Any]:
        """The plan next to what each role's replica reports (one replica per role answers)."""
        roles = sorted(self.models)
        reports = await asyncio.gather(*(self.models[r].placement.remote() for r in roles), return_exceptions=True)
        out: dict[str, Any] = {}
        for role, report in zip(roles, reports, strict=True):
            if isinstance(report, BaseException):
                report = {"error": _message_of(report)}
            out[role] = {"plan": self.plan.get(role), "replica": report}
        return {"models": out}

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        # The proxy routes here only once the app is running; model replicas
        # report their own health to Serve through `check_health`.
        return {"status": "ok", "models": sorted(self.models)}
