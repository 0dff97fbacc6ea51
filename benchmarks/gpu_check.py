"""GPU proof: the suite's GPU tests, rayfit's speed next to its peer, the planner's memory
estimate and decode speed on a real GPU, and both MedGemma shapes served side by side on
one card by the plan.

    .venv/bin/python benchmarks/gpu_check.py                 # one H100/H200, no network, < 8 min (budget)
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke     # same steps at tiny sizes on CPU (CI, ~1.5 min)
    .venv/bin/python benchmarks/gpu_check.py --bandwidth-tbs 3.35 --no-compile --skip-serve

Expected on one H100 (estimates until a GPU run records them; the JSON's `step_seconds` has
each step's time): GPU tests ~1.5 min, the peer comparison ~2 min, the two MedGemma shapes
(steps 1-3) ~3 min, serving both ~1.5 min. The run keeps to `--budget-s` (420 s by default
on a GPU): a step that would start with too little time left is skipped and listed under
"skipped steps", so one device run of 8 minutes always comes back with a report.

0. GPU tests: `pytest -m gpu` over the test modules that carry the marker (tests/conftest.py
   skips them where torch sees no GPU, with the reason): passed/failed/skipped counts and the
   names of any failure.
0b. Speed next to the peer: the offline demo's SmolLM2-135M (bf16, the converted GGUF that
   benchmarks/bench_peer.py uses) served by rayfit (planned onto GPU 0 by the running Ray) and
   by `transformers serve --continuous-batching` (with its CUDA graphs: `--cb-use-cuda-graph`;
   rayfit's pool runs without them), one after the other, each alone on the card; closed-loop
   greedy chat completions at concurrency 1 and 8 (bench_peer's client), tok/s and
   rayfit/peer. On CPU (the smoke) these figures say the step works, nothing about a GPU.

1. Memory. No MedGemma weights exist offline, so random-weight models of the
   real shapes are built in NF4 on the GPU: MedGemma 4B (Gemma3ForConditionalGeneration,
   image+text) and MedGemma 27B text (Gemma3ForCausalLM). The skeleton is built
   on the meta device; then each nn.Linear is created in bf16 on the card and
   quantized to NF4 (bitsandbytes, double quant) before the next one exists, so
   the 27B is never held in bf16. Reported next to
   `placement.sizing.estimate_from_config` (the planner's estimate): allocated
   after load vs weights + quant overhead (target within 5%), and the peak
   allocated/reserved during a generation at the configured context vs the total
   estimate (target within 10%).
2. Decode speed: single-stream greedy tokens/s, as a share of the bandwidth bound
   (card bandwidth ÷ bytes read per token = quantized weights + quant state + the
   tied lm_head/embedding in bf16 + KV read). Dynamic cache, then static cache +
   torch.compile. Target ≥ 40% for the 27B NF4.
3. KV contract: the engine's continuous-batching pool is built on the card for
   `--batch` × `--context` and its allocated bytes are held against the plan's
   pool (placement.sizing.kv_budget); then the per-process allocator cap is set
   just above what the process holds and a 1 GiB allocation must fail in this
   process (what a replica gets from its plan's budget).
4. Serving: the two models are saved (pre-quantized NF4 + a small offline
   tokenizer), on the Ray of this machine with the GPU and its gpu_slot (one
   Ray for steps 0b and 4, started by the first), the rayfit app plans both
   onto GPU 0 with fractions, and each replica reports its GPU UUID and
   memory from inside; their sum must stay within the card.
   The summarizer runs as configured by default (its engine in a child
   process), the buffer agent with `engine_process: false` (its engine in its
   replica); the driver's per-process GPU memory (NVML) shows what each process
   holds, CUDA contexts included, so a replica that held a context beside its
   engine process would show here (it should not: it never imports torch).

Writes a Markdown table and JSON to `--out` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# The role served with its engine in a process of its own (deployments.engine.process).
ENGINE_PROCESS_ROLE = "summarizer"
PEER_APP = "rayfit"  # the peer step's app; the serve step's is "gpucheck"
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))  # tiny_models: the offline tokenizer
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from deployments.engine.verify import CPU_FALLBACK_ENV  # noqa: E402
from deployments.ports import start_serve_on_a_free_port  # noqa: E402
from placement.sizing import estimate_from_config  # noqa: E402
from placement.sizing.reference_configs import MEDGEMMA_4B, MEDGEMMA_27B_TEXT  # noqa: E402
from placement.units import MIB  # noqa: E402

# Card memory bandwidth, TB/s (vendor figures), matched on torch.cuda.get_device_name().
BANDWIDTH_TBS = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100", 2.0), ("L40S", 0.864), ("4090", 1.008))

# --cpu-smoke: the same architectures, tiny (Linear dims multiples of 64 for bnb's CPU path).
SMOKE_27B_TEXT = {
    **MEDGEMMA_27B_TEXT,
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "query_pre_attn_scalar": 64,
    "sliding_window": 32,
}
SMOKE_4B = {
    **MEDGEMMA_4B,
    "mm_tokens_per_image": 4,
    "text_config": {**SMOKE_27B_TEXT, "num_hidden_layers": 2},
    "vision_config": {
        **MEDGEMMA_4B["vision_config"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
}


@dataclass
class ModelResult:
    name: str
    params_b: float
    est_weights_mib: float
    est_total_mib: float
    load_allocated_mib: float
    weights_error_pct: float
    peak_allocated_mib: float = 0.0
    peak_reserved_mib: float = 0.0
    total_error_pct: float = 0.0
    context: int = 0
    batch: int = 0
    bytes_per_token_mib: float = 0.0
    bound_tok_s: float = 0.0
    decode: dict[str, Any] = field(default_factory=dict)  # variant → {"tok_s", "share"} or {"error"}
    build_s: float = 0.0
    kv: dict[str, Any] = field(default_factory=dict)  # planned vs allocated KV pool


# ---- 1. build in NF4, layer by layer ----------------------------------------------------------


def _linear_to_nf4(linear: nn.Linear, device: torch.device) -> nn.Module:
    """A random bf16 nn.Linear of the same shape, made on `device` and quantized there at once."""
    import bitsandbytes as bnb

    weight = torch.empty(linear.out_features, linear.in_features, dtype=torch.bfloat16, device=device)
    weight.normal_(0.0, 0.02)
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.bfloat16,
        compress_statistics=True,  # double quant, as rayfit's bnb_config
        quant_type="nf4",
        device="meta",
    )
    quantized.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=quantized
    ).to(device)
    if linear.bias is not None:
        quantized.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=torch.bfloat16, device=device))
    del weight
    return quantized


def build_nf4(config_dict: dict[str, Any], device: torch.device) -> nn.Module:
    """The model of `config_dict` with random weights: linears NF4, the rest bf16, built per layer on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.for_model(**config_dict)
    auto = AutoModelForImageTextToText if "vision_config" in config_dict else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch.bfloat16)
    # 1. every nn.Linear except lm_head (bnb keeps it in bf16; tied to the embedding here)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not full.endswith("lm_head"):
                setattr(module, child_name, _linear_to_nf4(child, device))
    # 2. the other parameters (embeddings, norms, vision embeddings) in bf16
    for name, param in list(model.named_parameters()):
        if param.device.type != "meta":
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        data = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
        data.normal_(0.0, 0.02) if param.dim() > 1 else data.zero_()
        setattr(owner, attr, nn.Parameter(data, requires_grad=False))
    model.tie_weights()
    # 3. buffers (rotary frequencies, ...) were computed on meta: rebuild them on the device
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__:
            fresh = type(module)(config=module.config, device=device)
            for buffer_name, buffer in fresh.named_buffers(recurse=False):
                module.register_buffer(buffer_name, buffer, persistent=False)
            if hasattr(fresh, "original_inv_freq"):
                module.original_inv_freq = fresh.original_inv_freq
    for module in model.modules():
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.device.type == "meta":
                module.register_buffer(buffer_name, torch.zeros(buffer.shape, dtype=buffer.dtype, device=device))
            elif buffer.device != device:
                module.register_buffer(buffer_name, buffer.to(device))
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"parameters left on meta: {leftover[:5]}")
    return model.eval()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def _mib(n: float) -> float:
    return round(n / MIB, 1)


