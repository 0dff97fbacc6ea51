"""What makes an infeasible plan feasible (placement.advice), and what each placed role holds (placement.capacity).

On the real MedGemma config shapes (placement.sizing.reference_configs), laid
out as config.json in a Hugging Face cache as the unsloth bnb-4bit checkpoints
ship them, sized by the same `estimate_memory` the CLI uses. Every suggestion
is applied to the spec and planned again: the plan is feasible; a context or
batch figure is the largest that is (one more is not).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from placement.advice import KIND_ORDER, Advice, advise, apply, plan_or_advise
from placement.capacity import plan_capacity
from placement.config import ModelSpec
from placement.inventory import Inventory, parse_gpu_spec
from placement.plan import PlanError
from placement.planner import make_plan
from placement.sizing import estimate_memory
from placement.sizing.reference_configs import MEDGEMMA_4B, MEDGEMMA_27B_TEXT

BIG = "unsloth/medgemma-27b-text-it-unsloth-bnb-4bit"
SMALL = "unsloth/medgemma-1.5-4b-it-unsloth-bnb-4bit"
BIG_BF16 = "google/medgemma-27b-text-it"  # the same shapes, not pre-quantized
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def _unsloth_nf4(skip: list[str]) -> dict[str, Any]:
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "llm_int8_skip_modules": skip,
    }


def lay_out_hub(hub: Path) -> Path:
    """A Hugging Face cache holding only the config.json of the seed's two checkpoints (and the 27B's bf16 one)."""
    configs = {
        BIG: {**MEDGEMMA_27B_TEXT, "quantization_config": _unsloth_nf4(["lm_head"])},
        SMALL: {
            **MEDGEMMA_4B,
            "quantization_config": _unsloth_nf4(["lm_head", "vision_tower", "multi_modal_projector"]),
        },
        BIG_BF16: MEDGEMMA_27B_TEXT,
    }
    for model, config in configs.items():
        repo = hub / ("models--" + model.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(SNAPSHOT)
        snapshot = repo / "snapshots" / SNAPSHOT
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps(config))
    return hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lay_out_hub(tmp_path_factory.mktemp("hf-advice") / "hub")


@pytest.fixture(scope="module")
def sizes(hub: Path):
    """estimate_memory on the laid-out cache, memoized per spec (the tests re-plan the same specs often)."""
    cache: dict[ModelSpec, Any] = {}

    def estimate(spec: ModelSpec):
        if spec not in cache:
            cache[spec] = estimate_memory(spec, cache_dir=hub, fetch=False)
        return cache[spec]

    return estimate


def _plan(models: dict[str, ModelSpec], gpus: str | Inventory, estimate):
    inventory = parse_gpu_spec(gpus) if isinstance(gpus, str) else gpus
    return make_plan(models, inventory, estimates={role: estimate(spec) for role, spec in models.items()})


def _feasible(models: dict[str, ModelSpec], gpus: str | Inventory, estimate) -> bool:
    try:
        _plan(models, gpus, estimate)
    except PlanError:
        return False
    return True


def _check_every_suggestion(models: dict[str, ModelSpec], gpus: str | Inventory, estimate, advice: Advice) -> None:
    """Each suggestion, applied to the spec, plans feasibly; a shrunk figure is the largest that does."""
    assert advice.suggestions, advice.describe()
    ranks = [(s.cost, KIND_ORDER.index(s.kind), s.role) for s in advice.suggestions]
    assert ranks == sorted(ranks), "least change first"
    for suggestion in advice.suggestions:
        changed = apply(models, suggestion)
        for key, value in suggestion.change:  # the change is on the spec, as a user would write it
            outer, _, inner = key.partition(".")
            field = getattr(changed[suggestion.role], outer)
            assert (getattr(field, inner) if inner else field) == value
        plan = _plan(changed, gpus, estimate)
        assert dict(suggestion.lands) == {role: plan.entry(role).device_label for role, _ in suggestion.lands}
        if suggestion.kind in ("context_length", "max_batch_size", "replicas") and "." not in suggestion.change[0][0]:
            key, value = suggestion.change[0]
            one_more = {**changed, suggestion.role: changed[suggestion.role].model_copy(update={key: value + 1})}
            assert not _feasible(one_more, gpus, estimate), f"{key} {value + 1} fits too"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"context_length": 32768}, "context_length"),
        ({"max_batch_size": 16}, "max_batch_size"),
        ({"replicas": 2}, "replicas"),
    ],
)
def test_the_27b_made_infeasible_on_one_24gb_gpu_gets_changes_that_each_fit(sizes, extra, expected) -> None:
    models = {"buffer_agent": ModelSpec(model=BIG, **extra)}
    with pytest.raises(PlanError):
        _plan(models, "1x24GB", sizes)
    advice = advise(models, parse_gpu_spec("1x24GB"), estimate=sizes)
    print(f"\n{extra}:\n{advice.describe()}")
    _check_every_suggestion(models, "1x24GB", sizes, advice)
    first = advice.suggestions[0]
    assert first.kind == expected and first.role == "buffer_agent"
    # The checkpoint is pre-quantized: no other quantization is offered, and the advice says why.
    assert all(s.kind != "quantization" for s in advice.suggestions)
    assert any("pre-quantized" in note for note in advice.notes)
    # Bounded: a handful of estimates (cached per sizing-relevant spec), not one per probe of every search.
    assert advice.estimates <= 40


def test_the_context_found_is_exact(sizes) -> None:
    models = {"buffer_agent": ModelSpec(model=BIG, context_length=32768)}
    advice = advise(models, parse_gpu_spec("1x24GB"), estimate=sizes)
    (context,) = [s for s in advice.suggestions if s.kind == "context_length"]
    value = context.fields["context_length"]
    assert 4096 < value < 32768
    assert _plan(apply(models, context), "1x24GB", sizes).entry("buffer_agent").replica.context_length == value


def test_the_seeds_two_models_on_one_gpu(sizes) -> None:
    """The 27B and the 4B together on one GPU. On 24 GB no shrinking fits both (the 27B at 512 tokens
    still leaves the 4B no room): one of them moves to CPU. On 26 GB shrinking the 27B, the model that
    DID fit, makes room for the 4B."""
    models = {"buffer_agent": ModelSpec(model=BIG), "summarizer": ModelSpec(model=SMALL)}
    with pytest.raises(PlanError) as failed:
        _plan(models, "1x24GB", sizes)
    assert [u.role for u in failed.value.unplaced] == ["summarizer"]
    advice = advise(models, parse_gpu_spec("1x24GB"), estimate=sizes)
    print("\n" + advice.describe())
    _check_every_suggestion(models, "1x24GB", sizes, advice)
    # The smaller model moves first: less of the config changes.
    assert [(s.role, s.kind) for s in advice.suggestions] == [("summarizer", "cpu"), ("buffer_agent", "cpu")]
    assert dict(advice.suggestions[1].lands) == {"buffer_agent": "cpu", "summarizer": "cuda:0"}

    roomier = advise(models, parse_gpu_spec("1x26GB"), estimate=sizes)
    print("\n" + roomier.describe())
    _check_every_suggestion(models, "1x26GB", sizes, roomier)
    kinds = [(s.role, s.kind) for s in roomier.suggestions]
    assert kinds[:2] == [("buffer_agent", "max_batch_size"), ("buffer_agent", "context_length")]
    assert all(dict(s.lands) == {"buffer_agent": "cuda:0", "summarizer": "cuda:0"} for s in roomier.suggestions[:2])


def test_moving_another_model_to_another_gpu_ranks_first(sizes) -> None:
    """The 4B pinned to the 24 GB GPU leaves the 27B no GPU; pinning it to the other one costs nothing."""
    models = {"buffer_agent": ModelSpec(model=BIG), "summarizer": ModelSpec(model=SMALL, gpu=0)}
    with pytest.raises(PlanError):
        _plan(models, "24GB,12GB", sizes)
    advice = advise(models, parse_gpu_spec("24GB,12GB"), estimate=sizes)
    _check_every_suggestion(models, "24GB,12GB", sizes, advice)
    first = advice.suggestions[0]
    assert (first.role, first.kind, first.fields) == ("summarizer", "gpu", {"gpu": 1})
    assert dict(first.lands) == {"summarizer": "cuda:1", "buffer_agent": "cuda:0"}


def test_split_over_named_gpus(sizes) -> None:
    models = {"buffer_agent": ModelSpec(model=BIG)}
    advice = advise(models, parse_gpu_spec("2x12GB"), estimate=sizes)
    _check_every_suggestion(models, "2x12GB", sizes, advice)
    (split,) = [s for s in advice.suggestions if s.kind == "split"]
    assert split.fields == {"split": True} and dict(split.lands) == {"buffer_agent": "cuda:0+1"}
    assert "GPUs 0, 1" in split.summary


def test_quantization_only_for_a_checkpoint_not_pre_quantized(sizes) -> None:
    """The bf16 27B (54 GB) on 1x40GB: int8 fits, and is the least quantization offered (nf4 is not also listed)."""
    models = {"doctor": ModelSpec(model=BIG_BF16)}
    advice = advise(models, parse_gpu_spec("1x40GB"), estimate=sizes)
    _check_every_suggestion(models, "1x40GB", sizes, advice)
    quantized = [s for s in advice.suggestions if s.kind == "quantization"]
    assert [s.fields for s in quantized] == [{"quantization": "int8"}]
    assert quantized[0].cost == 0.5
    # On 1x24GB int8 does not fit: nf4 does.
    small_gpu = advise(models, parse_gpu_spec("1x24GB"), estimate=sizes)
    _check_every_suggestion(models, "1x24GB", sizes, small_gpu)
    assert [s.fields for s in small_gpu.suggestions if s.kind == "quantization"] == [{"quantization": "nf4"}]


def test_plan_or_advise_carries_the_suggestions(sizes) -> None:
    models = {"buffer_agent": ModelSpec(model=BIG, replicas=2)}
    with pytest.raises(PlanError) as raised:
        plan_or_advise(models, parse_gpu_spec("1x24GB"), estimate=sizes)
    assert raised.value.suggestions and raised.value.suggestions[0].fields == {"replicas": 1}
    message = str(raised.value)
    assert "buffer_agent needs" in message and "1. buffer_agent: replicas: 1" in message


def test_two_changes_where_no_single_one_fits(sizes) -> None:
    """The seed's two models on 1x24GB and 16 GiB of RAM, the 27B at 32768 tokens: no one change fits;
    the 4B on CPU plus the 27B's largest context that then fits does (the move first, its cost included)."""
    models = {"buffer_agent": ModelSpec(model=BIG, context_length=32768), "summarizer": ModelSpec(model=SMALL)}
    inventory = parse_gpu_spec("1x24GB", cpu_memory_bytes=16 * 2**30)
    advice = advise(models, inventory, estimate=sizes)
    print("\n" + advice.describe())
    _check_every_suggestion(models, inventory, sizes, advice)
    first = advice.suggestions[0]
    assert [(step.role, step.kind) for step in first.steps] == [
        ("summarizer", "cpu"),
        ("buffer_agent", "context_length"),
    ]
    assert first.cost == pytest.approx(
        sum(step.cost for step in first.requires) + 1 - first.fields["context_length"] / 32768
    )
    assert dict(first.lands) == {"summarizer": "cpu", "buffer_agent": "cuda:0"}
    assert "1. summarizer: cpu: true + buffer_agent: context_length: " in advice.describe()


