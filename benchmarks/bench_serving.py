"""Serving overhead and throughput: HTTP → ingress → model vs the engine in-process.

    .venv/bin/python benchmarks/bench_serving.py                      # demo summarizer, CPU
    .venv/bin/python benchmarks/bench_serving.py --role buffer_agent --max-tokens 16

1. Overhead: one request at a time, same model, same prompt and greedy params,
   through HTTP (openai-style JSON, keep-alive) vs `Engine.generate_batch` in
   this process. Median, p10–p90 spread, and the ratio of medians (target ≤ 1.10×).
   The engine runs with the replica's torch thread count (Ray sets OMP_NUM_THREADS
   from the replica's num_cpus), so only the serving path differs.
2. The OpenAI endpoint under load: streamed chat completions from 1/2/4/8/16
   closed-loop clients (max_batch_size = the highest level): completion tokens/s,
   requests/s, latency, time to first token and inter-token latency p50/p99,
   error rate. `--engine continuous` (default) is transformers' continuous
   batching in the replica; `--engine batch` is @serve.batch + one generate
   per batch, with a TextIteratorStreamer generate per stream (streams unbatched).

Own harness, next to GuideLLM: `benchmarks/bench_guidellm.py` runs GuideLLM 0.8.1
(in its own venv: its pins clash with the project's) against the served demo.

CPU only (the plan is made with `gpus: none`); on a GPU box the numbers would
compare the same way but this script does not pin the in-process engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from deployments.ports import start_serve_on_a_free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "demo" / "model_configs.yaml"
PROMPT = "Explain in two sentences why GPU memory planning matters when serving several language models."


def pct(values: list[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def write_role_config(source: Path, role: str, max_batch_size: int, directory: Path) -> Path:
    """A one-role model config with `max_batch_size` set (batching on/off)."""
    raw = yaml.safe_load(source.read_text())
    if role not in raw:
        raise SystemExit(f"{source}: no role {role!r}; roles: {', '.join(raw)}")
    body = dict(raw[role], max_batch_size=max_batch_size)
    path = directory / f"{role}-batch{max_batch_size}.yaml"
    path.write_text(yaml.safe_dump({role: body}))
    return path


def load_engine(config: Path, role: str, threads: int, continuous: bool) -> Any:
    """The same model and engine mode in this process, on CPU, with the replica's torch thread count."""
    import torch

    from deployments.app import AppArgs, plan_app
    from deployments.engine.core import Engine
    from deployments.engine.loading import load_model

    specs, _, _, plan = plan_app(AppArgs(model_config=str(config), gpus="none"))
    torch.set_num_threads(threads)
    replica = plan.entry(role).replica
    assert replica is not None and replica.continuous == continuous  # RAYFIT_CONTINUOUS_BATCHING, set above
    return Engine(load_model(specs[role], replica), replica)


def deploy(config: Path, app_name: str) -> None:
    from ray import serve

    from deployments.app import AppArgs, build_app

    for existing in serve.status().applications:
        serve.delete(existing)
    serve.run(build_app(AppArgs(model_config=str(config), gpus="none")), name=app_name, route_prefix="/")


