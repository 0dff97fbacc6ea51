"""The planner on hand-sized models, so every expected plan can be worked out by a reader.

Sizes are in GiB. A "24GB" GPU is 24 GiB; with the default 5% margin (1.2 GiB)
22.8 GiB of it is usable, and every replica is charged a 0.5 GiB CUDA context
(its engine process's) on each GPU it uses, beside its budget.
"""

from __future__ import annotations

import itertools
import random

import pytest

from placement.config import ModelSpec
from placement.estimate import MemoryEstimate
from placement.inventory import Gpu, Inventory, Node, Reserve, parse_gpu_spec
from placement.plan import PlanError
from placement.planner import make_plan
from placement.rules import SizeRule, SizeRules
from placement.units import GIB

USABLE_24 = 24 * GIB - int(0.05 * 24 * GIB)
CONTEXT = Reserve().cuda_context_bytes


def estimate(total_gib: float, params_b: float) -> MemoryEstimate:
    """An estimate whose total is `total_gib`, all of it weights."""
    return MemoryEstimate.lump(int(total_gib * GIB), source="params_b", params=int(params_b * 1e9))


def specs(**hints: dict) -> dict[str, ModelSpec]:
    return {role: ModelSpec(model=f"org/{role}", **h) for role, h in hints.items()}


# The user's case: MedGemma 27B (~17 GiB all in) and 4B (~3.5 GiB), no hints.
USER_MODELS = specs(summarizer={}, buffer_agent={})
USER_ESTIMATES = {"summarizer": estimate(3.5, 4.3), "buffer_agent": estimate(17.0, 27.0)}


def test_users_case_27b_to_gpu1_and_4b_to_gpu0() -> None:
    plan = make_plan(USER_MODELS, parse_gpu_spec("2x24GB"), estimates=USER_ESTIMATES)
    assert plan.entry("buffer_agent").gpu_indices == (1,)
    assert plan.entry("summarizer").gpu_indices == (0,)
    assert "rule 'large models take the last GPU'" in plan.entry("buffer_agent").reason
    # Fractions are each replica's share of the GPU's capacity (here all of it is usable), its CUDA
    # context included, in whole thousandths rounded down: (17 + 0.5) / 22.8 = 0.7675 -> 0.767.
    assert plan.entry("buffer_agent").fraction == 0.767
    assert plan.gpus[1].headroom_bytes == USABLE_24 - int(17.0 * GIB) - CONTEXT
    assert plan.gpus[1].cuda_context_bytes == CONTEXT and plan.entry("buffer_agent").cuda_context_bytes == CONTEXT


def test_plan_does_not_depend_on_config_order() -> None:
    reversed_models = dict(reversed(list(USER_MODELS.items())))
    reversed_estimates = dict(reversed(list(USER_ESTIMATES.items())))
    first = make_plan(USER_MODELS, parse_gpu_spec("2x24GB"), estimates=USER_ESTIMATES)
    second = make_plan(reversed_models, parse_gpu_spec("2x24GB"), estimates=reversed_estimates)
    assert first == second


def test_one_gpu_both_share_with_fractions_that_fit() -> None:
    plan = make_plan(USER_MODELS, parse_gpu_spec("1x24GB"), estimates=USER_ESTIMATES)
    assert {e.gpu_indices for e in plan.entries} == {(0,)}
    assert sum(e.fraction for e in plan.entries) <= 1.0
    # Two engine processes on the GPU: two CUDA contexts, beside the two budgets.
    assert plan.gpus[0].planned_bytes == int(3.5 * GIB) + int(17.0 * GIB) + 2 * CONTEXT
    assert (plan.gpus[0].cuda_contexts, plan.gpus[0].cuda_context_bytes) == (2, 2 * CONTEXT)
    # Who shares the GPU is in the GPU table; an entry names no other model (its replica's
    # bind arguments must not change when a neighbour joins).
    assert plan.gpus[0].roles == ("buffer_agent", "summarizer")
    assert "buffer_agent" not in plan.entry("summarizer").reason


def test_no_gpu_runs_on_cpu_with_a_ram_check() -> None:
    plan = make_plan(USER_MODELS, parse_gpu_spec("none", cpu_memory_bytes=64 * GIB), estimates=USER_ESTIMATES)
    assert [e.device for e in plan.entries] == ["cpu", "cpu"]
    with pytest.raises(PlanError) as raised:
        make_plan(USER_MODELS, parse_gpu_spec("none", cpu_memory_bytes=16 * GIB), estimates=USER_ESTIMATES)
    # The 27B does not fit 16 GiB of RAM; the 4B did (3.5 GiB + 1 GiB for its
    # process), and the message says what is left.
    assert [u.role for u in raised.value.unplaced] == ["buffer_agent"]
    assert "11.50 GiB" in str(raised.value)


