"""GuideLLM against the served offline demo: a run that must end with 0 errored requests.

    .venv/bin/python benchmarks/bench_guidellm.py                 # streams 1,4,8; 16 requests each
    .venv/bin/python benchmarks/bench_guidellm.py --streams 4 --requests 8

1. GuideLLM 0.8.1 gets its own venv (`~/.cache/rayfit/guidellm-venv`, made on
   first use: its pins clash with the project's). torch is installed first at
   the project's CPU version, so GuideLLM's torch dependency does not pull a
   CUDA build.
2. The offline demo is served the way `python -m deployments.demo` serves it
   (a local Ray, examples/demo/serve_config.yaml), on a free port.
3. `guidellm run` with the OpenAI HTTP backend (streamed chat completions:
   GuideLLM sends `stream_options.continuous_usage_stats` and `ignore_eos`),
   the concurrent profile at each of `--streams`, synthetic text data, and the
   demo's converted SmolLM2 directory under ~/.cache/rayfit/gguf/ as its
   tokenizer (no hub needed). The exact command is printed.
4. Its JSON report is read back: per stream count the successful, incomplete
   and errored requests, tokens/s, TTFT and ITL, as a table. Exit 1 if any
   request errored (the errors GuideLLM recorded are printed) or GuideLLM
   failed; incomplete requests (cancelled by GuideLLM when a benchmark ends)
   are shown but are not rayfit's errors.

Caveat (measured on Ray 2.60): Ray starts every worker process, so the model
replica, at nice 15; GuideLLM runs at nice 0 on the same cores.

Writes `benchmarks/results/bench_guidellm.{md,json}` (the table and its rows); GuideLLM's
own report (~0.5 MB per run) stays in a temporary directory, named at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from served_demo import smollm2_dir, start_demo, stop_demo  # noqa: E402

ROLE = "summarizer"
GUIDELLM_VERSION = "0.8.1"
TORCH_VERSION = "2.13.0"  # the project's CPU wheel (scripts/install.sh pins the same)


def guidellm_venv() -> Path:
    """GuideLLM's own venv, made on first use; its `guidellm` executable."""
    from placement.cache import rayfit_cache_dir

    venv = rayfit_cache_dir() / "guidellm-venv"
    exe = venv / "bin" / "guidellm"
    if exe.exists():
        return exe
    print(f"making {venv} (GuideLLM {GUIDELLM_VERSION}, torch {TORCH_VERSION} CPU) ...", flush=True)
    python = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"guidellm=={GUIDELLM_VERSION}", f"torch=={TORCH_VERSION}"], check=True)
    return exe


def guidellm_command(exe: Path, url: str, tokenizer: Path, args: argparse.Namespace, report: Path) -> list[str]:
    return [
        str(exe),
        "run",
        "--backend",
        f"kind=openai_http,target={url},model={ROLE}",
        "--profile",
        "kind=concurrent,streams=" + str(args.streams[0]),
        "--override",
        "profile.streams",
        ",".join(str(s) for s in args.streams),
        "--constraint",
        f"kind=max_requests,count={args.requests}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
        "--tokenizer",
        f"kind=hf_auto,model={tokenizer}",
        "--output",
        f"kind=json,path={report}",
        "--disable-console-interactive",
    ]


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per sub-benchmark (stream count) of GuideLLM's JSON report."""
    rows = []
    for bench in report.get("benchmarks") or []:
        made = _get(bench, "scheduler_metrics", "requests_made") or {}
        metrics = bench.get("metrics") or {}
        strategy = _get(bench, "config", "strategy") or {}
        errored = [r for r in (_get(bench, "requests", "errored") or []) if isinstance(r, dict)]
        rows.append(
            {
                "streams": strategy.get("streams") or strategy.get("max_concurrency"),
                "successful": made.get("successful"),
                "incomplete": made.get("incomplete"),
                "errored": made.get("errored"),
                "output_tok_s": _get(metrics, "output_tokens_per_second", "successful", "mean"),
                "req_s": _get(metrics, "requests_per_second", "successful", "mean"),
                "latency_p50_s": _get(metrics, "request_latency", "successful", "median"),
                "ttft_p50_ms": _get(metrics, "time_to_first_token_ms", "successful", "median"),
                "ttft_p99_ms": _get(metrics, "time_to_first_token_ms", "successful", "percentiles", "p99"),
                "itl_p50_ms": _get(metrics, "inter_token_latency_ms", "successful", "median"),
                "itl_p99_ms": _get(metrics, "inter_token_latency_ms", "successful", "percentiles", "p99"),
                "output_tokens_mean": _get(metrics, "output_token_count", "successful", "mean"),
                "errors": sorted({str(r.get("info", {}).get("error") or r.get("error")) for r in errored})[:5],
            }
        )
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    lines = [
        f"GuideLLM {GUIDELLM_VERSION} against the offline demo (`{ROLE}`, SmolLM2-135M), {platform.node()} "
        f"({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; concurrent profile, "
        f"{args.requests} requests per stream count, synthetic {args.prompt_tokens} prompt / "
        f"{args.output_tokens} output tokens, streamed chat completions",
        "",
        "| streams | successful | incomplete | errored | output tok/s | req/s | latency p50 s "
        "| TTFT p50 / p99 ms | ITL p50 / p99 ms | output tokens/req |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['streams']} | {row['successful']} | {row['incomplete']} | {row['errored']} "
            f"| {_fmt(row['output_tok_s'], '.1f')} | {_fmt(row['req_s'], '.2f')} | {_fmt(row['latency_p50_s'], '.2f')} "
            f"| {_fmt(row['ttft_p50_ms'], '.0f')} / {_fmt(row['ttft_p99_ms'], '.0f')} "
            f"| {_fmt(row['itl_p50_ms'], '.1f')} / {_fmt(row['itl_p99_ms'], '.1f')} "
            f"| {_fmt(row['output_tokens_mean'], '.1f')} |"
        )
    errored = sum(row["errored"] or 0 for row in rows)
    incomplete = sum(row["incomplete"] or 0 for row in rows)
    lines += ["", f"errored requests: {errored}, incomplete: {incomplete}", "", f"command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests per stream count")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    exe = guidellm_venv()
    tokenizer = smollm2_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = Path(tempfile.mkdtemp(prefix="rayfit-guidellm-")) / "report.json"
    url = start_demo()
    try:
        command = guidellm_command(exe, url, tokenizer, args, report_path)
        shown = shlex.join(command)
        print(f"$ {shown}", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        completed = subprocess.run(command, env=env, check=False)
    finally:
        stop_demo()
    if not report_path.exists():
        print(f"guidellm exited with {completed.returncode} and wrote no report")
        return 1
    rows = summarize(json.loads(report_path.read_text()))
    shown = shown.replace(url, "http://127.0.0.1:<port>").replace(str(report_path), "<report.json>")
    table = markdown(rows, args, shown.replace(str(Path.home()), "~"))
    print("\n" + table)
    print(f"GuideLLM's report: {report_path}")
    for row in rows:
        for error in row["errors"]:
            print(f"streams {row['streams']}: error: {error}")
    (args.out / "bench_guidellm.md").write_text(table)
    (args.out / "bench_guidellm.json").write_text(json.dumps({"rows": rows, "guidellm_rc": completed.returncode}))
    failed = completed.returncode != 0 or not rows or any(r["errored"] is None or r["errored"] > 0 for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
