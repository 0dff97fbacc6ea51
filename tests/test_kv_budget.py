"""The KV contract: what the plan budgets is what the engine allocates, on every path.

The reference MedGemma shapes are checked against transformers' own
PagedAttentionCache built on the meta device (no weights, no memory); the
tiny model runs the real engine on CPU and its allocated KV tensors are
measured against the planned bytes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from plans import replica_plan
from transformers import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.distributed import DistributedHelper

from deployments.engine.core import Engine
from deployments.engine.errors import PlanContractError
from deployments.engine.generation import GenerationInput, SamplingParams
from deployments.engine.kv import SequenceSlots
from deployments.engine.loading import LoadedModel, load_model
from placement.config import ModelSpec
from placement.inventory import parse_gpu_spec
from placement.planner import make_plan
from placement.replica import WEIGHTS_TOLERANCE, complete_kv
from placement.sizing import estimate_from_config, estimate_memory
from placement.sizing.kv_budget import kv_budget, paged_pool
from placement.sizing.meta_model import to_config
from placement.sizing.reference_configs import MEDGEMMA_4B, MEDGEMMA_27B_TEXT
from placement.units import GIB

if TYPE_CHECKING:
    from serve_support import ThreadGroup  # the `threads` fixture (conftest)

# What the issue allows on top of the plan: 2%.
TOLERANCE = 1.02


def _transformers_pool_bytes(text_config: object, num_blocks: int, sequences: int) -> int:
    """The cache tensor transformers' continuous batching builds for `num_blocks` (meta device)."""
    config = ContinuousBatchingConfig(
        page_size=64,
        num_blocks=num_blocks,
        max_requests_per_batch=sequences,
        max_batch_tokens=256,
        allow_block_sharing=False,
        max_memory_percent=1000.0,  # meta device: nothing is allocated, skip the free-memory check
    )
    cache = PagedAttentionCache(
        text_config, config, device="meta", distributed_helper=DistributedHelper(None, None), dtype=torch.bfloat16
    )
    return cache.cache_tensor.numel() * cache.cache_tensor.element_size()


