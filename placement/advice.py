"""What would make an infeasible plan feasible: each change computed by re-estimating and re-planning.

When `make_plan` finds no feasible plan, `advise` tries the nearest changes to
the user's config, one field of one role at a time, each planned with every
role (the WHOLE plan must become feasible), and keeps those that work:

- the largest `context_length` and the largest `max_batch_size` of a role that
  fit: bisection over re-estimates of that role (its KV and per-row workspaces
  are the estimator's, never a formula here); the figure fits, one more does not;
- fewer `replicas` (or a lower `autoscaling.max_replicas`): re-plans only;
- a load-time quantization, `int8` else `nf4`, for a checkpoint that is not
  pre-quantized (placement.quantization decides; a checkpoint quantized by
  another method is held as stored, so none is offered for it);
- `split: true` for a role that fits no single GPU (the plan names the GPUs);
- moving a model, the failing one or another: `gpu: N` or `cpu: true`.

When no single change fits, each move of one model (`gpu: N`, `cpu: true`) is
tried with each of the other changes to another model (`Suggestion.requires`):
the 4B on CPU and the 27B's largest context that then fits.

Every suggestion was planned: `apply(models, suggestion)` gives a config whose
plan is feasible. They are ranked by how little they change (`Suggestion.cost`,
summed over a suggestion's steps): a pin changes nothing the model serves
(PIN_COST); a split keeps every figure but spreads one model over GPUs
(SPLIT_COST); a smaller context, batch or replica count gives up that share of
what was asked (1 - new / old); a quantization gives up that share of the
weights' bits; a model on CPU runs, far slower (CPU_COST, plus up to 0.1 by the
share of all the config's bytes it moves: the 4B goes before the 27B).

Bounded for the CLI: estimates are cached per sizing-relevant part of a spec
(placement fields do not change an estimate), and at most MAX_ESTIMATES
re-estimates (~0.2-1 s each from a config) and MAX_PLANS re-plans (~ms) are
made; a search cut short by the bound says so in the advice's notes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from placement.config import ModelSpec
from placement.estimate import MemoryEstimate
from placement.inventory import Inventory, Reserve
from placement.plan import Plan, PlanError
from placement.rules import SizeRules
from placement.units import gib

Estimator = Callable[[ModelSpec], MemoryEstimate]
Kind = Literal["gpu", "split", "context_length", "max_batch_size", "replicas", "quantization", "cpu"]

# Below this a context is no use to a chat model (a system prompt alone runs to hundreds of tokens).
MIN_CONTEXT = 512
MAX_ESTIMATES = 64
MAX_PLANS = 400
PIN_COST = 0.05
SPLIT_COST = 0.1
CPU_COST = 0.9
# Equal costs rank in this order (then by role).
KIND_ORDER: tuple[Kind, ...] = ("gpu", "split", "replicas", "max_batch_size", "context_length", "quantization", "cpu")
# Fields that decide where a model goes, not how big it is: a spec differing only in these has the same estimate.
_PLACEMENT_DEFAULTS: dict[str, Any] = {
    "gpu": None,
    "node": None,
    "share": True,
    "split": False,
    "cpu": False,
    "num_cpus": None,
    "replicas": 1,
    "autoscaling": None,
}
_WEIGHT_BITS = {"nf4": 4, "int8": 8}
_DTYPE_BITS = {"bfloat16": 16, "float16": 16, "float32": 32}


@dataclass(frozen=True)
class Suggestion:
    """A change to one role's spec after which the whole plan is feasible (it was planned), made after
    `requires` (another model's move) when one change alone does not fit."""

    role: str
    kind: Kind
    change: tuple[tuple[str, Any], ...]  # spec fields → new values; "autoscaling.max_replicas" for a nested one
    before: tuple[tuple[str, Any], ...]  # the same fields as the config had them
    cost: float  # how much it changes, its requirements' included (module docstring): the ranking key
    summary: str  # one line for people
    lands: tuple[tuple[str, str], ...] = ()  # (role, device) in the feasible plan: the changed roles and the failed
    requires: tuple[Suggestion, ...] = ()  # changes made first (each infeasible alone)

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self.change)

    @property
    def steps(self) -> tuple[Suggestion, ...]:
        """Every change to make, in order: the requirements, then this one."""
        return (*self.requires, self)

    def yaml(self) -> str:
        """This step's lines under its role in model_configs.yaml, on one line: 'context_length: 18944'."""
        return ", ".join(f"{key}: {_yaml_value(value)}" for key, value in self.change)

    def describe(self) -> str:
        """Every step: 'summarizer: cpu: true + buffer_agent: context_length: 9844'."""
        return " + ".join(f"{step.role}: {step.yaml()}" for step in self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "kind": self.kind,
            "change": dict(self.change),
            "before": dict(self.before),
            "cost": round(self.cost, 4),
            "summary": self.summary,
            "lands": dict(self.lands),
            "requires": [step.as_dict() for step in self.requires],
        }