def run_concurrent(c: int, per_worker: int, work: Callable[[], dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(per_worker):
            item = work()
            with lock:
                results.append(item)

    threads = [threading.Thread(target=worker) for _ in range(c)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def http_once(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    response = client.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    return {"latency": time.perf_counter() - start, "tokens": response.json()["usage"]["completion_tokens"]}


def stream_once(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat completion: TTFT, inter-token gaps, completion tokens (from usage), or the error."""
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=payload, timeout=300) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}"}
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return {"error": type(exc).__name__}
    if not stamps:
        return {"error": "no content"}
    return {
        "ttft": stamps[0] - start,
        "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "tokens": tokens,
        "latency": time.perf_counter() - start,
    }


LOAD_HEADER = (
    f"{'conc':>5}{'reqs':>6}{'err %':>7}{'tok/s':>8}{'req/s':>7}{'lat p50 s':>10}"
    f"{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}"
)


def load_row(c: int, client: httpx.Client, url: str, body: dict[str, Any], requests: int) -> str:
    """`requests` streamed requests from `c` closed-loop workers, as one table row."""
    per_worker = max(1, requests // c)
    wall, results = run_concurrent(c, per_worker, lambda: stream_once(client, url, body))
    ok = [r for r in results if "error" not in r]
    errors = len(results) - len(ok)
    ttft = [r["ttft"] * 1e3 for r in ok]
    itl = [x * 1e3 for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    return (
        f"{c:>5}{len(results):>6}{100 * errors / len(results):>7.1f}{tokens / wall:>8.1f}{len(ok) / wall:>7.2f}"
        f"{pct([r['latency'] for r in ok], 50):>10.2f}{pct(ttft, 50):>10.0f}{pct(ttft, 99):>10.0f}"
        f"{pct(itl, 50):>9.1f}{pct(itl, 99):>9.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rayfit serving benchmark")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--role", default="summarizer")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10, help="requests for the overhead comparison")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--per-worker", type=int, default=3, help="requests per concurrent worker")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    parser.add_argument(
        "--engine",
        choices=["continuous", "batch"],
        default="continuous",
        help="continuous: transformers continuous batching (default); batch: @serve.batch + one generate per batch",
    )
    ns = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(x) for x in ns.concurrency.split(",")]
    body = {
        "model": ns.role,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": ns.max_tokens,
        "temperature": 0,
    }

    import ray
    from ray import serve

    workdir = Path(tempfile.mkdtemp(prefix="rayfit-bench-"))
    levels_max = max(levels)
    configs = {"on": write_role_config(ns.config, ns.role, levels_max, workdir)}
    continuous = ns.engine == "continuous"
    # Replicas inherit the environment of the Ray this process starts.
    os.environ["RAYFIT_CONTINUOUS_BATCHING"] = "1" if continuous else "0"
    ray.init(include_dashboard=False, log_to_driver=False)
    port = start_serve_on_a_free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        # ---- 1. overhead at concurrency 1 (same engine mode in both paths)
        from deployments.openai_api.protocol import ChatCompletionRequest

        deploy(configs["on"], "bench")
        threads = serve.get_deployment_handle(ns.role, "bench").placement.remote().result()["actual"]["torch_threads"]
        engine = load_engine(configs["on"], ns.role, threads, continuous)
        request = ChatCompletionRequest.model_validate(body).to_generation_input()
        engine_tokens = engine.generate_batch([request])[0].completion_tokens  # warm-up
        served: list[float] = []
        engine_s: list[float] = []
        with httpx.Client() as client:
            first = http_once(client, url, body)  # warm-up
            # Alternate the two paths so drift (other processes, caches) hits both alike;
            # only one of them computes at any moment.
            for _ in range(ns.repeats):
                served.extend(timed(lambda: http_once(client, url, body), 1))
                engine_s.extend(timed(lambda: engine.generate_batch([request]), 1))
        if engine_tokens != first["tokens"]:
            print(f"note: token counts differ (engine {engine_tokens}, served {first['tokens']})")
        print(
            f"\n1. One request at a time: {ns.role}, {first['tokens']} completion tokens, greedy, "
            f"torch threads {threads}"
        )
        print(f"{'path':<28}{'median s':>10}{'p10 s':>9}{'p90 s':>9}")
        for name, values in (("engine in-process", engine_s), ("HTTP → ingress → model", served)):
            print(f"{name:<28}{statistics.median(values):>10.3f}{pct(values, 10):>9.3f}{pct(values, 90):>9.3f}")
        ratio = statistics.median(served) / statistics.median(engine_s)
        paired = [a / b for a, b in zip(served, engine_s, strict=True)]
        verdict = "OK" if ratio <= 1.10 else "ABOVE TARGET"
        print(
            f"ratio of medians: {ratio:.3f}x; per pair: median {statistics.median(paired):.3f}x, "
            f"p10-p90 {pct(paired, 10):.3f}-{pct(paired, 90):.3f}x (target <= 1.10x: {verdict})"
        )
        engine.close()

        # ---- 2. the OpenAI endpoint under load: streaming chat completions, closed loop
        print(
            f"\n2. Streaming /v1/chat/completions at concurrency {ns.concurrency}, {ns.max_tokens} max tokens, "
            f"engine: {'continuous batching' if continuous else '@serve.batch + generate'}"
        )
        print(LOAD_HEADER)
        deploy(configs["on"], "bench")
        with httpx.Client(limits=httpx.Limits(max_connections=max(levels) * 2)) as client:
            stream_once(client, url, body)  # warm-up
            for c in levels:
                print(load_row(c, client, url, body, max(ns.min_requests, ns.per_worker * c)), flush=True)
        print("(TTFT and ITL in milliseconds; tok/s = completion tokens of finished streams ÷ wall time)")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
