"""The planner: estimated sizes + an inventory → a deterministic plan.

Largest model first, each onto a GPU with room, in the order its size rule
prefers (big models to the last GPU, small ones to cuda:0 by default). Models
that fit together share a GPU, each holding a fraction of it in proportion to
its memory. With no GPU at all, models run on CPU if RAM allows. A model that
fits no single GPU is split across GPUs of one node when allowed. Anything that
does not fit is collected, and one error names every such model.

Same inputs, same plan: nothing here depends on dict or config order, nor on
Ray's random node ids (`Inventory.sorted_nodes`). A redeploy of the same
config on the same cluster gives the same entries, field for field, because
an entry depends only on its own model and its GPU: the fraction is the
model's bytes over the GPU's fixed capacity (never over free memory), and the
reason names no other model and no free-memory figure. That is what keeps
Serve from restarting unchanged replicas (deployments.versions).

Every replica's engine process holds a CUDA context of its own on each GPU it
uses (`Reserve.cuda_context_bytes`), outside torch's caching allocator: the
planner charges one per replica per GPU in the GPU's planned bytes and in the
replica's fraction, while the replica's allocator caps (`ReplicaPlan.gpu_budgets`)
stay the torch-side budget. A split model is laid out where transformers puts
it (`_split_layout`): its KV cache and runtime workspaces on the split's first
GPU (local cuda:0, where the engine allocates the pool and the side caches),
its weights spread over the chosen GPUs around them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from placement.config import ModelSpec
from placement.estimate import MemoryEstimate
from placement.gpu_nodes import accelerator_type, node_accelerator_type
from placement.inventory import Gpu, Inventory, Node, Reserve, describe_gpu
from placement.plan import GpuSlot, GpuUsage, Plan, PlanEntry, PlanError, Unplaced, short_node_id
from placement.replica import plan_replica
from placement.rules import SizeRule, SizeRules, load_rules
from placement.units import GIB, gib

# CPUs Ray reserves per model replica unless the config says otherwise: a half
# lets the HTTP ingress and two models schedule on a 2-core machine. Torch's
# own thread count is separate from this scheduling figure.
DEFAULT_REPLICA_CPUS = 0.5
# RAM a CPU replica's process holds before any weight (Python, torch,
# transformers, Ray worker): measured 1.0-1.2 GiB RSS beyond the demo models' size.
CPU_PROCESS_BYTES = GIB
# GPU fractions are whole thousandths of the GPU's capacity, rounded down and
# at least one; the planner also counts these grains per GPU, so the fractions
# on one GPU never sum past 1 (Ray custom resources themselves have 4 decimals).
FRACTION_GRAIN = 1_000
# On a split, each GPU after the first holds this share of its weights for the activations and
# workspaces of the layers it runs (and bitsandbytes' one-layer transient when it quantizes at load):
# the weight-proportional part of the runtime estimate (placement.sizing.estimate.RUNTIME_WEIGHT_SHARE),
# moved from cuda:0 to where those layers are. The fixed floor and the logits workspaces stay on cuda:0.
SPLIT_RUNTIME_SHARE = 0.05


@dataclass
class _GpuState:
    """A GPU while the plan is being filled (mutable working state, not exported)."""

    node: Node
    gpu: Gpu
    order: int  # position in the global (node, index) order
    usable_bytes: int
    capacity_bytes: int  # fractions are shares of this (Reserve.capacity_bytes), not of usable_bytes
    planned_bytes: int = 0
    planned_grains: int = 0  # sum of the FRACTION_GRAIN units its replicas hold
    contexts: int = 0  # CUDA contexts charged here: one per replica (its engine process) using this GPU
    roles: list[str] = field(default_factory=list)
    exclusive: bool = False  # holds a model that said `share: false`
    # On a GPU group node (placement.gpu_nodes): only split models go there.
    group: bool = False

    @property
    def free_bytes(self) -> int:
        return self.usable_bytes - self.planned_bytes

    def can_take(self, need: int, *, alone: bool, replicas: int = 1) -> bool:
        if self.exclusive or (alone and self.roles):
            return False
        grains = _grains(need // replicas, self.capacity_bytes) * replicas
        return need <= self.free_bytes and self.planned_grains + grains <= FRACTION_GRAIN

    def label(self) -> str:
        return f"node {short_node_id(self.node.node_id)} {describe_gpu(self.gpu)}"


@dataclass(frozen=True)
class _Layout:
    """One replica's bytes on each GPU of its placement, in local order (after CUDA_VISIBLE_DEVICES)."""

    budgets: tuple[int, ...]  # torch's allocator cap per GPU (weights, KV, runtime); sums to the estimate
    weights: tuple[int, ...]  # a split's weights per GPU (accelerate's max_memory); () on one GPU
    context: int  # the replica's CUDA context on each of its GPUs, outside the caps

    @property
    def loads(self) -> tuple[int, ...]:
        """Everything the replica holds on each GPU: its budget plus its context."""
        return tuple(budget + self.context for budget in self.budgets)


