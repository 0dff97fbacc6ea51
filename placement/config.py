"""The user's model config (`model_configs.yaml`): one entry per role.

The file maps a role name (``summarizer``, ``buffer_agent``, ...) to a model
spec. Only ``provider`` and ``model`` are required; everything else is an
optional hint with a default. Unknown keys are refused with the file, line and
key, so a typo never silently changes placement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Quantization = Literal["auto", "nf4", "int8", "none"]

# A role becomes a Ray Serve deployment name and a URL-safe model name.
_ROLE_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


class Autoscaling(BaseModel):
    """Serve autoscaling for one role; the plan reserves memory for `max_replicas` copies, so every
    replica Serve adds has a place (ray_options turns this into the deployment's autoscaling_config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(default=1, ge=0, le=64, description="Replicas kept when idle (0: scale to zero)")
    max_replicas: int = Field(ge=1, le=64, description="Most replicas; the plan budgets this many")
    target_ongoing_requests: float = Field(default=2.0, gt=0, description="Requests per replica Serve aims for")
    upscale_delay_s: float = Field(default=30.0, ge=0, description="Load above target this long adds a replica")
    downscale_delay_s: float = Field(default=600.0, ge=0, description="Load below target this long removes one")
    metrics_interval_s: float = Field(default=10.0, gt=0, description="How often replicas report their load")
    look_back_period_s: float = Field(default=30.0, gt=0, description="Load is averaged over this window")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class ModelSpec(BaseModel):
    """One model of the user's config, validated once at the edge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["huggingface"] = "huggingface"
    model: str = Field(min_length=1, description="Hub id, local directory, or a .gguf file path")
    gguf_file: str | None = Field(default=None, description="GGUF file name inside `model` (a directory)")
    revision: str | None = None
    quantization: Quantization = "auto"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    context_length: int | None = Field(default=None, gt=0, description="Tokens per sequence; default from the model")
    max_batch_size: int = Field(default=4, gt=0, description="Concurrent sequences the KV cache is sized for")
    max_images_per_request: int = Field(
        default=4, ge=0, le=64, description="Images one request may carry (image+text models; the plan prices them)"
    )
    params_b: float | None = Field(default=None, gt=0, description="Parameter count in billions, if files are absent")
    memory_gb: float | None = Field(default=None, gt=0, description="Override the estimate: GiB the model needs")
    # Placement hints.
    gpu: int | None = Field(default=None, ge=0, description="Pin to this GPU index")
    node: str | None = Field(default=None, description="Pin to this Ray node (node id, prefix, or address)")
    share: bool = Field(default=True, description="May share a GPU with other models")
    split: bool = Field(default=False, description="May be split across GPUs of one node")
    cpu: bool = Field(default=False, description="Run on CPU")
    accelerator: str | None = Field(
        default=None,
        min_length=1,
        description="Only GPUs of this card: Ray's accelerator type (A100, H100, GeForce-RTX-3090) or its name",
    )
    num_cpus: float | None = Field(default=None, ge=0, description="CPUs Ray reserves for the replica")
    replicas: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Replicas of this model, all on its planned device, each with its own memory",
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="Serve autoscaling between min_replicas and max_replicas (instead of `replicas`)"
    )
    trust_remote_code: bool = False
    # Chat: how the model is prompted (deployments.engine.tool_formats).
    chat_template: str | None = Field(
        default=None,
        description="A Jinja chat template file to use instead of the model's own (relative: to this file)",
    )
    tool_format: Literal["auto", "json", "hermes"] = Field(
        default="auto",
        description="How tool calls are written: auto (from the chat template), json (rayfit's), hermes (<tool_call>)",
    )
    continuous_batching: bool = Field(
        default=True,
        description="Unseeded text requests share one continuous batch (transformers' paged KV pool); "
        "false runs every request on its own generate (the KV plan then budgets max_batch_size side slots)",
    )
    # Serving: where the engine runs (deployments.engine.process).
    engine_process: bool = Field(
        default=True,
        description="Run the engine (weights, KV cache, batching loop) in a process of its own next to the "
        "replica: the batching loop gets a GIL of its own instead of sharing one with Ray Serve's streaming; "
        "false keeps it inside the replica",
    )
    # Serving limits (deployment options and request checks, not placement).
    max_tokens_cap: int = Field(
        default=4096, gt=0, description="Largest max_tokens a request may ask for (400 above it)"
    )
    max_ongoing_requests: int = Field(
        default=16, gt=0, description="Requests a replica works on at once (its batch queue included)"
    )
    max_queued_requests: int = Field(
        default=64, ge=0, description="Requests waiting for a replica; beyond it the answer is 503 + Retry-After"
    )

    @model_validator(mode="after")
    def _hints_agree(self) -> ModelSpec:
        if self.cpu and (self.gpu is not None or self.split or self.accelerator):
            raise ValueError("`cpu: true` cannot be combined with `gpu`, `split: true` or `accelerator`")
        if self.gpu is not None and self.split:
            raise ValueError("`gpu` pins one GPU; drop it to allow `split: true`")
        if self.autoscaling is not None and self.replicas != 1:
            raise ValueError("set either `replicas` or `autoscaling` (its max_replicas is what the plan budgets)")
        return self

    @property
    def planned_replicas(self) -> int:
        """Copies the plan budgets memory for: `replicas`, or autoscaling's `max_replicas`."""
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    @field_validator("model")
    @classmethod
    def _model_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("`model` is empty")
        return value.strip()


class ConfigError(ValueError):
    """A model config that cannot be used; the message names file, line and key."""


@dataclass(frozen=True)
class ModelConfigs:
    """The parsed file: role → spec, in file order (planning does not depend on it)."""

    path: Path | None
    models: dict[str, ModelSpec]


def _line_of(node: yaml.Node, path: tuple[str | int, ...]) -> int | None:
    """1-based line of the YAML node at `path`, for error messages."""
    current: yaml.Node = node
    for key in path:
        if isinstance(current, yaml.MappingNode) and isinstance(key, str):
            match = [(k, v) for k, v in current.value if getattr(k, "value", None) == key]
            if not match:
                return current.start_mark.line + 1
            key_node, current = match[0]
            if key == path[-1]:
                return key_node.start_mark.line + 1
        else:
            return current.start_mark.line + 1
    return current.start_mark.line + 1


def parse_model_configs(text: str, source: str = "<string>") -> ModelConfigs:
    """Parse and validate a model config text; raise ConfigError naming file:line and key."""
    try:
        raw = yaml.safe_load(text)
        tree = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: malformed YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: expected a mapping of role name → model spec, found {type(raw).__name__}")
    models: dict[str, ModelSpec] = {}
    for role, body in raw.items():
        line = _line_of(tree, (str(role),)) if tree is not None else None
        where = f"{source}:{line}" if line else source
        if not isinstance(role, str) or not _ROLE_PATTERN.match(role):
            raise ConfigError(f"{where}: role name {role!r} must start with a letter and use letters, digits, _ or -")
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: `{role}` must be a mapping with at least `model:`")
        try:
            models[role] = ModelSpec.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            key_path = tuple(str(p) for p in first["loc"])
            key_line = _line_of(tree, (str(role), *key_path)) if key_path else line
            key = ".".join((role, *key_path))
            message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
            raise ConfigError(f"{source}:{key_line}: `{key}`: {message}") from exc
    return ModelConfigs(path=None, models=models)


def load_model_configs(path: str | Path) -> ModelConfigs:
    """Read `model_configs.yaml` from disk."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read model config: {exc.strerror}") from exc
    parsed = parse_model_configs(text, source=str(path))
    models = {role: _with_template_path(role, spec, path) for role, spec in parsed.models.items()}
    return ModelConfigs(path=path, models=models)


def _with_template_path(role: str, spec: ModelSpec, config_path: Path) -> ModelSpec:
    """`chat_template` made absolute (relative to the config file), and checked to exist:
    replicas run in other directories, and a missing file is a config error, not a load failure."""
    if spec.chat_template is None:
        return spec
    template = Path(spec.chat_template).expanduser()
    if not template.is_absolute():
        template = config_path.parent / template
    if not template.is_file():
        raise ConfigError(f"{config_path}: `{role}.chat_template`: no such file: {template}")
    return spec.model_copy(update={"chat_template": str(template.resolve())})
