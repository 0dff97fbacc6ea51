"""Size rules: ordered rules that map a model's size to a placement preference."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from placement.config import ConfigError
from placement.estimate import MemoryEstimate
from placement.units import GIB

Preference = Literal["first_gpu", "last_gpu", "most_free", "cpu"]


class SizeRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    min_params_b: float | None = None
    max_params_b: float | None = None
    min_memory_gb: float | None = None
    max_memory_gb: float | None = None
    prefer: Preference = "first_gpu"
    allow_split: bool = False
    # Only GPUs of this card (as a model's `accelerator:`); a model's own `accelerator:` wins.
    accelerator: str | None = Field(default=None, min_length=1)

    def matches(self, estimate: MemoryEstimate) -> bool:
        params_b = estimate.params / 1e9
        memory_gb = estimate.total_bytes / GIB
        bounds = (
            (self.min_params_b, params_b, True),
            (self.max_params_b, params_b, False),
            (self.min_memory_gb, memory_gb, True),
            (self.max_memory_gb, memory_gb, False),
        )
        return all(limit is None or (value >= limit if is_min else value < limit) for limit, value, is_min in bounds)


class SizeRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[SizeRule, ...] = Field(min_length=1)

    def rule_for(self, estimate: MemoryEstimate) -> SizeRule:
        """The first matching rule; a model no rule matches prefers the first GPU."""
        for rule in self.rules:
            if rule.matches(estimate):
                return rule
        return SizeRule(name="no rule matched", prefer="first_gpu")


def load_rules(path: str | Path | None = None) -> SizeRules:
    """The user's rules file, or the shipped defaults when `path` is None."""
    if path is None:
        text = resources.files("placement").joinpath("default_rules.yaml").read_text()
        source = "default_rules.yaml"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read rules file: {exc.strerror}") from exc
        source = str(path)
    try:
        return SizeRules.model_validate(yaml.safe_load(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: malformed YAML: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{source}: `{key}`: {first['msg']}") from exc
