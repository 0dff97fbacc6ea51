"""The engine's request and result types, shared by the engine, the Serve
deployment and the HTTP ingress. Plain dataclasses: no HTTP, no Ray."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings: the one value both generation backends
    (deployments.engine.pool and .side) read them from. A new setting is a
    field here plus its translation in each backend (`pool.sampling_kwargs`,
    `side.generation_config`)."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0 (top_p and seed then change nothing)."""
        return self.temperature <= 0


@dataclass(frozen=True)
class GenerationInput:
    """Either chat `messages` (OpenAI shape: role + content str or content parts
    with `text` / `image_url`) rendered by the tokenizer's chat template, or a
    raw `prompt` string."""

    params: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[dict, ...] | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class GenerationOutput:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass(frozen=True)
class StreamDelta:
    """One piece of a streamed generation; the last one has `finish_reason` and usage."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
