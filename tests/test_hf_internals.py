"""The transformers internals rayfit reaches (placement.hf_internals): present on the installed version,
and named by the engine-start check when one moves (no Ray, no model)."""

from __future__ import annotations

import asyncio
import threading
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers
from packaging.requirements import Requirement
from transformers.generation.continuous_batching.requests import GenerationOutput

from placement import hf_internals
from placement.hf_internals import (
    INTERNALS,
    TRANSFORMERS,
    TransformersInternalsError,
    check_transformers_internals,
    transformers_internals_problems,
)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _installed(**replaced: object) -> SimpleNamespace:
    """The installed transformers objects, with some replaced (None: removed)."""
    source = SimpleNamespace(**vars(TRANSFORMERS))
    for name, value in replaced.items():
        if value is None:
            delattr(source, name)
        else:
            setattr(source, name, value)
    return source


# ---- (a) the installed version -------------------------------------------------------------------


def test_installed_transformers_has_every_internal() -> None:
    assert transformers_internals_problems() == []
    check_transformers_internals()  # raises TransformersInternalsError otherwise
    assert TRANSFORMERS.version == transformers.__version__
    # Every object was really imported: none is a placeholder for a name that moved.
    for name, value in vars(TRANSFORMERS).items():
        assert not isinstance(value, hf_internals._MissingMeta), name


def test_pyproject_pins_the_tested_transformers() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (pin,) = [Requirement(d) for d in dependencies if Requirement(d).name == "transformers"]
    assert pin.specifier.contains(transformers.__version__), (str(pin), transformers.__version__)
    assert transformers.__version__.startswith(f"{hf_internals.TESTED_ON}.")
    # Only the tested release line: the next minor release is refused.
    major, minor = (int(part) for part in hf_internals.TESTED_ON.split("."))
    assert not pin.specifier.contains(f"{major}.{minor + 1}.0")
    assert not pin.specifier.contains(f"{major}.{minor - 1}.0")


def test_loop_delivery_is_what_the_router_reads() -> None:
    """The router entry `deliver_on_loop` writes is the one transformers' OutputRouter delivers to;
    after `drop_loop_delivery` outputs go back to the shared queue."""
    router = TRANSFORMERS.OutputRouter()
    manager = SimpleNamespace(output_router=router)

    async def deliver_from_another_thread() -> GenerationOutput:
        received: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        hf_internals.deliver_on_loop(manager, "r1", received.put_nowait, asyncio.get_running_loop())
        output = GenerationOutput(request_id="r1", generated_tokens=[7])
        sender = threading.Thread(target=router.deliver, args=(output,))
        sender.start()
        sender.join(timeout=10)
        return await asyncio.wait_for(received.get(), timeout=10)

    output = asyncio.run(deliver_from_another_thread())
    assert (output.request_id, output.generated_tokens) == ("r1", [7])
    hf_internals.drop_loop_delivery(manager, "r1")
    router.deliver(GenerationOutput(request_id="r1", generated_tokens=[8]))
    assert router.output_queue.get(timeout=10).generated_tokens == [8]


def test_request_row_state_reads_the_processor_argument() -> None:
    state = TRANSFORMERS.RequestState(request_id="r1", initial_tokens=[1, 2], logit_processor_kwargs={"rayfit_row": 3})
    state.generated_tokens.extend([5, 6])
    future = TRANSFORMERS.FutureRequestState(state, has_new_token=True, complete_blocks={}, query_length=1)
    kwargs, generated = hf_internals.request_row_state(future)
    assert (dict(kwargs), list(generated)) == ({"rayfit_row": 3}, [5, 6])


# ---- (b) the check names what moved --------------------------------------------------------------


class _RunnerWithoutSample:
    def __init__(self) -> None:
        self.return_logprobs = False


class _RunnerWithOtherSample:
    def __init__(self) -> None:
        self.return_logprobs = False

    def _sample(self, logits: object, out: object) -> None: ...


class _RouterWithRenamedLock:
    def __init__(self) -> None:
        self.result_handlers: dict[str, object] = {}
        self.lock = threading.Lock()


@pytest.mark.parametrize(
    ("replaced", "named"),
    [
        ({"OutputRouter": None}, "OutputRouter is gone"),
        ({"ModelRunner": _RunnerWithoutSample}, "ModelRunner._sample is gone"),
        (
            {"ModelRunner": _RunnerWithOtherSample},
            "ModelRunner._sample takes (logits, out), expected (scores, output_ids, ...)",
        ),
        ({"OutputRouter": _RouterWithRenamedLock}, "OutputRouter._lock is gone"),
        (
            {"ATTN_TYPE_TO_ALLOCATOR": {"full_attention": TRANSFORMERS.FullAttentionCacheAllocator}},
            "ATTN_TYPE_TO_ALLOCATOR['sliding_attention'] is no longer a FullAttentionCacheAllocator",
        ),
        ({"find_head_dim": lambda cfg: 64}, "find_head_dim takes (cfg), expected (config, ...)"),
    ],
)
def test_the_check_names_the_internal_that_moved(replaced: dict[str, object], named: str) -> None:
    source = _installed(version="5.99.0", **replaced)
    with pytest.raises(TransformersInternalsError) as caught:
        check_transformers_internals(source)
    message = str(caught.value)
    assert named in message
    assert message.startswith("transformers 5.99.0 changed internals")
    assert transformers_internals_problems(source) == [named]  # and nothing else is blamed


@pytest.mark.parametrize("owner", sorted({internal.owner for internal in INTERNALS}))
def test_every_listed_internal_is_checked(owner: str) -> None:
    """An object that lost everything is blamed for every attribute and callable the table lists for it;
    one the table only needs present is blamed when it is gone."""
    entries = [internal for internal in INTERNALS if internal.owner == owner]
    if not any(internal.attributes or internal.callable is not None for internal in entries):
        assert transformers_internals_problems(_installed(**{owner: None})) == [f"{owner} is gone"]
        return
    problems = transformers_internals_problems(_installed(**{owner: type(owner, (), {})}))
    for internal in entries:
        for attribute in internal.attributes:
            assert f"{owner}.{attribute} is gone" in problems
        if internal.callable:  # gone, or (object's own __init__) with other parameters
            assert any(p.startswith(f"{owner}.{internal.callable} ") for p in problems), problems
    assert problems, owner  # a bare class never passes for a transformers internal


def test_a_name_gone_at_import_is_a_placeholder_that_names_itself() -> None:
    missing = hf_internals._find("transformers.generation.continuous_batching.nowhere", "ModelRunner")
    path = "transformers.generation.continuous_batching.nowhere.ModelRunner"
    # What imports it still imports (a subclass is defined), but any use names it.
    subclass = type("Sub", (missing,), {})
    for use in (missing, subclass, lambda: missing["full_attention"], lambda: missing.get_bytes_per_page):
        with pytest.raises(TransformersInternalsError, match=f"has no {path}"):
            use()
    with pytest.raises(TransformersInternalsError, match=f"{path} is gone"):
        check_transformers_internals(_installed(ModelRunner=missing))
