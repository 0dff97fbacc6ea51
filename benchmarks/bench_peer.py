"""rayfit next to its speed peer, in one run: `transformers serve --continuous-batching`.

    .venv/bin/python benchmarks/bench_peer.py                 # default demo config, ~12 min on 2 cores
    .venv/bin/python benchmarks/bench_peer.py --rounds 6 --max-tokens 32

The peer is the same engine (transformers' continuous batching) on the same
converted SmolLM2 directory, with no Ray in between, started here with
`OMP_NUM_THREADS=1` to match a replica's one torch thread. rayfit serves the
default demo config (both roles; requests go to `summarizer`, the SmolLM2).
Closed-loop chat completions at concurrency 1 and 8, for the four request
shapes clients send: temperature unset (OpenAI's default 1.0) or 0, streamed
or not. Each cell is measured in several rounds; within a round the two
servers run back to back (the order flips every round), and the figure that
counts is the median over rounds of rayfit/peer in the same round: this VM's
speed drifts by ±15% within minutes, a pair measured seconds apart drifts far
less.

Besides tok/s, each cell reports CPU milliseconds per generated token, all
processes of a server together (the peer: its process tree; rayfit: every
other process on the machine but this client, i.e. the replicas, ingress,
proxy, controller, GCS and raylet). Unlike tok/s, that figure hardly moves
with the VM's drift, and it says what the serving stack costs beside the model.
The busiest thread of each server (transformers' batching loop, in the peer as
in the model replica) is also measured on its own: "decode thread" CPU ms per
token, the engine's cost apart from the serving around it.

Two peers, one after the other, one per way of decoding. `transformers serve`
(5.25) builds its continuous-batching manager once, from the model directory's
`generation_config.json`, and decodes every request that way: sampling or
not is one switch of the manager, and a request's temperature is applied only
if that config already names one (`cli/serving/utils.py`). SmolLM2's config
names none, so a plain peer decodes *every* request greedily, whatever its
temperature. So the temperature-0 rows go to a peer on the model directory as
it is, and the "temperature unset" rows (rayfit samples them at OpenAI's
default 1.0) to a peer on a copy of the directory whose generation config says
`do_sample: true` (temperature 1.0, top-p 1.0): that peer samples every request.
(transformers 5.24 built the manager from the first request instead; earlier
versions of this script primed the peer with a first request, which 5.25
ignores: their "temperature unset" rows compared rayfit sampling with a peer
decoding greedily.)

Caveat (measured on Ray 2.60): Ray starts every worker process, so every
rayfit replica, at nice 15, while the peers started from this script run at
nice 0; on a busy machine that favours the peers.

Writes `benchmarks/results/bench_peer.{md,json}` (with `--engine-in-replica`, rayfit's engines run
inside their replicas, as before `engine_process` became the default: `bench_peer_engine_in_replica.{md,json}`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench_serving import run_concurrent  # noqa: E402
from served_demo import smollm2_dir  # noqa: E402

from deployments.engine.process import ENGINE_PROCESS_ENV  # noqa: E402
from deployments.ports import free_port, start_serve_on_a_free_port  # noqa: E402

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


# rayfit's processes by the title Ray gives each (first match wins), for the CPU breakdown.
RAYFIT_PARTS = (
    (f"ServeReplica:rayfit:{ROLE}", "model replica"),
    ("deployments.engine.child", "engine process"),
    ("ServeReplica:rayfit:Ingress", "ingress"),
    ("ProxyActor", "proxy"),
    ("ServeController", "controller"),
    ("ServeReplica:rayfit:", "other replicas"),
)


class CpuMeter:
    """CPU seconds used by one server while a cell runs: the peer's process tree, or (rayfit)
    every other process on the machine except this client (the replicas, ingress, proxy,
    controller, GCS, raylet). Read per process: this VM's machine-wide counters miss them.

    Also the CPU of each server's busiest thread, its decoding loop (transformers' batching
    thread, in the peer as in the model replica): that one says whether the engine itself
    costs the same per token on both sides, apart from the serving around it."""

    def __init__(self, peer: psutil.Process, replica_pid: int):
        # Read once: the meter is built after the peer's first answer, when its workers exist.
        self.peer_pids = _process_tree(peer)
        self.replica_pid = replica_pid
        self.me = psutil.Process()  # the client: its HTTP threads are not part of either server
        self._parts: dict[int, str] = {}  # pid → its part of rayfit (a process keeps its title)

    def snapshot(self) -> tuple[dict[int, float], dict[tuple[int, int], float]]:
        """CPU seconds so far of every process, and of every thread of the two servers' model processes."""
        times: dict[int, float] = {}
        for process in psutil.process_iter():
            try:
                cpu = process.cpu_times()
                times[process.pid] = cpu.user + cpu.system
            except psutil.Error:
                pass
        threads: dict[tuple[int, int], float] = {}
        for pid in self.peer_pids | {self.replica_pid}:
            try:
                for thread in psutil.Process(pid).threads():
                    threads[(pid, thread.id)] = thread.user_time + thread.system_time
            except psutil.Error:
                pass
        return times, threads

    def part(self, pid: int) -> str:
        """Which part of rayfit a process is, from the title Ray gives it."""
        if pid not in self._parts:
            try:
                title = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                title = ""
            self._parts[pid] = next((name for marker, name in RAYFIT_PARTS if marker in title), "other")
        return self._parts[pid]

    def used(self, before: tuple[dict[int, float], dict[tuple[int, int], float]], server: str) -> dict[str, float]:
        """CPU seconds since `before`: {"total": ..., "decode thread": ...}, and for rayfit also per part
        (RAYFIT_PARTS)."""
        (after, threads_after), (before_times, threads_before) = self.snapshot(), before
        peer = self.peer_pids
        server_pids = peer if server == "peer" else {self.replica_pid}
        decode = max(
            (t - threads_before.get(key, 0.0) for key, t in threads_after.items() if key[0] in server_pids),
            default=0.0,
        )
        if server == "peer":
            total = sum(after[pid] - before_times.get(pid, 0.0) for pid in peer if pid in after)
            return {"total": total, "decode thread": decode}
        # Not this client's children: ray.init() started the raylet and GCS as children of this process.
        parts: dict[str, float] = {}
        for pid in set(after) - peer - {self.me.pid}:
            used = after[pid] - before_times.get(pid, 0.0)
            if used > 0:
                name = self.part(pid)
                parts[name] = parts.get(name, 0.0) + used
        return {"total": sum(parts.values()), "decode thread": decode, **parts}


