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
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    model_validator,
)

from deployments.engine.errors import BadRequestError, validation_error
from deployments.engine.generation import GenerationInput, StreamDelta
from deployments.engine.structured import ToolCallHoldBack, ToolSpec
from deployments.openai_api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    NamedErrorsModel,
    new_id,
    now,
)

# Every field is checked here with chat's bounds, so a bad value is a 400 naming the Responses field
# before anything is converted; what the conversion to chat still refuses (tool schemas, text.format's
# schema, images) is a 400 naming the Responses field too (`_responses_param`), never a 500.


class _Part(BaseModel):
    # Fields rayfit does not read (`id`, `status`, `annotations`, ...) are ignored, as for chat.
    model_config = ConfigDict(extra="ignore")


def _kind(default: str | None, aliases: dict[str, str] | None = None):
    """A tagged union's discriminator: the value's `type` (`default` when it has none)."""

    def kind(value: Any) -> str | None:
        found = value.get("type", default) if isinstance(value, dict) else getattr(value, "type", default)
        return (aliases or {}).get(found, found) if isinstance(found, str) else None

    return kind


class InputText(_Part):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputImage(_Part):
    type: Literal["input_image"]
    image_url: str  # a data URL; checked as chat checks it (deployments.engine.images)
    detail: Literal["auto", "low", "high"] | None = None


ContentPart = Annotated[
    Annotated[InputText, Tag("text")] | Annotated[InputImage, Tag("input_image")],
    Discriminator(
        _kind(None, {"input_text": "text", "output_text": "text"}),
        custom_error_type="content_part_type",
        custom_error_message="content part type must be input_text, output_text or input_image",
    ),
]


class MessageItem(_Part):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: list[ContentPart] | str | None = None


class FunctionCallItem(_Part):
    type: Literal["function_call"]
    name: str
    arguments: str = "{}"
    call_id: str | None = None
    id: str | None = None


class FunctionCallOutputItem(_Part):
    type: Literal["function_call_output"]
    call_id: str | None = None
    output: Any = None  # text as is; anything else (content parts, JSON) as JSON text


class ReasoningItem(_Part):
    type: Literal["reasoning"]  # a client echoing reasoning items: nothing to render


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(
        _kind("message"),
        custom_error_type="input_item_type",
        custom_error_message="input item type must be message, function_call, function_call_output or reasoning",
    ),
]


class FunctionTool(_Part):
    type: Literal["function"]  # the only tools rayfit runs: the client's own functions
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Part):
    type: Literal["function"]
    name: str


class TextFormat(_Part):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise BadRequestError(
                "text.format.schema: a json_schema format needs `schema`, a JSON schema object",
                param="text.format.schema",
            )
        return self


class TextConfig(_Part):
    format: TextFormat | None = None