# ---- 2. decode speed --------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _generate_s(model: nn.Module, ids: torch.Tensor, new: int, **kwargs: Any) -> float:
    _sync()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)
    _sync()
    return time.perf_counter() - start


def decode_speed(model: nn.Module, vocab: int, device: torch.device, tokens: int, compile_: bool) -> dict[str, Any]:
    """tok/s of decode alone: (t(N) - t(1)) / (N - 1), per cache variant."""
    ids = torch.randint(10, vocab - 10, (1, 32), device=device)
    variants: dict[str, dict[str, Any]] = {"dynamic cache": {}}
    if compile_:
        variants["static cache + torch.compile"] = {"cache_implementation": "static"}
    out: dict[str, Any] = {}
    for name, kwargs in variants.items():
        try:
            for _ in range(2):  # warm-up (and compile)
                _generate_s(model, ids, tokens, **kwargs)
            one = min(_generate_s(model, ids, 1, **kwargs) for _ in range(2))
            full = min(_generate_s(model, ids, tokens, **kwargs) for _ in range(2))
            if full > one:
                out[name] = {"tok_s": round((tokens - 1) / (full - one), 2)}
            else:  # tiny shapes on a busy CPU: the difference drowns in noise; the whole run's rate instead
                out[name] = {"tok_s": round(tokens / full, 2), "note": "t(N) <= t(1): whole-generation rate"}
        except Exception as exc:  # report, don't stop the check
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return out


