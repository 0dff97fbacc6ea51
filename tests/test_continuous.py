"""Continuous batching (deployments.engine.pool) gives the same text as the classic path.

Same tiny float32 Gemma3 as test_engine.py; greedy requests go through
transformers' continuous batching, everything else keeps `generate`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from plans import engine_plan

from deployments.engine.core import Engine
from deployments.engine.generation import GenerationInput, GenerationOutput, SamplingParams
from deployments.engine.loading import LoadedModel, load_model
from placement.config import ModelSpec

GREEDY = SamplingParams(max_tokens=12, temperature=0)
PROMPTS = ("Ray", "a dog, 3 foxes", "zebra quilts vex jumpy wizards; 42 + 17 = 59 (mostly)")
# Any thread still running after this is a hang: the test fails (and names it).
JOIN_S = 120.0


def run_threads(targets: list[Callable[[], object]]) -> None:
    """Run each target on a thread of its own and join them all, bounded; a target's exception is
    raised here (a thread's own failure would only be a warning) and a thread still running fails."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], object]) -> None:
        try:
            target()
        except BaseException as exc:  # handed back to the test below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    running = [t.name for t in threads if t.is_alive()]
    assert not running, f"threads {running} still running after {JOIN_S:.0f} s; errors meanwhile: {errors!r}"
    if errors:
        raise errors[0]


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll a real state until it holds; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def spec(tiny_text_model_dir: Path) -> ModelSpec:
    return ModelSpec(model=str(tiny_text_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def loaded(spec: ModelSpec) -> LoadedModel:
    return load_model(spec, engine_plan(spec))


@pytest.fixture(scope="module")
def classic(loaded: LoadedModel, spec: ModelSpec) -> Engine:
    return Engine(loaded, engine_plan(spec, continuous_batching=False))


@pytest.fixture(scope="module")
def continuous(loaded: LoadedModel, spec: ModelSpec) -> Iterator[Engine]:
    engine = Engine(loaded, engine_plan(spec, max_batch_size=4))
    yield engine
    engine.close()


def test_batch_and_streams_match_the_classic_path(classic: Engine, continuous: Engine) -> None:
    inputs = [GenerationInput(params=GREEDY, prompt=p) for p in PROMPTS]
    expected = [classic.generate_batch([i])[0] for i in inputs]
    assert continuous.generate_batch(inputs) == expected
    # Concurrent streams share the running batch and still produce each row's own text.
    texts: dict[int, str] = {}

    def stream(index: int) -> None:
        texts[index] = "".join(d.text for d in continuous.stream(inputs[index]))

    run_threads([lambda i=i: stream(i) for i in range(len(inputs))])
    assert [texts[i] for i in range(len(inputs))] == [e.text for e in expected]


def test_per_row_max_tokens_and_stop(classic: Engine, continuous: Engine) -> None:
    short = GenerationInput(params=SamplingParams(max_tokens=3, temperature=0), prompt="The quick")
    out = continuous.generate_batch([short])[0]
    assert (out.completion_tokens, out.finish_reason) == (3, "length")
    full = classic.generate_batch([GenerationInput(params=SamplingParams(max_tokens=20, temperature=0), prompt="The")])
    text = full[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = GenerationInput(params=SamplingParams(max_tokens=20, temperature=0, stop=(stop,)), prompt="The")
    expected = classic.generate_batch([stopped])[0]
    assert continuous.generate_batch([stopped])[0] == expected
    deltas = list(continuous.stream(stopped))
    assert "".join(d.text for d in deltas) == expected.text and deltas[-1].finish_reason == "stop"


def test_closing_a_stream_early_frees_the_batcher(continuous: Engine) -> None:
    long = GenerationInput(params=SamplingParams(max_tokens=200, temperature=0), prompt="The quick")
    stream = continuous.stream(long)
    next(stream)
    stream.close()  # client gone: the request is cancelled
    assert continuous.pool is not None
    out: GenerationOutput = continuous.generate_batch([GenerationInput(params=GREEDY, prompt="Ray")])[0]
    assert out.completion_tokens > 0


def test_sampled_requests_keep_the_classic_path(continuous: Engine) -> None:
    seeded = GenerationInput(params=SamplingParams(max_tokens=6, temperature=0.8, seed=7), prompt="The quick")
    assert continuous.generate_batch([seeded]) == continuous.generate_batch([seeded])


def test_sampled_requests_join_the_running_batch(continuous: Engine) -> None:
    """Unseeded sampled rows decode in the pool next to greedy rows; greedy rows stay exact."""
    sampled = GenerationInput(params=SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9), prompt="The quick")
    greedy = GenerationInput(params=GREEDY, prompt=PROMPTS[1])
    assert continuous.uses_pool(sampled) and continuous.uses_pool(greedy)
    seeded = GenerationInput(params=SamplingParams(max_tokens=8, temperature=0.9, seed=3), prompt="The quick")
    assert not continuous.uses_pool(seeded)
    side_before = continuous.kv_report()["peak_side_bytes"]
    alone = continuous.generate_batch([greedy])[0]
    outputs = continuous.generate_batch([sampled, greedy, sampled])
    assert outputs[1] == alone
    # Sampled rows may draw <eos> (the tiny model's logit 0 is unlikely, not impossible): what sampling cannot
    # break is the cap, and that a row cut by it used all 8 tokens.
    for sampled_output in (outputs[0], outputs[2]):
        assert sampled_output.finish_reason in ("length", "stop") and 0 < sampled_output.completion_tokens <= 8
        assert sampled_output.finish_reason == "stop" or sampled_output.completion_tokens == 8
    # Nothing ran on the side path: its measured KV did not move.
    assert continuous.kv_report()["peak_side_bytes"] == side_before


def test_a_failure_inside_the_batching_loop_is_recovered(loaded: LoadedModel, spec: ModelSpec) -> None:
    """An out-of-memory raised inside transformers' batching loop (a forward hook on the model):
    the in-flight request gets a retryable error, the batcher rebuilds, the next request works."""
    import torch

    from deployments.engine.errors import RetryableGenerationError
    from deployments.engine.pool import BatchInterrupted

    engine = Engine(loaded, engine_plan(spec, max_batch_size=2))
    armed = threading.Event()

    def explode(module: object, args: object) -> None:
        if armed.is_set():
            armed.clear()
            raise torch.OutOfMemoryError("CUDA out of memory (injected inside the batching loop)")

    hook = loaded.model.register_forward_pre_hook(explode)
    try:
        assert engine.pool is not None
        pool_before = engine.pool.batcher.cache_bytes
        armed.set()
        with pytest.raises(BatchInterrupted) as caught:
            engine.generate_batch([GenerationInput(params=GREEDY, prompt="Ray")])
        assert isinstance(caught.value, RetryableGenerationError)  # → 503 + Retry-After at the ingress
        out = engine.generate_batch([GenerationInput(params=GREEDY, prompt="Ray")])[0]
        assert out.completion_tokens == GREEDY.max_tokens
        assert engine.pool.batcher.restarts == 1
        assert engine.pool.batcher.slots.in_use == 0
        assert engine.pool.batcher._manager.batch_processor.cache.cache_tensor.numel() == pool_before
    finally:
        hook.remove()
        engine.close()


def test_a_failed_submit_withdraws_its_batch_mates(loaded: LoadedModel, spec: ModelSpec) -> None:
    """Three rows in one call; the manager refuses the second with an error: the first is cancelled
    and released, the third never submitted, and no slot or queue is left behind."""
    engine = Engine(loaded, engine_plan(spec, max_batch_size=4))
    try:
        assert engine.pool is not None
        batcher = engine.pool.batcher
        real_add = batcher._manager.add_request
        calls: list[str] = []

        def add_request(*args: object, **kwargs: object) -> object:
            calls.append(str(kwargs.get("request_id")))
            if len(calls) == 2:
                raise RuntimeError("refused (injected)")
            return real_add(*args, **kwargs)

        batcher._manager.add_request = add_request  # type: ignore[method-assign]
        long = GenerationInput(params=SamplingParams(max_tokens=200, temperature=0), prompt="The quick")
        with pytest.raises(RuntimeError, match="injected"):
            engine.generate_batch([long, long, long])
        assert len(calls) == 2  # the third row was never handed over
        assert batcher.slots.in_use == 0 and batcher.live_requests == 0
        batcher._manager.add_request = real_add  # type: ignore[method-assign]
        out = engine.generate_batch([GenerationInput(params=GREEDY, prompt="Ray")])[0]
        assert out.completion_tokens == GREEDY.max_tokens
    finally:
        engine.close()


def test_cheap_top_p_matches_the_stock_warper(continuous: Engine) -> None:
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingTopPLogitsWarper,
    )
    from transformers.generation.logits_process import TopPLogitsWarper

    from deployments.engine.pool import _CheapTopP

    assert continuous.pool is not None
    in_use = continuous.pool.batcher._manager.logit_processor.logits_processor
    assert any(type(p) is _CheapTopP for p in in_use)
    stock = ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(top_p=0.5))
    cheap = _CheapTopP(TopPLogitsWarper(top_p=0.5))
    scores = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    top_p = torch.tensor([0.0, 1.0, 0.7, 0.2]).view(torch.int32)
    fast, slow = cheap(scores, top_p), stock(scores, top_p)
    assert torch.equal(fast[2:], slow[2:])  # nucleus rows: the stock result
    assert torch.equal(fast[1], scores[1])  # top-p 1: untouched
    kept = torch.isfinite(fast[0]).nonzero().squeeze(1)
    assert kept.tolist() == [int(scores[0].argmax())]  # top-p 0: the argmax alone


def test_greedy_rows_skip_sampling_next_to_sampled_rows(classic: Engine, continuous: Engine) -> None:
    """Greedy rows take their argmax without softmax + multinomial (the sampler installed on the
    manager's runner), and keep the classic text while sampled rows decode beside them."""
    from deployments.engine.pool import _GreedyAwareSampler

    assert continuous.pool is not None
    runner = continuous.pool.batcher._manager.batch_processor.model_runner
    assert isinstance(runner._sample, _GreedyAwareSampler)
    # The sampler argmaxes greedy rows itself, so the top-p warper no longer masks them each step.
    assert runner._sample.top_p.sampler_picks_greedy
    greedy = [GenerationInput(params=GREEDY, prompt=p) for p in PROMPTS[:2]]
    sampled = GenerationInput(params=SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8), prompt="The quick")
    outputs = continuous.generate_batch([greedy[0], sampled, greedy[1]])
    assert [outputs[0], outputs[2]] == [classic.generate_batch([g])[0] for g in greedy]
    # The sampled row: only what sampling cannot break (it may draw <eos> early).
    assert outputs[1].finish_reason in ("length", "stop") and 0 < outputs[1].completion_tokens <= 12


