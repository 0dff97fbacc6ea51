"""Measured figures in later plans, and `--add`'s three answers, on declared inventories (no Ray).

Sizes in GiB as in tests/test_stable_plan.py: two 24 GiB GPUs named "RTX 3090", 5% kept free, each replica
charged a 0.5 GiB CUDA context beside its budget. The 27B (17 GiB) goes to the last GPU, the 4B (3.5 GiB)
to the first (the shipped size rules).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from placement.add_model import check_addition
from placement.calibration import (
    CPU_KIND,
    CalibrationKey,
    Measurement,
    calibrated,
    device_kind,
    key_for,
    load_measurements,
    save_measurements,
)
from placement.config import ModelSpec
from placement.estimate import MemoryEstimate
from placement.inventory import Gpu, Inventory, Node
from placement.plan import PlanError
from placement.planner import make_plan
from placement.units import GIB

GPU_NAME = "RTX 3090"
MODELS = {"summarizer": ModelSpec(model="org/medgemma-4b"), "buffer_agent": ModelSpec(model="org/medgemma-27b")}
SIZES = {
    "org/medgemma-4b": MemoryEstimate.lump(
        int(3.5 * GIB), source="params_b", params=4_300_000_000, context_length=4096
    ),
    "org/medgemma-27b": MemoryEstimate.lump(17 * GIB, source="params_b", params=27_000_000_000, context_length=4096),
    "org/new-30b": MemoryEstimate.lump(20 * GIB, source="params_b", params=30_000_000_000, context_length=4096),
    "org/new-1b": MemoryEstimate.lump(1 * GIB, source="params_b", params=1_000_000_000, context_length=4096),
    "org/huge": MemoryEstimate.lump(40 * GIB, source="params_b", params=70_000_000_000, context_length=4096),
}


def two_gpus(name: str | None = GPU_NAME) -> Inventory:
    gpus = (Gpu(0, 24 * GIB, name=name), Gpu(1, 24 * GIB, name=name))
    return Inventory(nodes=(Node(node_id="a" * 56, gpus=gpus, has_gpu_slots=True),))


def cpu_only(ram: int = 64 * GIB) -> Inventory:
    return Inventory(nodes=(Node(node_id="b" * 56, gpus=(), cpu_memory_bytes=ram),))


def measurement(spec: ModelSpec, kind: str, peak: int, weights: int) -> Measurement:
    key = key_for(spec, SIZES[spec.model], kind)
    return Measurement(key, weights, 0, peak, SIZES[spec.model].total_bytes, "r", "2026-12-07T00:00:00+00:00")


def add(role: str, model: str, inventory: Inventory):
    return check_addition(
        MODELS, role, ModelSpec(model=model), inventory, resolve=lambda s: s, estimate=lambda s: SIZES[s.model]
    )


def test_a_measured_peak_replaces_the_estimate_only_for_its_key_and_device_kind() -> None:
    big = MODELS["buffer_agent"]
    estimates = {role: SIZES[spec.model] for role, spec in MODELS.items()}
    stored = {m.key: m for m in [measurement(big, GPU_NAME, 15 * GIB, 14 * GIB)]}
    used = calibrated(MODELS, estimates, two_gpus(), stored)
    assert used["buffer_agent"].total_bytes == 15 * GIB and used["buffer_agent"].weights_bytes == 14 * GIB
    assert used["buffer_agent"].source_label == "measured (params_b)"
    assert used["summarizer"] == estimates["summarizer"]  # never measured
    # Another card, unnamed (declared) GPUs, or another context: the estimate stands.
    assert calibrated(MODELS, estimates, two_gpus("A10"), stored) == estimates
    assert calibrated(MODELS, estimates, two_gpus(None), stored) == estimates
    longer = {**estimates, "buffer_agent": MemoryEstimate.lump(17 * GIB, params=27_000_000_000, context_length=8192)}
    assert calibrated(MODELS, longer, two_gpus(), stored)["buffer_agent"].measured_peak_bytes is None
    # The plan budgets the measured total: 15 GiB instead of 17.
    plan = make_plan(MODELS, two_gpus(), estimates=used)
    assert plan.entry("buffer_agent").memory_budget_bytes == 15 * GIB


def test_on_cpu_the_measured_peak_rss_is_the_whole_charge() -> None:
    small = MODELS["summarizer"]
    assert device_kind(small, cpu_only()) == CPU_KIND and device_kind(small, two_gpus()) == GPU_NAME
    # 21 GiB of RAM: the 27B takes 17 + 1 (its process); the 4B's estimate + process (4.5) does not fit the 3 left,
    # its measured peak RSS of 2.5 GiB (the process included) does.
    tight = cpu_only(21 * GIB)
    estimates = {role: SIZES[spec.model] for role, spec in MODELS.items()}
    with pytest.raises(PlanError, match="summarizer needs 4.50 GiB"):
        make_plan(MODELS, tight, estimates=estimates)
    stored = {m.key: m for m in [measurement(small, CPU_KIND, int(2.5 * GIB), GIB)]}
    plan = make_plan(MODELS, tight, estimates=calibrated(MODELS, estimates, tight, stored))
    assert plan.entry("summarizer").device == "cpu" and plan.entry("summarizer").memory_budget_bytes == 2.5 * GIB


def test_the_file_keeps_the_latest_measurement_per_key(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "calibration.json"
    first = measurement(MODELS["summarizer"], CPU_KIND, 2 * GIB, GIB)
    again = measurement(MODELS["summarizer"], CPU_KIND, 3 * GIB, GIB)
    other = measurement(MODELS["buffer_agent"], GPU_NAME, 15 * GIB, 14 * GIB)
    save_measurements(path, [first, other])
    save_measurements(path, [again])
    stored = load_measurements(path)
    assert stored == {again.key: again, other.key: other}
    assert isinstance(next(iter(stored)), CalibrationKey)


def test_add_answers_fits_moves_and_no_room() -> None:
    small = add("helper", "org/new-1b", two_gpus())
    assert small.verdict == "fits" and small.moved == () and small.entry is not None
    assert small.entry.gpu_indices == (0,)  # small models go to cuda:0 (beside the 4B)
    # Larger than the running 27B: placed first, it takes GPU 1 and the 27B would move to GPU 0.
    bigger = add("judge", "org/new-30b", two_gpus())
    assert bigger.verdict == "moves" and bigger.entry is not None and bigger.entry.gpu_indices == (1,)
    assert [role for role, _, _ in bigger.moved] == ["buffer_agent"]
    assert "cuda:1" in bigger.moved[0][1] and "cuda:0" in bigger.moved[0][2]
    huge = add("giant", "org/huge", two_gpus())
    assert huge.verdict == "no_room" and huge.needed_bytes == 40 * GIB + GIB // 2  # its budget + its CUDA context
    with pytest.raises(ValueError, match="already in the config"):
        add("summarizer", "org/new-1b", two_gpus())


def test_measurements_are_read_from_the_placement_document() -> None:
    """A `/v1/placement` body as the app answers it: a GPU role (its card's peak reserved, summed over
    local GPUs), a CPU role (peak RSS), and a role whose replica did not answer (skipped, with why)."""
    from placement.calibration import measurements_from_placement

    node = "a" * 56
    planned = {"replica_plan": {"context_length": 4096}, "node_id": node, "memory_budget_bytes": 18 * GIB}
    gpu_memory = {"device": "cuda:0", "weights_bytes": 15 * GIB, "kv_built_bytes": GIB}
    cpu_memory = {"device": "cpu", "weights_bytes": 3 * GIB, "peak_rss_bytes": 5 * GIB}
    gpu_memory |= {"cuda:0_peak_reserved_bytes": 16 * GIB, "cuda:0_allocated_bytes": 15 * GIB}
    body = {
        "gpus": [{"node_id": node, "index": 1, "name": GPU_NAME, "total_bytes": 24 * GIB}],
        "models": {
            "buffer_agent": {
                "status": "ok",
                "reason": "",
                "plan": {**planned, "gpu_indices": [1], "device": "cuda:1"},
                "replica": {"actual": {"device": "cuda:0", "memory": gpu_memory}},
            },
            "summarizer": {
                "status": "ok",
                "reason": "",
                "plan": {**planned, "device": "cpu", "memory_budget_bytes": 4 * GIB},
                "replica": {"actual": {"device": "cpu", "memory": cpu_memory}},
            },
            "other": {"status": "unavailable", "reason": "x", "plan": None, "replica": {"error": "no replica"}},
        },
    }
    written = {**MODELS, "other": ModelSpec(model="org/new-1b")}
    estimates = {role: SIZES[spec.model] for role, spec in written.items()}
    found, notes = measurements_from_placement(body, written, estimates)
    by_role = {m.role: m for m in found}
    assert by_role["buffer_agent"].key.device_kind == GPU_NAME and by_role["buffer_agent"].peak_bytes == 16 * GIB
    assert by_role["buffer_agent"].kv_bytes == GIB and by_role["buffer_agent"].estimated_bytes == 18 * GIB
    assert by_role["summarizer"].key.device_kind == CPU_KIND and by_role["summarizer"].peak_bytes == 5 * GIB
    assert notes == ["other: no replica report (no replica); skipped"]