def card_bandwidth(override_tbs: float | None) -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "CPU (smoke)", override_tbs
    name = torch.cuda.get_device_name(0)
    if override_tbs is not None:
        return name, override_tbs
    for key, tbs in BANDWIDTH_TBS:
        if key in name:
            return name, tbs
    return name, None


# ---- one model: 1 + 2 -------------------------------------------------------------------------


def check_model(name: str, config: dict[str, Any], ns: argparse.Namespace, device: torch.device, bw: float | None):
    estimate = estimate_from_config(config, quantization="nf4", context_length=ns.context, batch_size=ns.batch)
    est_weights = estimate.weights_bytes + estimate.quant_overhead_bytes
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = _allocated()
    started = time.perf_counter()
    model = build_nf4(config, device)
    build_s = time.perf_counter() - started
    loaded = _allocated() - base
    if device.type == "cpu":  # no allocator to ask: count the tensors
        unique = {t.data_ptr(): t for t in model.state_dict().values() if isinstance(t, torch.Tensor)}  # tied once
        loaded = sum(t.numel() * t.element_size() for t in unique.values())
    result = ModelResult(
        name=name,
        params_b=round(estimate.params / 1e9, 3),
        est_weights_mib=_mib(est_weights),
        est_total_mib=_mib(estimate.total_bytes),
        load_allocated_mib=_mib(loaded),
        weights_error_pct=round(100 * (loaded - est_weights) / est_weights, 2),
        context=ns.context,
        batch=ns.batch,
        build_s=round(time.perf_counter() - started, 1),
    )
    print(f"{name}: built in {build_s:.1f} s, allocated {result.load_allocated_mib} MiB", flush=True)
    text = config.get("text_config", config)
    vocab = int(text["vocab_size"])
    # Generation at the configured context: prompt fills it up to the last 16 tokens.
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    prompt = torch.randint(10, vocab - 10, (ns.batch, ns.context - 16), device=device)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    del prompt
    if torch.cuda.is_available():
        peak, reserved = torch.cuda.max_memory_allocated() - base, torch.cuda.max_memory_reserved()
        result.peak_allocated_mib, result.peak_reserved_mib = _mib(peak), _mib(reserved)
        result.total_error_pct = round(100 * (peak - estimate.total_bytes) / estimate.total_bytes, 2)
    # Bytes read per decoded token: all weights (the tied lm_head reads the whole embedding) + a short KV.
    per_token = est_weights
    result.bytes_per_token_mib = _mib(per_token)
    if bw:
        result.bound_tok_s = round(bw * 1e12 / per_token, 1)
    result.decode = decode_speed(model, vocab, device, ns.decode_tokens, compile_=ns.compile)
    for variant in result.decode.values():
        if "tok_s" in variant and result.bound_tok_s:
            variant["share_of_bound"] = round(variant["tok_s"] / result.bound_tok_s, 3)
    print(f"{name}: decode {result.decode}", flush=True)
    result.kv = kv_pool_check(model, ns, device)
    print(f"{name}: KV pool {result.kv}", flush=True)
    return model, result


# ---- 3. the KV contract ------------------------------------------------------------------------


