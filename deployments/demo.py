"""The offline demo, end to end: `python -m deployments.demo`.

Starts a local Ray (declaring this machine's GPUs with their `gpu_slot_<i>`
resources; none on a CPU machine, where the planner puts both models on CPU),
serves `examples/demo/serve_config.yaml` exactly as `serve run` would (same
builder, same args, same HTTP options), waits until it is running, sends a
real chat request through the `openai` SDK, prints the answer and where each
model runs, and shuts everything down.

The models are two small GGUF files shipped on PyPI (no hub access needed);
the first run converts them once into ~/.cache/rayfit (about a minute).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from deployments.ports import listening_addresses, start_serve_on_a_free_port
from placement.placement_document import PlacementDocument, PlannedRole, ReplicaMemory, ReplicaReport

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "demo" / "serve_config.yaml"
QUESTION = "In one sentence: why should a 27B model and a 4B model not share one 24 GB GPU?"


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _resolve(path: str, config_dir: Path) -> str:
    """A relative path as `serve run` from the repo root would see it, wherever the demo is started."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return str(candidate)
    for base in (REPO_ROOT, config_dir):
        if (base / candidate).exists():
            return str(base / candidate)
    return path


def load_serve_config(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise SystemExit(f"{path}: the demo expects exactly one application, found {len(apps)}")
    return config


def start_ray(verbose: bool) -> None:
    """A local Ray that declares this machine's GPUs and one gpu_slot per GPU (ray_start_args' scheme)."""
    import ray

    from placement.ray_inventory import local_inventory
    from placement.ray_options import gpu_slot_resource

    gpus = local_inventory().gpu_count
    ray.init(
        num_gpus=gpus,
        resources={gpu_slot_resource(i): 1 for i in range(gpus)},
        include_dashboard=False,
        # Replica logs stay in /tmp/ray/session_latest/logs unless asked for:
        # the demo's own output is the point. A failing replica still fails serve.run loudly.
        log_to_driver=verbose,
    )


def serve_config(path: Path, port: int | None) -> tuple[str, int]:
    """Deploy the config's app; return (base URL, port). Blocks until the app is RUNNING."""
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    config = load_serve_config(path)
    app_cfg = config["applications"][0]
    http = config.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    port = http.get("port", 8000) if port is None else port
    if port and not _port_free(host, port):
        print(f"port {port} is busy; serving on a free one instead")
        port = 0
    args = dict(app_cfg.get("args") or {})
    if "model_config" in args:
        args["model_config"] = _resolve(args["model_config"], path.parent)
    if port:
        serve.start(http_options={"host": host, "port": port})
    else:  # 0: any free port, held until the proxy listens on it
        port = start_serve_on_a_free_port(host)
    builder = import_attr(app_cfg["import_path"])
    app = call_user_app_builder_with_args_if_necessary(builder, args)
    serve.run(app, name=app_cfg.get("name", "rayfit"), route_prefix=app_cfg.get("route_prefix", "/"))
    return f"http://{host}:{port}", port


def print_placement(placement: dict[str, Any]) -> None:
    """/v1/placement's JSON (placement.placement_document), one line per role and why it is there."""
    print("\nWhere each model runs (planned → actual):")
    for role, item in PlacementDocument.model_validate(placement).models.items():
        plan = item.plan or PlannedRole()
        actual = item.replica.actual if isinstance(item.replica, ReplicaReport) else None
        memory = actual.memory if actual else ReplicaMemory()
        held = memory.rss_bytes or memory.cuda_bytes("allocated").get(0) or 0
        print(
            f"  {role:<14} {plan.model!s:<28} planned {plan.device!s:<8} ({plan.memory_budget}), "
            f"actual {actual.device if actual else '?'} "
            f"CUDA_VISIBLE_DEVICES={actual.cuda_visible_devices if actual else None!r}, "
            f"{'RSS' if memory.rss_bytes is not None else 'allocated'} {held / 2**30:.2f} GiB, "
            f"loaded in {(actual.load_seconds if actual else None) or 0:.1f} s"
        )
        print(f"  {'':<14} why: {plan.reason}")
        kv_plan, kv_engine = plan.kv_cache_bytes, memory.kv_built_bytes
        if kv_plan is not None and kv_engine is not None:
            verdict = "within plan" if kv_engine <= kv_plan else "OVER PLAN"
            print(f"  {'':<14} KV cache: planned {kv_plan} B, engine holds at most {kv_engine} B ({verdict})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="serve config to run")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's; 0 picks a free one)")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--verbose", action="store_true", help="show the replicas' logs")
    ns = parser.parse_args(argv)

    # No hub on the demo's path: fail fast instead of waiting on network timeouts.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import httpx
    import ray
    from openai import OpenAI
    from ray import serve

    started = time.perf_counter()
    start_ray(ns.verbose)
    try:
        print(f"serving {ns.config} (first run converts the GGUF files once; later runs take seconds) ...")
        base_url, port = serve_config(ns.config, ns.port)
        print(f"ready at {base_url}/v1 after {time.perf_counter() - started:.1f} s")
        # What the OS says, not what was asked: 127.0.0.1 alone means no other machine can reach it.
        print(f"listening on {', '.join(sorted(listening_addresses(port))) or '(not visible)'} port {port}")

        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
        print("models:", ", ".join(f"{m.id}" for m in client.models.list().data))
        reply = client.chat.completions.create(
            model="summarizer",
            messages=[{"role": "user", "content": ns.question}],
            max_tokens=ns.max_tokens,
            temperature=0,
        )
        print(f"\nQ: {ns.question}\nA (summarizer): {reply.choices[0].message.content.strip()}")
        print(f"   usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")

        completion = client.completions.create(
            model="buffer_agent", prompt="The capital of France is", max_tokens=12, temperature=0
        )
        print(f"\nbuffer_agent (base model) completes 'The capital of France is' → {completion.choices[0].text!r}")

        print_placement(httpx.get(f"{base_url}/v1/placement", timeout=30).json())
        print(f"\ndone in {time.perf_counter() - started:.1f} s")
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
