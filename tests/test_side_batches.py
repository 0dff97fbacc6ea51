"""Side requests that arrive together run as one batch, inside the engine (deployments.engine.side_batches).

The first test drives a real engine with continuous batching off (every request on the side
backend), as a replica does: concurrent `generate_async` calls. The others give `SideBatches` a
batch function that records its calls and can be held, to pin down its rules: at most `size` per
batch, one batch at a time, a bad request never fails its mates, a caller that goes away leaves
its batch, and a batch whose callers have all gone is stopped.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from plans import engine_plan

from deployments.engine.core import Engine
from deployments.engine.errors import InvalidRequest
from deployments.engine.generation import GenerationInput, GenerationOutput, SamplingParams
from deployments.engine.loading import load_model
from deployments.engine.rules import RowRules
from deployments.engine.side_batches import SideBatches
from placement.config import ModelSpec

GREEDY = SamplingParams(max_tokens=6, temperature=0)
# Any wait in these tests: far above what it takes, so only a hang reaches it.
BOUND_S = 60.0


class RecordedEngine:
    """A real engine with continuous batching off (every request on the side backend, batched by its
    SideBatches), whose batch calls are recorded: each batch's size and how it ended."""

    def __init__(self, model_dir: Path, batch: int):
        spec = ModelSpec(model=str(model_dir), dtype="float32")
        plan = engine_plan(spec, continuous_batching=False, max_batch_size=batch)
        self.engine = Engine(load_model(spec, engine_plan(spec)), plan)
        self.batches: list[int] = []
        self.endings: list[str] = []  # "answered", or the exception's class name
        run = self.engine.side_batches._run_batch

        def recorded(inputs: Sequence[GenerationInput], cancel: threading.Event) -> list[GenerationOutput]:
            self.batches.append(len(inputs))
            try:
                outputs = run(inputs, cancel)
            except BaseException as exc:
                self.endings.append(type(exc).__name__)
                raise
            self.endings.append("answered")
            return outputs

        self.engine.side_batches._run_batch = recorded


@pytest.fixture(scope="module")
def recorded(tiny_text_model_dir: Path) -> RecordedEngine:
    return RecordedEngine(tiny_text_model_dir, batch=3)


def test_concurrent_side_requests_run_as_one_batch_on_a_real_engine(recorded: RecordedEngine) -> None:
    engine = recorded.engine
    assert engine.pool is None and engine.side_batches.size == 3  # the plan's batch size
    prompts = ["Ray", "a dog", "three foxes", "zebra"]
    alone = [engine.generate_batch([GenerationInput(params=GREEDY, prompt=p)])[0] for p in prompts]
    recorded.batches.clear()

    async def together() -> list[GenerationOutput]:
        calls = [engine.generate_async(GenerationInput(params=GREEDY, prompt=p)) for p in prompts]
        return await asyncio.wait_for(asyncio.gather(*calls), BOUND_S)

    assert asyncio.run(together()) == alone  # each its own answer, as if it ran alone
    assert recorded.batches == [3, 1]  # the plan's 3 together, the fourth after them


def test_a_side_batch_whose_caller_left_stops_decoding(recorded: RecordedEngine) -> None:
    """Its one caller gone, the batch stops within a step (RequestCancelled inside the batch call)
    rather than decode its 240 tokens (~0.5 s here) for nobody, and its side slot comes back."""
    engine = recorded.engine
    endless = SamplingParams(max_tokens=240, temperature=0, rules=RowRules(ignore_eos=True))
    recorded.endings.clear()

    async def leave_once_decoding() -> None:
        task = asyncio.create_task(engine.generate_async(GenerationInput(params=endless, prompt="Far")))
        deadline = asyncio.get_running_loop().time() + BOUND_S
        while engine.load_report()["side_slots_in_use"] == 0:
            assert asyncio.get_running_loop().time() < deadline and not task.done(), "never took its slot"
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave_once_decoding())
    assert recorded.endings == ["RequestCancelled"], recorded.endings
    assert engine.load_report()["side_slots_in_use"] == 0


def _output(text: str) -> GenerationOutput:
    return GenerationOutput(text=text, prompt_tokens=1, completion_tokens=1, finish_reason="stop")