def kv_pool_check(model: nn.Module, ns: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Build the engine's KV pool on the device; allocated bytes vs the plan's pool bytes."""
    from deployments.engine.generation import SamplingParams
    from deployments.engine.pool import ContinuousBatcher
    from placement.sizing.kv_budget import kv_budget

    text_config = model.config.get_text_config()
    budget = kv_budget(text_config, batch_sequences=ns.batch, context_length=ns.context, dtype=model.dtype)
    assert budget.pool is not None
    gc.collect()
    before = _allocated()
    batcher = ContinuousBatcher(model, pool=budget.pool, eos_token_ids=[1], pad_token_id=0)
    try:
        allocated = _allocated() - before if device.type == "cuda" else batcher.cache_bytes
        out = {
            "planned_pool_mib": _mib(budget.pool.cache_bytes),
            "planned_kv_mib": _mib(budget.total_bytes),
            "pool_tensor_mib": _mib(batcher.cache_bytes),
            "allocated_by_batcher_mib": _mib(allocated),
            "within_plan": batcher.cache_bytes <= budget.pool.cache_bytes,
        }
        ids = batcher.generate(list(range(10, 26)), SamplingParams(max_tokens=8, temperature=0))
        out["generated_tokens"] = len(ids)
    finally:
        batcher.close()
    return out


def allocator_cap_check(device: torch.device) -> dict[str, Any]:
    """The replica's cap (deployments.engine.memory): past it, this process's allocation fails."""
    if device.type != "cuda":
        return {"skipped": "CPU: the replica only reports (no allocator cap)"}
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    held = torch.cuda.memory_reserved(0)
    cap = held + 256 * MIB
    torch.cuda.set_per_process_memory_fraction(cap / total, 0)
    try:
        small = torch.empty(128 * MIB, dtype=torch.uint8, device=device)  # fits under the cap
        del small
        try:
            torch.empty(1024 * MIB, dtype=torch.uint8, device=device)
            refused = False
        except torch.cuda.OutOfMemoryError:
            refused = True
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    return {"cap_mib": _mib(cap), "held_mib": _mib(held), "1GiB_past_cap_refused": refused}


# ---- 3. serve both on one GPU -----------------------------------------------------------------


def save_for_serving(model: nn.Module, config: dict[str, Any], directory: Path) -> Path:
    """Save pre-quantized NF4 weights + an offline tokenizer (and processor for image+text)."""
    from tiny_models import CHAT_TEMPLATE, build_tokenizer
    from transformers import BitsAndBytesConfig

    tokenizer = build_tokenizer()
    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    text = model.config.get_text_config()
    text.pad_token_id, text.eos_token_id, text.bos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    )
    if "vision_config" in config:
        from transformers import Gemma3ImageProcessorPil, Gemma3Processor

        model.config.boi_token_index = tokenizer.convert_tokens_to_ids("<start_of_image>")
        model.config.eoi_token_index = tokenizer.convert_tokens_to_ids("<end_of_image>")
        model.config.image_token_index = tokenizer.convert_tokens_to_ids("<image_soft_token>")
        size = int(config["vision_config"]["image_size"])
        processor = Gemma3Processor(
            image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            image_seq_length=int(config["mm_tokens_per_image"]),
        )
        processor.save_pretrained(directory)
    else:
        tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def gpu_memory_by_pid() -> dict[int, float]:
    """MiB each process holds on GPU 0 by the driver's count (CUDA contexts included); {} without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {p.pid: _mib(p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    except Exception:  # no driver (the CPU smoke) or no NVML: nothing to show
        return {}


def serve_both(dirs: dict[str, Path], ns: argparse.Namespace, workdir: Path, local_ray: LocalRay) -> dict[str, Any]:
    """The app planned onto this machine's one GPU, each replica's own report."""
    import httpx
    import yaml
    from ray import serve

    from deployments.app import AppArgs, build_app

    models = {
        role: {
            "model": str(path),
            "context_length": ns.context,
            "max_batch_size": ns.batch,
            "engine_process": role == ENGINE_PROCESS_ROLE,
        }
        for role, path in dirs.items()
    }
    config_path = workdir / "model_configs.yaml"
    config_path.write_text(yaml.safe_dump(models))
    port = local_ray.serve_port()
    try:
        args = AppArgs(model_config=str(config_path), gpu_memory_gb=None if torch.cuda.is_available() else 64)
        started = time.perf_counter()
        serve.run(build_app(args), name="gpucheck", route_prefix="/")
        ready_s = time.perf_counter() - started
        report: dict[str, Any] = {"ready_s": round(ready_s, 1), "replicas": {}}
        for role in dirs:
            info = serve.get_deployment_handle(role, "gpucheck").placement.remote().result()
            reply = httpx.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json={"model": role, "prompt": "The", "max_tokens": 4, "temperature": 0},
                timeout=120,
            )
            actual = info["actual"]
            memory = actual["memory"]
            report["replicas"][role] = {
                "planned": info["planned"]["device"],
                "fraction": info["planned"]["fraction"],
                "gpu_uuids": actual.get("gpu_uuids"),
                "cuda_visible_devices": actual.get("cuda_visible_devices"),
                "pid": actual["pid"],
                "engine_pid": actual.get("engine_pid"),
                "allocated_mib": _mib(int(memory.get("cuda:0_allocated_bytes", 0))),
                "reserved_mib": _mib(int(memory.get("cuda:0_reserved_bytes", 0))),
                "card_total_mib": _mib(int(memory.get("cuda:0_total_bytes", 0))),
                "rss_mib": _mib(int(memory.get("rss_bytes", 0))),
                "kv_planned_mib": _mib(int(info["planned"].get("kv_cache_bytes") or 0)),
                "kv_engine_mib": _mib(int(memory.get("kv_built_bytes", 0))),
                "cap_mib": _mib(sum(actual.get("memory_cap_bytes", {}).values())),
                "http_status": reply.status_code,
            }
        report["gpu_mib_by_pid"] = gpu_memory_by_pid()
        replicas = report["replicas"].values()
        report["sum_reserved_mib"] = round(sum(r["reserved_mib"] for r in replicas), 3)
        total = max((r["card_total_mib"] for r in replicas), default=0.0)
        report["card_total_mib"] = total
        report["within_card"] = bool(total == 0 or report["sum_reserved_mib"] <= total)
        return report
    finally:
        serve.delete("gpucheck")


