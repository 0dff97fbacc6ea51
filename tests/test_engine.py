"""The in-process engine on tiny random Gemma3 models (no Ray, no hub)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image
from plans import replica_plan

from deployments.engine.contract import held_weight_bytes
from deployments.engine.core import Engine, InvalidRequest
from deployments.engine.generation import GenerationInput, SamplingParams
from deployments.engine.loading import LoadedModel, convert_gguf, gguf_cache_dir, load_model
from deployments.engine.verify import (
    PlacementMismatch,
    check_placement,
    memory_report,
    placement_log_line,
)
from placement.config import ModelSpec
from placement.demo_models import smollm2_gguf
from placement.estimate import MemoryEstimate
from placement.plan import PlanEntry
from placement.replica import ReplicaPlan

if TYPE_CHECKING:
    from serve_support import ThreadGroup  # the `threads` fixture's type (importing it loads Ray)

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def _entry(device: str = "cpu", gpu_indices: tuple[int, ...] = (), budget: int = 1 << 30) -> PlanEntry:
    estimate = MemoryEstimate.lump(budget, source="config", params=1, context_length=256)
    return PlanEntry(
        role="tiny",
        model="tiny",
        device=device,  # type: ignore[arg-type]
        node_id="node-abc123def456",
        estimate=estimate,
        memory_budget_bytes=budget,
        reason="test",
        gpu_indices=gpu_indices,
        gpu_uuids=tuple(None for _ in gpu_indices),
        fraction=1.0 if gpu_indices else 0.0,
    )


def _png_data_url(size: tuple[int, int] = (40, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def text_spec(tiny_text_model_dir: Path) -> ModelSpec:
    # float32: exact enough that padded and unpadded rows pick the same argmax. Every request on
    # model.generate (the side backend): tests/test_continuous.py covers the pool.
    return ModelSpec(model=str(tiny_text_model_dir), dtype="float32", continuous_batching=False)


@pytest.fixture(scope="module")
def text_plan(text_spec: ModelSpec) -> ReplicaPlan:
    return replica_plan(text_spec)


@pytest.fixture(scope="module")
def text_loaded(text_spec: ModelSpec, text_plan: ReplicaPlan) -> LoadedModel:
    return load_model(text_spec, text_plan)


@pytest.fixture(scope="module")
def engine(text_loaded: LoadedModel, text_plan: ReplicaPlan) -> Engine:
    return Engine(text_loaded, text_plan)


@pytest.fixture(scope="module")
def vision_engine(tiny_vision_model_dir: Path) -> Engine:
    spec = ModelSpec(model=str(tiny_vision_model_dir), dtype="float32", continuous_batching=False)
    plan = replica_plan(spec)
    return Engine(load_model(spec, plan), plan)


def test_load_text_model_on_cpu(text_loaded: LoadedModel, engine: Engine) -> None:
    assert not text_loaded.is_multimodal and text_loaded.processor is None
    assert engine.context_length == 256  # the plan's: min(max_position_embeddings of the tiny config, 4096)
    assert text_loaded.quantization == "none" and text_loaded.device_map == "cpu"
    assert next(text_loaded.model.parameters()).device.type == "cpu"


def test_greedy_is_deterministic(engine: Engine) -> None:
    inp = GenerationInput(params=GREEDY, prompt="The quick brown")
    first, second = engine.generate_batch([inp]), engine.generate_batch([inp])
    assert first == second
    assert first[0].text and first[0].completion_tokens == 12 and first[0].finish_reason == "length"


def test_batch_matches_single_requests(engine: Engine) -> None:
    # Prompts of different token counts: a right-padded or unmasked batch would
    # shift the short rows' positions and change their greedy tokens.
    prompts = ["Ray", "a dog, 3 foxes", "zebra quilts vex jumpy wizards; 42 + 17 = 59 (mostly)"]
    inputs = [GenerationInput(params=GREEDY, prompt=p) for p in prompts]
    lengths = {engine.count_prompt_tokens(i) for i in inputs}
    assert len(lengths) == 3
    alone = [engine.generate_batch([i])[0] for i in inputs]
    assert engine.generate_batch(inputs) == alone


def test_per_request_max_tokens_in_one_batch(engine: Engine) -> None:
    short = GenerationInput(params=SamplingParams(max_tokens=3, temperature=0), prompt="The quick")
    long = GenerationInput(params=SamplingParams(max_tokens=10, temperature=0), prompt="The quick")
    out_short, out_long = engine.generate_batch([short, long])
    assert (out_short.completion_tokens, out_short.finish_reason) == (3, "length")
    assert (out_long.completion_tokens, out_long.finish_reason) == (10, "length")
    assert out_long.text.startswith(out_short.text)


def test_stop_string_truncates(engine: Engine) -> None:
    prompt = "The quick brown"
    full = engine.generate_batch([GenerationInput(params=SamplingParams(max_tokens=20, temperature=0), prompt=prompt)])
    text = full[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick a visible stop from {text!r}"
    stopped_params = SamplingParams(max_tokens=20, temperature=0, stop=("never-appears", stop))
    out = engine.generate_batch([GenerationInput(params=stopped_params, prompt=prompt)])[0]
    assert out.text == text[: text.find(stop)]
    assert out.finish_reason == "stop"
    assert 0 < out.completion_tokens < 20
    streamed = list(engine.stream(GenerationInput(params=stopped_params, prompt=prompt)))
    assert "".join(d.text for d in streamed) == out.text
    assert streamed[-1].finish_reason == "stop"


def test_stream_joins_to_the_non_streaming_text(engine: Engine) -> None:
    inp = GenerationInput(
        params=SamplingParams(max_tokens=16, temperature=0), messages=({"role": "user", "content": "hi"},)
    )
    expected = engine.generate_batch([inp])[0]
    deltas = list(engine.stream(inp))
    assert len(deltas) > 2
    assert "".join(d.text for d in deltas) == expected.text
    assert all(d.finish_reason is None for d in deltas[:-1])
    last = deltas[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
        "length",
        expected.prompt_tokens,
        expected.completion_tokens,
    )


def test_stream_reraises_the_worker_exception(engine: Engine) -> None:
    # A negative top_p passes the engine's checks and fails inside model.generate, in the worker thread.
    bad = GenerationInput(params=SamplingParams(max_tokens=4, temperature=0.7, top_p=-1.0), prompt="hi")
    with pytest.raises(ValueError, match="top_p"):
        list(engine.stream(bad))


def test_usage_counts_match_the_tokenizer(engine: Engine, text_loaded: LoadedModel) -> None:
    tokenizer = text_loaded.tokenizer
    out = engine.generate_batch([GenerationInput(params=GREEDY, prompt="The quick brown fox")])[0]
    assert out.prompt_tokens == len(tokenizer("The quick brown fox")["input_ids"])  # with <bos>
    messages = ({"role": "user", "content": "hello there"},)
    rendered = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    chat = engine.generate_batch([GenerationInput(params=GREEDY, messages=messages)])[0]
    assert rendered.startswith("<bos><start_of_turn>user\nhello there<end_of_turn>")
    assert chat.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert chat.completion_tokens == GREEDY.max_tokens
    assert engine.count_tokens("hello there") == len(tokenizer("hello there", add_special_tokens=False)["input_ids"])


def test_context_length_is_enforced(engine: Engine) -> None:
    prompt_tokens = engine.count_prompt_tokens(GenerationInput(params=GREEDY, prompt="The quick brown fox"))
    too_long = GenerationInput(params=SamplingParams(max_tokens=256, temperature=0), prompt="The quick brown fox")
    with pytest.raises(InvalidRequest, match=rf"{prompt_tokens} tokens.*max_tokens is 256.*256"):
        engine.generate_batch([too_long])


def test_fallback_template_without_chat_template(text_loaded: LoadedModel, text_plan: ReplicaPlan) -> None:
    loaded = text_loaded
    original = loaded.tokenizer.chat_template
    loaded.tokenizer.chat_template = None
    try:
        engine = Engine(loaded, text_plan)
        messages = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
        prepared = engine.prepare(GenerationInput(params=GREEDY, messages=messages))
        assert loaded.tokenizer.decode(prepared.input_ids) == "system: be brief\nuser: hi\nassistant:"
    finally:
        loaded.tokenizer.chat_template = original


def test_image_prompt_on_vision_model(vision_engine: Engine) -> None:
    messages = (
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": _png_data_url()}},
            ],
        },
    )
    text_only = ({"role": "user", "content": "what is this"},)
    out, plain = vision_engine.generate_batch(
        [GenerationInput(params=GREEDY, messages=messages), GenerationInput(params=GREEDY, messages=text_only)]
    )
    assert vision_engine.loaded.is_multimodal
    # 4 image tokens + <start_of_image>/<end_of_image> + the "\n\n" around them.
    assert out.prompt_tokens > plain.prompt_tokens + 4
    assert out.completion_tokens == GREEDY.max_tokens and out.finish_reason == "length"
    streamed = list(vision_engine.stream(GenerationInput(params=GREEDY, messages=messages)))
    assert "".join(d.text for d in streamed) == out.text


def test_image_prompt_on_text_model_is_refused(engine: Engine) -> None:
    messages = ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_data_url()}}]},)
    with pytest.raises(InvalidRequest, match="text-only"):
        engine.generate_batch([GenerationInput(params=GREEDY, messages=messages)])


def test_remote_image_url_is_refused(vision_engine: Engine) -> None:
    messages = ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},)
    with pytest.raises(InvalidRequest, match="data URL"):
        vision_engine.generate_batch([GenerationInput(params=GREEDY, messages=messages)])


def test_check_placement_cpu(monkeypatch: pytest.MonkeyPatch, text_loaded: LoadedModel) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    actual = check_placement(_entry())
    assert actual.cuda_visible_devices == "" and actual.device_uuids == ()
    report = memory_report(text_loaded.model)
    assert report["device"] == "cpu" and int(report["rss_bytes"]) > 0
    assert report["weights_bytes"] == held_weight_bytes(text_loaded.model) > 0
    # A replica takes the weights' size once and passes it on every later report.
    assert memory_report(text_loaded.model, weights=12345)["weights_bytes"] == 12345


def test_check_placement_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(PlacementMismatch, match=r"planned cuda:0 \(CUDA_VISIBLE_DEVICES='0'\).*'1'"):
        check_placement(_entry("gpu", (0,)))
    with pytest.raises(PlacementMismatch, match="planned cpu"):
        check_placement(_entry())


def test_placement_log_line() -> None:
    entry = _entry("gpu", (1,), budget=int(15.2 * 1024**3))
    assert (
        placement_log_line("buffer_agent", "abc123", entry) == "buffer_agent → node abc123, cuda:1 (planned 15.20 GiB)"
    )


def test_nf4_load_on_cpu(tiny_text_model_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    spec = ModelSpec(model=str(tiny_text_model_dir), quantization="nf4")
    plan = replica_plan(spec)
    loaded = load_model(spec, plan)
    assert loaded.quantization == "nf4"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    out = Engine(loaded, plan).generate_batch([GenerationInput(params=GREEDY, prompt="The quick")])[0]
    assert out.completion_tokens == 12
    # A saved bnb checkpoint is pre-quantized: it loads as is, whatever the spec asks.
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    spec = ModelSpec(model=str(tmp_path), quantization="int8")
    again = load_model(spec, replica_plan(spec))
    assert again.quantization == "nf4 (pre-quantized)"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in again.model.modules())


@pytest.mark.slow  # ~40 s on 2 cores: the first GGUF load de-quantizes every tensor
def test_gguf_conversion_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: ThreadGroup) -> None:
    directory, name = smollm2_gguf()
    monkeypatch.setenv("RAYFIT_CACHE", str(tmp_path))
    spec = ModelSpec(model=str(directory), gguf_file=name)
    # A replica's load and another caller ask for the conversion at once (as two replicas starting
    # together on a fresh machine do): one converts, the other waits for it and reuses its result.
    both = threading.Barrier(2)

    def replica_load() -> LoadedModel:
        both.wait(timeout=30)
        return load_model(spec, replica_plan(spec))

    def other_caller() -> tuple[Path, bool]:
        both.wait(timeout=30)
        return convert_gguf(directory / name, tmp_path)

    started = time.perf_counter()
    threads.start(replica_load)
    threads.start(other_caller)
    first, (_, reused) = threads.join(timeout_s=300)
    first_seconds = time.perf_counter() - started
    # Converted once, not twice: the load converted and the other reused, or the other way round.
    # (The phrase, not a word: the cache's path holds this test's name.)
    converted_by_load = "(safetensors conversion at " in first.source
    assert converted_by_load == reused, (first.source, reused)
    cache = gguf_cache_dir(directory / name, tmp_path)
    assert (cache / "model.safetensors").is_file() and convert_gguf(directory / name, tmp_path)[1]
    started = time.perf_counter()
    spec = ModelSpec(model=str(directory / name))
    plan = replica_plan(spec)
    second = load_model(spec, plan)
    second_seconds = time.perf_counter() - started
    assert "(safetensors cache at " in second.source, second.source
    assert second_seconds < first_seconds / 3, (first_seconds, second_seconds)
    # SmolLM2's GGUF carries its chat template; the cached tokenizer keeps it.
    assert second.tokenizer.chat_template
    chat = GenerationInput(
        params=SamplingParams(max_tokens=8, temperature=0), messages=({"role": "user", "content": "Hi"},)
    )
    out = Engine(second, plan).generate_batch([chat])[0]
    assert out.text.strip() and out.prompt_tokens > 5


# What a replica pinned to one GPU does (deployments.engine.host.build_engine), run in a process of its
# own with CUDA_VISIBLE_DEVICES=<host index> as Ray's pin gives it: the pin must be in place before
# CUDA starts, which this test process cannot promise. The child prints what it saw as JSON.
_GPU_CHILD = """
import json, sys
from dataclasses import replace