@pytest.mark.parametrize("reference", [MEDGEMMA_27B_TEXT, MEDGEMMA_4B], ids=["medgemma-27b", "medgemma-4b"])
def test_reference_pool_is_what_transformers_builds(reference: dict) -> None:
    text_config = to_config(reference).get_text_config()
    pool = paged_pool(text_config, sequences=4, context_length=4096, dtype=torch.bfloat16)
    assert _transformers_pool_bytes(text_config, pool.num_blocks, 4) == pool.cache_bytes
    # The naive num_blocks (pages per request × batch, what the engine passed before) builds far more.
    naive = _transformers_pool_bytes(text_config, (4096 // 64) * 4, 4)
    assert naive > 2 * pool.cache_bytes
    # The planner's KV is that pool plus one side sequence: every byte the engine may hold.
    estimate = estimate_from_config(reference, quantization="nf4")
    budget = kv_budget(text_config, batch_sequences=4, context_length=4096, dtype=torch.bfloat16)
    assert estimate.kv_cache_bytes == budget.total_bytes == pool.cache_bytes + budget.side_bytes


def test_the_two_by_24gb_plan_still_fits() -> None:
    from placement.config import ModelSpec

    specs = {
        "buffer_agent": ModelSpec(model="unsloth/medgemma-27b-text-it-unsloth-bnb-4bit"),
        "summarizer": ModelSpec(model="unsloth/medgemma-1.5-4b-it-unsloth-bnb-4bit"),
    }
    estimates = {
        "buffer_agent": estimate_from_config(MEDGEMMA_27B_TEXT, quantization="nf4"),
        "summarizer": estimate_from_config(MEDGEMMA_4B, quantization="nf4", skip_modules=["vision_tower"]),
    }
    plan = make_plan(specs, parse_gpu_spec("2x24GB"), estimates=estimates)
    assert plan.entry("buffer_agent").gpu_indices == (1,)
    assert plan.entry("summarizer").gpu_indices == (0,)
    big = plan.entry("buffer_agent").estimate
    print(f"\n27B: KV {big.kv_cache_bytes / GIB:.2f} GiB, total {big.total_bytes / GIB:.2f} GiB")
    assert big.total_bytes < 22 * GIB
    for gpu in plan.gpus:
        assert gpu.planned_bytes <= gpu.usable_bytes


# ---- the real engine on the tiny model ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_spec(tiny_text_model_dir: Path) -> ModelSpec:
    return ModelSpec(model=str(tiny_text_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def loaded(tiny_spec: ModelSpec) -> LoadedModel:
    return load_model(tiny_spec, replica_plan(tiny_spec))


@pytest.fixture(scope="module")
def planned_kv(tiny_spec: ModelSpec) -> int:
    return estimate_memory(tiny_spec).kv_cache_bytes


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel, tiny_spec: ModelSpec) -> Iterator[Engine]:
    engine = Engine(loaded, replica_plan(tiny_spec))
    yield engine
    engine.close()


def _request(max_tokens: int, *, temperature: float = 0.0, seed: int | None = None) -> GenerationInput:
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    return GenerationInput(params=params, prompt="The quick brown fox")


def test_pool_allocated_equals_planned(engine: Engine, planned_kv: int) -> None:
    report = engine.kv_report()
    assert engine.pool is not None
    # Measured off the manager's own cache tensor.
    assert engine.pool.batcher.cache_bytes == engine.kv_budget.pool_bytes
    assert report["built_bytes"] <= planned_kv
    assert report["pool_sequences"] == 4 and report["side_sequences"] == 1


def test_side_path_stays_in_its_slot(engine: Engine, planned_kv: int) -> None:
    # A seeded request runs its own generate to the full context: its cache is measured every step.
    long = _request(engine.context_length - 8, temperature=0.8, seed=1)
    engine.generate_batch([long])
    report = engine.kv_report()
    assert 0 < report["peak_side_bytes"] <= report["side_bytes_worst"]
    assert report["peak_kv_bytes"] <= planned_kv * TOLERANCE


def test_every_path_at_once_under_load(engine: Engine, planned_kv: int, threads: ThreadGroup) -> None:
    """Greedy, sampled, seeded, streamed and batched requests together: never more KV than planned."""
    long = engine.context_length - 10

    jobs = []
    for i in range(6):
        jobs.append(lambda i=i: engine.generate_batch([_request(long - i)]))
        jobs.append(lambda i=i: list(engine.stream(_request(40 + i))))
    for i in range(3):
        jobs.append(lambda i=i: engine.generate_batch([_request(60, temperature=0.9, seed=i)]))
        jobs.append(lambda i=i: engine.generate_batch([_request(50, temperature=0.7) for _ in range(3)]))
        jobs.append(lambda: list(engine.stream(_request(30, temperature=0.9, seed=5))))
    for job in jobs:
        threads.start(job)
    # Every job finished within the bound, none raised (join re-raises the first that did).
    threads.join(600)
    report = engine.kv_report()
    assert engine.pool is not None
    assert engine.pool.batcher.slots.peak_in_use <= engine.pool.batcher.slots.capacity == 4
    assert engine.side.slots.peak_in_use <= engine.side.slots.capacity == 1
    assert report["peak_kv_bytes"] <= planned_kv * TOLERANCE
    print(f"\nKV planned {planned_kv} B, peak measured {report['peak_kv_bytes']} B")


def test_a_plan_without_geometry_fits_its_kv_bytes_at_load(
    loaded: LoadedModel, tiny_spec: ModelSpec, planned_kv: int
) -> None:
    """A model sized from a count or a name has no KV geometry in its plan: placement.replica.complete_kv
    gives it one from the loaded config, with as many of the batch's sequences as the reserved bytes hold."""
    text_config = loaded.model.config.get_text_config()
    budget_for_two = kv_budget(text_config, batch_sequences=2, context_length=256, dtype=torch.float32)
    plan = replace(replica_plan(tiny_spec), kv=None, kv_budget_bytes=budget_for_two.total_bytes)
    with pytest.raises(ValueError, match="no KV geometry"):
        Engine(loaded, plan)
    plan = complete_kv(plan, text_config, 4)
    assert plan.batch_sequences == 2 and plan.kv == budget_for_two
    engine = Engine(loaded, plan)
    try:
        assert engine.kv_budget.pool is not None and engine.kv_budget.pool.sequences == 2
        assert engine.kv_report()["built_bytes"] <= budget_for_two.total_bytes < planned_kv
    finally:
        engine.close()


def test_an_engine_that_cannot_build_its_plan_refuses_to_start(loaded: LoadedModel, tiny_spec: ModelSpec) -> None:
    """The contract check (deployments.engine.contract): a pool or weights other than planned never serve."""
    plan = replica_plan(tiny_spec)
    assert plan.kv is not None and plan.kv.pool is not None
    # The plan claims one sector more than the num_blocks it hands transformers builds.
    claimed = replace(plan.kv.pool, sectors=plan.kv.pool.sectors + 1)
    wrong_pool = replace(plan, kv=replace(plan.kv, pool=claimed))
    with pytest.raises(
        PlanContractError, match=rf"pool holds {plan.kv.pool_bytes} bytes.*plan budgets {claimed.cache_bytes}"
    ):
        Engine(loaded, wrong_pool)
    # Weights sized for another model (twice these): more than WEIGHTS_TOLERANCE apart.
    wrong_weights = replace(plan, weights_bytes=2 * plan.weights_bytes)
    with pytest.raises(PlanContractError, match=rf"weights hold \d+ bytes .* plan sized {2 * plan.weights_bytes}"):
        Engine(loaded, wrong_weights)
    # Within the tolerance it serves.
    close = replace(plan, weights_bytes=int(plan.weights_bytes * (1 + WEIGHTS_TOLERANCE / 2)))
    Engine(loaded, close).close()


def test_classic_only_engine_batches_within_its_slots(loaded: LoadedModel, tiny_spec: ModelSpec) -> None:
    spec = tiny_spec.model_copy(update={"max_batch_size": 2, "continuous_batching": False})
    planned_kv = estimate_memory(spec).kv_cache_bytes
    engine = Engine(loaded, replica_plan(spec))
    assert engine.pool is None and engine.side.slots.capacity == 2
    # Five rows in one call: chunked to two per generate, each row within the context length.
    rows = [_request(engine.context_length - 20, temperature=0.5) for _ in range(5)]
    outputs = engine.generate_batch(rows)
    assert len(outputs) == 5
    report = engine.kv_report()
    assert engine.side.slots.peak_in_use <= 2
    assert report["peak_kv_bytes"] <= report["built_bytes"] <= planned_kv


def test_slots_make_excess_requests_wait(threads: ThreadGroup) -> None:
    slots = SequenceSlots(1, "test")
    order: list[str] = []
    slots.acquire()

    def second() -> None:
        with slots.hold():
            order.append("second")

    threads.start(second)
    time.sleep(0.2)
    assert order == [] and slots.in_use == 1  # waiting, holding nothing
    order.append("first done")
    slots.release()
    threads.join(5)
    assert order == ["first done", "second"] and slots.in_use == 0
    with pytest.raises(ValueError, match="cannot hold 2"):
        slots.acquire(2)


def test_a_memory_gb_plan_keeps_the_models_context(tiny_spec: ModelSpec) -> None:
    """A `memory_gb` override keeps the model's own context (min(positions, 4096)): it once took 4096
    from nowhere for this 256-position model. (A `context_length` the user sets is theirs to choose.)"""
    lump = replica_plan(tiny_spec.model_copy(update={"memory_gb": 1.0}))
    assert lump.context_length == 256 and lump.kv is None and lump.kv_budget_bytes is None