class LocalRay:
    """The one Ray on this machine that the peer and serve steps serve on, its GPU declared with its
    slot; started when a step first asks (a start is 10-15 s of CPU on a small machine), stopped when
    the `with` block ends."""

    def __init__(self) -> None:
        self.port: int | None = None

    def __enter__(self) -> LocalRay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_port(self) -> int:
        """Serve's HTTP port, Ray and Serve started on the first call."""
        if self.port is None:
            import ray

            if not torch.cuda.is_available():
                os.environ[CPU_FALLBACK_ENV] = "1"  # smoke: the GPU plan loads on CPU, the pin still checked
            ray.init(num_gpus=1, resources={"gpu_slot_0": 1}, include_dashboard=False, log_to_driver=False)
            self.port = start_serve_on_a_free_port()
        return self.port

    def stop(self) -> None:
        if self.port is not None:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
            self.port = None


# ---- 0. the suite's GPU-marked tests ------------------------------------------------------------


def gpu_test_modules() -> list[str]:
    """The test modules that carry `pytest.mark.gpu` (collecting only those keeps the step short)."""
    tests = REPO_ROOT / "tests"
    return sorted(str(p.relative_to(REPO_ROOT)) for p in tests.glob("test_*.py") if "mark.gpu" in p.read_text())


def run_gpu_tests(timeout_s: float, workdir: Path) -> dict[str, Any]:
    """`pytest -m gpu` in a process of its own; its counts from the JUnit XML it writes."""
    junit = workdir / "gpu-tests.xml"
    modules = gpu_test_modules()
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    # The suite's two workers where the tests run; without a GPU each is only skipped, and one process
    # collecting them costs half of two.
    command += ["-n", "2" if torch.cuda.is_available() else "0", f"--junitxml={junit}", *modules]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:]
        return {"modules": modules, "timed_out_s": round(timeout_s), "output_tail": str(tail)}
    out: dict[str, Any] = {"modules": modules, "rc": done.returncode, "seconds": round(time.perf_counter() - started)}
    out["output_tail"] = (done.stdout + done.stderr)[-1500:]
    if not junit.is_file():
        return out
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    outcome: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    reasons: set[str] = set()
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome["failed"].append(name)
        elif (skipped := case.find("skipped")) is not None:
            outcome["skipped"].append(name)
            reasons.add(skipped.get("message", ""))
        else:
            outcome["passed"].append(name)
    out.update({kind: len(names) for kind, names in outcome.items()})
    out["failed_names"] = outcome["failed"]
    out["skip_reasons"] = sorted(reasons)
    return out


# ---- 0b. rayfit next to transformers serve on the same device --------------------------------------

PEER_SHAPE = {"stream": False, "temperature": 0}  # greedy: the peer's default decoding too (bench_peer)
# rayfit's role: as the demo plans it; the CPU smoke only needs room for c=8 short requests (a 2048 × 16
# pool is 0.7 GiB of CPU memory to allocate for a step that makes no speed claim).
PEER_ROLE = {"context_length": 2048, "max_batch_size": 16}
SMOKE_PEER_ROLE = {"context_length": 256, "max_batch_size": 8}
# Both servers at the same dtype: bf16 on a GPU; float32 for the smoke, where CPU bf16 matmuls (emulated on
# most CPUs) only make the step slower and it makes no speed claim.
PEER_DTYPE, SMOKE_PEER_DTYPE = "bfloat16", "float32"


def _peer_dtype(gpu: bool) -> str:
    return PEER_DTYPE if gpu else SMOKE_PEER_DTYPE


def _start_rayfit(model_dir: Path, workdir: Path, gpu: bool, local_ray: LocalRay) -> str:
    """The SmolLM2 served as the `summarizer` role, planned as the demo plans it (onto the GPU, or on
    CPU for the smoke); the base URL."""
    import yaml
    from ray import serve

    from deployments.app import AppArgs, build_app

    config = workdir / "peer_models.yaml"
    role = {"model": str(model_dir), **(PEER_ROLE if gpu else SMOKE_PEER_ROLE), "dtype": _peer_dtype(gpu)}
    config.write_text(yaml.safe_dump({"summarizer": role}))
    port = local_ray.serve_port()
    serve.run(build_app(AppArgs(model_config=str(config), gpus=None if gpu else "none")), name=PEER_APP)
    return f"http://127.0.0.1:{port}"


