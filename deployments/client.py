"""Deployment-handle client for agent code running on the Ray cluster.

Same request and response types as the HTTP API (`deployments.openai_api.protocol`), but
no HTTP hop: the call goes straight to the role's replicas.

    from deployments.client import get_model

    summarizer = get_model("summarizer")
    reply = summarizer.chat([{"role": "user", "content": "Summarize: ..."}], max_tokens=64)
    print(reply.choices[0].message.content)
    for chunk in summarizer.stream([{"role": "user", "content": "Hi"}]):
        print(chunk.choices[0].delta.content or "", end="")

The sync methods block; call them from plain threads or drivers. Inside a
Serve deployment or any running event loop, use `achat` / `astream`.

Failures raise `deployments.engine.errors.RayfitError` subclasses carrying the HTTP
status the same request would get: `BadRequestError` (400: bad parameters,
max_tokens over the cap, prompt over the context), `NotFoundError` (404: no
such role), `OverloadedError` (503: queue full, out of memory, replica
restarting; retry after `retry_after_s`), `ServerError` (500).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.engine.errors import BadRequestError, NotFoundError, RayfitError, classify, returned
from deployments.guard import validation_message
from deployments.openai_api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatStreamConverter,
    chat_response,
)

DEFAULT_APP_NAME = "rayfit"
# A handle to a deployment that failed to start can wait forever; a live one answers `info` at once.
INFO_TIMEOUT_S = 30.0


class ModelClient:
    """One role of a running rayfit app."""

    def __init__(self, role: str, handle: DeploymentHandle, max_tokens_cap: int | None = None):
        self.role = role
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self.max_tokens_cap = max_tokens_cap

    def _sync_cap(self) -> int | None:
        """The role's max_tokens_cap, asked once (the default max_tokens must respect it)."""
        if self.max_tokens_cap is None:
            try:
                info = self._handle.info.remote().result(timeout_s=INFO_TIMEOUT_S)
                self.max_tokens_cap = info.get("max_tokens_cap")
            except Exception as exc:
                raise classify(exc, self.role) from exc
        return self.max_tokens_cap

    async def _async_cap(self) -> int | None:
        if self.max_tokens_cap is None:
            try:
                info = await asyncio.wait_for(self._handle.info.remote(), INFO_TIMEOUT_S)
                self.max_tokens_cap = info.get("max_tokens_cap")
            except Exception as exc:
                raise classify(exc, self.role) from exc
        return self.max_tokens_cap

    def _request(self, messages: Sequence[dict[str, Any]], stream: bool, params: dict[str, Any]):
        """The generation input, validated exactly as the HTTP body would be (unknown params are refused)."""
        try:
            request = ChatCompletionRequest.model_validate(
                {"model": self.role, "messages": list(messages), "stream": stream, **params}
            )
        except ValidationError as exc:
            message, param = validation_message(exc)
            raise BadRequestError(message, param=param) from exc
        except TypeError as exc:  # `messages` not iterable
            raise BadRequestError(f"messages must be a list of messages: {exc}", param="messages") from exc
        if request.ignored_fields:  # over HTTP ignored; a keyword typo in Python code should not be
            unknown = ", ".join(request.ignored_fields)
            raise BadRequestError(f"unknown parameter(s): {unknown}", param=request.ignored_fields[0])
        return request, request.to_generation_input(self.max_tokens_cap)

    def chat(self, messages: Sequence[dict[str, Any]], **params: Any) -> ChatCompletionResponse:
        """OpenAI chat parameters as keywords (max_tokens, temperature, tools, response_format,
        logprobs / top_logprobs, ...); `choices[i].logprobs` is then a protocol `ChoiceLogprobs`."""
        self._sync_cap()
        request, generation = self._request(messages, False, params)
        try:
            output = self._handle.generate.remote(generation).result()
        except Exception as exc:
            raise classify(exc, self.role) from exc
        return chat_response(returned(output, self.role), self.role, tools=generation.callable_tools)

    async def achat(self, messages: Sequence[dict[str, Any]], **params: Any) -> ChatCompletionResponse:
        await self._async_cap()
        request, generation = self._request(messages, False, params)
        try:
            output = await self._handle.generate.remote(generation)
        except Exception as exc:
            raise classify(exc, self.role) from exc
        return chat_response(returned(output, self.role), self.role, tools=generation.callable_tools)

    def stream(self, messages: Sequence[dict[str, Any]], **params: Any) -> Iterator[ChatCompletionStreamResponse]:
        """Chat chunks as OpenAI streams them (first carries the role, last the finish_reason)."""
        self._sync_cap()
        request, generation = self._request(messages, True, params)
        converter = ChatStreamConverter(self.role, include_usage=request.include_usage, tools=generation.callable_tools)
        responses = self._stream_handle.stream.remote(generation)
        try:
            for delta in responses:
                yield from converter.convert(returned(delta, self.role))
        except RayfitError:
            raise
        except Exception as exc:
            raise classify(exc, self.role) from exc
        finally:
            responses.cancel()  # the caller broke out early: the replica stops generating

    async def astream(
        self, messages: Sequence[dict[str, Any]], **params: Any
    ) -> AsyncIterator[ChatCompletionStreamResponse]:
        await self._async_cap()
        request, generation = self._request(messages, True, params)
        converter = ChatStreamConverter(self.role, include_usage=request.include_usage, tools=generation.callable_tools)
        responses = self._stream_handle.stream.remote(generation)
        try:
            async for delta in responses:
                for chunk in converter.convert(returned(delta, self.role)):
                    yield chunk
        except RayfitError:
            raise
        except Exception as exc:
            raise classify(exc, self.role) from exc
        finally:
            responses.cancel()

    def info(self) -> dict[str, Any]:
        return self._handle.info.remote().result()

    def placement(self) -> dict[str, Any]:
        return self._handle.placement.remote().result()


def get_model(role: str, app_name: str = DEFAULT_APP_NAME) -> ModelClient:
    """The client for `role` of the app `app_name` (the serve config's app name).

    Raises NotFoundError naming the roles that exist when `role` is not one of them.
    """
    app = serve.status().applications.get(app_name)
    if app is None:
        raise NotFoundError(f"no Serve application named {app_name!r}")
    roles = sorted(name for name in app.deployments if name != "Ingress")
    if role not in roles:
        raise NotFoundError(f"The model {role!r} does not exist in app {app_name!r}. Available: {', '.join(roles)}")
    return ModelClient(role, serve.get_deployment_handle(role, app_name))
