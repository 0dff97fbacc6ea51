"""OpenAI-compatible request and response models, and the one place that turns
them into the engine's types and back.

Shaped like vLLM's `entrypoints/openai/protocol.py`. The field policy
(README "Request fields"):
- fields rayfit applies: sampling (`temperature`, `top_p`, `top_k`, `min_p`,
  `seed`), penalties (`presence_penalty`, `frequency_penalty`,
  `repetition_penalty`, `logit_bias`), length (`max_tokens`,
  `max_completion_tokens`, `min_tokens`, `ignore_eos`, `stop`), `n`,
  `response_format`, `tools` / `tool_choice` / `parallel_tool_calls`,
  `stream_options` (`include_usage`, `continuous_usage_stats`), `logprobs` /
  `top_logprobs` (chat), `logprobs` / `echo` and token-id prompts
  (completions; deployments.openai_api.logprobs);
- fields that change nothing here (`user`, `metadata`, `store`, ...) and any
  field rayfit does not know are accepted and ignored (listed by
  `ignored_fields`, which the ingress logs at debug), as vLLM and Ollama do;
- fields that ask for behaviour rayfit cannot give (audio output, `suffix`,
  `prediction`, web search) are a 400 naming the field.
Used by the HTTP ingress and by the handle client (`deployments.client`), so
both speak exactly the same types.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deployments.engine.errors import BadRequestError, InvalidRequest, validation_error
from deployments.engine.generation import (
    GenerationInput,
    GenerationOutput,
    SamplingParams,
    StreamDelta,
    ToolRequest,
    checked_max_tokens,
)
from deployments.engine.images import check_image_url
from deployments.engine.rules import RowRules
from deployments.engine.structured import (
    ToolCall,
    ToolCallHoldBack,
    ToolSpec,
    chosen_tools,
    parse_tool_calls,
    response_format_grammar,
    tool_call_grammar,
    tool_specs,
)
from deployments.openai_api.logprobs import (
    MAX_CHAT_TOP_LOGPROBS,
    MAX_COMPLETION_LOGPROBS,
    ChoiceLogprobs,
    CompletionLogprobs,
    chat_logprobs,
    completion_logprobs,
    next_offset,
)

# Below this a temperature is greedy decoding: logits / 5e-324 overflow to inf
# and sampling fails (found by the fuzz test); the limit of sampling is argmax anyway.
MIN_SAMPLING_TEMPERATURE = 1e-5
# The largest seed torch.manual_seed takes (the smallest is -(2**63)).
MAX_SEED = 2**64 - 1
# Choices one request may ask for (`n`): each is its own generation.
MAX_CHOICES = 8
# Prompts one completions request may carry (lm-evaluation-harness batches its requests this way):
# each is its own generation, so more belong in more requests.
MAX_PROMPTS = 32
# Fields that ask for something rayfit does not do: a 400 naming the field when set.
UNSUPPORTED_FIELDS = {
    "suffix": "insertion (suffix) is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the legacy `functions` field is not supported; use `tools`",
    "function_call": "the legacy `function_call` field is not supported; use `tool_choice`",
}


def lone_surrogate(data: Any) -> str | None:
    """The path of the first string in `data` (a parsed body; keys too) that is not Unicode text: one
    holding a lone surrogate, which JSON's `\\ud800` escape can carry but no tokenizer takes."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(value, dict):
            # A key that is not text is named by where it is (the error must be sendable as JSON).
            stack += [(path, key) for key in value]
            stack += [(f"{path}.{key}" if path else str(key), item) for key, item in value.items()]
        elif isinstance(value, list):
            stack += [(f"{path}.{index}" if path else str(index), item) for index, item in enumerate(value)]
    return None


def refuse_lone_surrogates(data: Any) -> None:
    path = lone_surrogate(data)
    if path is not None:
        raise BadRequestError(f"{path}: text with a lone surrogate (\\ud800-\\udfff) is not valid Unicode", param=path)


class OpenAIBaseModel(BaseModel):
    # Parts of a request: fields rayfit does not read (an SDK's `refusal`, `annotations`, ...) are ignored.
    model_config = ConfigDict(extra="ignore")