def _measure(url: str, model: str, ns: argparse.Namespace) -> dict[str, Any]:
    """Closed-loop tok/s at c=1 and c=8 (median over rounds) after a warm-up, bench_peer's client."""
    from bench_peer import closed_loop

    closed_loop(url, model, PEER_SHAPE, 2, 1, ns.peer_max_tokens)  # warm-up (first batch, graphs, caches)
    cells: dict[str, Any] = {}
    for concurrency in (1, 8):
        per_client = ns.peer_requests * (2 if concurrency == 1 else 1)
        rates, errors = [], []
        for _ in range(ns.peer_rounds):
            tok_s, _, failed, _ = closed_loop(url, model, PEER_SHAPE, concurrency, per_client, ns.peer_max_tokens)
            rates.append(tok_s)
            errors += failed
        cells[f"c{concurrency}"] = {"tok_s": round(statistics.median(rates), 2), "rounds": rates, "errors": errors}
    return cells


def peer_comparison(ns: argparse.Namespace, workdir: Path, gpu: bool, local_ray: LocalRay) -> dict[str, Any]:
    """rayfit, then the peer, each alone on the device, on the same SmolLM2 directory."""
    from bench_peer import start_peer
    from ray import serve
    from served_demo import smollm2_dir

    model_dir = smollm2_dir()
    url = _start_rayfit(model_dir, workdir, gpu, local_ray)
    try:
        rayfit = _measure(url, "summarizer", ns)
    finally:
        serve.delete(PEER_APP)  # returns once its replica is gone: the device is the peer's alone
    # The peer with its CUDA graphs on a GPU; on CPU a small KV cache (it sizes one from free memory).
    extra = ("--dtype", _peer_dtype(gpu), *(("--cb-use-cuda-graph",) if gpu else ("--cb-num-blocks", "32")))
    peer, port = start_peer(model_dir, extra)
    try:
        theirs = _measure(f"http://127.0.0.1:{port}", str(model_dir), ns)
    finally:
        peer.terminate()
        peer.wait(timeout=60)
    cells = {}
    for key in ("c1", "c8"):
        ratio = rayfit[key]["tok_s"] / theirs[key]["tok_s"] if theirs[key]["tok_s"] else None
        cells[key] = {
            "rayfit_tok_s": rayfit[key]["tok_s"],
            "peer_tok_s": theirs[key]["tok_s"],
            "ratio": round(ratio, 3) if ratio is not None else None,
            "rayfit_rounds": rayfit[key]["rounds"],
            "peer_rounds": theirs[key]["rounds"],
            "errors": rayfit[key]["errors"] + theirs[key]["errors"],
        }
    return {
        "gpu_figure": gpu,
        "model": f"{model_dir.name} ({_peer_dtype(gpu)})",
        "max_tokens": ns.peer_max_tokens,
        "rounds": ns.peer_rounds,
        "peer_options": list(extra),
        "cells": cells,
    }


# ---- report -----------------------------------------------------------------------------------


