"""Cold start: `serve run` of the offline demo to the first streamed token.

    .venv/bin/python benchmarks/bench_coldstart.py            # fresh cache (GGUF conversion) then cached
    .venv/bin/python benchmarks/bench_coldstart.py --runs cached

Each run starts `serve run examples/demo/serve_config.yaml` in a subprocess
(its own fresh local Ray; a free port instead of the config's 8000), waits for
/v1/models, then streams one chat completion and stops at its first content
chunk. "fresh" points RAYFIT_CACHE at an empty directory, so the Gemma GGUF is
assembled and both GGUF files are converted to safetensors; "cached" uses the
normal cache (~/.cache/rayfit), as every start after the first does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from deployments.ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO_ROOT / "examples" / "demo" / "serve_config.yaml"


def one_start(cache: Path | None, timeout_s: float) -> dict[str, float]:
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app_args = config["applications"][0]["args"]
    app_args["model_config"] = str(REPO_ROOT / app_args["model_config"])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    if cache is not None:
        env["RAYFIT_CACHE"] = str(cache)
    serve_bin = Path(sys.executable).parent / "serve"
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(serve_bin), "run", handle.name],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ready = None
        while time.perf_counter() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"serve run exited with {proc.returncode}")
            try:
                models = httpx.get(f"{url}/v1/models", timeout=2).json().get("data", [])
                if {m["id"] for m in models} >= {"summarizer", "buffer_agent"}:
                    ready = time.perf_counter() - started
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        if ready is None:
            raise TimeoutError(f"not ready after {timeout_s} s")
        body = {
            "model": "summarizer",
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
        }
        first = None
        while first is None and time.perf_counter() - started < timeout_s:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
                if response.status_code == 503:  # replica still loading
                    time.sleep(0.25)
                    continue
                for line in response.iter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - started
                        break
        return {"ready_s": round(ready, 1), "first_token_s": round(first or float("nan"), 1)}
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run shuts its own Ray down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        os.unlink(handle.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="fresh,cached", help="comma list of fresh, cached")
    parser.add_argument("--timeout", type=float, default=600)
    ns = parser.parse_args()
    rows = []
    for kind in [r.strip() for r in ns.runs.split(",") if r.strip()]:
        with tempfile.TemporaryDirectory(prefix="rayfit-cold-") as scratch:
            result = one_start(Path(scratch) if kind == "fresh" else None, ns.timeout)
        rows.append((kind, result))
        print(f"{kind}: {result}", flush=True)
    print("\n| cache | `serve run` → app ready s | → first streamed token s |")
    print("|---|---|---|")
    for kind, r in rows:
        print(f"| {kind} | {r['ready_s']} | {r['first_token_s']} |")


if __name__ == "__main__":
    main()