class NamedErrorsModel(BaseModel):
    """A whole request body (chat, completions, responses): unknown fields are kept aside, never an
    error; a validation error is a 400 naming the field as sent."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="wrap")
    @classmethod
    def _named_errors(cls, data: Any, handler: Any) -> Any:
        # pydantic's loc also names union members (`content.str`, `input.list[...].0`): not the field sent.
        refuse_lone_surrogates(data)
        try:
            return handler(data)
        except ValidationError as exc:
            raise validation_error(exc, data) from None


class _RequestModel(NamedErrorsModel):
    # Chat and completions: unknown fields are reported as ignored (`ignored_fields`).

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
    # The final assistant message is the start of the answer, to continue (Mistral's and DeepSeek's name).
    prefix: bool | None = None

    def has_image(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImageContentPart) for p in self.content)


# The shapes of the fields that hold free-form JSON (tools, tool_choice, response_format): checked
# before anything reads them, so a value of the wrong shape (`function: "x"`, `json_schema: 5`) is a
# 400 naming the field, never an exception in the code that reads it. What the values mean (known
# tool types, valid JSON schemas, which response formats exist) is deployments.engine.structured's to check.


def _schema_shape(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON schema object whose `$schema`, if any, is a URI string (jsonschema looks it up)."""
    if schema is not None and "$schema" in schema:
        uri = schema["$schema"]
        if not isinstance(uri, str):
            raise ValueError("`$schema` must be a URI string")
        try:
            urlsplit(uri)
        except ValueError as exc:
            raise ValueError(f"`$schema` is not a URI: {exc}") from None
    return schema


JsonSchema = Annotated[dict[str, Any], AfterValidator(_schema_shape)]


class FunctionDefinition(OpenAIBaseModel):
    name: str | None = None  # required: deployments.engine.structured.tool_specs says so
    description: str | None = None
    parameters: JsonSchema | None = None
    strict: bool | None = None


class ToolShape(OpenAIBaseModel):
    type: str = "function"
    function: FunctionDefinition | None = None


class NamedFunction(OpenAIBaseModel):
    name: str


class ToolChoiceShape(OpenAIBaseModel):
    type: str = "function"
    function: NamedFunction


class JsonSchemaSpec(OpenAIBaseModel):
    name: str | None = None
    description: str | None = None
    schema_: JsonSchema | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatShape(OpenAIBaseModel):
    type: str | None = None
    json_schema: JsonSchemaSpec | None = None