def test_a_step_whose_greedy_rows_are_unknown_fails_rather_than_samples(continuous: Engine) -> None:
    """The sampler knows greedy rows only from the top-p warper of the same step. Called without
    them (or for another row count), it refuses: the stock step would sample temperature-0 rows."""
    assert continuous.pool is not None and continuous.load_report()["pool_requests_live"] == 0  # idle: no step runs
    sampler = continuous.pool.batcher._manager.batch_processor.model_runner._sample
    vocab = int(continuous.model.config.get_text_config().vocab_size)
    scores, output_ids = torch.randn(1, 2, vocab), torch.zeros(1, 2, dtype=torch.long)
    sampler.top_p.greedy_rows = None
    with pytest.raises(RuntimeError, match="greedy rows unknown"):
        sampler(scores, output_ids)
    sampler.top_p.greedy_rows = torch.tensor([True, False, True])  # noted for 3 rows, 2 to sample
    with pytest.raises(RuntimeError, match="greedy rows unknown"):
        sampler(scores, output_ids)
    # Noted for this step's rows: greedy rows take their argmax.
    sampler.top_p.greedy_rows = torch.tensor([True, True])
    sampler(scores, output_ids)
    assert output_ids[0].tolist() == scores[0].argmax(dim=-1).tolist()
    # The engine still serves greedy requests as the classic path does.
    assert continuous.generate_batch([GenerationInput(params=GREEDY, prompt=PROMPTS[0])])[0].completion_tokens > 0