def test_nothing_to_suggest_says_so() -> None:
    """60 GB on 2x24GB with 4 GiB of RAM: no split, no pin, no CPU holds it; memory_gb lumps do not shrink."""
    models = {"huge": ModelSpec(model="org/huge", memory_gb=60), "small": ModelSpec(model="org/small", memory_gb=2)}
    inventory = parse_gpu_spec("2x24GB", cpu_memory_bytes=4 * 2**30)
    advice = advise(models, inventory, estimate=lambda spec: estimate_memory(spec, fetch=False))
    assert advice.suggestions == () and advice.estimates == 0
    assert advice.describe().startswith("No change to one model's context, batch, replicas, quantization")


def test_capacity_is_read_off_the_replica_plan(sizes) -> None:
    """The seed's two models on 2x24GB: what each KV holds, from its replica plan, and its GPU's headroom."""
    plan = _plan({"buffer_agent": ModelSpec(model=BIG), "summarizer": ModelSpec(model=SMALL)}, "2x24GB", sizes)
    capacity = plan_capacity(plan)
    for role, gpu in (("buffer_agent", 1), ("summarizer", 0)):
        entry, held = plan.entry(role), capacity[role]
        kv = entry.replica.kv
        assert held.context_length == entry.replica.context_length == 4096
        assert held.sequences == kv.pool.sequences + kv.side_sequences == 5
        assert held.tokens_at_batch_1 == kv.pool.sequences * kv.pool.context_length == 4 * 4096
        assert held.kv_bytes == kv.total_bytes == entry.estimate.kv_cache_bytes
        (usage,) = [g for g in plan.gpus if g.index == gpu]
        assert held.headroom_bytes == usage.headroom_bytes > 0
        assert [(g.index, g.headroom_bytes) for g in held.gpus] == [(gpu, usage.headroom_bytes)]


