"""The engine's request and result types, shared by the engine, the Serve
deployment and the HTTP ingress. Plain dataclasses: no HTTP, no Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deployments.engine.errors import InvalidRequest
from deployments.engine.rules import RowRules

# max_tokens when a request names none: OpenAI's is "until the context ends"; a bounded default keeps one
# forgotten `max_tokens` from holding a replica.
DEFAULT_MAX_TOKENS = 256


def checked_max_tokens(max_tokens: int | None, cap: int | None, model: str) -> int:
    """A request's max_tokens under the replica plan's cap (placement.replica): the default when it
    names none (never above the cap); InvalidRequest above the cap. `cap` None: not known here (the
    replica checks again with its plan's). The one place this rule lives."""
    if max_tokens is None:
        return DEFAULT_MAX_TOKENS if cap is None else min(DEFAULT_MAX_TOKENS, cap)
    if cap is not None and max_tokens > cap:
        raise InvalidRequest(f"max_tokens is {max_tokens} but model {model!r} allows at most {cap}")
    return max_tokens


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings: the one value both generation backends
    (deployments.engine.pool and .side) read them from. Temperature, top-p and the
    seed are transformers' own settings, translated by each backend
    (`pool.sampling_kwargs`, `side.generation_config`); every other rule on the
    logits is a `RowRules` field (deployments.engine.rules), applied the same way
    in both."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    rules: RowRules = field(default_factory=RowRules)
    # Log-probabilities of each generated token with this many alternatives (0..20); None: not asked.
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0 (top_p and seed then change nothing)."""
        return self.temperature <= 0


@dataclass(frozen=True)
class ToolSpec:
    """One function tool, checked (deployments.engine.structured.tool_specs)."""

    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        """The tool as OpenAI (and chat templates that render tools) spell it."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolRequest:
    """The tools a chat request lets the answer call, checked at the ingress. The
    replica's tool format (deployments.engine.tool_formats) tells the model about them."""

    tools: tuple[ToolSpec, ...]
    mode: str  # "auto" (prose or calls) or "required" (calls only; a named tool_choice is this, cut to one tool)
    parallel: bool = True


@dataclass(frozen=True)
class GenerationInput:
    """Either chat `messages` (OpenAI shape: role + content str or content parts
    with `text` / `image_url`, assistant `tool_calls`, `tool` turns) rendered by
    the tokenizer's chat template, or a raw `prompt` string. `tools`: what the
    answer may call (None: no tools, or tool_choice none)."""

    params: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[dict, ...] | None = None
    prompt: str | None = None
    tools: ToolRequest | None = None
    # Completions only: token ids instead of `prompt` (fed as they are); `echo`: the output carries the
    # prompt's text, and with `prompt_logprobs` each prompt token's logprob with that many alternatives.
    # With `echo`, `params.max_tokens` may be 0 (score the prompt only).
    prompt_ids: tuple[int, ...] | None = None
    echo: bool = False
    prompt_logprobs: int | None = None

    @property
    def callable_tools(self) -> list[ToolSpec]:
        """The tools the answer may call (what its tool calls are read against)."""
        return list(self.tools.tools) if self.tools is not None else []


@dataclass(frozen=True)
class GenerationOutput:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per completion token, when asked
    prompt_text: str | None = None  # with `echo`
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # one per prompt token, with echo + logprobs


@dataclass(frozen=True)
class StreamDelta:
    """One piece of a streamed generation; the last one has `finish_reason` and usage."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens this delta's text came from, when asked


@dataclass(frozen=True)
class TopLogprob:
    token: str
    bytes: tuple[int, ...]  # the token's exact bytes (a token may hold part of a UTF-8 character)
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model, and the most likely tokens at its position
    (deployments.engine.logprobs). `logprob` is None only for a prompt's first token: nothing predicts it."""

    token: str
    bytes: tuple[int, ...]
    logprob: float | None
    top: tuple[TopLogprob, ...] = ()


def image_count(inp: GenerationInput) -> int:
    """The image_url content parts of the request (counted without decoding anything)."""
    count = 0
    for message in inp.messages or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")
    return count


def requests_images(inp: GenerationInput) -> bool:
    """Whether the request carries image_url content (decided without decoding anything)."""
    return image_count(inp) > 0


def pool_takes(params: SamplingParams) -> bool:
    """Whether the continuous-batching pool can run these settings: it samples per row but has no
    per-request seed, so a seeded sampled request runs on the side backend."""
    return params.greedy or params.seed is None


@dataclass(frozen=True)
class ModelFacts:
    """What a replica reports about its loaded model, wherever its engine runs (in the replica, or in
    an engine process that sends these when it is ready)."""

    device: str  # the weights' device, e.g. "cuda:0" or "cpu"
    context_length: int
    is_multimodal: bool
    load_seconds: float
    quantization: str
    # The torch allocator's cap per local GPU (the plan's budget); empty on CPU.
    memory_caps: dict[int, int]
    # Read where the engine runs, so a replica whose engine runs apart never imports torch.
    torch_threads: int  # Ray sets OMP_NUM_THREADS from num_cpus: 0.5 CPUs compute on 1 thread
    gpu_uuids: tuple[str, ...]  # the card(s) the engine really holds, as the driver names them
    cpu_fallback: bool  # planned on a GPU, loaded on CPU (RAYFIT_ALLOW_CPU_FALLBACK, dev/test only)
