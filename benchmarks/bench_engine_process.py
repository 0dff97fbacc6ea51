"""The engine inside its replica vs in a process of its own (`engine_process: true`), in one app.

    .venv/bin/python benchmarks/bench_engine_process.py              # 6 rounds, ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_engine_process.py --rounds 8

Two roles on the demo's SmolLM2 (same config but `engine_process`), one Ray app,
closed-loop chat completions at concurrency 8, 32 tokens: whole greedy answers,
streamed greedy, streamed sampled (temperature unset). Each round measures both
roles back to back (the order flips every round); the figure that counts is the
median over rounds of engine-process/in-replica in the same round, because this
VM's speed drifts by ±15% within minutes.

For the thread that runs transformers' batching loop (the busiest thread of the
process holding the model) it also reads the kernel's view per decode step
(8 tokens): CPU ms per token, the share of wall time it waited on the run queue
(`/proc/<pid>/task/<tid>/schedstat`), and its voluntary switches (it blocked:
on the GIL, a lock) and involuntary ones (the scheduler preempted it for another
runnable thread) from `/proc/<pid>/task/<tid>/status`.

Writes `benchmarks/results/bench_engine_process.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from bench_peer import closed_loop, start_rayfit  # noqa: E402

ROLES = {"in replica": "inside", "engine process": "apart"}
SHAPES = {
    "temperature 0, non-streaming": {"stream": False, "temperature": 0},
    "temperature 0, streaming": {"stream": True, "temperature": 0},
    "temperature unset, streaming": {"stream": True},
}
CONCURRENCY = 8
ROLE_CONFIG = """\
{role}:
  provider: huggingface
  model: demo:smollm2-135m-instruct
  context_length: 2048
  max_batch_size: 16
  engine_process: {apart}
"""


def start_app() -> tuple[str, dict[str, int]]:
    """Ray + the two-role app; (base URL, role → pid of the process holding its model)."""
    config = Path(tempfile.mkdtemp(prefix="bench-engine-process-")) / "model_configs.yaml"
    config.write_text("".join(ROLE_CONFIG.format(role=r, apart=str(r == "apart").lower()) for r in ROLES.values()))
    url = start_rayfit(config)
    models = httpx.get(f"{url}/v1/placement", timeout=60).json()["models"]
    return url, {role: int(models[role]["replica"]["actual"]["engine_pid"]) for role in ROLES.values()}


def thread_stats(pid: int) -> dict[int, tuple[int, int, int, int]]:
    """tid → (CPU ns, run-queue wait ns, voluntary switches, involuntary switches)."""
    stats = {}
    for thread in psutil.Process(pid).threads():
        try:
            cpu, wait, _ = (int(x) for x in Path(f"/proc/{pid}/task/{thread.id}/schedstat").read_text().split())
            fields = dict(
                line.split(":\t")
                for line in Path(f"/proc/{pid}/task/{thread.id}/status").read_text().splitlines()
                if ":\t" in line
            )
        except OSError:
            continue  # the thread ended meanwhile
        switches = int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"])
        stats[thread.id] = (cpu, wait, *switches)
    return stats


def measure(url: str, role: str, pid: int, shape: dict[str, Any], per_client: int) -> dict[str, float]:
    before = thread_stats(pid)
    started = time.perf_counter()
    tok_s, _, errors, tokens = closed_loop(url, role, shape, CONCURRENCY, per_client, 32)
    wall = time.perf_counter() - started
    after = thread_stats(pid)
    deltas = {tid: [a - b for a, b in zip(after[tid], before[tid], strict=True)] for tid in after if tid in before}
    cpu_ns, wait_ns, voluntary, involuntary = max(deltas.values(), key=lambda d: d[0])  # the batching loop
    steps = max(tokens, 1) / CONCURRENCY
    return {
        "tok_s": tok_s,
        "errors": len(errors),
        "decode_cpu_ms_per_token": round(cpu_ns / 1e6 / max(tokens, 1), 2),
        "run_queue_wait_pct": round(100 * wait_ns / 1e9 / wall, 2),
        "voluntary_per_step": round(voluntary / steps, 2),
        "involuntary_per_step": round(involuntary / steps, 2),
    }


def markdown(rows: dict[str, dict[str, Any]], rounds: int) -> str:
    lines = [
        f"engine in the replica vs in its own process, one app, {platform.node()} ({psutil.cpu_count()} CPUs), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; closed loop c={CONCURRENCY}, 32 tokens, "
        f"{rounds} rounds of alternating pairs; medians over rounds; per step = per decode step of 8 tokens",
        "",
        "| request | apart/inside tok/s (range) | tok/s inside | tok/s apart | decode CPU ms/tok inside / apart "
        "| run-queue wait % inside / apart | voluntary switches/step inside / apart "
        "| involuntary switches/step inside / apart |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, row in rows.items():
        inside, apart = row["in replica"], row["engine process"]

        def pair(key: str, inside: dict = inside, apart: dict = apart) -> str:
            return f"{statistics.median(inside[key]):.2f} / {statistics.median(apart[key]):.2f}"

        ratios = row["ratio"]
        lines.append(
            f"| {shape} | **{statistics.median(ratios):.2f}×** ({min(ratios):.2f}–{max(ratios):.2f}) "
            f"| {statistics.median(inside['tok_s']):.1f} | {statistics.median(apart['tok_s']):.1f} "
            f"| {pair('decode_cpu_ms_per_token')} | {pair('run_queue_wait_pct')} | {pair('voluntary_per_step')} "
            f"| {pair('involuntary_per_step')} |"
        )
    errors = sum(sum(row[mode]["errors"]) for row in rows.values() for mode in ROLES)
    return "\n".join([*lines, "", f"errors: {errors}", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=2, help="requests per client per cell")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    url, pids = start_app()
    for role in ROLES.values():
        closed_loop(url, role, SHAPES["temperature 0, non-streaming"], 2, 1, 32)  # warm-up
    rows: dict[str, dict[str, Any]] = {shape: {"ratio": []} for shape in SHAPES}
    for round_no in range(args.rounds):
        for shape_name, shape in SHAPES.items():
            modes = list(ROLES) if round_no % 2 == 0 else list(reversed(ROLES))
            got = {}
            for mode in modes:
                result = measure(url, ROLES[mode], pids[ROLES[mode]], shape, args.requests)
                got[mode] = result["tok_s"]
                for key, value in result.items():
                    rows[shape_name].setdefault(mode, {}).setdefault(key, []).append(value)
                print(f"round {round_no} {shape_name}, {mode}: {result}", flush=True)
            rows[shape_name]["ratio"].append(round(got["engine process"] / max(got["in replica"], 1e-9), 3))
    report = markdown(rows, args.rounds)
    print("\n" + report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_engine_process.md").write_text(report)
    (args.out / "bench_engine_process.json").write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