sys.path.insert(0, sys.argv[3])  # tests/: plans
from plans import planned_entry

from deployments.engine.host import build_engine
from deployments.engine.generation import GenerationInput, SamplingParams
from deployments.engine.verify import PlacementMismatch, check_placement, memory_report, visible_gpu_uuids
from placement.config import ModelSpec

model_dir, index = sys.argv[1], int(sys.argv[2])
uuid = visible_gpu_uuids()[0]
spec = ModelSpec(model=model_dir, dtype="float32")
entry = planned_entry(spec, gpus="1x80GB")
entry = replace(entry, gpu_indices=(index,), gpu_uuids=(uuid,))
seen = {"uuid": uuid, "placement_uuids": list(check_placement(entry).device_uuids)}
try:
    check_placement(replace(entry, gpu_uuids=("GPU-00000000-0000-0000-0000-000000000000",)))
    seen["wrong_uuid"] = "accepted"
except PlacementMismatch as exc:
    seen["wrong_uuid"] = str(exc)
engine, facts = build_engine(spec, entry)
try:
    greedy = SamplingParams(max_tokens=12, temperature=0)
    out = engine.generate_batch([GenerationInput(params=greedy, prompt="The q")])[0]
    allocated = int(memory_report(engine.model)["cuda:0_allocated_bytes"])