@dataclass(frozen=True)
class Advice:
    """The ranked suggestions (least change first), what was not tried and why, and the work it took."""

    suggestions: tuple[Suggestion, ...]
    notes: tuple[str, ...] = ()
    plans: int = 0
    estimates: int = 0

    def describe(self) -> str:
        """Lines for the infeasible message."""
        if not self.suggestions:
            lines = ["No change to one model's context, batch, replicas, quantization, split or device fits."]
        else:
            lines = ["Changes that make the whole plan feasible, least change first (each one planned):"]
            for rank, item in enumerate(self.suggestions, 1):
                where = ", ".join(f"{role} on {device}" for role, device in item.lands)
                why = "; ".join(step.summary for step in item.steps)
                lines.append(f"  {rank}. {item.describe()}  ({why}) → {where}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "suggestions": [s.as_dict() for s in self.suggestions],
            "notes": list(self.notes),
            "plans": self.plans,
            "estimates": self.estimates,
        }


def apply(models: Mapping[str, ModelSpec], suggestion: Suggestion) -> dict[str, ModelSpec]:
    """`models` with every step of the suggestion made (each spec validated as a config file's is)."""
    changed = dict(models)
    for step in suggestion.steps:
        data = changed[step.role].model_dump()
        for key, value in step.change:
            outer, _, inner = key.partition(".")
            if inner:
                data[outer] = {**(data[outer] or {}), inner: value}
            else:
                data[key] = value
        changed[step.role] = ModelSpec.model_validate(data)
    return changed


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _sizing_key(spec: ModelSpec) -> ModelSpec:
    """The part of a spec its estimate depends on (placement fields reset)."""
    return spec.model_copy(update=_PLACEMENT_DEFAULTS)


def _estimate_memory(spec: ModelSpec) -> MemoryEstimate:
    from placement.sizing import estimate_memory  # heavy (torch): only once a plan failed

    return estimate_memory(spec)