def test_infeasible_plan_names_every_model_and_every_gpu() -> None:
    models = specs(a={}, b={}, c={})
    estimates = {"a": estimate(30, 50), "b": estimate(40, 70), "c": estimate(2, 1)}
    with pytest.raises(PlanError) as raised:
        make_plan(models, parse_gpu_spec("2x24GB"), estimates=estimates)
    message = str(raised.value)
    assert {u.role for u in raised.value.unplaced} == {"a", "b"}
    assert "a needs 30.00 GiB + 0.50 GiB for the CUDA context" in message and "b needs 40.00 GiB" in message
    assert "GPU 0" in message and "GPU 1" in message and "split: true" in message
    assert "Nothing was started." in message


def test_model_that_fits_no_gpu_is_split_when_allowed() -> None:
    # 30 GiB over two GPUs with 22.8 GiB usable each (22.3 beside its context on each): 15 GiB on each.
    models = specs(big={"split": True})
    plan = make_plan(models, parse_gpu_spec("2x24GB"), estimates={"big": estimate(30, 50)})
    entry = plan.entry("big")
    assert entry.gpu_indices == (0, 1) and entry.is_split
    assert entry.max_memory == {0: 15 * GIB, 1: 15 * GIB}
    assert entry.device_label == "cuda:0+1"
    # A split replica's engine process holds a context on each of its GPUs: one charged on each.
    assert [(g.cuda_contexts, g.planned_bytes) for g in plan.gpus] == [(1, 15 * GIB + CONTEXT)] * 2


def test_split_is_balanced_around_a_partly_full_gpu() -> None:
    # GPU 1 holds a 17 GiB model (+ its context), leaving 5.3 GiB; the split takes the fewest
    # GPUs with room (0 and 2, 22.8 GiB each), 15 GiB on each, and skips GPU 1.
    models = specs(big={"split": True}, other={"gpu": 1})
    estimates = {"big": estimate(30, 50), "other": estimate(17, 27)}
    plan = make_plan(models, parse_gpu_spec("3x24GB"), estimates=estimates)
    big = plan.entry("big")
    assert big.gpu_indices == (0, 2)  # two emptiest GPUs suffice: 22.8 + 22.8 >= 30 + 2 contexts
    assert big.max_memory == {0: 15 * GIB, 1: 15 * GIB}


def test_hints_pin_gpu_and_refuse_sharing() -> None:
    models = specs(a={"gpu": 0}, b={"share": False}, c={})
    estimates = {"a": estimate(15, 27), "b": estimate(2, 1), "c": estimate(2, 1)}
    plan = make_plan(models, parse_gpu_spec("3x24GB"), estimates=estimates)
    assert plan.entry("a").gpu_indices == (0,) and "pinned by `gpu: 0`" in plan.entry("a").reason
    b_gpu = plan.entry("b").gpu_indices
    # b sits alone: neither a nor c shares its GPU.
    assert b_gpu not in {plan.entry("a").gpu_indices, plan.entry("c").gpu_indices}


def test_cpu_hint_and_node_hint() -> None:
    inventory = Inventory(
        nodes=(
            Node(node_id="node-a", gpus=(Gpu(0, 24 * GIB),), cpu_memory_bytes=32 * GIB),
            Node(node_id="node-b", gpus=(Gpu(0, 24 * GIB),), cpu_memory_bytes=32 * GIB),
        )
    )
    models = specs(x={"cpu": True}, y={"node": "node-b"})
    plan = make_plan(models, inventory, estimates={"x": estimate(1, 0.5), "y": estimate(5, 7)})
    assert plan.entry("x").device == "cpu"
    assert plan.entry("y").node_id == "node-b"


def test_custom_rules_change_preference() -> None:
    rules = SizeRules(rules=(SizeRule(name="spread", prefer="most_free"),))
    models = specs(a={}, b={}, c={})
    estimates = {"a": estimate(3, 4), "b": estimate(2, 2), "c": estimate(1, 1)}
    plan = make_plan(models, parse_gpu_spec("3x24GB"), rules=rules, estimates=estimates)
    assert sorted(e.gpu_indices for e in plan.entries) == [(0,), (1,), (2,)]