def _shape_checked(value: Any, shape: type[BaseModel], param: str) -> None:
    try:
        shape.model_validate(value)
    except ValidationError as exc:
        raise validation_error(exc, value, prefix=param) from None


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage in every chunk (vLLM's field; GuideLLM sends it)


class _SamplingFields(_RequestModel):
    """Fields common to chat and completions, in the OpenAI docs' order."""

    model: str
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100, le=100)]] | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    response_format: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=MAX_SEED)  # what torch.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # Beyond OpenAI, as vLLM names them.
    top_k: int = Field(default=0, ge=-1, description="0 or -1: off")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    # Seen tokens' positive logits are divided by it: near 0 they overflow to inf and sampling fails (the fuzz test).
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=10.0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _check(self) -> _SamplingFields:
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise BadRequestError("`stop` takes at most 4 sequences", param="stop")
        if self.n > 1 and self.stream:
            raise BadRequestError("n > 1 is not supported with stream: true", param="n")
        if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
            # Choice i is generated with seed + i (deployments.ingress): each must be a seed torch takes.
            raise BadRequestError(f"seed + n - 1 must be at most {MAX_SEED} (choice i uses seed + i)", param="seed")
        return self

    @field_validator("response_format")
    @classmethod
    def _response_format_shape(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            _shape_checked(value, ResponseFormatShape, "response_format")
        return value

    def grammar(self) -> str | None:
        return response_format_grammar(self.response_format)

    def logprob_count(self) -> int | None:
        """Alternatives per generated token's logprob (None: no logprobs asked)."""
        return None

    def sampling_params(
        self,
        max_tokens: int | None = None,
        max_tokens_cap: int | None = None,
        grammar: str | None = None,
        max_tokens_field: str = "max_tokens",
    ) -> SamplingParams:
        """`max_tokens_cap`: the model's limit (its replica plan's); above it is a 400 naming `max_tokens_field`
        (the field `max_tokens` came from); the default obeys it (deployments.engine.generation.checked_max_tokens).
        None: the caller checks later (the replica does)."""
        try:
            max_tokens = checked_max_tokens(max_tokens, max_tokens_cap, self.model)
        except InvalidRequest as exc:
            message = str(exc).replace("max_tokens", max_tokens_field, 1)
            raise BadRequestError(message, param=max_tokens_field) from None
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
            logprobs=self.logprob_count(),
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
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    # vLLM's names. A final assistant message is answered by a new turn (as OpenAI and vLLM do),
    # or, with `continue_final_message` (or `prefix: true` on it), continued: a prefilled answer.
    continue_final_message: bool = False
    add_generation_prompt: bool = True

    @field_validator("tools")
    @classmethod
    def _tools_shape(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for index, tool in enumerate(tools or []):
            _shape_checked(tool, ToolShape, f"tools.{index}")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_shape(cls, choice: Any) -> Any:
        if isinstance(choice, dict):
            _shape_checked(choice, ToolChoiceShape, "tool_choice")
        return choice

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        return self

    @model_validator(mode="after")
    def _check_prefill(self) -> ChatCompletionRequest:
        if (
            self.continue_final_message
            and "add_generation_prompt" in self.model_fields_set
            and self.add_generation_prompt
        ):
            raise BadRequestError(
                "continue_final_message continues the final message; add_generation_prompt: true would open a new "
                "turn instead: send add_generation_prompt: false (or leave it out)",
                param="add_generation_prompt",
            )
        if not self.add_generation_prompt and not self.prefilled:
            raise BadRequestError(
                "add_generation_prompt: false is supported only with continue_final_message: true",
                param="add_generation_prompt",
            )
        marked = [i for i, m in enumerate(self.messages) if m.prefix]
        if marked and marked != [len(self.messages) - 1]:
            raise BadRequestError("only the final message can have `prefix: true`", param=f"messages.{marked[0]}")
        if self.prefilled and self.messages[-1].role != "assistant":
            raise BadRequestError(
                "continue_final_message (or `prefix`) needs an assistant message last, the answer's start; "
                f"the last message is {self.messages[-1].role!r}",
                param="messages",
            )
        return self

    @property
    def prefilled(self) -> bool:
        """Whether the answer continues the final (assistant) message."""
        return self.continue_final_message or bool(self.messages[-1].prefix)

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_setup(self) -> tuple[str, list[ToolSpec]]:
        """(mode, tools the answer may call); mode none when no tools apply."""
        return chosen_tools(tool_specs(self.tools or []), self.tool_choice)

    def to_generation_input(self, max_tokens_cap: int | None = None) -> GenerationInput:
        mode, tools = self.tool_setup()
        grammar = self.grammar()
        if self.prefilled and (mode != "none" or grammar is not None):
            # The grammar would start after the prefilled text, as if nothing had been written yet.
            param = "tools" if mode != "none" else "response_format"
            raise BadRequestError(
                f"a prefilled answer (continue_final_message) cannot be combined with {param}", param=param
            )
        if mode != "none":
            if grammar is not None:
                raise BadRequestError("response_format cannot be combined with tools", param="response_format")
            # rayfit's JSON call format; building it checks the tool schemas here, before any
            # replica. A model whose template has its own format swaps it (deployments.engine.tool_formats).
            grammar = tool_call_grammar(tools, mode, self.parallel_tool_calls)
        # `max_completion_tokens` is the newer name; it wins when both are given.
        field = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
        params = self.sampling_params(self.max_completion_tokens or self.max_tokens, max_tokens_cap, grammar, field)
        dumped = [m.model_dump(exclude_none=True, exclude={"tool_calls", "prefix"}) for m in self.messages]
        if self.prefilled:
            dumped[-1]["prefix"] = True  # deployments.engine.prompts continues it
        for message, source in zip(dumped, self.messages, strict=True):
            if source.tool_calls:
                message["tool_calls"] = [call.model_dump() for call in source.tool_calls]
        tool_request = ToolRequest(tuple(tools), mode, self.parallel_tool_calls) if mode != "none" else None
        # The engine wants `content` on every message; an assistant turn may have none.
        return GenerationInput(
            params=params,
            messages=tuple({**m, "content": m.get("content") or ""} for m in dumped),
            tools=tool_request,
        )


TokenId = Annotated[int, Field(ge=0)]  # below the vocabulary's size too: the replica checks that


class CompletionRequest(_SamplingFields):
    """`prompt`: a string, token ids, or a list of either (each its own choices, in order).
    `logprobs` (0..5) alternatives per token; `echo` puts the prompt before the answer (with
    `logprobs`, its tokens' logprobs too); `max_tokens: 0` with `echo` scores the prompt only."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _check_prompts(self) -> CompletionRequest:
        prompts = self.prompts()
        if not prompts or not all(prompts):
            # "" too: a tokenizer that adds no BOS (SmolLM2's) makes it a prompt of no tokens, which the
            # model cannot run (found by the fuzz benchmark: every request in its batch failed).
            index = next((i for i, p in enumerate(prompts) if not p), None)
            whole = index is None or prompts == [self.prompt]  # one prompt (text or token ids), or none
            param = "prompt" if whole else f"prompt.{index}"
            raise BadRequestError("`prompt` is empty", param=param)
        if len(prompts) > MAX_PROMPTS:
            raise BadRequestError(f"`prompt` holds {len(prompts)} prompts; at most {MAX_PROMPTS}", param="prompt")
        if self.stream and len(prompts) > 1:
            raise BadRequestError("several prompts are not supported with stream: true", param="prompt")
        if self.stream and self.echo:
            raise BadRequestError("echo is not supported with stream: true", param="echo")
        if self.max_tokens == 0 and not self.echo:
            raise BadRequestError("max_tokens 0 only scores the prompt: it needs echo: true", param="max_tokens")
        return self

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(token, int) for token in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]  # one prompt of token ids
        return list(self.prompt)  # type: ignore[arg-type]

    def logprob_count(self) -> int | None:
        return self.logprobs

    def to_generation_inputs(self, max_tokens_cap: int | None = None) -> list[GenerationInput]:
        params = self.sampling_params(self.max_tokens, max_tokens_cap, self.grammar())
        prompt_logprobs = self.logprobs if self.echo else None
        return [
            GenerationInput(params=params, prompt=p, echo=self.echo, prompt_logprobs=prompt_logprobs)
            if isinstance(p, str)
            else GenerationInput(params=params, prompt_ids=tuple(p), echo=self.echo, prompt_logprobs=prompt_logprobs)
            for p in self.prompts()
        ]

    def to_generation_input(self, max_tokens_cap: int | None = None) -> GenerationInput:
        """The first prompt's input (a request of one prompt)."""
        return self.to_generation_inputs(max_tokens_cap)[0]


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
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: CompletionLogprobs | None = None


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
            logprobs=chat_logprobs(output.logprobs),
        )
    message = AssistantMessage(content=output.text)
    return ChatCompletionChoice(
        index=index,
        message=message,
        finish_reason=_finish(output.finish_reason),
        logprobs=chat_logprobs(output.logprobs),
    )


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
        usage=_usage(outputs, n=len(outputs)),  # every choice answers the one conversation
    )