def _run_plan(tmp_path: Path, config: str, *args: str) -> subprocess.CompletedProcess[str]:
    hub = tmp_path / ".cache" / "huggingface" / "hub"  # HOME's default Hugging Face cache
    if not hub.exists():
        lay_out_hub(hub)
    path = tmp_path / "model_configs.yaml"
    path.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "placement", "plan", str(path), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(tmp_path)},
    )


def test_cli_prints_the_changes_and_exits_1(tmp_path: Path) -> None:
    config = f"buffer_agent:\n  provider: huggingface\n  model: {BIG}\n  context_length: 32768\n"
    table = _run_plan(tmp_path, config, "--gpus", "1x24GB")
    assert table.returncode == 1, table.stderr
    out = table.stdout + table.stderr
    print(out)
    assert "buffer_agent needs" in out and "changes that make it fit" in out
    assert "context_length: " in out  # (`cpu: true` is listed only where this machine's free RAM holds the 27B)

    as_json = _run_plan(tmp_path, config, "--gpus", "1x24GB", "--json")
    assert as_json.returncode == 1, as_json.stderr
    payload = json.loads(as_json.stdout)
    assert payload["unplaced"][0]["role"] == "buffer_agent"
    first = payload["suggestions"][0]
    assert first["role"] == "buffer_agent" and first["kind"] == "context_length"
    assert 4096 < first["change"]["context_length"] < 32768 and first["before"] == {"context_length": 32768}
    assert first["lands"] == {"buffer_agent": "cuda:0"}
    # The figure is the one the in-process advice computes from the same files.
    spec = ModelSpec(model=BIG, context_length=first["change"]["context_length"])
    hub = tmp_path / ".cache" / "huggingface" / "hub"
    assert _feasible({"buffer_agent": spec}, "1x24GB", lambda s: estimate_memory(s, cache_dir=hub, fetch=False))