@dataclass(frozen=True)
class _Placement:
    """Where one model landed, before fractions are known."""

    node: Node
    states: tuple[_GpuState, ...]  # empty on CPU
    shares: tuple[int, ...]  # bytes on each of `states`, every replica's load (contexts included)
    reason: str
    layout: _Layout | None = None  # one replica's bytes per GPU; None on CPU


def make_plan(
    models: Mapping[str, ModelSpec],
    inventory: Inventory,
    *,
    rules: SizeRules | None = None,
    reserve: Reserve | None = None,
    estimates: Mapping[str, MemoryEstimate] | None = None,
) -> Plan:
    """Plan every model; raise PlanError naming each one that cannot be placed."""
    rules = rules or load_rules()
    reserve = reserve or Reserve()
    if estimates is None:
        from placement.sizing import estimate_memory  # heavy import (torch), only when sizing is needed

        estimates = {role: estimate_memory(spec) for role, spec in models.items()}
    missing = sorted(set(models) - set(estimates))
    if missing:
        raise ValueError(f"no memory estimate for: {', '.join(missing)}")

    nodes = inventory.sorted_nodes()
    gpu_states = [
        _GpuState(
            node=node,
            gpu=gpu,
            order=0,
            usable_bytes=reserve.usable_bytes(gpu),
            capacity_bytes=reserve.capacity_bytes(gpu),
            group=node.gpu_node is not None and node.gpu_node.is_group,
        )
        for node in nodes
        for gpu in sorted(node.gpus, key=lambda g: g.index)
    ]
    for order, state in enumerate(gpu_states):
        state.order = order
    cpu_planned: dict[str, int] = {node.node_id: 0 for node in nodes}

    placements: dict[str, _Placement] = {}
    slots: dict[str, tuple[_Placement, ...]] = {}  # per-GPU mode: one placement per replica
    unplaced: list[Unplaced] = []
    warnings: list[str] = []
    accelerators: dict[str, str] = {}  # role → the card type it asked for, as its GPUs state it
    per_gpu = inventory.per_gpu_nodes
    labelled = [node for node in nodes if node.gpus and node.gpu_node is not None]
    if labelled and not per_gpu:
        warnings.append(
            f"{len(labelled)} GPU node(s) are per-GPU nodes (rayfit.io/gpu) but others are not: the single-node "
            "mode is used for all; start every GPU with `python -m placement ray-start-args --per-gpu`"
        )

    context = reserve.cuda_context_bytes
    for role in _placement_order(models, estimates):
        spec, estimate = models[role], estimates[role]
        replicas = spec.planned_replicas
        need = estimate.total_bytes * replicas
        if estimate.is_guess:
            warnings.append(
                f"{role}: size GUESSED from the name {spec.model!r} ({estimate.params / 1e9:.3g}B params); "
                "set `params_b` or `memory_gb`, or make its config.json available"
            )
        rule = rules.rule_for(estimate)
        candidate_nodes = _nodes_for(spec, nodes)
        if not candidate_nodes:
            unplaced.append(Unplaced(role, need, f"no node matches `node: {spec.node}`"))
            continue
        on_gpu = [s for s in gpu_states if s.node in candidate_nodes]
        accelerator = None if spec.cpu else spec.accelerator or rule.accelerator
        if accelerator is not None:
            on_gpu, why_not = _of_accelerator(accelerator, on_gpu)
            if not on_gpu:
                unplaced.append(Unplaced(role, need, why_not, context, replicas))
                continue
            accelerators[role] = _accelerator_of(on_gpu[0])
        wants_cpu = spec.cpu or (rule.prefer == "cpu" and accelerator is None)
        if wants_cpu or not on_gpu:
            # On CPU each replica's own process (Python, torch, transformers) shares the RAM too;
            # a measured peak RSS (placement.calibration) already holds it.
            if estimate.measured_peak_bytes is None:
                need += CPU_PROCESS_BYTES * replicas
            placement, why_not = _place_on_cpu(role, need, candidate_nodes, cpu_planned, spec, rule, warnings)
        elif per_gpu:
            spread, why_not = _spread_over_gpu_nodes(role, spec, estimate, context, rule, on_gpu)
            if spread is None:
                unplaced.append(Unplaced(role, need, why_not, context, replicas))
                continue
            placements[role] = spread[0]
            slots[role] = tuple(spread)
            continue
        else:
            placement, why_not = _place_on_gpu(role, spec, estimate, context, rule, on_gpu)
        if placement is None:
            on_cpu = wants_cpu or not on_gpu
            unplaced.append(Unplaced(role, need, why_not, 0 if on_cpu else context, 0 if on_cpu else replicas))
            continue
        _hold(placement, role, spec, replicas, whole_gpus=False)
        placements[role] = placement

    if unplaced:
        raise PlanError(_infeasible_message(unplaced, gpu_states, nodes, cpu_planned), tuple(unplaced))

    entries = tuple(
        replace(
            _entry(role, models[role], estimates[role], placements[role], slots.get(role, ())),
            accelerator=accelerators.get(role),
        )
        for role in sorted(placements)
    )
    gpus = tuple(_usage(state, entries, context) for state in gpu_states)
    return Plan(entries=entries, gpus=gpus, warnings=tuple(warnings))