def tests_and_peer_markdown(tests: dict[str, Any] | None, peer: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    if tests:
        if "timed_out_s" in tests:
            lines += [f"GPU-marked tests ({', '.join(tests['modules'])}): TIMED OUT after {tests['timed_out_s']} s", ""]
        else:
            lines += [
                f"GPU-marked tests (`pytest -m gpu` over {', '.join(tests['modules'])}, {tests.get('seconds')} s): "
                f"**{tests.get('passed', '?')} passed, {tests.get('failed', '?')} failed, "
                f"{tests.get('skipped', '?')} skipped** (exit {tests['rc']})"
                + (f"; skipped because: {'; '.join(tests['skip_reasons'])}" if tests.get("skip_reasons") else ""),
                "",
            ]
            lines += [f"- FAILED {name}" for name in tests.get("failed_names", [])]
            if tests.get("failed_names"):
                lines.append("")
    if peer:
        where = (
            "on this GPU" if peer["gpu_figure"] else "**CPU SMOKE: not a GPU figure** (the step works; no speed claim)"
        )
        lines += [
            f"rayfit vs `transformers serve --continuous-batching {' '.join(peer['peer_options'])}`, {where}: "
            f"{peer['model']}, each alone on the device, closed-loop greedy chat completions, "
            f"max_tokens {peer['max_tokens']}, median of {peer['rounds']} round(s)",
            "",
            "| c | rayfit tok/s | peer tok/s | rayfit/peer | errors |",
            "|---|---|---|---|---|",
        ]
        for key, cell in peer["cells"].items():
            ratio = f"{cell['ratio']:.2f}×" if cell["ratio"] is not None else "-"
            lines.append(
                f"| {key[1:]} | {cell['rayfit_tok_s']} | {cell['peer_tok_s']} | {ratio} | {len(cell['errors'])} |"
            )
        lines.append("")
    return lines


def markdown(
    card: str,
    bw: float | None,
    results: list[ModelResult],
    served: dict[str, Any] | None,
    cap: dict[str, Any] | None = None,
    tests: dict[str, Any] | None = None,
    peer: dict[str, Any] | None = None,
) -> str:
    lines = [
        f"GPU check on **{card}** (bandwidth {bw or 'unknown'} TB/s), torch {torch.__version__}",
        "",
    ]
    if not torch.cuda.is_available():
        lines += ["**CPU smoke: no figure below is a GPU figure.**", ""]
    lines += tests_and_peer_markdown(tests, peer)
    lines += [
        "| model | params | est. weights MiB | allocated after load MiB | error | est. total MiB "
        "| peak alloc MiB | peak reserved MiB | error | context×batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.params_b}B | {r.est_weights_mib} | {r.load_allocated_mib} | {r.weights_error_pct:+.1f}% "
            f"| {r.est_total_mib} | {r.peak_allocated_mib} | {r.peak_reserved_mib} | {r.total_error_pct:+.1f}% "
            f"| {r.context}×{r.batch} |"
        )
    lines += [
        "",
        "| model | bytes/token MiB | bound tok/s | variant | tok/s | share of bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for variant, v in r.decode.items():
            got = v.get("tok_s", v.get("error", "?"))
            lines.append(
                f"| {r.name} | {r.bytes_per_token_mib} | {r.bound_tok_s or '-'} | {variant} | {got} "
                f"| {v.get('share_of_bound', '-')} |"
            )
    lines += [
        "",
        "| model | KV planned MiB (pool + side) | pool planned MiB | pool tensor MiB | allocated by batcher MiB "
        "| within plan |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        kv = r.kv
        lines.append(
            f"| {r.name} | {kv.get('planned_kv_mib')} | {kv.get('planned_pool_mib')} | {kv.get('pool_tensor_mib')} "
            f"| {kv.get('allocated_by_batcher_mib')} | {kv.get('within_plan')} |"
        )
    if cap:
        lines += ["", f"Allocator cap: {cap}"]
    if served:
        lines += ["", f"Served on one card (ready in {served['ready_s']} s):", ""]
        lines += [
            "| role | planned | fraction | GPU UUID | allocated MiB | reserved MiB | KV plan / engine MiB | cap MiB "
            "| HTTP |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for role, r in served["replicas"].items():
            uuid = ",".join(r["gpu_uuids"] or []) or "-"
            lines.append(
                f"| {role} | {r['planned']} | {r['fraction']} | {uuid} | {r['allocated_mib']} "
                f"| {r['reserved_mib']} | {r['kv_planned_mib']} / {r['kv_engine_mib']} | {r['cap_mib']} "
                f"| {r['http_status']} |"
            )
        lines.append("")
        by_pid = served.get("gpu_mib_by_pid") or {}
        for role, r in served["replicas"].items():
            holders = [("replica", r["pid"])] + (
                [("engine process", r["engine_pid"])] if r["engine_pid"] != r["pid"] else []
            )
            seen = ", ".join(f"{what} {pid}: {by_pid.get(pid, 0.0)} MiB" for what, pid in holders)
            lines.append(f"- {role}: GPU memory by process (NVML): {seen or '-'}")
        lines.append(
            f"\nsum reserved {served['sum_reserved_mib']} MiB of {served['card_total_mib']} MiB: "
            f"{'within the card' if served['within_card'] else 'OVER THE CARD'}"
        )
    return "\n".join(lines) + "\n"


# Seconds a step needs left in the budget to start, on one H100 (estimates; the JSON's step_seconds
# records what each took). The GPU tests go first and are bounded by what is left.
MIN_LEFT_S = {"peer": 150.0, "4b": 90.0, "27b": 180.0, "compile": 240.0, "serve": 120.0}
GPU_BUDGET_S = 420.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (CI keeps the script working)")
    parser.add_argument("--bandwidth-tbs", type=float, default=None, help="card bandwidth, TB/s (default: by name)")
    parser.add_argument("--context", type=int, default=None, help="tokens per sequence (default 4096; smoke 64)")
    parser.add_argument("--batch", type=int, default=1, help="sequences in the generation at full context")
    parser.add_argument("--decode-tokens", type=int, default=None, help="tokens per decode timing (default 64)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip static cache + compile")
    parser.add_argument("--skip-serve", action="store_true", help="skip step 4 (both models served by Ray + Serve)")
    parser.add_argument("--skip-tests", action="store_true", help="skip step 0 (pytest -m gpu)")
    parser.add_argument("--skip-peer", action="store_true", help="skip step 0b (rayfit vs transformers serve)")
    parser.add_argument("--peer-max-tokens", type=int, default=None, help="tokens per request (default 64; smoke 4)")
    parser.add_argument("--peer-rounds", type=int, default=None, help="rounds per cell, median (default 3; smoke 1)")
    parser.add_argument(
        "--peer-requests", type=int, default=None, help="requests per client at c=8, twice at c=1 (default 2; smoke 1)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"seconds the whole run may take; a step that would start with too little left is skipped "
        f"(default {GPU_BUDGET_S:.0f} on a GPU, none for the smoke)",
    )
    parser.add_argument("--models", default="4b,27b", help="comma list of 4b, 27b")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ns = parser.parse_args(argv)
    smoke = ns.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --cpu-smoke")
    ns.context = ns.context or (64 if smoke else 4096)
    ns.decode_tokens = ns.decode_tokens or (8 if smoke else 64)
    ns.peer_max_tokens = ns.peer_max_tokens or (4 if smoke else 64)
    ns.peer_rounds = ns.peer_rounds or (1 if smoke else 3)
    ns.peer_requests = ns.peer_requests or (1 if smoke else 2)
    if smoke:
        # One torch thread, as each replica has: with two, every op of the tiny shapes waits for a thread
        # the other busy processes hold (steps 1-3 took 132 s instead of 34 s on 2 loaded cores).
        torch.set_num_threads(1)
    budget = ns.budget_s if ns.budget_s is not None else (None if smoke else GPU_BUDGET_S)
    device = torch.device("cpu" if smoke else "cuda:0")
    card, bw = card_bandwidth(ns.bandwidth_tbs)
    configs = {
        "4b": ("medgemma-4b-it (image+text)", SMOKE_4B if smoke else MEDGEMMA_4B, "summarizer"),
        "27b": ("medgemma-27b-text", SMOKE_27B_TEXT if smoke else MEDGEMMA_27B_TEXT, "buffer_agent"),
    }
    started = time.perf_counter()
    step_seconds: dict[str, float] = {}
    skipped_steps: list[str] = []

    def left() -> float:
        return float("inf") if budget is None else budget - (time.perf_counter() - started)

    def may_start(step: str) -> bool:
        if left() >= MIN_LEFT_S.get(step, 0.0):
            return True
        skipped_steps.append(f"{step}: {max(left(), 0):.0f} s left of the {budget:.0f} s budget")
        print(f"skipping {skipped_steps[-1]}", flush=True)
        return False

    def timed(step: str, since: float) -> None:
        step_seconds[step] = round(time.perf_counter() - since, 1)

    results: list[ModelResult] = []
    served: dict[str, Any] | None = None
    tests: dict[str, Any] | None = None
    peer: dict[str, Any] | None = None
    cap: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="rayfit-gpucheck-") as scratch, LocalRay() as local_ray:
        workdir = Path(scratch)
        if not ns.skip_tests:
            t0 = time.perf_counter()
            tests = run_gpu_tests(min(300.0, left()), workdir)
            timed("gpu tests", t0)
            print(f"GPU tests: { {k: v for k, v in tests.items() if k != 'output_tail'} }", flush=True)
        if not ns.skip_peer and may_start("peer"):
            t0 = time.perf_counter()
            peer = peer_comparison(ns, workdir, not smoke, local_ray)
            timed("peer", t0)
            print(f"rayfit vs peer: {peer['cells']}", flush=True)
        dirs: dict[str, Path] = {}
        for key in [k.strip() for k in ns.models.split(",") if k.strip()]:
            if not may_start(key):
                continue
            if ns.compile and not may_start("compile"):
                ns.compile = False
            t0 = time.perf_counter()
            name, config, role = configs[key]
            model, result = check_model(name, config, ns, device, bw)
            results.append(result)
            if not ns.skip_serve:
                dirs[role] = save_for_serving(model, config, workdir / key)
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            timed(key, t0)
        if results:
            cap = allocator_cap_check(device)
            print(f"allocator cap: {cap}", flush=True)
        if dirs and may_start("serve"):
            t0 = time.perf_counter()
            served = serve_both(dirs, ns, workdir, local_ray)
            timed("serve", t0)
    report = markdown(card, bw, results, served, cap, tests, peer)
    if skipped_steps:
        report += "\nskipped steps (time budget): " + "; ".join(skipped_steps) + "\n"
    report += f"\ntotal {time.perf_counter() - started:.0f} s (by step: {step_seconds})\n"
    print("\n" + report)
    ns.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check-cpu-smoke" if smoke else f"gpu_check-{card.replace(' ', '_')}"
    (ns.out / f"{stem}.md").write_text(report)
    (ns.out / f"{stem}.json").write_text(
        json.dumps(
            {
                "card": card,
                "gpu_figures": not smoke,
                "bandwidth_tbs": bw,
                "gpu_tests": tests,
                "peer": peer,
                "models": [asdict(r) for r in results],
                "allocator_cap": cap,
                "served": served,
                "budget_s": budget,
                "step_seconds": step_seconds,
                "skipped_steps": skipped_steps,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