def test_cli_plan_shows_capacity(tmp_path: Path) -> None:
    config = f"buffer_agent:\n  model: {BIG}\nsummarizer:\n  model: {SMALL}\n"
    result = _run_plan(tmp_path, config, "--gpus", "2x24GB", "--json")
    assert result.returncode == 0, result.stderr
    models = {m["role"]: m for m in json.loads(result.stdout)["models"]}
    held = models["buffer_agent"]["capacity"]
    assert held["sequences"] == 5 and held["tokens_at_batch_1"] == 4 * 4096 and held["headroom_bytes"] > 0
    assert held["gpus"][0]["index"] == 1


def test_serve_app_plan_failure_carries_the_changes(tmp_path: Path) -> None:
    """deployments.app.plan_app (what `serve run` builds from) raises the advice with its PlanError; no Ray."""
    from deployments.app import AppArgs, plan_app

    path = tmp_path / "too_big.yaml"
    path.write_text("huge:\n  model: org/huge\n  memory_gb: 30\nsmall:\n  model: org/small\n  memory_gb: 2\n")
    args = AppArgs(model_config=str(path), gpus="2x24GB")
    with pytest.raises(PlanError) as raised:
        plan_app(args, parse_gpu_spec("2x24GB"))
    first = raised.value.suggestions[0]
    assert (first.role, first.fields, dict(first.lands)) == ("huge", {"split": True}, {"huge": "cuda:0+1"})
    assert "Nothing was started." in str(raised.value) and "1. huge: split: true" in str(raised.value)


def test_placement_entries_carry_capacity(sizes) -> None:
    """/v1/placement's plan entry (deployments.app.entry_summary) has the same capacity as the plan table."""
    from deployments.app import entry_summary

    plan = _plan({"buffer_agent": ModelSpec(model=BIG), "summarizer": ModelSpec(model=SMALL)}, "2x24GB", sizes)
    capacity = plan_capacity(plan)
    for entry in plan.entries:
        summary = json.loads(json.dumps(entry_summary(entry, entry.model, plan.gpus)))
        assert summary["capacity"] == capacity[entry.role].as_dict()
        assert summary["capacity"]["headroom_bytes"] > 0 and summary["capacity"]["sequences"] == 5
