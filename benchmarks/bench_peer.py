"""rayfit next to its speed peer, in one run: `transformers serve --continuous-batching`.

    .venv/bin/python benchmarks/bench_peer.py                 # default demo config, ~6 min on 2 cores
    .venv/bin/python benchmarks/bench_peer.py --requests 6 --max-tokens 32

The peer is the same engine (transformers' continuous batching) on the same
converted SmolLM2 directory, with no Ray in between, started here with
`OMP_NUM_THREADS=1` to match a replica's one torch thread. rayfit serves the
default demo config (both roles; requests go to `summarizer`, the SmolLM2).
Closed-loop chat completions at concurrency 1 and 8, for the four request
shapes clients send: temperature unset (OpenAI's default 1.0) or 0, streamed
or not. Cells alternate between the two servers so drift hits both.

Two peers, one after the other, one per way of decoding: `transformers serve` builds its
continuous-batching manager from the *first* request's generation config and
decodes every later request that way (transformers 5.24,
`cli/serving/utils.py`), and a request without `temperature` gets the model's
default, which for SmolLM2 is greedy. So one peer is started with a
temperature-0 request and answers the temperature-0 rows, the other with a
temperature-1.0 request and answers the "temperature unset" rows, which rayfit
samples at OpenAI's default 1.0. (Before this, both kinds of rows went to one
greedy peer: the "temperature unset" rows compared rayfit sampling with the
peer decoding greedily.)

Caveat (measured on Ray 2.60): Ray starts every worker process, so every
rayfit replica, at nice 15, while the peers started from this script run at
nice 0; on a busy machine that favours the peers.

Writes `benchmarks/results/bench_peer.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench_serving import run_concurrent  # noqa: E402
from served_demo import smollm2_dir  # noqa: E402

from deployments.ports import free_port  # noqa: E402

DEMO_CONFIG = REPO_ROOT / "examples" / "demo" / "model_configs.yaml"
ROLE = "summarizer"
PROMPT = "Explain in two sentences why GPU memory planning matters when serving several language models."
SHAPES = {
    "temperature unset, non-streaming": {"stream": False},
    "temperature unset, streaming": {"stream": True},
    "temperature 0, non-streaming": {"stream": False, "temperature": 0},
    "temperature 0, streaming": {"stream": True, "temperature": 0},
}


def one_request(client: httpx.Client, url: str, model: str, shape: dict[str, Any], max_tokens: int) -> int:
    """Completion tokens of one chat completion (from usage; streamed: the final usage chunk)."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, **shape}
    if shape["stream"]:
        body["stream_options"] = {"include_usage": True}
        tokens = pieces = 0
        with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        pieces += 1
        return tokens or pieces
    response = client.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    return int(response.json()["usage"]["completion_tokens"])


def closed_loop(url: str, model: str, shape: dict[str, Any], concurrency: int, per_client: int, max_tokens: int):
    """(tok/s, requests, errors): `concurrency` clients each sending `per_client` requests back to back."""
    local = threading.local()

    def work() -> dict[str, Any]:
        if not hasattr(local, "client"):
            local.client = httpx.Client()
        try:
            return {"tokens": one_request(local.client, url, model, shape, max_tokens)}
        except Exception as exc:  # counted, reported
            return {"error": f"{type(exc).__name__}: {exc}"}

    wall, results = run_concurrent(concurrency, per_client, work)
    tokens = [r["tokens"] for r in results if "tokens" in r]
    errors = [r["error"] for r in results if "error" in r]
    return round(sum(tokens) / wall, 2), len(tokens), errors


def start_peer(model_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        str(REPO_ROOT / ".venv" / "bin" / "transformers"),
        "serve",
        "--port",
        str(port),
        "--continuous-batching",
        str(model_dir),
    ]
    peer = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return peer
        except httpx.HTTPError:
            pass
        if peer.poll() is not None:
            raise SystemExit(f"transformers serve exited with {peer.returncode}")
        time.sleep(1)
    peer.kill()
    raise SystemExit("transformers serve did not become healthy in 300 s")


def start_rayfit() -> str:
    import ray
    from ray import serve

    from deployments.app import AppArgs, build_app

    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(model_config=str(DEMO_CONFIG), gpus="none")), name="rayfit", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"rayfit vs `transformers serve --continuous-batching` (same SmolLM2 dir), {platform.node()} "
        f"({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"closed loop, max_tokens {args.max_tokens}, {args.requests} requests per client; tok/s. "
        "Peer: a greedy one for the temperature-0 rows, a sampling one (temperature 1.0) for the unset rows",
        "",
        "| request as clients send it | peer c=1 | peer c=8 | rayfit c=1 | rayfit c=8 "
        "| rayfit/peer c=1 | rayfit/peer c=8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shape']} | {row['peer_c1']} | {row['peer_c8']} | {row['rayfit_c1']} | {row['rayfit_c8']} "
            f"| {row['ratio_c1']:.2f}× | {row['ratio_c8']:.2f}× |"
        )
    errors = sum(row["errors"] for row in rows)
    lines += ["", f"errors: {errors}", ""]
    return "\n".join(lines)


def measure_row(name: str, shape: dict[str, Any], servers: dict[str, tuple[str, str]], args: argparse.Namespace):
    """One table row: each server at c=1 and c=8, cells alternating between the servers."""
    row: dict[str, Any] = {"shape": name, "errors": 0}
    for concurrency in (1, 8):
        per_client = args.requests * (2 if concurrency == 1 else 1)
        for server, (url, model) in servers.items():
            tok_s, done, errors = closed_loop(url, model, shape, concurrency, per_client, args.max_tokens)
            row[f"{server}_c{concurrency}"] = tok_s
            row["errors"] += len(errors)
            print(f"{name}, c={concurrency}, {server}: {tok_s} tok/s ({done} ok, {len(errors)} errors)")
        row[f"ratio_c{concurrency}"] = row[f"rayfit_c{concurrency}"] / max(row[f"peer_c{concurrency}"], 1e-9)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client in each cell")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    model_dir = smollm2_dir()
    rayfit_url = start_rayfit()
    closed_loop(rayfit_url, ROLE, SHAPES["temperature 0, non-streaming"], 2, 1, args.max_tokens)  # warm-up
    rows_by_shape: dict[str, dict[str, Any]] = {}
    # One peer at a time (each holds ~13 GiB here: its KV cache is sized from free memory), its first
    # request fixing how it decodes (see the module docstring): the greedy one, then the sampling one.
    for temperature in (0, 1.0):
        port = free_port()
        peer = start_peer(model_dir, port)
        try:
            peer_url = f"http://127.0.0.1:{port}"
            closed_loop(peer_url, str(model_dir), {"stream": False, "temperature": temperature}, 1, 1, args.max_tokens)
            servers = {"peer": (peer_url, str(model_dir)), "rayfit": (rayfit_url, ROLE)}
            for name, shape in SHAPES.items():
                if (shape.get("temperature") == 0) != (temperature == 0):
                    continue
                rows_by_shape[name] = measure_row(name, shape, servers, args)
        finally:
            peer.terminate()
            peer.wait(timeout=30)
    rows = [rows_by_shape[name] for name in SHAPES]
    report = markdown(rows, args)
    print("\n" + report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_peer.md").write_text(report)
    (args.out / "bench_peer.json").write_text(json.dumps({"rows": rows, "max_tokens": args.max_tokens}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