def test_a_short_request_is_not_stuck_behind_long_ones(continuous: Engine) -> None:
    """No head-of-line blocking: a 2-token request sent while three long ones decode (sampled at the
    OpenAI default temperature, as most clients send) joins the running batch and finishes while
    they are still going, in a small part of their time."""
    from deployments.engine.rules import RowRules

    # ignore_eos: sampled rows that may not stop early, so the counts below are exact whatever is drawn.
    long = SamplingParams(max_tokens=200, temperature=1.0, rules=RowRules(ignore_eos=True))
    done: list[float] = []
    started = time.monotonic()
    assert continuous.pool is not None
    batcher = continuous.pool.batcher

    def run_long() -> None:
        out = continuous.generate_batch([GenerationInput(params=long, prompt="Ray")])[0]
        assert out.completion_tokens == long.max_tokens
        done.append(time.monotonic() - started)

    short_s: list[float] = []
    still_running: list[bool] = []

    def run_short() -> None:
        wait_for(lambda: continuous.load_report()["pool_requests_live"] >= 3, 60, "the three long requests live")
        # All three in the batch and decoding: a few decode steps taken since (the manager's step counter).
        step = batcher._manager.current_batch
        wait_for(lambda: batcher._manager.current_batch >= step + 3, 60, "three decode steps of the long requests")
        sent = time.monotonic()
        short_params = SamplingParams(max_tokens=2, rules=RowRules(ignore_eos=True))  # the default temperature
        short = continuous.generate_batch([GenerationInput(params=short_params, prompt="Ray")])[0]
        short_s.append(time.monotonic() - sent)
        still_running.append(not done)
        assert short.completion_tokens == 2

    run_threads([run_long, run_long, run_long, run_short])
    assert still_running == [True], "the long requests finished before the short one"
    assert len(done) == 3 and short_s[0] < min(done) / 5, (short_s, done)