class Recorder:
    """A batch function: echoes each prompt, records every batch, raises on a prompt "bad" (a bad
    request) or "boom" (the batch fails), answers one short on "short", and holds a batch while
    `hold` is clear."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.running = 0
        self.most_at_once = 0
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()
        self.cancels: list[threading.Event] = []
        self._lock = threading.Lock()

    def __call__(self, inputs: Sequence[GenerationInput], cancel: threading.Event) -> list[GenerationOutput]:
        prompts = [str(i.prompt) for i in inputs]
        with self._lock:
            self.batches.append(prompts)
            self.cancels.append(cancel)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.started.set()
        try:
            assert self.hold.wait(BOUND_S), "a held batch was never released"
            if "boom" in prompts:
                raise RuntimeError("the batch lost its memory")
            if "bad" in prompts:
                raise InvalidRequest("prompt 'bad' is refused")
            if "short" in prompts:  # a broken batch function: one answer missing
                return [_output(p.upper()) for p in prompts[1:]]
            return [_output(p.upper()) for p in prompts]
        finally:
            with self._lock:
                self.running -= 1


def _request(prompt: str) -> GenerationInput:
    return GenerationInput(params=GREEDY, prompt=prompt)


async def _answers(batches: SideBatches, prompts: list[str]) -> list[GenerationOutput | BaseException]:
    calls = [batches.generate(_request(p)) for p in prompts]
    return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), BOUND_S)


def test_at_most_size_per_batch_and_one_batch_at_a_time() -> None:
    recorder = Recorder()
    answers = asyncio.run(_answers(SideBatches(recorder, size=2), ["a", "b", "c", "d", "e"]))
    assert [a.text for a in answers] == ["A", "B", "C", "D", "E"]  # type: ignore[union-attr]
    assert recorder.batches == [["a", "b"], ["c", "d"], ["e"]]  # oldest first
    assert recorder.most_at_once == 1


def test_a_bad_request_never_fails_its_batch_mates() -> None:
    recorder = Recorder()
    answers = asyncio.run(_answers(SideBatches(recorder, size=3), ["a", "bad", "c"]))
    assert recorder.batches == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]  # then one by one
    assert answers[0].text == "A" and answers[2].text == "C"  # type: ignore[union-attr]
    assert isinstance(answers[1], InvalidRequest)


def test_a_failed_batch_is_every_requests_error() -> None:
    recorder = Recorder()
    answers = asyncio.run(_answers(SideBatches(recorder, size=2), ["a", "boom"]))
    assert all(isinstance(a, RuntimeError) and "lost its memory" in str(a) for a in answers), answers
    assert recorder.batches == [["a", "boom"]]  # not retried: the error is not one request's


def test_a_batch_that_ends_without_answers_leaves_no_caller_waiting() -> None:
    recorder = Recorder()
    answers = asyncio.run(_answers(SideBatches(recorder, size=3), ["a", "short", "c"]))
    # An error each, within the bound; nobody gets another request's answer.
    assert all(isinstance(a, RuntimeError) and "2 answers for 3 requests" in str(a) for a in answers), answers


@pytest.mark.parametrize("leaving", [["a"], ["a", "b"]])
def test_a_caller_that_goes_away_leaves_its_batch(leaving: list[str]) -> None:
    """The batch is held running; callers in `leaving` are cancelled. The batch is stopped only when
    all its callers have gone; a caller that stays gets its answer."""
    recorder = Recorder()
    recorder.hold.clear()
    batches = SideBatches(recorder, size=2)

    async def scenario() -> dict[str, object]:
        tasks = {p: asyncio.create_task(batches.generate(_request(p))) for p in ["a", "b"]}
        started = await asyncio.to_thread(recorder.started.wait, BOUND_S)
        assert started, "the batch never started"
        for prompt in leaving:
            tasks[prompt].cancel()
        await asyncio.wait([tasks[p] for p in leaving], timeout=BOUND_S)  # each has left
        stopped = recorder.cancels[0].is_set()
        recorder.hold.set()
        done = await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), BOUND_S)
        return {"stopped": stopped, **dict(zip(tasks, done, strict=True))}

    result = asyncio.run(scenario())
    assert result["stopped"] == (len(leaving) == 2)
    for prompt in ["a", "b"]:
        if prompt in leaving:
            assert isinstance(result[prompt], asyncio.CancelledError)
        else:
            assert result[prompt].text == prompt.upper()  # type: ignore[union-attr]
