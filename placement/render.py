"""Present a plan: a rich table for people, a JSON document for machines."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from placement.capacity import Capacity, plan_capacity
from placement.plan import Plan, PlanEntry
from placement.units import GIB, gib

if TYPE_CHECKING:
    from placement.advice import Advice


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON-ready data (bytes as integers, plus GiB for reading)."""
    models = []
    capacity = plan_capacity(plan)
    for entry in plan.entries:
        data = asdict(entry)
        data["estimate"]["total_bytes"] = entry.estimate.total_bytes
        data["estimate"]["source_label"] = entry.estimate.source_label  # "measured (...)" once calibrated
        data["device_label"] = entry.device_label
        data["memory_budget_gib"] = round(entry.memory_budget_bytes / GIB, 3)
        data["max_memory"] = {str(k): v for k, v in entry.max_memory.items()}
        # Per local GPU: the allocator cap (torch's side) and, beside it, the replica's CUDA context.
        data["gpu_budgets"] = list(entry.replica.gpu_budgets) if entry.replica else []
        data["autoscaling"] = entry.autoscaling.model_dump() if entry.autoscaling else None
        # What its KV holds (from the replica plan's geometry) and the room left on its GPUs.
        data["capacity"] = capacity[entry.role].as_dict()
        models.append(data)
    gpus = [{**asdict(g), "headroom_bytes": g.headroom_bytes} for g in plan.gpus]
    return {"models": models, "gpus": gpus, "warnings": list(plan.warnings)}


def _breakdown(entry: PlanEntry) -> str:
    # Imported here: placement.sizing loads torch and transformers (~3 s), which the CLI's
    # commands that never size a model (help, a bad config, ray start args) should not wait for.
    from placement.sizing.kv_budget import SIDE_SEQUENCES

    e = entry.estimate
    parts = [f"weights {gib(e.weights_bytes)}"]
    if e.quant_overhead_bytes:
        parts.append(f"quant {gib(e.quant_overhead_bytes)}")
    parts.append(f"KV {gib(e.kv_cache_bytes)} ({e.batch_size}×{e.context_length} tok + {SIDE_SEQUENCES} side)")
    parts.append(f"runtime {gib(e.runtime_bytes)}")
    return "\n".join(parts)


def _memory(entry: PlanEntry) -> str:
    """The replica's budget; on a GPU its CUDA context beside it, and a split's cap on each GPU."""
    text = gib(entry.memory_budget_bytes)
    if entry.device != "gpu":
        return text
    text += f"\n+ {gib(entry.cuda_context_bytes)} CUDA context per GPU"
    if entry.replica is not None and entry.replica.is_split:
        caps = ", ".join(f"cuda:{local} {gib(cap)}" for local, cap in enumerate(entry.replica.gpu_budgets))
        text += f"\n(caps {caps}; KV on cuda:0)"
    return text


def _where(entry: PlanEntry) -> tuple[str, str]:
    """(node column, device column): per-GPU mode lists each replica's GPU node and GPU(s)."""
    if not entry.slots:
        return entry.node_id, entry.device_label + (f" ×{entry.replicas}" if entry.replicas > 1 else "")
    nodes = "\n".join(slot.gpu_label for slot in entry.slots)
    devices = "\n".join("cuda:" + "+".join(str(i) for i in slot.gpu_indices) for slot in entry.slots)
    scaling = f"\n(autoscaling {entry.autoscaling.min_replicas}..{entry.replicas})" if entry.autoscaling else ""
    return nodes, devices + scaling


def print_plan(plan: Plan, console: Console) -> None:
    models = Table(title="rayfit plan: models", show_lines=True)
    for column in ("model", "estimate source", "memory", "breakdown", "node", "device", "fraction", "reason"):
        models.add_column(column, overflow="fold")
    for entry in plan.entries:
        e = entry.estimate
        source = f"[bold red]{e.source} (GUESS)[/]" if e.is_guess else e.source_label
        quant = "" if e.quantization == "none" else f" {e.quantization}"
        models.add_row(
            f"[bold]{entry.role}[/]\n{entry.model}",
            f"{source}\n{e.params / 1e9:.2f}B params{quant}",
            _memory(entry),
            _breakdown(entry),
            _where(entry)[0],
            _where(entry)[1],
            f"{entry.fraction:.4f}" if entry.device == "gpu" else "-",
            entry.reason,
        )
    console.print(models)
    print_capacity(plan, console)

    if plan.gpus:
        gpus = Table(title="rayfit plan: GPUs")
        for column in ("node", "GPU", "total", "usable", "planned", "CUDA contexts", "headroom", "fraction", "models"):
            gpus.add_column(column)
        for usage in plan.gpus:
            name = f" {usage.name}" if usage.name else ""
            gpus.add_row(
                usage.node_id,
                f"{usage.index}{name}",
                gib(usage.total_bytes),
                gib(usage.usable_bytes),
                gib(usage.planned_bytes),
                f"{usage.cuda_contexts} × {gib(usage.cuda_context_bytes // usage.cuda_contexts)}"
                if usage.cuda_contexts
                else "-",
                gib(usage.headroom_bytes),
                f"{usage.fraction_used:.4f}",
                ", ".join(usage.roles) or "-",
            )
        console.print(gpus)
    for warning in plan.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}")


def _headroom(capacity: Capacity) -> str:
    if not capacity.gpus:
        return "- (CPU)"
    return "\n".join(f"GPU {g.index}: {gib(g.headroom_bytes)}" for g in capacity.gpus)


def print_capacity(plan: Plan, console: Console) -> None:
    """Per role: the sequences and tokens its KV holds (the replica plan's geometry) and its GPUs' headroom."""
    table = Table(title="rayfit plan: capacity per replica")
    for column in ("model", "context", "sequences at context", "tokens at batch 1", "KV", "headroom on its GPU"):
        table.add_column(column)
    for role, capacity in plan_capacity(plan).items():
        if capacity.sequences is None:
            held = tokens = kv = "not itemized"
        else:
            held = f"{capacity.sequences} ({capacity.pool_sequences} pool + {capacity.side_sequences} side)"
            tokens, kv = str(capacity.tokens_at_batch_1), gib(capacity.kv_bytes or 0)
        table.add_row(role, str(capacity.context_length), held, tokens, kv, _headroom(capacity))
    console.print(table)


def print_advice(advice: Advice, console: Console) -> None:
    """The changes that make an infeasible plan feasible, least change first (placement.advice)."""
    if not advice.suggestions:
        console.print(advice.describe(), highlight=False, markup=False)
        return
    table = Table(title="rayfit plan: changes that make it fit (least change first, each one planned)")
    for column in ("#", "model", "set in model_configs.yaml", "what it changes", "then"):
        table.add_column(column, overflow="fold")
    for rank, item in enumerate(advice.suggestions, 1):
        then = "\n".join(f"{role} on {device}" for role, device in item.lands)
        steps = item.steps  # another model's move first, where one change alone does not fit
        table.add_row(
            str(rank),
            "\n".join(step.role for step in steps),
            "\n".join(step.yaml() for step in steps),
            "\n".join(step.summary for step in steps),
            then,
        )
    console.print(table)
    for note in advice.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
