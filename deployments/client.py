"""Deployment-handle client for agent code running on the Ray cluster.

Same request and response types as the HTTP API (`deployments.protocol`), but
no HTTP hop: the call goes straight to the role's replicas.

    from deployments.client import get_model

    summarizer = get_model("summarizer")
    reply = summarizer.chat([{"role": "user", "content": "Summarize: ..."}], max_tokens=64)
    print(reply.choices[0].message.content)
    for chunk in summarizer.stream([{"role": "user", "content": "Hi"}]):
        print(chunk.choices[0].delta.content or "", end="")

The sync methods block; call them from plain threads or drivers. Inside a
Serve deployment or any running event loop, use `achat` / `astream`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatStreamConverter,
    chat_response,
)

DEFAULT_APP_NAME = "rayfit"


class ModelClient:
    """One role of a running rayfit app."""

    def __init__(self, role: str, handle: DeploymentHandle):
        self.role = role
        self._handle = handle
        self._stream_handle = handle.options(stream=True)

    def _request(self, messages: Sequence[dict[str, Any]], stream: bool, params: dict[str, Any]):
        # Validated exactly as the HTTP body would be (unknown params are refused).
        return ChatCompletionRequest.model_validate(
            {"model": self.role, "messages": list(messages), "stream": stream, **params}
        )

    def chat(self, messages: Sequence[dict[str, Any]], **params: Any) -> ChatCompletionResponse:
        """OpenAI chat parameters as keywords: max_tokens, temperature, top_p, stop, seed."""
        request = self._request(messages, False, params)
        output = self._handle.generate.remote(request.to_generation_input()).result()
        return chat_response(output, self.role)

    async def achat(self, messages: Sequence[dict[str, Any]], **params: Any) -> ChatCompletionResponse:
        request = self._request(messages, False, params)
        output = await self._handle.generate.remote(request.to_generation_input())
        return chat_response(output, self.role)

    def stream(self, messages: Sequence[dict[str, Any]], **params: Any) -> Iterator[ChatCompletionStreamResponse]:
        """Chat chunks as OpenAI streams them (first carries the role, last the finish_reason)."""
        request = self._request(messages, True, params)
        converter = ChatStreamConverter(self.role, include_usage=request.include_usage)
        for delta in self._stream_handle.stream.remote(request.to_generation_input()):
            yield from converter.convert(delta)

    async def astream(
        self, messages: Sequence[dict[str, Any]], **params: Any
    ) -> AsyncIterator[ChatCompletionStreamResponse]:
        request = self._request(messages, True, params)
        converter = ChatStreamConverter(self.role, include_usage=request.include_usage)
        async for delta in self._stream_handle.stream.remote(request.to_generation_input()):
            for chunk in converter.convert(delta):
                yield chunk

    def info(self) -> dict[str, Any]:
        return self._handle.info.remote().result()

    def placement(self) -> dict[str, Any]:
        return self._handle.placement.remote().result()


def get_model(role: str, app_name: str = DEFAULT_APP_NAME) -> ModelClient:
    """The client for `role` of the app `app_name` (the serve config's app name)."""
    return ModelClient(role, serve.get_deployment_handle(role, app_name))
