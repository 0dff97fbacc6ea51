"""Done when (issue 25): a box started by the README's one command, the seed's two roles served on it.

`python -m placement start-box` (placement.box_start_cli) is run as the README runs it, on a declared
box: two 24 GB RTX A5000s (`--gpus 2 --gpu-memory 24GB --accelerator`; this machine has no GPU) and a
machine of 6 CPUs, 6 GiB of Ray memory and 384 MiB of object store, declared so the totals are known.
The flags a test adds go to the head only (`--head-arg`: its own temp dir and ports, no dashboard or log monitor), so
the GPU nodes start exactly as the README's. It starts a GPU-less head and one raylet per GPU, each
with its share of the machine and its card; then the real app is served on it
(tests/test_gpu_nodes.py serves the same app on raylets started one by one, and checks the rest of the
per-GPU mode: spread replicas, a whole-GPU task kept off, a node leaving).

The seed's roles, as tiny models sized to land as the seed's do (default size rules; GPU capacity
22.8 GiB; each replica charged its 0.5 GiB CUDA context):

    buffer_agent   15 GiB, accelerator: RTX-A5000  → box-1   num_gpus 0.679 (15.5 / 22.8)
    summarizer      3 GiB                          → box-0   num_gpus 0.153 (3.5 / 22.8)

so Ray counts 0.832 of 2 GPUs in use. Replicas load on CPU (the app's allow_cpu_fallback,
AppArgs); where Ray put them is what is checked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray import serve
from ray_nodes import LocalRayCluster, local_ray_cluster, ray_cli

from deployments.app import AppArgs, build_app
from deployments.ports import free_port
from placement.gpu_nodes import ACCELERATOR_TYPE_LABEL, GPU_LABEL
from placement.units import GIB, MIB

APP = "rayfit-box"
HOST = "box"
BIG, SMALL = "buffer_agent", "summarizer"
CARD = "NVIDIA RTX A5000"
CARD_TYPE = "RTX-A5000"  # Ray's name for it
CPUS = 6
MEMORY = 6 * GIB
OBJECT_STORE = 384 * MIB
TIMEOUT_S = 120.0


def _alive(count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) == count:
            return alive
        time.sleep(0.5)
    raise AssertionError(f"expected {count} alive nodes, got {ray.nodes()}")


def start_box(nodes: LocalRayCluster) -> subprocess.CompletedProcess[str]:
    """The README's one command, on a declared box, with this test's own head temp dir and ports."""
    head_args = [
        f"--temp-dir={nodes.temp_dir}",
        "--include-dashboard=false",
        f"--dashboard-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--dashboard-agent-listen-port=0",
        "--include-log-monitor=false",  # as tests/ray_nodes.py starts every test node
    ]
    command = [sys.executable, "-m", "placement", "start-box", "--host", HOST, "--address", nodes.address]
    command += ["--gpus", "2", "--gpu-memory", "24GB", "--accelerator", CARD]
    command += ["--num-cpus", str(CPUS), "--memory", "6GiB", "--object-store-memory", "384MiB"]
    command += [f"--head-arg={arg}" for arg in head_args]
    return subprocess.run(command, env=nodes.env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, tiny_text_model_dir: Path) -> Iterator[LocalRayCluster]:
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()  # this driver joins a token-auth cluster (as tests/test_gpu_nodes.py does)
    with local_ray_cluster() as nodes:
        started = start_box(nodes)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        ray.init(address=nodes.address, log_to_driver=False)
        try:
            _alive(3)
            common = {"model": str(tiny_text_model_dir), "dtype": "float32"}
            roles = {BIG: {**common, "memory_gb": 15, "accelerator": CARD_TYPE}, SMALL: {**common, "memory_gb": 3}}
            config = tmp_path_factory.mktemp("box") / "model_configs.yaml"
            config.write_text(yaml.safe_dump(roles))
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()})
            serve.run(build_app(AppArgs(model_config=str(config), allow_cpu_fallback=True)), name=APP, route_prefix="/")
            yield nodes
        finally:
            ray.shutdown()


def replica_placement(role: str) -> dict[str, Any]:
    return serve.get_deployment_handle(role, app_name=APP).placement.remote().result(timeout_s=60)


def ray_status_gpus(address: str) -> tuple[float, float]:
    """`ray status`'s cluster-wide GPU line, as an operator reads it: (in use, total)."""
    done = subprocess.run(
        [ray_cli(), "status", f"--address={address}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r"^\s*([\d.]+)/([\d.]+) GPU\b", done.stdout, flags=re.MULTILINE)
    assert match, done.stdout
    return float(match.group(1)), float(match.group(2))


@pytest.mark.slow
def test_the_box_is_one_machine_to_ray_and_each_gpu_node_states_its_card(box: LocalRayCluster) -> None:
    alive = _alive(3)
    totals = {key: sum(n["Resources"].get(key, 0) for n in alive) for key in ("CPU", "memory", "object_store_memory")}
    assert totals == {"CPU": CPUS, "memory": MEMORY, "object_store_memory": OBJECT_STORE}
    gpu_nodes = sorted((n for n in alive if n["Resources"].get("GPU")), key=lambda n: n["Labels"][GPU_LABEL])
    assert [n["Labels"][GPU_LABEL] for n in gpu_nodes] == ["box-0", "box-1"]
    for node in gpu_nodes:
        assert node["Resources"]["GPU"] == 1 and node["Resources"]["CPU"] == CPUS // 3
        # Ray's own label and resource for the card, as `ray start` was given them.
        assert node["Labels"][ACCELERATOR_TYPE_LABEL] == CARD_TYPE
        assert node["Resources"][f"accelerator_type:{CARD_TYPE}"] == 1


@pytest.mark.slow
def test_the_seeds_roles_hold_their_planned_gpus_and_ray_counts_them(box: LocalRayCluster) -> None:
    fractions = {}
    for role, label, index in ((BIG, "box-1", "1"), (SMALL, "box-0", "0")):
        placed = replica_placement(role)
        assert placed["planned"]["gpu_labels"] == [label], placed
        # Ray chose the GPU itself (num_gpus through the raylet's CUDA_VISIBLE_DEVICES): the planned one.
        assert placed["actual"]["ray_gpu_ids"] == [str(i) for i in placed["planned"]["gpu_indices"]] == [index]
        assert placed["actual"]["gpu_label"] == label
        fractions[role] = placed["planned"]["fraction"]
    assert fractions == {BIG: pytest.approx(0.679), SMALL: pytest.approx(0.153)}
    # What `ray status` shows in use is the sum of the two roles' fractions (the view settles within seconds).
    expected = fractions[BIG] + fractions[SMALL]
    deadline = time.monotonic() + TIMEOUT_S
    while (status := ray_status_gpus(box.address)) != (pytest.approx(expected, abs=1e-3), 2.0):
        assert time.monotonic() < deadline, f"ray status shows {status}, expected {expected} of 2 GPUs in use"
        time.sleep(1.0)