@dataclass
class _Shared:
    """What every search of one `advise` call shares: the estimates cache, the counts and the notes."""

    estimate: Estimator
    cache: dict[ModelSpec, MemoryEstimate | None]
    plans: int = 0
    estimates: int = 0
    cut_short: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Trials:
    """One base config to change, and how to plan it (the searches' view)."""

    models: Mapping[str, ModelSpec]
    inventory: Inventory
    rules: SizeRules | None
    reserve: Reserve | None
    failed: tuple[str, ...]  # the roles the user's config could not place
    shared: _Shared
    moved: Suggestion | None = None  # the move this base already holds (a second-level search)

    def estimate(self, spec: ModelSpec) -> MemoryEstimate | None:
        """The spec's estimate, or None when it cannot be sized (or the estimate bound is reached)."""
        shared, key = self.shared, _sizing_key(spec)
        if key in shared.cache:
            return shared.cache[key]
        if shared.estimates >= MAX_ESTIMATES:
            shared.cut_short = True
            return None
        shared.estimates += 1
        try:
            found: MemoryEstimate | None = shared.estimate(spec)
        except (ValueError, FileNotFoundError):  # SizingError is a ValueError
            found = None
        shared.cache[key] = found
        return found

    def plan(self, models: Mapping[str, ModelSpec]) -> Plan | None:
        """The plan of `models`, or None when it is infeasible (or cannot be sized, or the plan bound is reached)."""
        from placement.planner import make_plan

        estimates = {role: self.estimate(spec) for role, spec in models.items()}
        known = {role: e for role, e in estimates.items() if e is not None}
        if len(known) != len(estimates):
            return None
        if self.shared.plans >= MAX_PLANS:
            self.shared.cut_short = True
            return None
        self.shared.plans += 1
        try:
            return make_plan(models, self.inventory, rules=self.rules, reserve=self.reserve, estimates=known)
        except PlanError:
            return None

    def step(self, role: str, kind: Kind, change: Mapping[str, Any], cost: float, summary: str = "") -> Suggestion:
        """The change as a suggestion (not yet planned), its `before` read from this base."""
        before = tuple((key, _field(self.models[role], key)) for key in change)
        return Suggestion(role, kind, tuple(change.items()), before, cost, summary)

    def with_change(self, role: str, change: Mapping[str, Any]) -> tuple[dict[str, ModelSpec], Plan | None]:
        try:
            models = apply(self.models, self.step(role, "gpu", change, 0.0))
        except ValueError:  # the change contradicts another field of the spec
            return dict(self.models), None
        return models, self.plan(models)

    def made(
        self, role: str, kind: Kind, change: Mapping[str, Any], cost: float, summary: str, plan: Plan
    ) -> Suggestion:
        """A feasible change as a suggestion; on a moved base, the move comes first and its cost is added."""
        moved = () if self.moved is None else (self.moved,)
        shown = tuple(dict.fromkeys((*(m.role for m in moved), role, *self.failed)))
        lands = tuple((r, plan.entry(r).device_label) for r in shown)
        made = replace(self.step(role, kind, change, cost, summary), lands=lands, requires=moved)
        return replace(made, cost=cost + sum(m.cost for m in moved))


def _field(spec: ModelSpec, key: str) -> Any:
    outer, _, inner = key.partition(".")
    value = getattr(spec, outer)
    return getattr(value, inner) if inner and value is not None else value


def _moves(trials: _Trials, role: str) -> list[Suggestion]:
    """The moves of one role, not yet planned: `gpu: N` for every GPU index but its own pin, and `cpu: true`."""
    spec = trials.models[role]
    moves = []
    for index in sorted({gpu.index for node in trials.inventory.nodes for gpu in node.gpus}):
        if index != spec.gpu:
            change = {"gpu": index, **({"cpu": False} if spec.cpu else {}), **({"split": False} if spec.split else {})}
            moves.append(trials.step(role, "gpu", change, PIN_COST, f"pinned to GPU {index}, placed before the others"))
    if not spec.cpu:
        change = {
            "cpu": True,
            **({"gpu": None} if spec.gpu is not None else {}),
            **({"split": False} if spec.split else {}),
        }
        moves.append(trials.step(role, "cpu", change, _cpu_cost(trials, role), "runs on CPU, far slower than on a GPU"))
    return moves


def _cpu_cost(trials: _Trials, role: str) -> float:
    """CPU_COST plus up to 0.1 by the share of every model's bytes that moves: the smaller model moves first."""
    sizes = {r: trials.estimate(s) for r, s in trials.models.items()}
    total = sum(e.total_bytes * trials.models[r].planned_replicas for r, e in sizes.items() if e is not None)
    own = sizes[role]
    moved = own.total_bytes * trials.models[role].planned_replicas if own is not None else total
    return CPU_COST + 0.1 * moved / total if total else CPU_COST


def _try_moves(trials: _Trials, role: str) -> tuple[list[Suggestion], list[Suggestion]]:
    """(the role's moves that fit — the lowest GPU index only — , those that do not)."""
    fits: list[Suggestion] = []
    misses: list[Suggestion] = []
    for move in _moves(trials, role):
        if move.kind == "gpu" and any(found.kind == "gpu" for found in fits):
            continue
        _, plan = trials.with_change(role, move.fields)
        if plan is None:
            misses.append(move)
            continue
        summary = move.summary
        if move.kind == "cpu":
            reason = plan.entry(role).reason
            start = reason.find("CPU on node")
            summary = f"runs on {reason[start:] if start >= 0 else 'CPU'}, far slower than on a GPU"
        fits.append(trials.made(role, move.kind, move.fields, move.cost, summary, plan))
    return fits, misses


