"""OpenAI-compatible request and response models, and the one place that turns
them into the engine's types and back.

Shaped like vLLM's `entrypoints/openai/protocol.py`. The field policy
(README "Request fields"):
- fields rayfit applies: sampling (`temperature`, `top_p`, `top_k`, `min_p`,
  `seed`), penalties (`presence_penalty`, `frequency_penalty`,
  `repetition_penalty`, `logit_bias`), length (`max_tokens`,
  `max_completion_tokens`, `min_tokens`, `ignore_eos`, `stop`), `n`,
  `response_format`, `tools` / `tool_choice` / `parallel_tool_calls`,
  `stream_options` (`include_usage`, `continuous_usage_stats`);
- fields that change nothing here (`user`, `metadata`, `store`, ...) and any
  field rayfit does not know are accepted and ignored (listed by
  `ignored_fields`, which the ingress logs at debug), as vLLM and Ollama do;
- fields that ask for behaviour rayfit cannot give (`logprobs`, audio output,
  `prediction`, web search) are a 400 naming the field.
Used by the HTTP ingress and by the handle client (`deployments.client`), so
both speak exactly the same types.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from deployments.errors import BadRequestError
from deployments.generation import GenerationInput, GenerationOutput, RowRules, SamplingParams, StreamDelta
from deployments.images import check_image_url
from deployments.structured import (
    ToolCall,
    ToolCallHoldBack,
    ToolSpec,
    chosen_tools,
    history_messages,
    parse_tool_calls,
    response_format_grammar,
    tool_call_grammar,
    tool_specs,
    tools_prompt,
)

# OpenAI's default when a request gives no limit is "until the context ends";
# a bounded default keeps one forgotten `max_tokens` from holding a replica.
DEFAULT_MAX_TOKENS = 256
# Below this a temperature is greedy decoding: logits / 5e-324 overflow to inf
# and sampling fails (found by the fuzz test); the limit of sampling is argmax anyway.
MIN_SAMPLING_TEMPERATURE = 1e-5
# Choices one request may ask for (`n`): each is its own generation.
MAX_CHOICES = 8
# Fields that ask for something rayfit does not do: a 400 naming the field when set.
UNSUPPORTED_FIELDS = {
    "logprobs": "token log-probabilities are not supported yet",
    "top_logprobs": "token log-probabilities are not supported yet",
    "echo": "echoing the prompt with log-probabilities is not supported yet",
    "suffix": "insertion (suffix) is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the legacy `functions` field is not supported; use `tools`",
    "function_call": "the legacy `function_call` field is not supported; use `tool_choice`",
}


class OpenAIBaseModel(BaseModel):
    # Parts of a request: fields rayfit does not read (an SDK's `refusal`, `annotations`, ...) are ignored.
    model_config = ConfigDict(extra="ignore")


class _RequestModel(BaseModel):
    # A whole request: unknown fields are kept aside (`ignored_fields`), never an error.
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _RequestModel:
        for name, why in UNSUPPORTED_FIELDS.items():
            value = getattr(self, name, None) if name in type(self).model_fields else (self.model_extra or {}).get(name)
            if value not in (None, False, 0, "", [], {}):
                raise BadRequestError(f"`{name}`: {why}", param=name)
        return self

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


# ---------------------------------------------------------------- requests


class ImageURL(OpenAIBaseModel):
    url: Annotated[str, AfterValidator(check_image_url)] = Field(
        description="A data URL (data:image/png;base64,...) of a readable image within the size limits"
    )
    detail: Literal["auto", "low", "high"] | None = None


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ImageContentPart(OpenAIBaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextContentPart | ImageContentPart, Field(discriminator="type")]


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str = "{}"


class ToolCallItem(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call it answers

    def has_image(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImageContentPart) for p in self.content)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage in every chunk (vLLM's field; GuideLLM sends it)


class _SamplingFields(_RequestModel):
    """Fields common to chat and completions, in the OpenAI docs' order."""

    model: str
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    response_format: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # Beyond OpenAI, as vLLM names them.
    top_k: int = Field(default=0, ge=-1, description="0 or -1: off")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _check(self) -> _SamplingFields:
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("`stop` takes at most 4 sequences")
        if self.n > 1 and self.stream:
            raise BadRequestError("n > 1 is not supported with stream: true", param="n")
        return self

    def grammar(self) -> str | None:
        return response_format_grammar(self.response_format)

    def sampling_params(
        self, max_tokens: int | None = None, max_tokens_cap: int | None = None, grammar: str | None = None
    ) -> SamplingParams:
        """`max_tokens_cap`: the model's limit (ModelSpec.max_tokens_cap); above it is a 400; the default obeys it."""
        if max_tokens is not None and max_tokens_cap is not None and max_tokens > max_tokens_cap:
            raise BadRequestError(
                f"max_tokens is {max_tokens} but model {self.model!r} allows at most {max_tokens_cap}",
                param="max_tokens",
            )
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_cap or DEFAULT_MAX_TOKENS)
        if self.min_tokens > max_tokens:
            raise BadRequestError(
                f"min_tokens ({self.min_tokens}) is above max_tokens ({max_tokens})", param="min_tokens"
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        rules = RowRules(
            grammar=grammar,
            logit_bias=tuple(sorted((self.logit_bias or {}).items())),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
        )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature if self.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0,
            top_p=self.top_p,
            stop=tuple(s for s in stop if s),
            seed=self.seed,
            rules=rules,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def tool_setup(self) -> tuple[str, list[ToolSpec]]:
        """(mode, tools the answer may call); mode none when no tools apply."""
        return chosen_tools(tool_specs(self.tools or []), self.tool_choice)

    def to_generation_input(self, max_tokens_cap: int | None = None) -> GenerationInput:
        mode, tools = self.tool_setup()
        grammar = self.grammar()
        if mode != "none":
            if grammar is not None:
                raise BadRequestError("response_format cannot be combined with tools", param="response_format")
            grammar = tool_call_grammar(tools, mode, self.parallel_tool_calls)
        # `max_completion_tokens` is the newer name; it wins when both are given.
        params = self.sampling_params(self.max_completion_tokens or self.max_tokens, max_tokens_cap, grammar)
        dumped = [m.model_dump(exclude_none=True, exclude={"tool_calls"}) for m in self.messages]
        for message, source in zip(dumped, self.messages, strict=True):
            if source.tool_calls:
                message["tool_calls"] = [call.model_dump() for call in source.tool_calls]
        messages = history_messages(dumped)
        if mode != "none":
            messages = _with_system(messages, tools_prompt(tools, mode, self.parallel_tool_calls))
        # The engine wants `content` on every message; an assistant turn may have none.
        return GenerationInput(
            params=params, messages=tuple({**m, "content": m.get("content") or ""} for m in messages)
        )


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`text` appended to the first system message, or a new system message first."""
    if messages and messages[0].get("role") in ("system", "developer") and isinstance(messages[0].get("content"), str):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError(f"`prompt` must be one string; got a list of {len(self.prompt)}")
        return self

    def to_generation_input(self, max_tokens_cap: int | None = None) -> GenerationInput:
        prompt = self.prompt[0] if isinstance(self.prompt, list) else self.prompt
        params = self.sampling_params(self.max_tokens, max_tokens_cap, self.grammar())
        return GenerationInput(params=params, prompt=prompt)


# --------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = Literal["stop", "length", "tool_calls"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallItem] | None = None


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaToolCall(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str  # the role: what clients put in `model`
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rayfit"
    root: str  # the Hugging Face model id (also accepted as `model`)
    max_model_len: int | None = None
    multimodal: bool = False


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo

    @classmethod
    def of(cls, message: str, *, type: str, code: int | str | None = None, param: str | None = None) -> ErrorResponse:
        return cls(error=ErrorInfo(message=message, type=type, param=param, code=code))


# ------------------------------------------------ engine output → response


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def _finish(reason: str | None) -> Literal["stop", "length"] | None:
    # The engine reports only "stop" or "length"; anything else reads as stop.
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def _tool_items(calls: list[ToolCall]) -> list[ToolCallItem]:
    return [ToolCallItem(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def chat_choice(output: GenerationOutput, tools: list[ToolSpec], index: int = 0) -> ChatCompletionChoice:
    """One choice; an answer that is a valid call of `tools` becomes `tool_calls`."""
    calls = parse_tool_calls(output.text, tools) if tools else None
    if calls:
        return ChatCompletionChoice(
            index=index,
            message=AssistantMessage(content=None, tool_calls=_tool_items(calls)),
            finish_reason="tool_calls",
        )
    message = AssistantMessage(content=output.text)
    return ChatCompletionChoice(index=index, message=message, finish_reason=_finish(output.finish_reason))


def chat_response(
    outputs: GenerationOutput | list[GenerationOutput],
    model: str,
    request_id: str | None = None,
    tools: list[ToolSpec] | None = None,
) -> ChatCompletionResponse:
    outputs = outputs if isinstance(outputs, list) else [outputs]
    return ChatCompletionResponse(
        id=request_id or new_id("chatcmpl"),
        created=now(),
        model=model,
        choices=[chat_choice(output, tools or [], index) for index, output in enumerate(outputs)],
        usage=_usage(outputs),
    )


def _usage(outputs: list[GenerationOutput]) -> UsageInfo:
    # n choices of one prompt: the prompt is counted once, every choice's tokens add up.
    return UsageInfo.of(outputs[0].prompt_tokens, sum(o.completion_tokens for o in outputs))


def completion_response(
    outputs: GenerationOutput | list[GenerationOutput], model: str, request_id: str | None = None
) -> CompletionResponse:
    outputs = outputs if isinstance(outputs, list) else [outputs]
    return CompletionResponse(
        id=request_id or new_id("cmpl"),
        created=now(),
        model=model,
        choices=[
            CompletionChoice(index=index, text=output.text, finish_reason=_finish(output.finish_reason))
            for index, output in enumerate(outputs)
        ],
        usage=_usage(outputs),
    )


class ChatStreamConverter:
    """Turns engine `StreamDelta`s into OpenAI chat chunks for one request.

    The first chunk carries `role: assistant`; the last carries `finish_reason`;
    with `include_usage` a final chunk with empty `choices` carries usage, as
    OpenAI does. With `tools`, an answer that opens with "{" (the tool-call
    object) is held back until it ends, then sent as one `delta.tool_calls`
    chunk (index, id, name, whole arguments); prose streams as it comes.
    """

    def __init__(
        self,
        model: str,
        *,
        include_usage: bool = False,
        request_id: str | None = None,
        tools: list[ToolSpec] | None = None,
    ):
        self.model = model
        self.include_usage = include_usage
        self.id = request_id or new_id("chatcmpl")
        self.created = now()
        self.tools = tools or []
        self._sent_role = False
        self._hold = ToolCallHoldBack(self.tools)

    def _chunk(self, delta: DeltaMessage, finish: str | None, usage: UsageInfo | None = None):
        choices = [] if usage is not None else [ChatCompletionStreamChoice(delta=delta, finish_reason=finish)]
        return ChatCompletionStreamResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def convert(self, delta: StreamDelta) -> list[ChatCompletionStreamResponse]:
        chunks = []
        if not self._sent_role:
            chunks.append(self._chunk(DeltaMessage(role="assistant", content=""), None))
            self._sent_role = True
        finished = delta.finish_reason is not None
        text, calls = self._hold.feed(delta.text, finished)
        if calls:
            items = [
                DeltaToolCall(index=i, id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                for i, c in enumerate(calls)
            ]
            chunks.append(self._chunk(DeltaMessage(tool_calls=items), "tool_calls"))
        elif text or finished:
            chunks.append(self._chunk(DeltaMessage(content=text or None), _finish(delta.finish_reason)))
        if finished and self.include_usage:
            chunks.append(
                self._chunk(DeltaMessage(), None, UsageInfo.of(delta.prompt_tokens or 0, delta.completion_tokens or 0))
            )
        return chunks


class CompletionStreamConverter:
    """Turns engine `StreamDelta`s into OpenAI completion chunks for one request."""

    def __init__(self, model: str, *, include_usage: bool = False, request_id: str | None = None):
        self.model = model
        self.include_usage = include_usage
        self.id = request_id or new_id("cmpl")
        self.created = now()

    def convert(self, delta: StreamDelta) -> list[CompletionStreamResponse]:
        chunks = []
        if delta.text or delta.finish_reason is not None:
            choice = CompletionChoice(text=delta.text, finish_reason=_finish(delta.finish_reason))
            chunks.append(
                CompletionStreamResponse(id=self.id, created=self.created, model=self.model, choices=[choice])
            )
        if delta.finish_reason is not None and self.include_usage:
            usage = UsageInfo.of(delta.prompt_tokens or 0, delta.completion_tokens or 0)
            chunks.append(
                CompletionStreamResponse(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)
            )
        return chunks


def sse_lines(chunks: Iterable[BaseModel]) -> str:
    """Server-sent-event text for chunks: one `data: {json}` block each."""
    return "".join(f"data: {c.model_dump_json(exclude_none=False)}\n\n" for c in chunks)


SSE_DONE = "data: [DONE]\n\n"


def error_body(message: str, *, type: str, code: int, param: str | None = None) -> dict[str, Any]:
    return ErrorResponse.of(message, type=type, code=code, param=param).model_dump()