def _process_tree(process: psutil.Process) -> set[int]:
    try:
        return {process.pid, *(child.pid for child in process.children(recursive=True))}
    except psutil.Error:
        return {process.pid}


def closed_loop(
    url: str, model: str, shape: dict[str, Any], concurrency: int, per_client: int, max_tokens: int
) -> tuple[float, int, list[str], int]:
    """(tok/s, requests, errors, tokens): `concurrency` clients each sending `per_client` requests back to back.

    The clients are built before the clock starts: building one (its TLS context) takes tens of
    milliseconds of this process's CPU, eight at once ~0.3 s, which is the client's cost, not a server's."""
    local = threading.local()
    clients = [httpx.Client() for _ in range(concurrency)]
    idle: queue.SimpleQueue[httpx.Client] = queue.SimpleQueue()
    for client in clients:
        idle.put(client)

    def work() -> dict[str, Any]:
        if not hasattr(local, "client"):
            local.client = idle.get_nowait()
        try:
            return {"tokens": one_request(local.client, url, model, shape, max_tokens)}
        except Exception as exc:  # counted, reported
            return {"error": f"{type(exc).__name__}: {exc}"}

    try:
        wall, results = run_concurrent(concurrency, per_client, work)
    finally:
        for client in clients:
            client.close()
    tokens = [r["tokens"] for r in results if "tokens" in r]
    errors = [r["error"] for r in results if "error" in r]
    return round(sum(tokens) / wall, 2), len(tokens), errors, sum(tokens)