def _split(trials: _Trials, role: str) -> list[Suggestion]:
    spec = trials.models[role]
    if spec.split or spec.cpu or not trials.inventory.gpu_count:
        return []
    change: dict[str, Any] = {"split": True, **({"gpu": None} if spec.gpu is not None else {})}
    _, plan = trials.with_change(role, change)
    if plan is None:
        return []
    return [trials.made(role, "split", change, SPLIT_COST, plan.entry(role).reason, plan)]


def _largest(trials: _Trials, role: str, key: str, low: int, high: int) -> tuple[int, Plan] | None:
    """The largest value of `key` in [low, high] after which the whole plan is feasible, by bisection.

    The value returned was planned feasible, and one above it was planned infeasible (or is `high + 1`,
    the config's own value, known infeasible). None when even `low` does not fit.
    """
    if low > high:
        return None
    _, plan = trials.with_change(role, {key: low})
    if plan is None:
        return None
    best = (low, plan)
    while low < high:
        mid = (low + high + 1) // 2
        _, plan = trials.with_change(role, {key: mid})
        if plan is None:
            high = mid - 1
        else:
            low, best = mid, (mid, plan)
    return best


def _replicas(trials: _Trials, role: str) -> list[Suggestion]:
    spec = trials.models[role]
    count = spec.planned_replicas
    key, floor = "replicas", 1
    if spec.autoscaling is not None:
        key, floor = "autoscaling.max_replicas", max(1, spec.autoscaling.min_replicas)
    found = _largest(trials, role, key, floor, count - 1)
    if found is None:
        return []
    value, plan = found
    return [trials.made(role, "replicas", {key: value}, 1 - value / count, f"was {count}: the most that fit", plan)]


def _shrink(trials: _Trials, role: str, key: Kind, floor: int) -> list[Suggestion]:
    """The largest `context_length` or `max_batch_size` (≥ floor) after which the plan is feasible."""
    spec = trials.models[role]
    estimate = trials.estimate(spec)
    if estimate is None or estimate.source == "memory_gb":  # a lump: context and batch change nothing
        return []
    current = estimate.context_length if key == "context_length" else estimate.batch_size
    found = _largest(trials, role, key, floor, current - 1)
    if found is None:
        return []
    value, plan = found
    smaller = trials.estimate(spec.model_copy(update={key: value}))
    saved = f", {gib(estimate.total_bytes - smaller.total_bytes)} less per replica" if smaller else ""
    summary = f"was {current}: the largest that fits, {value + 1} does not{saved}"
    return [trials.made(role, key, {key: value}, 1 - value / current, summary, plan)]


def _quantize(trials: _Trials, role: str) -> list[Suggestion]:
    """`quantization: int8`, else `nf4`, for a model not pre-quantized whose checkpoint bitsandbytes may quantize."""
    spec = trials.models[role]
    estimate = trials.estimate(spec)
    if estimate is None or estimate.source == "memory_gb":
        return []
    if estimate.quant is not None and estimate.quant.prequantized:
        trials.shared.notes.append(
            f"{role}: checkpoint is pre-quantized ({estimate.quant.label}): no other quantization offered"
        )
        return []
    bits = _WEIGHT_BITS.get(estimate.quantization, _DTYPE_BITS.get(spec.dtype, 16))
    for scheme in ("int8", "nf4"):
        if _WEIGHT_BITS[scheme] >= bits:
            continue
        smaller = trials.estimate(spec.model_copy(update={"quantization": scheme}))
        if smaller is None or smaller.quantization != scheme:  # held as stored (another method's checkpoint)
            return []
        _, plan = trials.with_change(role, {"quantization": scheme})
        if plan is not None:
            held = estimate.weights_bytes + estimate.quant_overhead_bytes
            summary = (
                f"was {estimate.quantization}: quantized at load, weights {gib(held)}"
                f" → {gib(smaller.weights_bytes + smaller.quant_overhead_bytes)}"
            )
            cost = 1 - _WEIGHT_BITS[scheme] / bits
            return [trials.made(role, "quantization", {"quantization": scheme}, cost, summary, plan)]
    return []


