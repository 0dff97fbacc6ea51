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
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.errors import BadRequestError, NotFoundError, OverloadedError, RayfitError, classify
from deployments.failures import deployment_problems
from deployments.generation import GenerationInput, StreamDelta
from deployments.guard import IngressSettings, authorize, parse_body, read_body
from deployments.placement_status import alive_node_ids, unplaced_roles, with_status
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

# /v1/placement waits this long for a replica's own report.
PLACEMENT_TIMEOUT_S = 10.0
# A call to a deployment that failed to start can wait forever (measured on
# Ray 2.60: a handle first used after the failure never answers). A call still
# waiting after this long checks the deployment's status, and gives up only if
# it failed; a model that is merely busy or restarting is waited for.
STATUS_CHECK_S = 5.0

app = FastAPI(title="rayfit", description="OpenAI-compatible API over rayfit's model deployments")


def _error(
    status: int, message: str, type: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = error_body(message, type=type, code=status, param=param)
    return JSONResponse(status_code=status, content=body, headers=headers)


@app.exception_handler(RayfitError)
async def _rayfit_error(_: Request, exc: RayfitError) -> JSONResponse:
    headers = {"Retry-After": str(int(exc.retry_after_s + 0.999))} if exc.retry_after_s is not None else None
    if exc.status >= 500:
        logger.warning("answered %d: %s", exc.status, exc.message)
    return _error(exc.status, exc.message, exc.type, exc.param, headers)


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
        settings: IngressSettings | None = None,
        gpus: list[dict[str, Any]] | None = None,
    ):
        """`models`: role → handle; `model_ids`: role → model id as in the config;
        `plan`: role → the planned entry as JSON (shown by /v1/placement);
        `settings`: API key and body limit; `gpus`: the planned GPUs as JSON (for the report)."""
        self.models = models
        self.model_ids = model_ids
        self.plan = plan or {}
        self.settings = settings or IngressSettings()
        self.gpus = gpus or []
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
            raise BadRequestError(
                f"model {name!r} is served by several roles ({', '.join(sorted(matches))}); use the role name",
                param="model",
            )
        raise NotFoundError(f"The model {name!r} does not exist. Available: {known}", param="model")

    async def _body(self, http: Request, model: type[Any]) -> Any:
        """Authorize, then read and validate the body: 401, 413 or 400 before any model is called."""
        authorize(http, self.settings.api_key)
        return parse_body(await read_body(http, self.settings.max_body_bytes), model)

    async def _failed(self, exc: BaseException, role: str) -> RayfitError:
        """The error for a failed call; a model whose deployment failed says why (from `serve status`)."""
        error = classify(exc, role)
        if isinstance(error, OverloadedError):
            problem = (await deployment_problems([role])).get(role)
            if problem is not None and problem["status"] == "DEPLOY_FAILED":
                return OverloadedError(f"model {role!r} failed to deploy: {problem['reason']}", retry_after_s=None)
        return error

    async def _call(self, role: str, call: Awaitable[Any]) -> Any:
        """Await a call to `role`; a failed deployment is a 503 naming its load error, not a hang."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=STATUS_CHECK_S)
                if done:
                    return task.result()
                problem = (await deployment_problems([role])).get(role)
                if problem is not None and problem["status"] == "DEPLOY_FAILED":
                    raise OverloadedError(f"model {role!r} failed to deploy: {problem['reason']}", retry_after_s=None)
        except (RayfitError, StopAsyncIteration):
            raise
        except Exception as exc:
            raise await self._failed(exc, role) from exc
        finally:
            task.cancel()  # no-op when done; stops the call when the client left or the model failed

    def _max_tokens_cap(self, role: str) -> int | None:
        return self.settings.max_tokens_caps.get(role)

    async def _generate(self, role: str, request: GenerationInput):
        return await self._call(role, self.models[role].generate.remote(request))

    async def _stream(self, role: str, request: GenerationInput, convert, include_done: bool = True):
        """Start the stream and read its first delta before answering, so a bad
        request is a plain 400 rather than an error inside a 200 stream."""
        handle = self.models[role].options(stream=True)
        deltas: AsyncIterator[StreamDelta] = handle.stream.remote(request)
        try:
            first = await self._call(role, deltas.__anext__())
        except StopAsyncIteration:
            first = None

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
                error = classify(exc, role)
                logger.warning("%s: stream failed mid-way: %s", role, error.message)
                yield f"data: {json.dumps(error_body(error.message, type=error.type, code=error.status))}\n\n"
            yield SSE_DONE

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------ routes

    # Bodies are read by `_body`, not by FastAPI: it bounds their size (413)
    # and turns every malformed body into a 400 in OpenAI's shape.
    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(self, http: Request):
        request: ChatCompletionRequest = await self._body(http, ChatCompletionRequest)
        role = self._resolve(request.model)
        generation = request.to_generation_input(self._max_tokens_cap(role))
        if request.stream:
            converter = ChatStreamConverter(request.model, include_usage=request.include_usage)
            return await self._stream(role, generation, converter.convert)
        output = await self._generate(role, generation)
        return chat_response(output, request.model)

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(self, http: Request):
        request: CompletionRequest = await self._body(http, CompletionRequest)
        role = self._resolve(request.model)
        generation = request.to_generation_input(self._max_tokens_cap(role))
        if request.stream:
            converter = CompletionStreamConverter(request.model, include_usage=request.include_usage)
            return await self._stream(role, generation, converter.convert)
        output = await self._generate(role, generation)
        return completion_response(output, request.model)

    async def _role_info(self, role: str) -> dict[str, Any]:
        if role not in self._info:
            self._info[role] = await self._call(role, self.models[role].info.remote())
        return self._info[role]

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(self, http: Request) -> ModelList:
        authorize(http, self.settings.api_key)
        answers = await asyncio.gather(*(self._role_info(role) for role in sorted(self.models)), return_exceptions=True)
        # A model whose deployment failed is not listed (/v1/placement says why).
        infos = [info for info in answers if isinstance(info, dict)]
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
    async def placement(self, http: Request) -> dict[str, Any]:
        """The plan next to what each role's replica reports (one replica per role answers),
        or why the role has no replica (its deployment failed: the load error)."""
        authorize(http, self.settings.api_key)
        roles = sorted(self.models)
        problems = await deployment_problems(roles)
        failed = {role for role, p in problems.items() if p["status"] == "DEPLOY_FAILED"}
        alive = await asyncio.to_thread(alive_node_ids)
        gone = unplaced_roles(self.plan, alive)

        async def report(role: str) -> dict[str, Any]:
            if role in gone:  # its replica can only come back on that node: don't wait for it
                return {"error": gone[role], **problems.get(role, {})}
            if role in failed:
                return {"error": problems[role]["reason"], "status": "DEPLOY_FAILED"}
            try:
                # Bounded: a deployment still starting must not hold the whole report.
                return await asyncio.wait_for(self.models[role].placement.remote(), PLACEMENT_TIMEOUT_S)
            except Exception as exc:
                return {"error": _message_of(exc), **problems.get(role, {})}

        reports = await asyncio.gather(*(report(role) for role in roles))
        pairs = zip(roles, reports, strict=True)
        models = {role: {"plan": self.plan.get(role), "replica": r} for role, r in pairs}
        return {"models": with_status(models, alive), "gpus": self.gpus}

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        # The proxy routes here only once the app is running; model replicas
        # report their own health to Serve through `check_health`. A role whose
        # deployment is not HEALTHY or whose planned node left makes it "degraded"
        # (still 200: the other models serve).
        problems = await deployment_problems(sorted(self.models))
        unavailable = {role: f"{p['status']}: {p['reason']}".rstrip(": ") for role, p in problems.items()}
        unavailable.update(unplaced_roles(self.plan, await asyncio.to_thread(alive_node_ids)))
        status = "degraded" if unavailable else "ok"
        return {"status": status, "models": sorted(self.models), "unavailable": unavailable}
