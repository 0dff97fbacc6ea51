"""The ingress stays off GPU nodes in the per-GPU mode.

GPU nodes have CPUs of their own there (start-box gives each raylet its share of the machine), so the
ingress's 0.1 CPU could be scheduled onto one; `deployments.app.ingress_options` gives it a label
selector that no GPU node matches. The options are checked as data, and the selector against a real
local Ray: a head without GPUs and one per-GPU node (tests/ray_nodes.py, as start-box starts them).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import ray
from ray._private.label_utils import validate_label_selector
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray_nodes import LocalRayCluster, local_ray_cluster

from deployments.app import AppArgs, ingress_limits, ingress_options
from placement.gpu_nodes import GPU_LABEL
from placement.inventory import Gpu, Inventory, Node, parse_gpu_spec
from placement.units import GIB

ARGS = AppArgs(model_config="model_configs.yaml")
SCHEDULE_TIMEOUT_S = 60.0
# Long enough for Ray to place an actor a node has room for (the control below shows it does in less).
PENDING_CHECK_S = 5.0


def test_per_gpu_mode_selects_no_gpu_node() -> None:
    inventory = parse_gpu_spec("2x24GB").as_gpu_nodes()
    labels = sorted(n.gpu_node.gpu_label for n in inventory.nodes if n.gpu_node is not None)
    assert labels == ["local-0", "local-1"]
    options = ingress_options(ARGS, inventory)
    assert options["ray_actor_options"] == {"num_cpus": 0.1, "label_selector": {GPU_LABEL: "!in(local-0,local-1)"}}
    assert validate_label_selector(options["ray_actor_options"]["label_selector"]) is None  # Ray's own syntax check
    # The limits are the ingress's as before.
    assert {k: v for k, v in options.items() if k != "ray_actor_options"} == ingress_limits(ARGS)


def test_single_node_mode_keeps_the_ingress_defaults() -> None:
    # One node holds every GPU and the head's CPUs: nowhere else to go, and no selector to add.
    assert ingress_options(ARGS, parse_gpu_spec("2x24GB")) == ingress_limits(ARGS)
    assert ingress_options(ARGS, parse_gpu_spec("none")) == ingress_limits(ARGS)


@ray.remote
class Where:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


@pytest.fixture(scope="module")
def head_and_gpu_node() -> Iterator[LocalRayCluster]:
    # This driver joins a token-auth cluster (as tests/test_gpu_nodes.py does).
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()
    with local_ray_cluster() as nodes:
        nodes.start_head(gpus=0, labels={}, num_cpus=1)
        nodes.add_gpu_node("box", 0, 24 * GIB, num_cpus=1)
        ray.init(address=nodes.address, log_to_driver=False)
        try:
            deadline = time.monotonic() + SCHEDULE_TIMEOUT_S
            while sum(n["Alive"] for n in ray.nodes()) < 2:
                assert time.monotonic() < deadline, "the GPU node did not join"
                time.sleep(0.5)
            yield nodes
        finally:
            ray.shutdown()


@pytest.mark.slow
def test_the_selector_keeps_the_ingress_on_the_head(head_and_gpu_node: LocalRayCluster) -> None:
    by_label = {bool(n["Labels"].get(GPU_LABEL)): n["NodeID"] for n in ray.nodes() if n["Alive"]}
    head, gpu_node = by_label[False], by_label[True]
    # The box as the planner sees it in the per-GPU mode: host "box", its GPU 0 a node labelled box-0.
    machine = Node(node_id="box", gpus=(Gpu(0, 24 * GIB),), hostname="box")
    actor_options = ingress_options(ARGS, Inventory(nodes=(machine,)).as_gpu_nodes())["ray_actor_options"]
    assert actor_options["label_selector"] == {GPU_LABEL: "!in(box-0)"}

    # The head free: the ingress's options land there (a node without the label matches `!in`).
    first = Where.options(**actor_options).remote()
    assert ray.get(first.node.remote(), timeout=SCHEDULE_TIMEOUT_S) == head
    ray.kill(first)

    # The head's CPU taken: an actor without the selector goes to the GPU node, which has room...
    blocker = Where.options(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    assert ray.get(blocker.node.remote(), timeout=SCHEDULE_TIMEOUT_S) == head
    control = Where.options(num_cpus=0.1).remote()
    assert ray.get(control.node.remote(), timeout=SCHEDULE_TIMEOUT_S) == gpu_node
    # ... one with the ingress's options waits for the head instead, and starts there once it has room.
    ingress = Where.options(**actor_options).remote()
    placed = ingress.node.remote()
    ready, _ = ray.wait([placed], timeout=PENDING_CHECK_S)
    assert not ready
    ray.kill(blocker)
    assert ray.get(placed, timeout=SCHEDULE_TIMEOUT_S) == head