def _resize(trials: _Trials, role: str) -> list[Suggestion]:
    """Every change to the role itself other than a move: split, replicas, quantization, batch, context."""
    return [
        *_split(trials, role),
        *_replicas(trials, role),
        *_quantize(trials, role),
        *_shrink(trials, role, "max_batch_size", 1),
        *_shrink(trials, role, "context_length", MIN_CONTEXT),
    ]


def _rank(item: Suggestion) -> tuple[float, int, int, str]:
    return (round(item.cost, 6), len(item.requires), KIND_ORDER.index(item.kind), item.role)


def advise(
    models: Mapping[str, ModelSpec],
    inventory: Inventory,
    *,
    rules: SizeRules | None = None,
    reserve: Reserve | None = None,
    estimates: Mapping[str, MemoryEstimate] | None = None,
    estimate: Estimator | None = None,
    failed: tuple[str, ...] | None = None,
) -> Advice:
    """The changes after which `models` plan feasibly on `inventory`, least change first.

    `estimate` sizes a changed spec (default: placement.sizing.estimate_memory); `estimates` are the
    config's own (default: computed with it); `failed`: the roles the plan could not place (default:
    planned once more to find them).
    """
    estimate = estimate or _estimate_memory
    if estimates is None:
        estimates = {role: estimate(spec) for role, spec in models.items()}
    shared = _Shared(estimate, {_sizing_key(spec): estimates[role] for role, spec in models.items()})
    trials = _Trials(dict(models), inventory, rules, reserve, failed or (), shared)
    if failed is None:
        failed = _failed_roles(trials, estimates)
        if not failed:
            return Advice((), ("the plan is feasible as it is",))
        trials = replace(trials, failed=failed)
    # The roles that failed first, then the others (moving or shrinking another model can make room).
    order = (*sorted(failed), *sorted(set(models) - set(failed)))
    found: list[Suggestion] = []
    misses: list[Suggestion] = []
    for role in order:  # re-plans only first (cheap), then the searches that re-estimate
        fits, missed = _try_moves(trials, role)
        found.extend(fits)
        misses.extend(missed)
    for role in order:
        found.extend(_resize(trials, role))
    if not found:
        # No single change fits: a move of one model, then a change to another on top of it.
        for move in sorted(misses, key=_rank):
            moved = replace(trials, models=apply(trials.models, move), moved=move)
            for role in order:
                if role != move.role:
                    found.extend(_try_moves(moved, role)[0])
                    found.extend(_resize(moved, role))
    notes = list(dict.fromkeys(shared.notes))
    if shared.cut_short:
        notes.append(
            f"the search stopped at its bound ({MAX_ESTIMATES} estimates, {MAX_PLANS} plans): "
            "a change not listed may still fit"
        )
    return Advice(tuple(sorted(found, key=_rank)), tuple(notes), shared.plans, shared.estimates)


def _failed_roles(trials: _Trials, estimates: Mapping[str, MemoryEstimate]) -> tuple[str, ...]:
    from placement.planner import make_plan

    try:
        make_plan(trials.models, trials.inventory, rules=trials.rules, reserve=trials.reserve, estimates=estimates)
    except PlanError as exc:
        return tuple(sorted(u.role for u in exc.unplaced))
    return ()


def with_advice(error: PlanError, advice: Advice) -> PlanError:
    """The same error with the advice in its message and on it (`PlanError.advice`)."""
    return PlanError(f"{error}\n{advice.describe()}", error.unplaced, advice)


def plan_or_advise(
    models: Mapping[str, ModelSpec],
    inventory: Inventory,
    *,
    rules: SizeRules | None = None,
    reserve: Reserve | None = None,
    estimates: Mapping[str, MemoryEstimate] | None = None,
    estimate: Estimator | None = None,
) -> Plan:
    """`make_plan`, or PlanError naming every model that does not fit and what would make the plan feasible."""
    from placement.planner import make_plan

    estimate = estimate or _estimate_memory
    if estimates is None:
        estimates = {role: estimate(spec) for role, spec in models.items()}
    try:
        return make_plan(models, inventory, rules=rules, reserve=reserve, estimates=estimates)
    except PlanError as exc:
        failed = tuple(sorted(u.role for u in exc.unplaced))
        advice = advise(
            models, inventory, rules=rules, reserve=reserve, estimates=estimates, estimate=estimate, failed=failed
        )
        raise with_advice(exc, advice) from exc