def _hold(placement: _Placement, role: str, spec: ModelSpec, replicas: int, *, whole_gpus: bool) -> None:
    """Count `replicas` copies of `placement` on its GPUs. `whole_gpus`: a split on a GPU group node,
    whose replica asks Ray for the group's GPUs whole (placement.gpu_nodes), so nothing else fits there."""
    for state, share in zip(placement.states, placement.shares, strict=True):
        state.planned_bytes += share
        state.planned_grains += _grains(share // replicas, state.capacity_bytes) * replicas
        state.contexts += replicas
        state.roles.append(role)
        state.exclusive = state.exclusive or not spec.share or whole_gpus
        if whole_gpus:
            state.planned_grains = FRACTION_GRAIN


def _spread_over_gpu_nodes(
    role: str, spec: ModelSpec, estimate: MemoryEstimate, context: int, rule: SizeRule, states: list[_GpuState]
) -> tuple[list[_Placement] | None, str]:
    """Per-GPU mode: each replica placed on its own, on a GPU node no other replica of the role holds
    while one has room (Serve then spreads them: max_replicas_per_node), else stacked.

    Each replica is budgeted where it lands; Ray's label_selector lets a replica run on any GPU the
    role was given and `max_replicas_per_node` keeps them one per node when the plan spread them.
    When replicas are stacked (more copies than GPU nodes with room), Serve may stack them on another
    of the role's GPUs than the plan did: the `rayfit_gpu_mib` request still keeps every GPU within
    its memory, but a model planned there later may then wait for room. Spread plans have no such case.
    """
    one = spec.model_copy(update={"replicas": 1, "autoscaling": None})
    # A role whose later replicas find no room is not placed at all: put its earlier ones back.
    before = [(s, s.planned_bytes, s.planned_grains, s.contexts, list(s.roles), s.exclusive) for s in states]
    placed: list[_Placement] = []
    for _ in range(spec.planned_replicas):
        taken = {id(s) for p in placed for s in p.states}
        fresh = [s for s in states if id(s) not in taken]
        placement, why_not = _place_on_gpu(role, one, estimate, context, rule, fresh) if fresh else (None, "")
        if placement is None:
            placement, why_not = _place_on_gpu(role, one, estimate, context, rule, states)
        if placement is None:
            for state, planned, grains, contexts, roles, exclusive in before:
                state.planned_bytes, state.planned_grains, state.contexts = planned, grains, contexts
                state.roles, state.exclusive = roles, exclusive
            count = spec.planned_replicas
            return None, why_not if count == 1 else f"replica {len(placed) + 1} of {count} has no room: {why_not}"
        _hold(placement, role, spec, 1, whole_gpus=len(placement.states) > 1)
        placed.append(placement)
    return placed, ""


def _accelerator_of(state: _GpuState) -> str | None:
    return node_accelerator_type(state.node.labels, state.gpu.name)


def _of_accelerator(wanted: str, states: list[_GpuState]) -> tuple[list[_GpuState], str]:
    """The GPUs whose card is `wanted` (Ray's accelerator type, or a card name mapped to it; any case),
    or none and why."""
    key = accelerator_type(wanted).lower()
    matching = [s for s in states if (_accelerator_of(s) or "").lower() == key]
    if matching:
        return matching, ""
    present = sorted({_accelerator_of(s) or "unknown (declared without a card)" for s in states})
    return [], f"`accelerator: {wanted}` matches no GPU it may use (cards: {', '.join(present) or 'no GPU'})"


def _placement_order(models: Mapping[str, ModelSpec], estimates: Mapping[str, MemoryEstimate]) -> list[str]:
    """Pinned models first (their GPU is not negotiable), then largest first (all replicas
    counted); role name breaks ties."""
    return sorted(
        models,
        key=lambda role: (models[role].gpu is None, -estimates[role].total_bytes * models[role].planned_replicas, role),
    )


def _nodes_for(spec: ModelSpec, nodes: tuple[Node, ...]) -> tuple[Node, ...]:
    """The nodes a model may use: all, or those its `node:` hint names (id, id prefix or address)."""
    if spec.node is None:
        return nodes
    hint = spec.node
    return tuple(n for n in nodes if n.node_id == hint or n.node_id.startswith(hint) or n.address == hint)


def _ordered_by_preference(states: list[_GpuState], prefer: str) -> list[_GpuState]:
    if prefer == "last_gpu":
        return sorted(states, key=lambda s: -s.order)
    if prefer == "most_free":
        return sorted(states, key=lambda s: (-s.free_bytes, s.order))
    return sorted(states, key=lambda s: s.order)


def _place_on_gpu(
    role: str, spec: ModelSpec, estimate: MemoryEstimate, context: int, rule: SizeRule, states: list[_GpuState]
) -> tuple[_Placement | None, str]:
    alone = not spec.share
    replicas = spec.planned_replicas
    single = _Layout(budgets=(estimate.total_bytes,), weights=(), context=context)
    need = single.loads[0] * replicas
    if spec.gpu is not None:
        pinned = [s for s in states if s.gpu.index == spec.gpu and not s.group]
        if not pinned:
            return None, f"`gpu: {spec.gpu}` names a GPU that does not exist"
        for state in pinned:
            if state.can_take(need, alone=alone, replicas=replicas):
                return _single(state, single, replicas, f"pinned by `gpu: {spec.gpu}`"), ""
        return None, f"`gpu: {spec.gpu}` has {gib(max(s.free_bytes for s in pinned))} free"

    singles = [s for s in states if not s.group]  # a GPU group node is for split models only
    for state in _ordered_by_preference(singles, rule.prefer):
        if state.can_take(need, alone=alone, replicas=replicas):
            why = f"{rule.prefer.replace('_', ' ')} with room (rule '{rule.name}')"
            return _single(state, single, replicas, why), ""

    most_free = max(singles or states, key=lambda s: (s.free_bytes, -s.order))
    if spec.split or rule.allow_split:
        split = _split(estimate, context, states, alone=alone, replicas=replicas)
        if split is not None:
            return split, ""
        return None, (
            "cannot be split either: no node's GPUs hold it together (its KV and runtime on the first, "
            "a CUDA context on each)"
        )
    return None, (
        f"fits no single GPU (most free: {gib(most_free.free_bytes)} on {most_free.label()}); "
        "set `split: true` to split it across GPUs of one node"
    )


def _single(state: _GpuState, layout: _Layout, replicas: int, why: str) -> _Placement:
    # Who else shares the GPU is in the plan's GPU table, not here: an entry (and so the
    # replica's bind arguments) must not change when another model joins its GPU.
    share = layout.loads[0] * replicas
    return _Placement(state.node, (state,), (share,), f"{why}: GPU {state.gpu.index}", layout)


def _split(
    estimate: MemoryEstimate, context: int, states: list[_GpuState], *, alone: bool, replicas: int = 1
) -> _Placement | None:
    """Fewest GPUs of one node that hold the model laid out as `_split_layout` puts it.

    GPUs are taken emptiest first; nodes are tried in the inventory's stable
    order (the first node with the fewest GPUs wins).
    """
    best: tuple[int, list[_GpuState], _Layout] | None = None
    node_ids = list(dict.fromkeys(s.node.node_id for s in sorted(states, key=lambda s: s.order)))
    for node in node_ids:
        usable = [s for s in states if s.node.node_id == node and not s.exclusive and not (alone and s.roles)]
        usable.sort(key=lambda s: (-s.free_bytes, s.order))
        for count in range(1, len(usable) + 1):
            if best is not None and count >= best[0]:
                break
            chosen = sorted(usable[:count], key=lambda s: s.order)
            layout = _split_layout(estimate, context, [s.free_bytes // replicas for s in chosen])
            if layout is None:
                continue
            fits = all(
                s.planned_grains + _grains(load, s.capacity_bytes) * replicas <= FRACTION_GRAIN
                for s, load in zip(chosen, layout.loads, strict=True)
            )
            if fits:
                best = (count, chosen, layout)
                break
    if best is None:
        return None
    _, chosen, layout = best
    indices = ", ".join(str(s.gpu.index) for s in chosen)
    reason = f"fits no single GPU: split over GPUs {indices} of node {short_node_id(chosen[0].node.node_id)}"
    shares = tuple(load * replicas for load in layout.loads)
    return _Placement(chosen[0].node, tuple(chosen), shares, reason, layout)


def _split_layout(estimate: MemoryEstimate, context: int, rooms: list[int]) -> _Layout | None:
    """One replica of a split over GPUs with `rooms` bytes free each (local order), or None if it does not fit.

    Where the engine puts it: transformers allocates the continuous-batching KV pool and the side
    caches on `model.device`, the split's local cuda:0 (the lowest host index), and the logits and
    their workspaces come out there too; accelerate spreads the weights over the GPUs by `max_memory`.
    So cuda:0 holds the whole KV and the runtime (less the share below) beside its part of the weights;
    every other GPU holds its weights and `SPLIT_RUNTIME_SHARE` of them for its layers' activations.
    The weights are water-filled as evenly as each GPU's room allows (cuda:0's room is what the KV
    and the runtime leave). Each GPU also holds the replica's CUDA context, outside the caps.
    The budgets sum to the estimate; `weights` (accelerate's per-GPU share) sum to the weights.
    """
    count = len(rooms)
    if count == 1:
        single = _Layout(budgets=(estimate.total_bytes,), weights=(), context=context)
        return single if single.loads[0] <= rooms[0] else None
    weights = estimate.weights_bytes + estimate.quant_overhead_bytes
    kv, runtime = estimate.kv_cache_bytes, estimate.runtime_bytes
    # Never move more runtime off cuda:0 than the estimate has (a `memory_gb` lump has none).
    share = min(SPLIT_RUNTIME_SHARE, runtime / weights) if weights else 0.0
    # cuda:0's fixed part: KV + the runtime that does not scale with the layers it holds.
    fixed = [context + kv + runtime - math.floor(share * weights)] + [context] * (count - 1)
    weight_rooms = [math.floor((room - held) / (1 + share)) for room, held in zip(rooms, fixed, strict=True)]
    if min(weight_rooms) < 0 or sum(weight_rooms) < weights:
        return None
    spread = _balanced_shares(weights, weight_rooms)
    moved = [math.floor(share * w) for w in spread[1:]]  # runtime each later GPU holds for its layers
    budgets = (spread[0] + kv + runtime - sum(moved), *(w + r for w, r in zip(spread[1:], moved, strict=True)))
    layout = _Layout(budgets=budgets, weights=tuple(spread), context=context)
    if any(load > room for load, room in zip(layout.loads, rooms, strict=True)):
        return None  # rounding at the edge of a full GPU
    return layout


def _balanced_shares(need: int, free: list[int]) -> list[int]:
    """Water-fill `need` bytes over GPUs with `free` bytes each, as evenly as room allows
    (like accelerate's get_balanced_memory: a GPU with less room than its share gives what it has)."""
    shares = [0] * len(free)
    remaining = need
    open_slots = sorted(range(len(free)), key=lambda i: free[i])
    while open_slots:
        even = math.ceil(remaining / len(open_slots))
        slot = open_slots.pop(0)
        shares[slot] = min(free[slot], even)
        remaining -= shares[slot]
    return shares


def _place_on_cpu(
    role: str,
    need: int,
    nodes: tuple[Node, ...],
    cpu_planned: dict[str, int],
    spec: ModelSpec,
    rule: SizeRule,
    warnings: list[str],
) -> tuple[_Placement | None, str]:
    why = "`cpu: true`" if spec.cpu else f"rule '{rule.name}'" if rule.prefer == "cpu" else "no GPU available"

    def ram_free(node: Node) -> int | None:
        return None if node.cpu_memory_bytes is None else node.cpu_memory_bytes - cpu_planned[node.node_id]

    # The node with the most free RAM; unknown RAM ranks last; ties go by the stable node order.
    rank = {node.node_id: position for position, node in enumerate(nodes)}
    ranked = sorted(nodes, key=lambda n: (ram_free(n) is None, -(ram_free(n) or 0), rank[n.node_id]))
    for node in ranked:
        free = ram_free(node)
        if free is None:
            warnings.append(f"{role}: RAM on node {node.node_id} is unknown; {gib(need)} on CPU was not checked")
        elif need > free:
            continue
        cpu_planned[node.node_id] += need
        # The reason names no RAM figure: it is part of the entry a replica is built from, and a figure that
        # moves with the models planned before it would restart this replica when an unrelated model is added.
        return _Placement(node, (), (), f"{why}: CPU on node {short_node_id(node.node_id)}"), ""
    best = max((ram_free(n) or 0) for n in nodes)
    return None, f"on CPU ({why}) but the most RAM free on any node is {gib(best)}"


def _slot(placement: _Placement) -> GpuSlot:
    """One replica's placement in the per-GPU mode, named by its GPU node's label."""
    gpu_node = placement.node.gpu_node
    assert gpu_node is not None, "per-GPU mode places replicas on labelled GPU nodes only"
    fractions = [
        _fraction(share, s.capacity_bytes) for share, s in zip(placement.shares, placement.states, strict=True)
    ]
    return GpuSlot(
        gpu_label=gpu_node.gpu_label,
        node_id=placement.node.node_id,
        gpu_indices=tuple(s.gpu.index for s in placement.states),
        fraction=max(fractions),
        gpu_uuids=tuple(s.gpu.uuid for s in placement.states),
    )


def _spread_reason(first: _Placement, replicas: tuple[_Placement, ...]) -> str:
    if len(replicas) <= 1:
        return first.reason
    labels = [_slot(p).gpu_label for p in replicas]
    where = ", ".join(labels)
    spread = "one replica each" if len(set(labels)) == len(labels) else "replicas stacked where no other GPU had room"
    return f"{first.reason.split(':')[0]}: {len(replicas)} replicas on GPU nodes {where} ({spread})"


def _entry(
    role: str, spec: ModelSpec, estimate: MemoryEstimate, placement: _Placement, replicas: tuple[_Placement, ...] = ()
) -> PlanEntry:
    num_cpus = DEFAULT_REPLICA_CPUS if spec.num_cpus is None else spec.num_cpus
    if replicas:
        # Per-GPU mode: the entry's own node/GPU fields are its first replica's; `slots` has them all.
        single = spec.model_copy(update={"replicas": 1, "autoscaling": None})
        first = _entry(role, single, estimate, placement)
        return replace(
            first,
            reason=_spread_reason(placement, replicas),
            replicas=len(replicas),
            slots=tuple(_slot(p) for p in replicas),
            autoscaling=spec.autoscaling,
        )
    if not placement.states:
        entry = PlanEntry(
            role=role,
            model=spec.model,
            device="cpu",
            node_id=placement.node.node_id,
            estimate=estimate,
            memory_budget_bytes=estimate.total_bytes,
            reason=placement.reason,
            num_cpus=num_cpus,
            replicas=spec.planned_replicas,
            autoscaling=spec.autoscaling,
        )
        return replace(entry, replica=plan_replica(role, spec, estimate, device="cpu", gpu_budgets=()))
    states = placement.states
    layout = placement.layout
    assert layout is not None, "a GPU placement has its layout"
    # Ray counts resources per replica: each replica holds its own copy's share, its CUDA context included.
    fractions = tuple(_fraction(load, s.capacity_bytes) for load, s in zip(layout.loads, states, strict=True))
    entry = PlanEntry(
        role=role,
        model=spec.model,
        device="gpu",
        node_id=placement.node.node_id,
        estimate=estimate,
        memory_budget_bytes=estimate.total_bytes,
        reason=placement.reason,
        gpu_indices=tuple(s.gpu.index for s in states),
        gpu_uuids=tuple(s.gpu.uuid for s in states),
        fraction=max(fractions),
        gpu_fractions=fractions,
        # Inside the replica, CUDA_VISIBLE_DEVICES renumbers the planned GPUs 0..k-1.
        max_memory=dict(enumerate(layout.weights)),
        num_cpus=num_cpus,
        replicas=spec.planned_replicas,
        autoscaling=spec.autoscaling,
        cuda_context_bytes=layout.context,
    )
    replica = plan_replica(
        role, spec, estimate, device="gpu", gpu_budgets=layout.budgets, weights_max_memory=layout.weights
    )
    return replace(entry, replica=replica)


def _grains(share_bytes: int, capacity_bytes: int) -> int:
    """A replica's share of a GPU in whole FRACTION_GRAIN units: rounded down, at least one.

    Derived from the planned bytes and the GPU's fixed capacity only, so the
    same model on the same GPU gets the same fraction whatever else runs.
    """
    if capacity_bytes <= 0:
        return FRACTION_GRAIN
    return min(max(share_bytes * FRACTION_GRAIN // capacity_bytes, 1), FRACTION_GRAIN)


def _fraction(share_bytes: int, capacity_bytes: int) -> float:
    """The replica's share of a GPU in Ray resource units (k / FRACTION_GRAIN)."""
    return _grains(share_bytes, capacity_bytes) / FRACTION_GRAIN


def _copies_on(entry: PlanEntry, node_id: str, index: int) -> tuple[int, float]:
    """(replicas of `entry` on GPU `index` of `node_id`, each one's fraction of it)."""
    if entry.device != "gpu":
        return 0, 0.0
    if entry.slots:
        held = [slot for slot in entry.slots if slot.node_id == node_id and index in slot.gpu_indices]
        return len(held), held[0].fraction if held else 0.0
    if entry.node_id == node_id and index in entry.gpu_indices:
        return entry.replicas, entry.fraction_of(index)
    return 0, 0.0


def _usage(state: _GpuState, entries: tuple[PlanEntry, ...], context: int) -> GpuUsage:
    copies = {e.role: _copies_on(e, state.node.node_id, state.gpu.index) for e in entries}
    holders = [e for e in entries if copies[e.role][0]]
    return GpuUsage(
        node_id=state.node.node_id,
        index=state.gpu.index,
        name=state.gpu.name,
        uuid=state.gpu.uuid,
        total_bytes=state.gpu.total_bytes,
        usable_bytes=state.usable_bytes,
        planned_bytes=state.planned_bytes,
        cuda_contexts=state.contexts,
        cuda_context_bytes=state.contexts * context,
        roles=tuple(sorted(e.role for e in holders)),
        fraction_used=round(sum(count * fraction for count, fraction in copies.values()), 6),
    )


def _contexts_text(item: Unplaced) -> str:
    """' + 0.50 GiB for the CUDA context of its engine process' (on each GPU it would use), or ''."""
    if not item.contexts:
        return ""
    if item.contexts == 1:
        return f" + {gib(item.context_bytes)} for the CUDA context of its engine process (on each GPU it uses)"
    return (
        f" + {item.contexts} × {gib(item.context_bytes)} for the CUDA contexts of its replicas' engine "
        "processes (one each, on each GPU it uses)"
    )


def _infeasible_message(
    unplaced: list[Unplaced], states: list[_GpuState], nodes: tuple[Node, ...], cpu_planned: dict[str, int]
) -> str:
    count = len(unplaced)
    lines = [f"No feasible plan: {count} model{'s' if count != 1 else ''} cannot be placed."]
    for item in sorted(unplaced, key=lambda u: u.role):
        lines.append(f"  - {item.role} needs {gib(item.needed_bytes)}{_contexts_text(item)}: {item.why}")
    if states:
        lines.append("Free on each GPU after the models that fit:")
        for state in states:
            holding = f" (holds {', '.join(state.roles)}, {state.contexts} CUDA context(s))" if state.roles else ""
            lines.append(
                f"  - {state.label()}: {gib(state.free_bytes)} free of {gib(state.usable_bytes)} usable{holding}"
            )
    else:
        lines.append("No GPUs in the inventory; RAM free per node:")
        for node in nodes:
            ram = "unknown" if node.cpu_memory_bytes is None else gib(node.cpu_memory_bytes - cpu_planned[node.node_id])
            lines.append(f"  - node {node.node_id}: {ram}")
    lines.append("Nothing was started.")
    return "\n".join(lines)
