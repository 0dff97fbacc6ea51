"""One more model on the running cluster: does it fit now, where, and does any running model move?

The answer is two plans on the same live inventory: the config as it runs
(`before`) and the config with the new model (`after`). The planner is stable
(placement.planner: the running app's own GPU memory counts as available, an
entry depends only on its model and its GPU), so `before` is the plan the
running app was deployed with, and every running role whose entry is the same
in `after` keeps its replica on a redeploy (deployments.versions). The planner
places the largest model first, so a new model larger than a running one may
take its GPU: that answer says which running models would move.

The new model is written as one of:
- `MODEL`: a hub id, a local directory or .gguf file, or `demo:<name>`; the role is
  the model's last path part, lower-cased (letters, digits, `_`, `-`);
- `ROLE=MODEL`;
- a one-role YAML entry as in model_configs.yaml, e.g. `{extra: {model: org/m, memory_gb: 3}}`.

Nothing is deployed: this only plans.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from placement.calibration import CalibrationKey, Measurement, calibrated
from placement.config import ConfigError, ModelSpec, parse_model_configs
from placement.estimate import MemoryEstimate
from placement.inventory import Inventory, Reserve
from placement.plan import Plan, PlanEntry, PlanError
from placement.rules import SizeRules
from placement.units import gib

Verdict = Literal["fits", "moves", "no_room"]


def parse_addition(text: str) -> tuple[str, ModelSpec]:
    """(role, spec as written) from `MODEL`, `ROLE=MODEL` or a one-role YAML entry; ConfigError otherwise."""
    text = text.strip()
    if not text:
        raise ConfigError("--add: empty; give MODEL, ROLE=MODEL or a one-role YAML entry")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        loaded = None
    if isinstance(loaded, dict):
        models = parse_model_configs(text, source="--add").models
        if len(models) != 1:
            raise ConfigError(f"--add: one role expected, found {len(models)} ({', '.join(models)})")
        ((role, spec),) = models.items()
        return role, spec
    role, sep, model = text.partition("=")
    if not sep:
        model = text
        role = re.sub(r"[^a-z0-9_-]+", "-", re.split(r"[/:]", text.rstrip("/"))[-1].lower()).strip("-_")
        role = role.removesuffix(".gguf") if role else role
        if not role or not role[0].isalpha():
            role = f"model-{role}".rstrip("-")
    models = parse_model_configs(yaml.safe_dump({role.strip(): {"model": model.strip()}}), source="--add").models
    ((role, spec),) = models.items()
    return role, spec


@dataclass(frozen=True)
class Addition:
    """The answer: `verdict` "fits" (placed, no running model moves), "moves" (placed only by moving the
    running models in `moved`), or "no_room" (`error` says what it needs and what each place has)."""

    role: str
    model: str
    verdict: Verdict
    entry: PlanEntry | None = None
    moved: tuple[tuple[str, str, str], ...] = ()  # (role, where it runs now, where it would go)
    error: str = ""
    needed_bytes: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fits(self) -> bool:
        return self.verdict == "fits"

    def describe(self) -> str:
        if self.verdict == "no_room":
            return f"{self.role} ({self.model}) does not fit the running cluster now: {self.error}"
        assert self.entry is not None
        where = f"{self.entry.device_label} on node {self.entry.node_id[:12]}"
        what = f"{self.role} ({self.model}) fits: {where}, budget {gib(self.entry.memory_budget_bytes)}"
        if self.verdict == "fits":
            return f"{what}; no running model moves"
        moves = "; ".join(f"{role}: {now} → {then}" for role, now, then in self.moved)
        return f"{what}, but only if running models move (their replicas restart): {moves}"

    def as_dict(self) -> dict[str, Any]:
        entry = self.entry
        return {
            "role": self.role,
            "model": self.model,
            "verdict": self.verdict,
            "fits": self.fits,
            "answer": self.describe(),
            "device": entry.device_label if entry else None,
            "node_id": entry.node_id if entry else None,
            "gpu_indices": list(entry.gpu_indices) if entry else [],
            "fraction": entry.fraction if entry else None,
            "memory_budget_bytes": entry.memory_budget_bytes if entry else None,
            "estimate_source": entry.estimate.source_label if entry else None,
            "reason": entry.reason if entry else None,
            "moved": [{"role": r, "now": now, "then": then} for r, now, then in self.moved],
            "needed_bytes": self.needed_bytes,
            "error": self.error or None,
            "notes": list(self.notes),
        }


def _where(entry: PlanEntry) -> str:
    return f"{entry.device_label} on node {entry.node_id[:12]}"


def check_addition(
    written: Mapping[str, ModelSpec],
    role: str,
    spec: ModelSpec,
    inventory: Inventory,
    *,
    resolve: Callable[[ModelSpec], ModelSpec],
    estimate: Callable[[ModelSpec], MemoryEstimate],
    rules: SizeRules | None = None,
    reserve: Reserve | None = None,
    measurements: Mapping[CalibrationKey, Measurement] | None = None,
) -> Addition:
    """Plan `written` (the running config, as written) with and without `role`; see the module's docstring.

    `resolve` turns a spec as written into a loadable one (demo names); `estimate` sizes it; `measurements`
    replace estimates where a replica was measured (placement.calibration). Raises PlanError when the
    running config itself no longer fits (then `before` is not what runs), ValueError when `role` runs."""
    if role in written:
        raise ValueError(f"role {role!r} is already in the config; name the new model another role (ROLE=MODEL)")
    every = {**written, role: spec}
    resolved = {r: resolve(s) for r, s in every.items()}
    estimates = {r: estimate(s) for r, s in resolved.items()}
    if measurements:
        estimates = calibrated(every, estimates, inventory, measurements)
    from placement.planner import make_plan

    running = {r: resolved[r] for r in written}
    before = make_plan(running, inventory, rules=rules, reserve=reserve, estimates=estimates)
    try:
        after = make_plan(resolved, inventory, rules=rules, reserve=reserve, estimates=estimates)
    except PlanError as exc:
        mine = [u for u in exc.unplaced if u.role == role]
        notes = tuple(f"{u.role} would no longer fit either: {u.why}" for u in exc.unplaced if u.role != role)
        needed = mine[0].needed_bytes + mine[0].context_bytes * mine[0].contexts if mine else None
        return Addition(role, spec.model, "no_room", error=str(exc), needed_bytes=needed, notes=notes)
    return _compare(role, spec, before, after)


def _compare(role: str, spec: ModelSpec, before: Plan, after: Plan) -> Addition:
    moved = tuple(
        (entry.role, _where(entry), _where(after.entry(entry.role)))
        for entry in before.entries
        if after.entry(entry.role) != entry
    )
    entry = after.entry(role)
    return Addition(role, spec.model, "moves" if moved else "fits", entry=entry, moved=moved)


@dataclass(frozen=True)
class RunningConfig:
    """What the running app was planned from, so the ingress can answer `/v1/placement/add` as the CLI does:
    the specs as written, the reserve, the rules file, and declared GPUs (else the live Ray's)."""

    models: dict[str, ModelSpec]
    reserve: Reserve
    rules_path: str | None = None
    gpus: str | None = None
    gpu_memory_bytes: int | None = None

    def inventory(self) -> Inventory:
        """As the app reads it (deployments.app): declared GPUs with the slots this Ray has, else the live Ray's."""
        from dataclasses import replace

        import ray

        from placement.inventory import parse_gpu_spec
        from placement.ray_inventory import inventory_from_ray
        from placement.ray_options import GPU_SLOT_PREFIX

        if self.gpus is None:
            return inventory_from_ray(gpu_memory_bytes=self.gpu_memory_bytes)
        declared = parse_gpu_spec(self.gpus)
        slots = any(name.startswith(GPU_SLOT_PREFIX) for name in ray.cluster_resources())
        return Inventory(nodes=tuple(replace(node, has_gpu_slots=slots) for node in declared.nodes))


def answer_for_running(running: RunningConfig, text: str) -> dict[str, Any]:
    """`/v1/placement/add`'s answer (Addition.as_dict) on the Ray this process is connected to; ConfigError or
    ValueError for a bad `text`. No measurements: the running app was planned from estimates."""
    from placement.demo_models import resolve_demo_model
    from placement.rules import load_rules
    from placement.sizing import estimate_memory

    role, spec = parse_addition(text)
    rules = load_rules(running.rules_path) if running.rules_path else None
    answer = check_addition(
        running.models,
        role,
        spec,
        running.inventory(),
        resolve=resolve_demo_model,
        estimate=estimate_memory,
        rules=rules,
        reserve=running.reserve,
    )
    return answer.as_dict()
