"""placement.report and deployments.placement_status on /v1/placement-shaped JSON.

The documents are what the app answers (deployments.app.entry_summary and
gpu_summary for the plan, ModelServer.placement for the replica). Two 24 GiB
GPUs on one node: buffer_agent (15 GiB budget) on GPU 1, summarizer (3 GiB) on
GPU 0.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.placement_status import role_status, unplaced_roles, with_status
from placement.placement_document import PlacementDocument, ReplicaError
from placement.report import build_report

GIB = 2**30
NODE, OTHER = "a" * 56, "b" * 56


def plan(gpu: int, budget_gib: float) -> dict[str, Any]:
    return {
        "model": f"org/m{gpu}",
        "device": f"cuda:{gpu}",
        "node_id": NODE,
        "gpu_indices": [gpu],
        "cuda_visible_devices": str(gpu),
        "fraction": 0.5,
        "memory_budget_bytes": int(budget_gib * GIB),
    }


def replica(gpu: int, reserved_gib: float, *, node: str = NODE, visible: str | None = None) -> dict[str, Any]:
    return {
        "planned": {},
        "actual": {
            "device": "cuda:0",
            "cuda_visible_devices": str(gpu) if visible is None else visible,
            "node_id": node,
            "cpu_fallback": False,
            "memory": {
                "device": "cuda:0",
                "weights_bytes": int(reserved_gib * GIB * 0.8),
                "cuda:0_allocated_bytes": int(reserved_gib * GIB * 0.9),
                "cuda:0_reserved_bytes": int(reserved_gib * GIB),
                "cuda:0_free_bytes": 4 * GIB,
                "cuda:0_total_bytes": 24 * GIB,
            },
        },
    }


def document() -> dict[str, Any]:
    """All well: each model on its GPU, within budget."""
    gpus = [
        {"node_id": NODE, "index": i, "name": "RTX 3090", "total_bytes": 24 * GIB, "planned_bytes": p, "roles": [r]}
        for i, p, r in ((0, 3 * GIB, "summarizer"), (1, 15 * GIB, "buffer_agent"))
    ]
    models = {
        "buffer_agent": {"plan": plan(1, 15), "replica": replica(1, 14)},
        "summarizer": {"plan": plan(0, 3), "replica": replica(0, 2.5)},
    }
    return {"models": with_status(models, {NODE}), "gpus": gpus}


def test_all_in_place_is_ok_with_per_gpu_usage() -> None:
    report = build_report(document())
    assert report.ok and report.findings == ()
    assert [m.status for m in report.models] == ["ok", "ok"]
    gpu0, gpu1 = report.gpus
    assert (gpu1.index, gpu1.reserved_bytes, gpu1.roles) == (1, 14 * GIB, ("buffer_agent",))
    assert gpu1.allocated_bytes == int(14 * GIB * 0.9)
    assert gpu0.free_bytes == 4 * GIB and gpu0.used_percent == pytest.approx(100 * 20 / 24)
    assert report.models[0].actual_bytes == 14 * GIB


def test_model_over_its_budget_is_an_error() -> None:
    doc = document()
    doc["models"]["summarizer"]["replica"] = replica(0, 3.5)
    report = build_report(doc)
    assert not report.ok
    (finding,) = report.findings
    assert (finding.kind, finding.role) == ("memory", "summarizer")
    assert "3.50 GiB" in finding.message and "3.00 GiB" in finding.message


def test_engine_kv_over_the_planned_kv_is_an_error() -> None:
    doc = document()
    doc["models"]["buffer_agent"]["plan"]["kv_cache_bytes"] = 4 * GIB
    doc["models"]["buffer_agent"]["replica"]["actual"]["memory"]["kv_built_bytes"] = 3 * GIB
    report = build_report(doc)
    assert report.ok
    assert (report.models[0].kv_planned_bytes, report.models[0].kv_actual_bytes) == (4 * GIB, 3 * GIB)
    doc["models"]["buffer_agent"]["replica"]["actual"]["memory"]["kv_built_bytes"] = 5 * GIB
    report = build_report(doc)
    assert not report.ok
    (finding,) = report.findings
    assert (finding.kind, finding.role) == ("memory", "buffer_agent")
    assert "5.000 GiB of KV cache" in finding.message and "4.000 GiB" in finding.message


@pytest.mark.parametrize(
    ("bad_replica", "kind"),
    [(replica(1, 14, node=OTHER), "node"), (replica(1, 14, visible="0"), "gpu")],
)
def test_model_not_where_planned_is_misplaced(bad_replica: dict[str, Any], kind: str) -> None:
    models = {"buffer_agent": {"plan": plan(1, 15), "replica": bad_replica}}
    doc = {"models": with_status(models, {NODE, OTHER}), "gpus": []}
    assert doc["models"]["buffer_agent"]["status"] == "misplaced"
    report = build_report(doc)
    assert [(f.kind, f.severity) for f in report.findings] == [(kind, "error")]


def test_planned_node_gone_is_unplaced_not_moved() -> None:
    models = {"buffer_agent": {"plan": plan(1, 15), "replica": {"error": "no replica answered"}}}
    status, reason = role_status("buffer_agent", plan(1, 15), models["buffer_agent"]["replica"], alive={OTHER})
    assert status == "unplaced" and NODE[:12] in reason
    assert unplaced_roles({"buffer_agent": plan(1, 15)}, alive={OTHER}) == {
        "buffer_agent": f"planned node {NODE[:12]} has left the cluster"
    }
    assert unplaced_roles({"buffer_agent": plan(1, 15)}, alive={NODE}) == {}
    report = build_report({"models": with_status(models, {OTHER}), "gpus": []})
    assert not report.ok and report.models[0].status == "unplaced"
    assert report.findings[0].kind == "unavailable"


def test_cpu_fallback_is_a_warning_only() -> None:
    doc = document()
    fallback = copy.deepcopy(doc["models"]["summarizer"]["replica"])
    fallback["actual"].update(cpu_fallback=True, device="cpu", memory={"weights_bytes": GIB, "rss_bytes": 2 * GIB})
    doc["models"]["summarizer"]["replica"] = fallback
    report = build_report(doc)
    assert report.ok
    assert [(f.kind, f.severity) for f in report.findings] == [("fallback", "warning")]
    summarizer = report.models[1]
    assert summarizer.actual_bytes == GIB and summarizer.rss_bytes == 2 * GIB  # weights, not RSS, vs the budget


def test_report_cli_exit_code_when_the_app_cannot_be_read() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "placement", "report", "--url", "http://127.0.0.1:9", "--timeout", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "cannot read http://127.0.0.1:9/v1/placement" in done.stderr
    assert json.loads(done.stdout or "null") is None


def test_the_document_keeps_its_keys_through_the_model() -> None:
    """The ingress answers the document through PlacementDocument: the JSON it gives back is the JSON it was
    given, key for key (the replica's CUDA figures kept as the memory report's extra keys)."""
    doc = document()
    unhealthy = {"error": "no replica answered", "status": "UNHEALTHY", "reason": "health check failed"}
    doc["models"]["summarizer"].update(status="unavailable", reason="no replica answered", replica=unhealthy)
    parsed = PlacementDocument.model_validate(doc)
    assert parsed.to_json() == doc
    memory = parsed.models["buffer_agent"].replica.actual.memory  # type: ignore[union-attr]
    assert memory.cuda_bytes("reserved") == {0: 14 * GIB} and memory.weights_bytes == int(14 * GIB * 0.8)
    assert isinstance(parsed.models["summarizer"].replica, ReplicaError)
    assert build_report(parsed) == build_report(doc)


@pytest.mark.parametrize(
    ("break_it", "field"),
    [
        (lambda doc: doc.pop("models"), "models"),
        (lambda doc: doc["models"]["summarizer"].pop("replica"), "models.summarizer.replica"),
        (lambda doc: doc["models"]["summarizer"].pop("status"), "models.summarizer.status"),
        (lambda doc: doc["models"]["summarizer"].update(replica={}), "models.summarizer.replica.error.error"),
        (lambda doc: doc["gpus"][1].pop("total_bytes"), "gpus.1.total_bytes"),
        (
            lambda doc: doc["models"]["summarizer"]["replica"]["actual"]["memory"].update({"cuda:0_free_bytes": "?"}),
            "models.summarizer.replica.report.actual.memory.cuda:0_free_bytes",
        ),
    ],
)
def test_a_document_missing_a_part_is_an_error_naming_it(break_it: Any, field: str) -> None:
    doc = document()
    break_it(doc)
    with pytest.raises(ValidationError) as raised:
        build_report(doc)
    (error,) = raised.value.errors()
    assert ".".join(str(part) for part in error["loc"]) == field
    assert field in str(raised.value)
