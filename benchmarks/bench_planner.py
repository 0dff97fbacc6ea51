"""Planner scale: 1,000 models onto 256 GPUs over 32 nodes (target: under 1 s),
and planning the offline demo config (sizes both GGUF files from their headers).

Run: .venv/bin/python benchmarks/bench_planner.py
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

from placement.config import ModelSpec
from placement.estimate import MemoryEstimate
from placement.inventory import Gpu, Inventory, Node
from placement.planner import make_plan
from placement.units import GIB

NODES, GPUS_PER_NODE, MODELS, RUNS = 32, 8, 1000, 5


def _workload(seed: int = 0) -> tuple[dict[str, ModelSpec], dict[str, MemoryEstimate], Inventory]:
    rng = random.Random(seed)
    inventory = Inventory(
        nodes=tuple(
            Node(
                node_id=f"node-{n:02d}",
                gpus=tuple(Gpu(i, rng.choice([24, 48, 80]) * GIB) for i in range(GPUS_PER_NODE)),
            )
            for n in range(NODES)
        )
    )
    models = {f"model-{i:04d}": ModelSpec(model=f"org/model-{i}") for i in range(MODELS)}
    estimates = {}
    for role in models:
        params_b = rng.choice([0.5, 1, 3, 4, 7, 8, 13, 27])
        total = params_b * 0.6 * GIB + rng.uniform(0.2, 2) * GIB  # ~NF4 weights + KV
        estimates[role] = MemoryEstimate.lump(int(total), source="params_b", params=int(params_b * 1e9))
    return models, estimates, inventory


def main() -> None:
    models, estimates, inventory = _workload()
    timings = []
    for _ in range(RUNS):
        start = time.perf_counter()
        plan = make_plan(models, inventory, estimates=estimates)
        timings.append(time.perf_counter() - start)
    on_gpu = sum(1 for e in plan.entries if e.device == "gpu")
    print("| benchmark | models | GPUs | median s | max s | target |")
    print("|---|---|---|---|---|---|")
    print(
        f"| plan {MODELS} models / {NODES * GPUS_PER_NODE} GPUs / {NODES} nodes | {on_gpu} placed | "
        f"{NODES * GPUS_PER_NODE} | {statistics.median(timings):.3f} | {max(timings):.3f} | < 1 s |"
    )
    demo = Path(__file__).resolve().parent.parent / "examples" / "demo" / "model_configs.yaml"
    try:
        from deployments.app import AppArgs, plan_app

        start = time.perf_counter()
        plan_app(AppArgs(model_config=str(demo), gpus="none"))  # first: pays the torch/transformers import
        first = time.perf_counter() - start
        start = time.perf_counter()
        plan_app(AppArgs(model_config=str(demo), gpus="none"))
        again = time.perf_counter() - start
        print(f"| plan the demo config (2 GGUF files) | 2 | 0 | {again:.3f} | {first:.3f} (first, with imports) | - |")
    except Exception as exc:  # demo packages not installed
        print(f"| plan the demo config | skipped: {exc} |")


if __name__ == "__main__":
    main()