# ---- the replica's calls: answers delivered on the event loop ------------------------------


def test_event_loop_answers_match_the_thread_ones(classic: Engine, continuous: Engine) -> None:
    """open_stream / generate_async (what the replica awaits) give the same text as the blocking
    calls, for concurrent requests sharing the batch; their outputs arrive through transformers'
    result handler on the loop, and no handler or request is left once they are done."""
    import asyncio

    inputs = [GenerationInput(params=GREEDY, prompt=p) for p in PROMPTS]
    expected = [classic.generate_batch([i])[0] for i in inputs]

    async def streamed(inp: GenerationInput) -> str:
        return "".join([d.text async for d in await continuous.open_stream(inp)])

    async def main() -> tuple[list[str], list[GenerationOutput]]:
        texts = await asyncio.gather(*(streamed(i) for i in inputs))
        outputs = await asyncio.gather(*(continuous.generate_async(i) for i in inputs))
        return list(texts), list(outputs)

    texts, outputs = asyncio.run(main())
    assert texts == [e.text for e in expected]
    assert outputs == expected
    assert continuous.pool is not None
    batcher = continuous.pool.batcher
    assert batcher.live_requests == 0 and batcher.slots.in_use == 0
    assert batcher._manager.output_router.result_handlers == {}


def test_cancelling_an_event_loop_request_withdraws_it(continuous: Engine) -> None:
    """A reader cancelled mid-stream (the replica then closes the stream), and one cancelled
    while it waits for its answer or its slot: each request leaves the batch within a step
    (no live request, no slot, no result handler)."""
    import asyncio
    import contextlib

    long = GenerationInput(params=SamplingParams(max_tokens=200, temperature=0), prompt="The quick")
    assert continuous.pool is not None
    batcher = continuous.pool.batcher

    async def read_then_stall() -> None:
        async with contextlib.aclosing(await continuous.open_stream(long)) as deltas:
            await anext(deltas)
            await asyncio.sleep(3600)  # a client that stops reading; cancelled below

    async def withdrawn(call: object) -> float:
        task = asyncio.create_task(call)  # type: ignore[arg-type]
        deadline = time.monotonic() + 60
        while batcher.live_requests == 0:  # the request reached the batcher
            assert time.monotonic() < deadline, "the request never reached the batcher"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        started = time.monotonic()
        while batcher.live_requests and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        return time.monotonic() - started

    async def main() -> list[float]:
        return [await withdrawn(read_then_stall()), await withdrawn(continuous.generate_async(long))]

    assert all(seconds < 1 for seconds in asyncio.run(main()))
    assert batcher.live_requests == 0 and batcher.slots.in_use == 0
    assert batcher._manager.output_router.result_handlers == {}
    out = continuous.generate_batch([GenerationInput(params=GREEDY, prompt="Ray")])[0]
    assert out.completion_tokens == GREEDY.max_tokens