finally:
    engine.close()  # its batching thread would keep this process alive
seen.update(
    device=facts.device,
    cpu_fallback=facts.cpu_fallback,
    gpu_uuids=list(facts.gpu_uuids),
    memory_caps={str(k): v for k, v in facts.memory_caps.items()},
    budget=entry.replica.gpu_budgets[0],
    completion_tokens=out.completion_tokens,
    allocated=allocated,
)
print("SEEN " + json.dumps(seen))
"""


def _host_gpu_index() -> int:
    """The GPU this test pins its child to: the first this process may use (its own CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return 0
    first = visible.split(",")[0].strip()
    assert first.isdigit(), f"CUDA_VISIBLE_DEVICES={visible!r}: this test pins by host index, as rayfit does"
    return int(first)


@pytest.mark.gpu
def test_load_on_gpu_and_check_placement(tiny_text_model_dir: Path) -> None:
    index = _host_gpu_index()
    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    done = subprocess.run(
        [sys.executable, "-c", _GPU_CHILD, str(tiny_text_model_dir), str(index), str(tests_dir)],
        env=env,
        cwd=tests_dir.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("SEEN ")]
    seen = json.loads(line[len("SEEN ") :])
    assert seen["placement_uuids"] == [seen["uuid"]]
    assert "UUID" in seen["wrong_uuid"], seen["wrong_uuid"]  # another card's UUID is refused
    # Loaded on the pinned card (local cuda:0), not the CPU fallback, under the plan's allocator cap.
    assert seen["device"] == "cuda:0" and seen["cpu_fallback"] is False
    assert [u.removeprefix("GPU-") for u in seen["gpu_uuids"]] == [seen["uuid"].removeprefix("GPU-")]
    assert seen["memory_caps"] == {"0": seen["budget"]} and seen["budget"] > 0
    assert seen["completion_tokens"] == GREEDY.max_tokens
    assert 0 < seen["allocated"] <= seen["budget"]
