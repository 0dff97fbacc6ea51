"""Present a placement report: rich tables for people, JSON for machines."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from placement.report import Report
from placement.units import gib

_STATUS_STYLE = {"ok": "green", "misplaced": "bold red", "unplaced": "bold red", "unavailable": "bold red"}


def report_to_dict(report: Report) -> dict[str, Any]:
    gpus = [{**asdict(gpu), "used_percent": gpu.used_percent} for gpu in report.gpus]
    return {
        "ok": report.ok,
        "models": [asdict(row) for row in report.models],
        "gpus": gpus,
        "findings": [asdict(f) for f in report.findings],
        "replicas": [asdict(row) for row in report.replicas],
    }


def _size(value: int | None) -> str:
    return "-" if value is None else gib(value)


def print_report(report: Report, console: Console) -> None:
    gpus = Table(title="rayfit report: GPUs")
    for column in ("node", "GPU", "name", "total", "planned", "allocated", "reserved", "free", "used", "models"):
        gpus.add_column(column)
    for gpu in report.gpus:
        used = gpu.used_percent
        gpus.add_row(
            gpu.node_id[:12],
            str(gpu.index),
            gpu.name or "-",
            gib(gpu.total_bytes),
            gib(gpu.planned_bytes),
            _size(gpu.allocated_bytes),
            _size(gpu.reserved_bytes),
            _size(gpu.free_bytes),
            "-" if used is None else f"{used:.1f}%",
            ", ".join(gpu.roles) or "-",
        )
    console.print(gpus)

    models = Table(title="rayfit report: models", show_lines=True)
    for column in ("model", "status", "planned", "actual", "budget", "uses", "KV plan / engine", "RSS"):
        models.add_column(column, overflow="fold")
    for row in report.models:
        style = _STATUS_STYLE.get(row.status, "yellow")
        planned = f"node {(row.planned_node or '?')[:12]}\n{row.planned_device or '?'}"
        actual = (
            f"node {row.actual_node[:12]}\n{row.actual_device} (CUDA_VISIBLE_DEVICES={row.cuda_visible_devices!r})"
            if row.actual_node
            else "-"
        )
        models.add_row(
            f"[bold]{row.role}[/]\n{row.model}",
            f"[{style}]{row.status}[/]",
            planned,
            actual,
            _size(row.budget_bytes),
            _size(row.actual_bytes),
            f"{_size(row.kv_planned_bytes)} / {_size(row.kv_actual_bytes)}",
            _size(row.rss_bytes),
        )
    console.print(models)
    if report.replicas:
        replicas = Table(title="rayfit report: replicas")
        for column in ("model", "replica", "state", "node", "GPU node", "GPU"):
            replicas.add_column(column)
        for rep in report.replicas:
            gpus = "-" if rep.gpu_indices is None else "+".join(str(i) for i in rep.gpu_indices)
            replicas.add_row(
                rep.role, rep.replica_id or "-", rep.state or "-", (rep.node_id or "-")[:12], rep.gpu_label or "-", gpus
            )
        console.print(replicas)
    for finding in report.findings:
        colour = "red" if finding.severity == "error" else "yellow"
        console.print(f"[bold {colour}]{finding.severity}:[/] {finding.role}: {finding.message}", highlight=False)
    if report.ok:
        console.print("[bold green]every model is where the plan put it, within its budget[/]")