def _usage(outputs: list[GenerationOutput], n: int = 1) -> UsageInfo:
    # n choices per prompt: each prompt is counted once, every choice's tokens add up.
    prompts = sum(o.prompt_tokens for o in outputs[::n])
    return UsageInfo.of(prompts, sum(o.completion_tokens for o in outputs))


def completion_choice(output: GenerationOutput, index: int = 0) -> CompletionChoice:
    """One choice; with echo the prompt comes first, in the text and (with logprobs) in the logprobs."""
    text = (output.prompt_text or "") + output.text
    logprobs = None
    if output.logprobs is not None or output.prompt_logprobs is not None:
        logprobs = completion_logprobs((*(output.prompt_logprobs or ()), *(output.logprobs or ())))
    return CompletionChoice(index=index, text=text, finish_reason=_finish(output.finish_reason), logprobs=logprobs)


def completion_response(
    outputs: GenerationOutput | list[GenerationOutput], model: str, request_id: str | None = None, n: int = 1
) -> CompletionResponse:
    """`outputs`: n choices per prompt, prompt by prompt."""
    outputs = outputs if isinstance(outputs, list) else [outputs]
    return CompletionResponse(
        id=request_id or new_id("cmpl"),
        created=now(),
        model=model,
        choices=[completion_choice(output, index) for index, output in enumerate(outputs)],
        usage=_usage(outputs, n),
    )


class ChatStreamConverter:
    """Turns engine `StreamDelta`s into OpenAI chat chunks for one request.

    The first chunk carries `role: assistant`; the last carries `finish_reason`;
    with `include_usage` a final chunk with empty `choices` carries usage, as
    OpenAI does. With `tools`, an answer that opens with "{" (the tool-call
    object) is held back until it ends, then sent as one `delta.tool_calls`
    chunk (index, id, name, whole arguments); prose streams as it comes. Logprobs
    go with the chunk that sends their text (held back with it).
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
        self._held_logprobs: tuple = ()  # TokenLogprob entries whose text is not sent yet

    def _chunk(self, delta: DeltaMessage, finish: str | None, usage: UsageInfo | None = None):
        logprobs = None
        if usage is None and self._held_logprobs and (delta.content or delta.tool_calls or finish):
            logprobs, self._held_logprobs = chat_logprobs(self._held_logprobs), ()
        choices = (
            []
            if usage is not None
            else [ChatCompletionStreamChoice(delta=delta, finish_reason=finish, logprobs=logprobs)]
        )
        return ChatCompletionStreamResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def convert(self, delta: StreamDelta) -> list[ChatCompletionStreamResponse]:
        chunks = []
        if not self._sent_role:
            chunks.append(self._chunk(DeltaMessage(role="assistant", content=""), None))
            self._sent_role = True
        finished = delta.finish_reason is not None
        self._held_logprobs = (*self._held_logprobs, *delta.logprobs)
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
        self._offset = 0  # where the next token starts in the streamed text

    def convert(self, delta: StreamDelta) -> list[CompletionStreamResponse]:
        chunks = []
        if delta.text or delta.finish_reason is not None or delta.logprobs:
            logprobs = completion_logprobs(delta.logprobs, self._offset) if delta.logprobs else None
            self._offset = next_offset(logprobs, self._offset)
            choice = CompletionChoice(text=delta.text, finish_reason=_finish(delta.finish_reason), logprobs=logprobs)
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