def test_guessed_sizes_are_said_loudly() -> None:
    guess = MemoryEstimate.lump(15 * GIB, source="name_guess", params=27_000_000_000, is_guess=True)
    plan = make_plan(specs(m={}), parse_gpu_spec("1x24GB"), estimates={"m": guess})
    assert any("GUESSED" in w for w in plan.warnings)


def test_many_models_pack_without_overfilling_any_gpu() -> None:
    rng = random.Random(7)
    nodes = tuple(
        Node(node_id=f"n{n:02d}", gpus=tuple(Gpu(i, rng.choice([24, 48, 80]) * GIB) for i in range(8)))
        for n in range(4)
    )
    models = {f"m{i:03d}": ModelSpec(model=f"org/m{i}") for i in range(120)}
    estimates = {role: estimate(rng.uniform(0.5, 20), rng.uniform(0.5, 30)) for role in models}
    plan = make_plan(models, Inventory(nodes=nodes), estimates=estimates)
    assert len(plan.entries) == 120
    for usage in plan.gpus:
        assert usage.planned_bytes <= usage.usable_bytes
        assert usage.fraction_used <= 1.0
    # Shuffled dict order gives the identical plan.
    shuffled = list(models.items())
    rng.shuffle(shuffled)
    assert make_plan(dict(shuffled), Inventory(nodes=tuple(reversed(nodes))), estimates=estimates) == plan


@pytest.mark.parametrize("order", list(itertools.permutations(["a", "b", "c"])))
def test_fractions_on_a_shared_gpu_never_exceed_one(order: tuple[str, ...]) -> None:
    estimates = {"a": estimate(11, 9), "b": estimate(7, 5), "c": estimate(3.3, 3)}  # 21.3 + 3 contexts = 22.8
    models = {role: ModelSpec(model=role) for role in order}
    plan = make_plan(models, parse_gpu_spec("1x24GB"), estimates=estimates)
    assert 0 < plan.gpus[0].fraction_used <= 1.0


def test_uneven_split_holds_its_own_share_of_each_gpu() -> None:
    # "other" (17 GiB + its context) pinned on GPU 1 leaves it 5.3 GiB; "big" (25 GiB) must
    # split: water-filling puts 4.8 GiB of weights on GPU 1 (all it has beside big's own
    # context there) and 20.2 on GPU 0. Each GPU's slot holds only that GPU's share; one
    # fraction for both would put 0.76 + 0.9 on GPU 1's slot, which Ray could never schedule.
    models = specs(big={"split": True}, other={"gpu": 1})
    estimates = {"big": estimate(25, 40), "other": estimate(17, 27)}
    plan = make_plan(models, parse_gpu_spec("2x24GB"), estimates=estimates)
    big = plan.entry("big")
    assert big.gpu_indices == (0, 1)
    free_gpu1 = USABLE_24 - int(17 * GIB) - 2 * CONTEXT  # other's context, and big's own there
    assert big.max_memory == {0: 25 * GIB - free_gpu1, 1: free_gpu1}
    assert plan.gpus[1].headroom_bytes == 0
    assert big.fraction_of(1) < big.fraction_of(0) == big.fraction
    for usage in plan.gpus:
        assert usage.fraction_used <= 1.0


def test_replicas_are_budgeted_each_with_its_own_share() -> None:
    # Two replicas of a 6 GiB model: 12 GiB + two contexts on one GPU, each replica's slot
    # holding 6.5/22.8 of it.
    models = specs(pair={"replicas": 2}, other={})
    estimates = {"pair": estimate(6, 7), "other": estimate(9, 1)}
    plan = make_plan(models, parse_gpu_spec("1x24GB"), estimates=estimates)
    pair = plan.entry("pair")
    assert pair.replicas == 2 and pair.memory_budget_bytes == 6 * GIB
    assert pair.fraction == pytest.approx((6 * GIB + CONTEXT) / USABLE_24, abs=1e-3)
    assert plan.gpus[0].planned_bytes == 21 * GIB + 3 * CONTEXT
    assert plan.gpus[0].cuda_contexts == 3  # two replicas of pair, one of other
    assert plan.gpus[0].fraction_used == pytest.approx(2 * pair.fraction + plan.entry("other").fraction)
    # A third replica (18 GiB + 3 contexts) leaves no room for the 9 GiB model beside it.
    with pytest.raises(PlanError) as raised:
        make_plan(specs(pair={"replicas": 3}, other={}), parse_gpu_spec("1x24GB"), estimates=estimates)
    assert [u.role for u in raised.value.unplaced] == ["other"]