def sampling_copy(model_dir: Path, into: Path) -> Path:
    """`model_dir` as a directory of links whose generation config samples (temperature 1.0, top-p 1.0)."""
    into.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != "generation_config.json":
            (into / item.name).symlink_to(item.resolve())
    config = json.loads((model_dir / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=None)
    (into / "generation_config.json").write_text(json.dumps(config, indent=1))
    return into


def start_peer(model_dir: Path, extra: tuple[str, ...] = (), attempts: int = 3) -> tuple[subprocess.Popen, int]:
    """`transformers serve --continuous-batching` on `model_dir`, healthy, and its port; `extra`: more of
    its options (benchmarks/gpu_check.py: CUDA graphs on a GPU, a small KV cache on CPU). A port picked
    free can be taken by another process before the peer binds it (the peer then exits): another port."""
    exits: list[str] = []
    for _ in range(attempts):
        port = free_port()
        peer = _start_peer_on(model_dir, port, extra)
        if peer is not None:
            return peer, port
        exits.append(str(port))
    raise SystemExit(f"transformers serve exited before it was healthy, on ports {', '.join(exits)}")


def _start_peer_on(model_dir: Path, port: int, extra: tuple[str, ...]) -> subprocess.Popen | None:
    """The healthy peer on `port`, or None when it exited first (a taken port, most often)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        str(REPO_ROOT / ".venv" / "bin" / "transformers"),
        "serve",
        "--port",
        str(port),
        "--continuous-batching",
        *extra,
        str(model_dir),
    ]
    peer = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if peer.poll() is not None:
            return None
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return peer
        except httpx.HTTPError:
            pass
        time.sleep(1)
    peer.kill()
    raise SystemExit("transformers serve did not become healthy in 300 s")


def start_rayfit(config: Path = DEMO_CONFIG) -> str:
    """A local Ray serving `config` as the app "rayfit" at /; its base URL."""
    import ray
    from ray import serve

    from deployments.app import AppArgs, build_app

    ray.init(include_dashboard=False, log_to_driver=False)
    port = start_serve_on_a_free_port()
    serve.run(build_app(AppArgs(model_config=str(config), gpus="none")), name="rayfit", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"rayfit vs `transformers serve --continuous-batching` (same SmolLM2 dir), {platform.node()} "
        f"({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"closed loop, max_tokens {args.max_tokens}, {args.rounds} rounds of alternating pairs; "
        "tok/s = median over rounds; ratio = median of the per-round rayfit/peer (p-range: min-max); "
        "CPU = CPU ms per generated token, all processes of the server; decode thread = the CPU ms per token "
        "of the server's busiest thread (transformers' batching loop). "
        "Peer: a greedy one for the temperature-0 rows, one whose generation config samples (temperature 1.0) "
        "for the unset rows. rayfit's engine: "
        + ("inside the replica (--engine-in-replica)" if args.engine_in_replica else "in a process of its own"),
        "",
        "| request as clients send it | c | peer tok/s | rayfit tok/s | rayfit/peer (range) "
        "| peer CPU ms/tok | rayfit CPU ms/tok | decode thread: peer | decode thread: rayfit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for c in (1, 8):
            cell = row[f"c{c}"]
            lines.append(
                f"| {row['shape']} | {c} | {cell['peer_tok_s']} | {cell['rayfit_tok_s']} "
                f"| **{cell['ratio']:.2f}×** ({cell['ratio_min']:.2f}–{cell['ratio_max']:.2f}) "
                f"| {cell['peer_cpu_ms']} | {cell['rayfit_cpu_ms']} "
                f"| {cell['peer_decode_cpu_ms']} | {cell['rayfit_decode_cpu_ms']} |"
            )
    parts = [name for _, name in RAYFIT_PARTS] + ["other"]
    lines += [
        "",
        "rayfit's CPU ms per generated token by process at c=8 (medians over rounds; "
        "'other' = GCS, raylet, dashboard agent and the rest of Ray):",
        "",
        "| request as clients send it | " + " | ".join(parts) + " |",
        "|---|" + "---|" * len(parts),
    ]
    for row in rows:
        by_part = row["c8"]["rayfit_cpu_ms_by_part"]
        lines.append(f"| {row['shape']} | " + " | ".join(str(by_part.get(part, 0.0)) for part in parts) + " |")
    errors = sum(row["errors"] for row in rows)
    lines += ["", f"errors: {errors}", ""]
    return "\n".join(lines)


def measure_round(
    round_no: int,
    name: str,
    shape: dict[str, Any],
    servers: dict[str, tuple[str, str]],
    meter: CpuMeter,
    row: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    """One round of one table row: both servers at c=1, then at c=8, back to back (order flips per round)."""
    order = list(servers) if round_no % 2 == 0 else list(reversed(servers))
    for concurrency in (1, 8):
        per_client = args.requests * (2 if concurrency == 1 else 1)
        got: dict[str, float] = {}
        for server in order:
            url, model = servers[server]
            before = meter.snapshot()
            tok_s, done, errors, tokens = closed_loop(url, model, shape, concurrency, per_client, args.max_tokens)
            used_ms = {part: 1000 * seconds / max(tokens, 1) for part, seconds in meter.used(before, server).items()}
            cpu_ms = used_ms.pop("total")
            decode_ms = used_ms.pop("decode thread")
            got[server] = tok_s
            samples = row.setdefault(
                f"c{concurrency}_samples",
                {"peer": [], "rayfit": [], "ratio": [], "cpu": {}, "decode": {}, "parts": {}},
            )
            samples[server].append(tok_s)
            samples["cpu"].setdefault(server, []).append(cpu_ms)
            samples["decode"].setdefault(server, []).append(decode_ms)
            if server == "rayfit":
                for part, ms in used_ms.items():
                    samples["parts"].setdefault(part, []).append(ms)
            row["errors"] += len(errors)
            print(
                f"round {round_no} {name}, c={concurrency}, {server}: {tok_s} tok/s, "
                f"{cpu_ms:.1f} CPU ms/token, decode thread {decode_ms:.1f} ({done} ok, {len(errors)} errors)",
                flush=True,
            )
        samples["ratio"].append(got["rayfit"] / max(got["peer"], 1e-9))


def summarize(row: dict[str, Any]) -> dict[str, Any]:
    """Medians over rounds of each cell's samples."""
    for concurrency in (1, 8):
        samples = row.pop(f"c{concurrency}_samples")
        row[f"c{concurrency}"] = {
            "peer_tok_s": round(statistics.median(samples["peer"]), 2),
            "rayfit_tok_s": round(statistics.median(samples["rayfit"]), 2),
            "ratio": statistics.median(samples["ratio"]),
            "ratio_min": min(samples["ratio"]),
            "ratio_max": max(samples["ratio"]),
            "ratios": [round(r, 3) for r in samples["ratio"]],
            "peer_cpu_ms": round(statistics.median(samples["cpu"]["peer"]), 1),
            "rayfit_cpu_ms": round(statistics.median(samples["cpu"]["rayfit"]), 1),
            "peer_decode_cpu_ms": round(statistics.median(samples["decode"]["peer"]), 1),
            "rayfit_decode_cpu_ms": round(statistics.median(samples["decode"]["rayfit"]), 1),
            # A part idle in some round has no sample there: medians over the rounds it used CPU in.
            "rayfit_cpu_ms_by_part": {part: round(statistics.median(ms), 2) for part, ms in samples["parts"].items()},
        }
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1, help="requests per client in a c=8 cell (twice that at c=1)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating pairs per cell")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--engine-in-replica",
        action="store_true",
        help="rayfit's replicas run their engine inside themselves (RAYFIT_ENGINE_PROCESS=0; the default is "
        "a process of its own)",
    )
    args = parser.parse_args(argv)
    model_dir = smollm2_dir()
    if args.engine_in_replica:
        os.environ[ENGINE_PROCESS_ENV] = "0"  # the local Ray's workers inherit it
    rayfit_url = start_rayfit()
    closed_loop(rayfit_url, ROLE, SHAPES["temperature 0, non-streaming"], 2, 1, args.max_tokens)  # warm-up
    placement = httpx.get(f"{rayfit_url}/v1/placement", timeout=60).json()
    # The process that runs the batching loop: the replica, or its engine process.
    actual = placement["models"][ROLE]["replica"]["actual"]
    replica_pid = int(actual.get("engine_pid", actual["pid"]))
    rows_by_shape: dict[str, dict[str, Any]] = {}
    # One peer at a time (each holds ~13 GiB here: its KV cache is sized from free memory): the greedy
    # one on the model directory, then the sampling one on a copy whose generation config samples.
    scratch = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    for temperature in (0, 1.0):
        peer_dir = model_dir if temperature == 0 else sampling_copy(model_dir, scratch / model_dir.name)
        peer, port = start_peer(peer_dir)
        try:
            peer_url = f"http://127.0.0.1:{port}"
            closed_loop(peer_url, str(peer_dir), {"stream": False, "temperature": temperature}, 1, 1, args.max_tokens)
            servers = {"peer": (peer_url, str(peer_dir)), "rayfit": (rayfit_url, ROLE)}
            meter = CpuMeter(psutil.Process(peer.pid), replica_pid)
            shapes = {n: s for n, s in SHAPES.items() if (s.get("temperature") == 0) == (temperature == 0)}
            for round_no in range(args.rounds):
                for name, shape in shapes.items():
                    row = rows_by_shape.setdefault(name, {"shape": name, "errors": 0})
                    measure_round(round_no, name, shape, servers, meter, row, args)
        finally:
            peer.terminate()
            peer.wait(timeout=30)
    shutil.rmtree(scratch, ignore_errors=True)
    rows = [summarize(rows_by_shape[name]) for name in SHAPES]
    report = markdown(rows, args)
    print("\n" + report)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bench_peer_engine_in_replica" if args.engine_in_replica else "bench_peer"
    (args.out / f"{name}.md").write_text(report)
    payload = {"rows": rows, "max_tokens": args.max_tokens, "rounds": args.rounds, "requests": args.requests}
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
