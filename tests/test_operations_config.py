"""cluster.yaml and deploy/rayservice.yaml: valid for their tools, and the same app as serve_config.yaml."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml

from placement.gpu_nodes import GPU_MEMORY_RESOURCE, gpu_node_labels, gpu_node_of, gpu_node_start_args
from placement.ray_options import ray_start_args

ROOT = Path(__file__).resolve().parent.parent
APP_KEYS = ("name", "import_path", "route_prefix", "args")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


def launcher_schema() -> dict[str, Any]:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_validates_against_rays_launcher_schema() -> None:
    config = load("cluster.yaml")
    jsonschema.validate(config, launcher_schema())
    # The launcher's own path too: local-provider checks, defaults merged, then the schema again.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"


def test_cluster_yaml_schema_check_can_fail() -> None:
    config = load("cluster.yaml")
    config["head_start_ray_commands"] = "ray start --head"  # must be a list
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, launcher_schema())


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_every_node_starts_ray_with_rayfits_gpu_arguments(key: str) -> None:
    config = load("cluster.yaml")
    start = config[key][-1]
    assert "python -m placement ray-start-args" in start
    assert "RAY_AUTH_MODE=token" in start
    assert ("--head" in start) == (key == "head_start_ray_commands")
    assert "--worker" in start or key == "head_start_ray_commands"
    subprocess.run(["bash", "-n", "-c", start], check=True)  # the shell can parse it
    # The project is installed on every node before Ray starts, and the token is shared.
    assert any("scripts/install.sh" in cmd for cmd in config["setup_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]


@pytest.mark.parametrize("role", ["head", "worker"])
def test_ray_start_args_command_as_the_launcher_runs_it(role: str) -> None:
    """The `$(python -m placement ray-start-args ...)` part, on a 2-GPU box."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "placement",
            "ray-start-args",
            "--gpus",
            "2",
            f"--{role}",
            "--label",
            f"rayfit-node={role}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    # `$(...)` splits on whitespace and keeps the JSON's quotes, as str.split does.
    assert done.stdout.split() == ray_start_args(2, node_labels={"rayfit-node": role}, head=role == "head")


def serve_app(config: dict[str, Any]) -> dict[str, Any]:
    (app,) = config["applications"]
    return {key: app.get(key) for key in APP_KEYS}


def test_rayservice_serves_the_same_app_as_serve_config() -> None:
    rayservice = load("deploy/rayservice.yaml")
    assert rayservice["kind"] == "RayService"
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve_app(embedded) == serve_app(load("serve_config.yaml"))
    assert serve_app(embedded)["import_path"] == "deployments.app:build_app"
    # A role's ray_actor_options would replace rayfit's pin (DESIGN.md): none in either.
    for config in (embedded, load("serve_config.yaml")):
        for app in config["applications"]:
            assert all("ray_actor_options" not in d for d in app.get("deployments", []))


def test_rayservice_gpu_workers_are_one_labelled_pod_per_gpu() -> None:
    """The per-GPU mode: each group one pod of one GPU, declaring what `ray-start-args --per-gpu` would."""
    cluster = load("deploy/rayservice.yaml")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    groups = cluster["workerGroupSpecs"]
    assert groups
    seen = set()
    for group in groups:
        params = group["rayStartParams"]
        (container,) = group["template"]["spec"]["containers"]
        assert params["num-gpus"] == "1" and int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
        # One pod per group: a recreated pod takes the group's labels, and no two pods share them.
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
        labels = group["labels"]  # the group's Ray node labels (KubeRay refuses them in rayStartParams)
        info = gpu_node_of(labels)
        assert info is not None and info.indices == (0,) and info.memory_bytes
        assert labels == gpu_node_labels(info.host, [0], info.memory_bytes)
        seen.add(info.gpu_label)
        # KubeRay passes `resources` as a quoted JSON string, as `ray start --resources` takes it.
        resources = json.loads(json.loads(params["resources"]))
        expected = gpu_node_start_args(info.host, [0], info.memory_bytes, address="head:6379")
        assert f"--resources={json.dumps(resources, separators=(',', ':'))}" in expected
        assert resources == {GPU_MEMORY_RESOURCE: info.memory_bytes // 2**20}
    assert len(seen) == len(groups)