class ResponsesRequest(NamedErrorsModel):
    """The fields rayfit reads, bounded as chat bounds them; the rest is accepted and ignored (as for chat)."""

    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    text: TextConfig | None = None

    @model_validator(mode="after")
    def _no_server_state(self) -> ResponsesRequest:
        for name in ("previous_response_id", "conversation"):
            if (self.model_extra or {}).get(name):
                raise BadRequestError(
                    f"`{name}`: rayfit stores no conversations; send the whole history in `input`", param=name
                )
        return self

    def to_chat(self) -> ChatCompletionRequest:
        """The chat request this one is. What chat refuses in it, now or when it becomes generation
        input, is a 400 naming this request's field (`_responses_param`)."""
        messages, sources = _messages(self.instructions, self.input)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        if self.tools:
            body["tools"] = [_chat_tool(tool) for tool in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        for name, value in (
            ("max_tokens", self.max_output_tokens),
            ("temperature", self.temperature),
            ("top_p", self.top_p),
        ):
            if value is not None:
                body[name] = value
        response_format = _response_format(self.text.format if self.text else None)
        if response_format is not None:
            body["response_format"] = response_format

        def rename(param: str) -> str:
            return _responses_param(param, sources)

        try:
            chat = ChatOfResponses.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc, body, rename=rename) from None
        except BadRequestError as exc:
            raise _renamed(exc, rename) from None
        chat._rename = rename
        return chat

    def echo(self) -> dict[str, Any]:
        """The request's settings as a Response object repeats them."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "parallel_tool_calls": self.parallel_tool_calls,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "tool_choice": _dumped(self.tool_choice) or "auto",
            "tools": [tool.model_dump(exclude_none=True) for tool in self.tools or []],
            "text": self.text.model_dump(exclude_none=True, by_alias=True)
            if self.text
            else {"format": {"type": "text"}},
        }


class ChatOfResponses(ChatCompletionRequest):
    """The chat request a Responses request became: what it refuses while becoming generation input
    (tool schemas, the response format's schema, max_tokens over the model's cap) names the Responses field."""

    _rename: Any = PrivateAttr(default=None)

    def to_generation_input(self, max_tokens_cap: int | None = None) -> GenerationInput:
        try:
            return super().to_generation_input(max_tokens_cap)
        except BadRequestError as exc:
            raise _renamed(exc, self._rename) from None


def _dumped(value: Any) -> Any:
    return value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value


_CHAT_FIELDS = ("max_tokens", "max_completion_tokens", "response_format", "tools", "tool_choice", "messages")


def _renamed(exc: BadRequestError, rename: Any) -> BadRequestError:
    """`exc` naming the Responses fields: its param, and the chat field paths in its message."""
    if rename is None or exc.param is None:
        return exc

    def word(text: str) -> str:
        path = text.rstrip(":,;")
        return rename(path) + text[len(path) :] if path.split(".")[0] in _CHAT_FIELDS else text

    return BadRequestError(" ".join(word(w) for w in exc.message.split(" ")), param=rename(exc.param))


# Where a chat message came from: the Responses field (an input item's path), the item paths of its
# tool calls, and how its chat field names read there.
Source = tuple[str, list[str], dict[str, str]]
_WHOLE: dict[str, str] = {}  # instructions or a string input: whatever fails in it names the field itself
_MESSAGE = {"url": ""}  # content.0.image_url.url → content.0.image_url
_CALL = {"function": "", "id": "call_id"}
_OUTPUT = {"content": "output", "tool_call_id": "call_id"}


def _responses_param(param: str, sources: list[Source]) -> str:
    """A chat request's field path as the Responses request's (`max_tokens` → `max_output_tokens`,
    `response_format.json_schema.schema` → `text.format.schema`, `tools.0.function.parameters` →
    `tools.0.parameters`, `messages.3.content.0.image_url.url` → `input.2.content.0.image_url`)."""
    if not param:
        return param
    head, *rest = param.split(".")
    if head in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    if head == "response_format":
        return ".".join(["text", "format", *(p for p in rest if p != "json_schema")])
    if head in ("tools", "tool_choice"):
        return ".".join([head, *(p for p in rest if p != "function")])
    if head != "messages":
        return param
    if not rest or not rest[0].isdigit() or int(rest[0]) >= len(sources):
        return "input"
    item, calls, names = sources[int(rest[0])]
    rest = rest[1:]
    if rest[:1] == ["tool_calls"] and len(rest) > 1 and rest[1].isdigit() and int(rest[1]) < len(calls):
        item, names, rest = calls[int(rest[1])], _CALL, rest[2:]
    if names is _WHOLE:
        return item
    return ".".join([item, *(mapped for p in rest if (mapped := names.get(p, p)))])


def _content(content: list[InputText | InputImage] | str | None) -> Any:
    """Responses content (a string or input_text / output_text / input_image parts) as chat content."""
    if isinstance(content, str) or content is None:
        return content or ""
    return [
        {"type": "text", "text": part.text}
        if isinstance(part, InputText)
        else {"type": "image_url", "image_url": {"url": part.image_url}}
        for part in content
    ]


def _messages(
    instructions: str | None, items: str | list[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem]
) -> tuple[list[dict[str, Any]], list[Source]]:
    """The chat messages, and where each came from (the Responses field, for errors)."""
    messages: list[dict[str, Any]] = []
    sources: list[Source] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
        sources.append(("instructions", [], _WHOLE))
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}], [*sources, ("input", [], _WHOLE)]
    for index, item in enumerate(items):
        where = f"input.{index}"
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _content(item.content)})
            sources.append((where, [], _MESSAGE))
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id or item.id or new_id("call"),
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments or "{}"},
            }
            # Consecutive calls are one assistant turn with several tool calls.
            last = messages[-1] if messages else None
            if last is not None and last.get("role") == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
                sources[-1][1].append(where)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                sources.append((where, [where], _CALL))
        elif isinstance(item, FunctionCallOutputItem):
            text = item.output if isinstance(item.output, str) else json.dumps(item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": text})
            sources.append((where, [], _OUTPUT))
    return messages, sources


def _chat_tool(tool: FunctionTool) -> dict[str, Any]:
    function = {
        k: v
        for k, v in (("name", tool.name), ("description", tool.description), ("parameters", tool.parameters))
        if v is not None
    }
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | FunctionChoice) -> Any:
    if isinstance(choice, FunctionChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


def _response_format(format_: TextFormat | None) -> dict[str, Any] | None:
    if format_ is None or format_.type == "text":
        return None
    if format_.type == "json_schema":
        spec = {"name": format_.name, "schema": format_.schema_, "strict": format_.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}
    return {"type": format_.type}


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
        **request.echo(),
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
