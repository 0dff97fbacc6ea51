"""OpenAI-compatible request and response models, and the one place that turns
them into the engine's types and back.

Shaped like vLLM's `entrypoints/openai/protocol.py`, but only with the fields
rayfit supports. Unknown request fields are refused (400 naming the field)
rather than silently ignored: a client asking for `tools` or `logprobs` must
learn they are not applied. Used by the HTTP ingress and by the handle client
(`deployments.client`), so both speak exactly the same types.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from deployments.errors import BadRequestError
from deployments.generation import GenerationInput, GenerationOutput, SamplingParams, StreamDelta
from deployments.images import check_image_url

# OpenAI's default when a request gives no limit is "until the context ends";
# a bounded default keeps one forgotten `max_tokens` from holding a replica.
DEFAULT_MAX_TOKENS = 256
# Below this a temperature is greedy decoding: logits / 5e-324 overflow to inf
# and sampling fails (found by the fuzz test); the limit of sampling is argmax anyway.
MIN_SAMPLING_TEMPERATURE = 1e-5


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def has_image(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImageContentPart) for p in self.content)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class _SamplingFields(OpenAIBaseModel):
    """Fields common to chat and completions, in the OpenAI docs' order."""

    model: str
    max_tokens: int | None = Field(default=None, gt=0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, description="Only 1 is supported")
    user: str | None = None  # accepted for client compatibility; not used

    @model_validator(mode="after")
    def _only_one_choice(self) -> _SamplingFields:
        if self.n != 1:
            raise ValueError(f"n={self.n} is not supported: rayfit returns exactly one choice (n=1)")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("`stop` takes at most 4 sequences")
        return self

    def sampling_params(self, max_tokens: int | None = None, max_tokens_cap: int | None = None) -> SamplingParams:
        """`max_tokens_cap`: the model's limit (ModelSpec.max_tokens_cap); above it is a 400; the default obeys it."""
        if max_tokens is not None and max_tokens_cap is not None and max_tokens > max_tokens_cap:
            raise BadRequestError(
                f"max_tokens is {max_tokens} but model {self.model!r} allows at most {max_tokens_cap}",
                param="max_tokens",
            )
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_cap or DEFAULT_MAX_TOKENS)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature if self.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0,
            top_p=self.top_p,
            stop=tuple(s for s in stop if s),
            seed=self.seed,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)

    def to_generation_input(self, max_tokens_cap: int | None = None) -> GenerationInput:
        # `max_completion_tokens` is the newer name; it wins when both are given.
        params = self.sampling_params(self.max_completion_tokens or self.max_tokens, max_tokens_cap)
        # The engine wants `content` on every message; an assistant turn may have none.
        messages = tuple({"content": "", **m.model_dump(exclude_none=True)} for m in self.messages)
        return GenerationInput(params=params, messages=messages)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError(f"`prompt` must be one string; got a list of {len(self.prompt)}")
        return self

    def to_generation_input(self, max_tokens_cap: int | None = None) -> GenerationInput:
        prompt = self.prompt[0] if isinstance(self.prompt, list) else self.prompt
        return GenerationInput(params=self.sampling_params(self.max_tokens, max_tokens_cap), prompt=prompt)


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None
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


def chat_response(output: GenerationOutput, model: str, request_id: str | None = None) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=request_id or new_id("chatcmpl"),
        created=now(),
        model=model,
        choices=[
            ChatCompletionChoice(
                message=AssistantMessage(content=output.text), finish_reason=_finish(output.finish_reason)
            )
        ],
        usage=UsageInfo.of(output.prompt_tokens, output.completion_tokens),
    )


def completion_response(output: GenerationOutput, model: str, request_id: str | None = None) -> CompletionResponse:
    return CompletionResponse(
        id=request_id or new_id("cmpl"),
        created=now(),
        model=model,
        choices=[CompletionChoice(text=output.text, finish_reason=_finish(output.finish_reason))],
        usage=UsageInfo.of(output.prompt_tokens, output.completion_tokens),
    )


class ChatStreamConverter:
    """Turns engine `StreamDelta`s into OpenAI chat chunks for one request.

    The first chunk carries `role: assistant`; the last carries `finish_reason`;
    with `include_usage` a final chunk with empty `choices` carries usage, as
    OpenAI does.
    """

    def __init__(self, model: str, *, include_usage: bool = False, request_id: str | None = None):
        self.model = model
        self.include_usage = include_usage
        self.id = request_id or new_id("chatcmpl")
        self.created = now()
        self._sent_role = False

    def _chunk(self, delta: DeltaMessage, finish: str | None, usage: UsageInfo | None = None):
        choices = [] if usage is not None else [ChatCompletionStreamChoice(delta=delta, finish_reason=_finish(finish))]
        return ChatCompletionStreamResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def convert(self, delta: StreamDelta) -> list[ChatCompletionStreamResponse]:
        chunks = []
        if not self._sent_role:
            chunks.append(self._chunk(DeltaMessage(role="assistant", content=""), None))
            self._sent_role = True
        if delta.text or delta.finish_reason is not None:
            chunks.append(self._chunk(DeltaMessage(content=delta.text or None), delta.finish_reason))
        if delta.finish_reason is not None and self.include_usage:
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