def test_a_reader_behind_by_several_steps_gets_only_the_newest_update(continuous: Engine) -> None:
    """Updates are cumulative: a busy event loop that falls behind sends one delta for all the
    steps it missed, never a stale one; the finishing update and an error are never skipped."""
    import asyncio

    from deployments.engine.pool import LoopSink, TokenUpdate

    assert continuous.pool is not None
    batcher = continuous.pool.batcher

    async def read(items: list[TokenUpdate | BaseException]) -> list[TokenUpdate | str]:
        sink = LoopSink(asyncio.get_running_loop())
        for item in items:
            sink.items.put_nowait(item)  # queued while the reader was busy
        seen: list[TokenUpdate | str] = []
        try:
            async for update in batcher.aupdates("behind", sink):
                seen.append(update)
        except RuntimeError as exc:
            seen.append(str(exc))
        return seen

    steps = [TokenUpdate(tuple(range(n)), finished=False) for n in (1, 2, 3)]
    done = TokenUpdate((0, 1, 2, 3), finished=True)
    assert asyncio.run(read([*steps, done])) == [done]
    assert asyncio.run(read([steps[0], done, TokenUpdate((9,), finished=False)])) == [done]
    assert asyncio.run(read([*steps, RuntimeError("batch failed")])) == ["batch failed"]


def test_a_request_arriving_during_the_rebuild_is_served_not_told_to_retry(
    loaded: LoadedModel, spec: ModelSpec
) -> None:
    """A request sent right after a batch failed (the client got its 503 and retried at once) waits
    while the pump rebuilds the manager. The rebuild answers every registered request with "retry";
    this one never reached the old batch, so it must run on the new manager instead (seen as a 503
    for the retry when it arrived between the loop's death and the rebuild)."""
    import torch

    from deployments.engine.pool import BatchInterrupted

    engine = Engine(loaded, engine_plan(spec, max_batch_size=2))
    assert engine.pool is not None
    batcher = engine.pool.batcher
    armed, retry_waits = threading.Event(), threading.Event()
    rebuild, wait_for_live_manager = batcher._recover, batcher._wait_for_live_manager
    # The proof that the race was hit, not merely that the retry was served: the rebuild ran while the
    # retry was registered and waiting for a live manager, so the rebuild answered it "retry" too.
    registered_at_rebuild: list[int] = []

    def rebuild_once_the_retry_waits() -> None:  # the pump's rebuild, held until the retry waits (bounded)
        if retry_waits.wait(30):
            registered_at_rebuild.append(batcher.live_requests)
        rebuild()

    def retry_enters_its_wait() -> bool:  # installed once the first request failed: only the retry calls it
        retry_waits.set()  # registered (submit registers a request before it waits)
        return wait_for_live_manager()

    batcher._recover = rebuild_once_the_retry_waits  # type: ignore[method-assign]

    def explode(module: object, args: object) -> None:
        if armed.is_set():
            armed.clear()
            raise torch.OutOfMemoryError("CUDA out of memory (injected inside the batching loop)")

    hook = loaded.model.register_forward_pre_hook(explode)
    answers: list[GenerationOutput | BaseException] = []

    def retry() -> None:
        try:
            answers.append(engine.generate_batch([GenerationInput(params=GREEDY, prompt="Ray")])[0])
        except BaseException as exc:  # recorded: the assertion below names it
            answers.append(exc)

    try:
        armed.set()
        with pytest.raises(BatchInterrupted):
            engine.generate_batch([GenerationInput(params=GREEDY, prompt="Ray")])
        batcher._wait_for_live_manager = retry_enters_its_wait  # type: ignore[method-assign]
        run_threads([retry])
        assert registered_at_rebuild == [1], "the retry was not waiting when the rebuild ran: the race was not hit"
        assert len(answers) == 1 and isinstance(answers[0], GenerationOutput), answers
        assert answers[0].completion_tokens == GREEDY.max_tokens
        assert batcher.restarts == 1 and batcher.slots.in_use == 0
    finally:
        hook.remove()
        engine.close()
