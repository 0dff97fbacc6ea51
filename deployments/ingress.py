"""OpenAI-compatible HTTP ingress: routes each request to its role's deployment.

The ingress receives one `DeploymentHandle` per role in its constructor (Ray's
model-composition pattern) and holds no model. `model` in a request is the role
name (`summarizer`) or the model id from the config; anything else is a 404 in
OpenAI's error shape naming the models that exist.
"""

# No `from __future__ import annotations`: FastAPI must see the request
# models as classes on methods that @serve.ingress rewraps.
import asyncio
import dataclasses
import functools
import json
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.engine.errors import BadRequestError, NotFoundError, OverloadedError, RayfitError, classify, returned
from deployments.engine.generation import GenerationInput, GenerationOutput, StreamDelta
from deployments.guard import Admission, IngressSettings, Ticket, authorize, parse_body, read_body
from deployments.openai_api.protocol import (
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
from deployments.openai_api.responses import ResponseEvents, ResponsesRequest, response_body, sse_events
from deployments.placement_status import alive_nodes, replica_locations, role_placement, unplaced_roles
from deployments.status_watch import FAILED, READY, StatusWatch, read_states, wait_for_role
from placement.add_model import RunningConfig, answer_for_running
from placement.config import ConfigError
from placement.placement_document import PlacementDocument, PlannedGpu, PlannedRole, ReplicaError, ReplicaReport

T = TypeVar("T")
logger = logging.getLogger("ray.serve")

# /v1/placement waits this long for a replica's own report.
PLACEMENT_TIMEOUT_S = 10.0
# /v1/placement/add: sizing the new model and reading the live inventory (a task that loads the sizing code).
ADD_TIMEOUT_S = 180.0
# /v1/models asks a running role for its context length at most this long (then lists it without).
MODELS_INFO_TIMEOUT_S = 2.0
# A call to a deployment that failed to start can wait forever (measured on
# Ray 2.60: a handle first used after the failure never answers); so can one to
# a role whose replica never starts. Every call is therefore awaited through
# `status_watch.wait_for_role`, which reads one cached status per ingress replica.

app = FastAPI(title="rayfit", description="OpenAI-compatible API over rayfit's model deployments")


class AdditionRequest(BaseModel):
    """`/v1/placement/add`: the new model as `plan --add` takes it (MODEL, ROLE=MODEL, or a one-role YAML entry)."""

    model_config = ConfigDict(extra="forbid")
    add: str = Field(min_length=1, max_length=4096)


def _answer_addition(running: RunningConfig, text: str) -> dict[str, Any]:
    """Run as a Ray task: sizing loads torch, which the ingress process never does (tests/test_light_imports)."""
    try:
        return {"answer": answer_for_running(running, text)}
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        return {"bad_input": str(exc)}


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


async def all_or_none(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Every call's result, or the first error with the other calls cancelled.

    `asyncio.gather` leaves the others running: a request whose one choice
    failed (a 400, a full queue) was answered at once while the replica went on
    generating its other choices, which nobody would read, and took the turns
    of the requests after it. Cancelling a call cancels its replica request."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each cancellation delivered before answering
        raise


class RoleCard(ModelCard):
    """An OpenAI model object plus the role's state: ready, loading, unavailable, failed (or unknown)."""

    multimodal: bool | None = None  # None: not known until its replica answers
    status: str
    reason: str | None = None


class RoleList(ModelList):
    data: list[RoleCard]


async def relay_stream(
    first: StreamDelta | None,
    deltas: AsyncIterator[StreamDelta],
    render: Callable[[StreamDelta], str],
    role: str,
) -> AsyncGenerator[str, None]:
    """A replica's stream (`first`, then the rest of `deltas`, a DeploymentResponseGenerator) as
    server-sent events, ending with [DONE]; a failure mid-way is reported in-band.

    When the client leaves, Starlette cancels the task that sends this stream (wherever it waits:
    here for the next delta, or in `send`, after which this generator is only closed) and the ASGI
    call then ends normally. Serve cancels the child calls of a request it cancels, not of one that
    ended, so the replica's stream is cancelled here, or it would decode on for nobody."""
    try:
        if first is not None:
            yield render(first)
            async for delta in deltas:
                yield render(returned(delta, role))
    except Exception as exc:
        # Headers are sent: report in-band as OpenAI-style servers do, then end.
        error = classify(exc, role)
        logger.warning("%s: stream failed mid-way: %s", role, error.message)
        yield f"data: {json.dumps(error_body(error.message, type=error.type, code=error.status))}\n\n"
    except BaseException:  # CancelledError, or GeneratorExit at a yield: the client left
        deltas.cancel()  # type: ignore[attr-defined]
        raise
    yield SSE_DONE


class HeldStream(StreamingResponse):
    """A streamed answer that holds its request's admission turn until it is sent or the client leaves."""

    def __init__(self, content: AsyncGenerator[str, None], ticket: Ticket):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._content = content
        self._ticket = ticket
        ticket.handed_over = True
        weakref.finalize(self, ticket.release)  # never sent at all (cancelled in between): freed with the response

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Stopped in `send` (the client left), the stream is closed now, not whenever it is collected.
            await self._content.aclose()
            self._ticket.release()


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
        running: RunningConfig | None = None,
    ):
        """`models`: role → handle; `model_ids`: role → model id as in the config;
        `plan`: role → the planned entry as JSON (shown by /v1/placement);
        `settings`: API key and body limit; `gpus`: the planned GPUs as JSON (for the report);
        `running`: what the app was planned from (for /v1/placement/add)."""
        self.running = running
        self.models = models
        self.model_ids = model_ids
        # Validated once, here: a plan off /v1/placement's schema fails the deploy, not every report.
        self.plan = {role: PlannedRole.model_validate(entry) for role, entry in (plan or {}).items()}
        self.settings = settings or IngressSettings()
        self.gpus = [PlannedGpu.model_validate(gpu) for gpu in gpus or []]
        self._info: dict[str, dict[str, Any]] = {}
        # One status reader per ingress replica: requests read its cache, never the controller.
        self.watch = StatusWatch(functools.partial(read_states, serve.get_replica_context().app_name))
        self.admission = Admission(self.settings.max_ongoing_requests, self.settings.max_queued_requests)

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

    def _failed(self, exc: BaseException, role: str) -> RayfitError:
        """The error for a failed call; a model whose deployment failed says why (from the cached status)."""
        error = classify(exc, role)
        state = self.watch.state(role)
        if isinstance(error, OverloadedError) and state.phase == FAILED:
            message = f"model {role!r} failed to deploy: {state.reason}"
            return OverloadedError(message, retry_after_s=error.retry_after_s)
        return error

    async def _call(self, role: str, call: Awaitable[Any]) -> Any:
        """Await a call to `role`: a failed deployment is a 503 naming its load error at once, a role
        with no running replica a 503 after `unavailable_timeout_s`; a busy one is waited for."""
        try:
            return returned(await wait_for_role(self.watch, role, call, self.settings.unavailable_timeout_s), role)
        except (RayfitError, StopAsyncIteration):
            raise
        except Exception as exc:
            raise self._failed(exc, role) from exc

    def _max_tokens_cap(self, role: str) -> int | None:
        return self.settings.max_tokens_caps.get(role)

    async def _generate(self, role: str, request: GenerationInput):
        return await self._call(role, self.models[role].generate.remote(request))

    async def _stream(self, role: str, request: GenerationInput, render: Callable[[StreamDelta], str], ticket: Ticket):
        """Start the stream and read its first delta before answering, so a bad
        request is a plain 400 rather than an error inside a 200 stream. The
        answer holds `ticket` (the request's admission turn) until it ends;
        `render` turns each delta into its server-sent-event text."""
        handle = self.models[role].options(stream=True)
        deltas: AsyncIterator[StreamDelta] = handle.stream.remote(request)
        try:
            first = await self._call(role, deltas.__anext__())
        except StopAsyncIteration:
            first = None
        except BaseException:
            deltas.cancel()  # given up or cancelled before its first delta: the replica drops it too
            raise

        return HeldStream(relay_stream(first, deltas, render, role), ticket)

    # ------------------------------------------------------------ routes

    # Generation requests take an admission turn first (503 + Retry-After in
    # OpenAI's shape past the ingress's bound). Bodies are read by `_body`, not
    # by FastAPI: it bounds their size (413) and turns every malformed body into
    # a 400 in OpenAI's shape.
    async def _choices(self, role: str, generation: GenerationInput, n: int) -> list[GenerationOutput]:
        """`n` answers to one request, generated side by side (a seed gives choice i the seed + i)."""
        seed = generation.params.seed
        inputs = [
            generation
            if i == 0 or seed is None
            else dataclasses.replace(generation, params=dataclasses.replace(generation.params, seed=seed + i))
            for i in range(n)
        ]
        return await all_or_none(self._generate(role, one) for one in inputs)

    @staticmethod
    def _log_ignored(request: Any) -> None:
        if request.ignored_fields:
            logger.debug("ignored request fields: %s", ", ".join(request.ignored_fields))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(self, http: Request):
        async with self.admission.enter() as ticket:
            request: ChatCompletionRequest = await self._body(http, ChatCompletionRequest)
            self._log_ignored(request)
            role = self._resolve(request.model)
            generation = request.to_generation_input(self._max_tokens_cap(role))
            tools = generation.callable_tools
            if request.stream:
                converter = ChatStreamConverter(
                    request.model, include_usage=request.include_usage or request.continuous_usage, tools=tools
                )
                return await self._stream(role, generation, lambda d: sse_lines(converter.convert(d)), ticket)
            outputs = await self._choices(role, generation, request.n)
            return chat_response(outputs, request.model, tools=tools)

    @app.post("/v1/responses")
    async def responses(self, http: Request):
        """OpenAI's Responses API, answered through the chat path (deployments.openai_api.responses)."""
        async with self.admission.enter() as ticket:
            request: ResponsesRequest = await self._body(http, ResponsesRequest)
            chat = request.to_chat()
            role = self._resolve(request.model)
            generation = chat.to_generation_input(self._max_tokens_cap(role))
            tools = generation.callable_tools
            if request.stream:
                events = ResponseEvents(request, tools)
                opening = sse_events(events.start())

                def render(delta: StreamDelta) -> str:
                    nonlocal opening
                    text, opening = opening + sse_events(list(events.convert(delta))), ""
                    return text

                return await self._stream(role, generation, render, ticket)
            outputs = await self._choices(role, generation, 1)
            return response_body(request, chat_response(outputs, request.model, tools=tools))

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(self, http: Request):
        async with self.admission.enter() as ticket:
            request: CompletionRequest = await self._body(http, CompletionRequest)
            self._log_ignored(request)
            role = self._resolve(request.model)
            # One input per prompt (a list of prompts: lm-evaluation-harness batches that way).
            generations = request.to_generation_inputs(self._max_tokens_cap(role))
            if request.stream:  # one prompt (the request model refuses several with stream)
                converter = CompletionStreamConverter(
                    request.model, include_usage=request.include_usage or request.continuous_usage
                )
                return await self._stream(role, generations[0], lambda d: sse_lines(converter.convert(d)), ticket)
            groups = await all_or_none(self._choices(role, g, request.n) for g in generations)
            return completion_response([o for group in groups for o in group], request.model, n=request.n)

    async def _role_card(self, role: str, created: int) -> RoleCard:
        """The role as /v1/models lists it; only a running role is asked for its details (bounded)."""
        state = self.watch.state(role)
        if role not in self._info and state.phase == READY:
            try:
                info = await asyncio.wait_for(self.models[role].info.remote(), MODELS_INFO_TIMEOUT_S)
                self._info[role] = info
            except Exception as exc:  # listed without details; the next listing asks again
                logger.info("/v1/models: %s did not report its details: %s", role, _message_of(exc))
        info = self._info.get(role, {})
        return RoleCard(
            id=role,
            created=created,
            root=self.model_ids.get(role, info.get("model", role)),
            max_model_len=info.get("context_length"),
            multimodal=bool(info["multimodal"]) if "multimodal" in info else None,
            status=state.phase,
            reason=(state.reason or None) if state.phase != READY else None,
        )

    @app.get("/v1/models", response_model=RoleList)
    async def list_models(self, http: Request) -> RoleList:
        """Every configured role with its state; never waits for a model that is loading."""
        authorize(http, self.settings.api_key)
        await self.watch.states()  # the cached statuses (the first call waits for the first read)
        created = now()
        return RoleList(data=await asyncio.gather(*(self._role_card(role, created) for role in sorted(self.models))))

    @app.get("/v1/placement", response_model=PlacementDocument, response_model_exclude_unset=True)
    async def placement(self, http: Request) -> PlacementDocument:
        """The plan next to what each role's replica reports (one replica per role answers),
        or why the role has no replica (its deployment failed: the load error).
        Each part keeps exactly the keys its producer wrote (placement.placement_document)."""
        authorize(http, self.settings.api_key)
        roles = sorted(self.models)
        try:
            await self.watch.refresh()  # an operator's report: read the statuses now, not up to a second ago
        except Exception as exc:
            logger.warning("/v1/placement: cannot read deployment statuses: %s", exc)
        problems = self.watch.problems(roles)
        failed = {role for role in roles if self.watch.state(role).phase == FAILED}
        alive = await asyncio.to_thread(alive_nodes)
        gone = unplaced_roles(self.plan, alive)
        try:  # every replica of every role, as Ray sees it (node, GPU node label)
            replicas = await asyncio.to_thread(replica_locations, serve.get_replica_context().app_name)
        except Exception as exc:
            logger.warning("/v1/placement: cannot list replicas: %s", exc)
            replicas = {}

        async def report(role: str) -> ReplicaReport | ReplicaError:
            if role in gone:  # its replica can only come back on that node: don't wait for it
                return ReplicaError(error=gone[role], **problems.get(role, {}))
            if role in failed:
                return ReplicaError(error=self.watch.state(role).reason, status="DEPLOY_FAILED")
            try:
                # Bounded: a deployment still starting must not hold the whole report.
                answer = await asyncio.wait_for(self.models[role].placement.remote(), PLACEMENT_TIMEOUT_S)
            except Exception as exc:
                return ReplicaError(error=_message_of(exc), **problems.get(role, {}))
            return ReplicaReport.model_validate(answer)  # a report off its schema is this app's bug: a 500

        reports = await asyncio.gather(*(report(role) for role in roles))
        models = {
            role: role_placement(role, self.plan.get(role), replica, replicas.get(role, []), alive)
            for role, replica in zip(roles, reports, strict=True)
        }
        return PlacementDocument(models=models, gpus=self.gpus)

    @app.post("/v1/placement/add")
    async def placement_add(self, http: Request) -> dict[str, Any]:
        """Would one more model fit the running cluster now, where, and would a running model move?
        Read-only: placement.add_model plans the config with and without it; nothing is deployed."""
        authorize(http, self.settings.api_key)
        request = parse_body(await read_body(http, self.settings.max_body_bytes), AdditionRequest)
        if self.running is None:
            raise NotFoundError("this app was bound without its config: /v1/placement/add is not available")
        import ray

        task = ray.remote(num_cpus=0, max_retries=0)(_answer_addition)
        result = await asyncio.wait_for(task.remote(self.running, request.add), ADD_TIMEOUT_S)
        if "bad_input" in result:
            raise BadRequestError(result["bad_input"], param="add")
        return result["answer"]

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        # The proxy routes here only once the app is running; model replicas
        # report their own health to Serve through `check_health`. A role whose
        # deployment is not HEALTHY or whose planned node left makes it "degraded"
        # (still 200: the other models serve). Statuses come from the watcher's cache.
        await self.watch.states()
        problems = self.watch.problems(sorted(self.models))
        unavailable = {role: f"{p['status']}: {p['reason']}".rstrip(": ") for role, p in problems.items()}
        unavailable.update(unplaced_roles(self.plan, await asyncio.to_thread(alive_nodes)))
        status = "degraded" if unavailable else "ok"
        return {"status": status, "models": sorted(self.models), "unavailable": unavailable}
