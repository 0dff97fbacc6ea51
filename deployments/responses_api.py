"""`POST /v1/responses` (OpenAI's Responses API) as a translation of chat completions.

A request becomes a `ChatCompletionRequest` (instructions → system message,
input items → messages, function tools → chat tools, `text.format` →
`response_format`, `max_output_tokens` → `max_tokens`); the chat answer
becomes a Response object (`message` and `function_call` output items), or,
streamed, the Responses event sequence. Nothing is stored on the server:
`previous_response_id` and `conversation` are a 400, so clients (the OpenAI
Agents SDK, pydantic-ai) send the whole history each time, which they do by
default for servers other than OpenAI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.errors import BadRequestError
from deployments.generation import StreamDelta
from deployments.protocol import ChatCompletionRequest, ChatCompletionResponse, new_id, now
from deployments.structured import ToolCallHoldBack, ToolSpec


class ResponsesRequest(BaseModel):
    """The fields rayfit reads; the rest is accepted and ignored (as for chat)."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _no_server_state(self) -> ResponsesRequest:
        for name in ("previous_response_id", "conversation"):
            if (self.model_extra or {}).get(name):
                raise BadRequestError(
                    f"`{name}`: rayfit stores no conversations; send the whole history in `input`", param=name
                )
        return self

    def to_chat(self) -> ChatCompletionRequest:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": _messages(self.instructions, self.input),
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        if self.tools:
            body["tools"] = [_chat_tool(tool, index) for index, tool in enumerate(self.tools)]
            if self.tool_choice is not None:
                body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        for name, value in (("max_tokens", self.max_output_tokens), ("temperature", self.temperature)):
            if value is not None:
                body[name] = value
        if self.top_p is not None:
            body["top_p"] = self.top_p
        response_format = _response_format((self.text or {}).get("format"))
        if response_format is not None:
            body["response_format"] = response_format
        return ChatCompletionRequest.model_validate(body)


def _content_text(content: Any) -> Any:
    """Responses content (a string or input_text / output_text / input_image parts) as chat content."""
    if isinstance(content, str) or content is None:
        return content or ""
    parts = []
    for part in content:
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": part.get("image_url", "")}})
        else:
            raise BadRequestError(f"input content part type {kind!r} is not supported", param="input")
    return parts


def _messages(instructions: str | None, items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role", "user"), "content": _content_text(item.get("content"))})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id") or item.get("id") or new_id("call"),
                "type": "function",
                "function": {"name": item.get("name", ""), "arguments": item.get("arguments") or "{}"},
            }
            # Consecutive calls are one assistant turn with several tool calls.
            last = messages[-1] if messages else None
            if last is not None and last.get("role") == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else json.dumps(output)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind == "reasoning":
            continue  # a client echoing reasoning items: nothing to render
        else:
            raise BadRequestError(f"input item type {kind!r} is not supported", param="input")
    return messages


def _chat_tool(tool: dict[str, Any], index: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise BadRequestError(
            f"tools[{index}]: only function tools are supported (got {tool.get('type')!r})", param=f"tools.{index}"
        )
    function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(format_: dict[str, Any] | None) -> dict[str, Any] | None:
    if not format_ or format_.get("type") == "text":
        return None
    if format_.get("type") == "json_schema":
        spec = {k: format_.get(k) for k in ("name", "schema", "strict") if k in format_}
        return {"type": "json_schema", "json_schema": spec}
    return {"type": format_.get("type")}


# ------------------------------------------------------------- answers


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": new_id("msg"),
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _call_item(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": new_id("fc"),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


def _response(request: ResponsesRequest, output: list[dict[str, Any]], usage: dict[str, Any] | None, status: str):
    return {
        "id": new_id("resp"),
        "object": "response",
        "created_at": now(),
        "model": request.model,
        "status": status,
        "output": output,
        "usage": usage,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "parallel_tool_calls": request.parallel_tool_calls,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "tool_choice": request.tool_choice or "auto",
        "tools": request.tools or [],
        "text": request.text or {"format": {"type": "text"}},
        "error": None,
        "incomplete_details": None,
        "metadata": {},
    }


def response_body(request: ResponsesRequest, chat: ChatCompletionResponse) -> dict[str, Any]:
    """The Response object for a chat answer."""
    choice = chat.choices[0]
    if choice.message.tool_calls:
        output = [_call_item(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    else:
        output = [_message_item(choice.message.content or "")]
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    body = _response(request, output, _usage(chat.usage.prompt_tokens, chat.usage.completion_tokens), status)
    if status == "incomplete":
        body["incomplete_details"] = {"reason": "max_output_tokens"}
    return body


class ResponseEvents:
    """Engine deltas → the Responses streaming events for one answer.

    Text streams as `response.output_text.delta`; with tools, an answer that
    opens with "{" is held until it ends and sent as `function_call` items.
    Every event carries a `sequence_number`, as OpenAI's do.
    """

    def __init__(self, request: ResponsesRequest, tools: list[ToolSpec]):
        self.request = request
        self.tools = tools
        self._sequence = 0
        self._text = ""
        self._message: dict[str, Any] | None = None
        self._hold = ToolCallHoldBack(tools)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        created = _response(self.request, [], None, "in_progress")
        self._id = created["id"]
        return [
            self._event("response.created", response=created),
            self._event("response.in_progress", response=created),
        ]

    def _open_message(self) -> list[dict[str, Any]]:
        self._message = _message_item("", status="in_progress")
        self._message["content"] = []
        part = {"type": "output_text", "text": "", "annotations": []}
        where = {"item_id": self._message["id"], "output_index": 0, "content_index": 0}
        return [
            self._event("response.output_item.added", output_index=0, item=self._message),
            self._event("response.content_part.added", **where, part=part),
        ]

    def _text_events(self, text: str) -> list[dict[str, Any]]:
        events = [] if self._message is not None else self._open_message()
        self._text += text
        where = {"item_id": self._message["id"], "output_index": 0, "content_index": 0}  # type: ignore[index]
        events.append(self._event("response.output_text.delta", **where, delta=text, logprobs=[]))
        return events

    def _message_done(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        events = [] if self._message is not None else self._open_message()
        item = {**_message_item(self._text), "id": self._message["id"]}  # type: ignore[index]
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        events += [
            self._event("response.output_text.done", **where, text=self._text, logprobs=[]),
            self._event("response.content_part.done", **where, part=item["content"][0]),
            self._event("response.output_item.done", output_index=0, item=item),
        ]
        return events, item

    def _calls_done(self, calls: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        events, items = [], []
        for index, call in enumerate(calls):
            item = _call_item(call.id, call.name, call.arguments)
            events += [
                self._event("response.output_item.added", output_index=index, item={**item, "status": "in_progress"}),
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=call.arguments,
                ),
                self._event("response.output_item.done", output_index=index, item=item),
            ]
            items.append(item)
        return events, items

    def convert(self, delta: StreamDelta) -> Iterator[dict[str, Any]]:
        finished = delta.finish_reason is not None
        text, calls = self._hold.feed(delta.text, finished)
        if text:
            yield from self._text_events(text)
        if not finished:
            return
        if calls:
            events, output = self._calls_done(calls)
        else:
            events, item = self._message_done()
            output = [item]
        yield from events
        status = "incomplete" if delta.finish_reason == "length" else "completed"
        done = _response(self.request, output, _usage(delta.prompt_tokens or 0, delta.completion_tokens or 0), status)
        done["id"] = self._id
        yield self._event("response.completed" if status == "completed" else "response.incomplete", response=done)


def sse_events(events: list[dict[str, Any]]) -> str:
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)
