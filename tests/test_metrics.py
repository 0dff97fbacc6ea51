"""rayfit's Serve metrics, scraped from Ray's Prometheus endpoint as Prometheus would.

On the session's shared local Ray (tests/shared_cluster.py), whose node exports
metrics on a port the OS picked (read back from the node); one tiny model is
served on CPU through the real app and HTTP, then the node's metrics endpoint is
polled until every rayfit metric shows up with the model and GPU tags (only
this module's app and role count: earlier modules' series stay on the node).
Ray pushes metrics every few seconds, hence the bounded poll.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from shared_cluster import shared_serve

from deployments.app import AppArgs, build_app
from deployments.metrics import GPU_ONLY_METRIC_NAMES, METRIC_NAMES, ModelMetrics
from placement.config import ModelSpec
from placement.sizing import estimate_memory

ROLE, APP = "metered", "metrics"  # names no other module on the shared cluster uses
SCRAPE_TIMEOUT_S = 60.0
GREEDY = {"temperature": 0, "max_tokens": 6}


# On the session's shared Ray: its replicas' CPU fallback and declared GPUs do not matter to a CPU plan.
pytestmark = pytest.mark.shared_serve


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_text_model_dir: Path) -> Iterator[tuple[str, int]]:
    """(base URL, metrics port) of the app serving ROLE on CPU."""
    config = tmp_path_factory.mktemp("metrics") / "models.yaml"
    config.write_text(f"{ROLE}:\n  model: {tiny_text_model_dir}\n  dtype: float32\n  num_cpus: 0.2\n")
    with shared_serve() as http_port:
        metrics_port = ray._private.worker.global_worker.node.metrics_export_port
        serve.run(build_app(AppArgs(model_config=str(config), gpus="none")), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{http_port}", metrics_port


def _samples(port: int) -> list:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


@pytest.mark.slow
def test_metrics_are_exported_with_model_and_gpu_tags(served: tuple[str, int], tiny_text_model_dir: Path) -> None:
    base_url, metrics_port = served
    body = {"model": ROLE, "prompt": "once upon a time", **GREEDY}
    for _ in range(2):
        assert httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).status_code == 200
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"

    # Ray exports `ray_<name>`; counters end in `_total`, histograms in `_bucket/_count/_sum`.
    # CPU: RSS (now and peak) instead of the per-GPU memory series.
    wanted = {f"ray_{name}" for name in METRIC_NAMES if name not in GPU_ONLY_METRIC_NAMES}
    found: dict[str, list] = {}
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while time.monotonic() < deadline:
        found = {}
        for sample in _samples(metrics_port):
            base = sample.name.removesuffix("_total").removesuffix("_count")
            if base in wanted and sample.labels.get("model") == ROLE and sample.labels.get("application") == APP:
                found.setdefault(base, []).append(sample)
        # Counters must include all three requests: Ray may export part of them first.
        requests = sum(s.value for s in found.get("ray_rayfit_requests", []) if s.labels.get("status") == "ok")
        if set(found) == wanted and requests >= 3:
            break
        time.sleep(1.0)
    assert set(found) == wanted, f"missing after {SCRAPE_TIMEOUT_S}s: {sorted(wanted - set(found))}"

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in found[name] if all(s.labels.get(k) == v for k, v in labels.items()))

    assert all(s.labels["gpu"] == "cpu" for samples in found.values() for s in samples)
    assert all(s.labels["deployment"] == ROLE for samples in found.values() for s in samples)
    assert value("ray_rayfit_requests", status="ok") == 3
    assert value("ray_rayfit_generated_tokens") == 3 * GREEDY["max_tokens"]
    assert value("ray_rayfit_prompt_tokens") >= 3
    # One streamed request: one TTFT, and a gap between each later delta. Under load the engine may
    # hand two steps' tokens over as one delta, and a delta whose text is still held back (a partial
    # character) sends no event: so at least one gap per event after the first, at most one per token.
    assert value("ray_rayfit_time_to_first_token_seconds") == 1
    assert len(events) - 2 <= value("ray_rayfit_inter_token_latency_seconds") <= GREEDY["max_tokens"] - 1
    assert value("ray_rayfit_request_latency_seconds") == 3
    planned = estimate_memory(ModelSpec(model=str(tiny_text_model_dir), dtype="float32"))
    assert value("ray_rayfit_memory_planned_bytes") == planned.total_bytes
    # The KV contract as gauges: the engine's worst case over all paths within the plan's KV bytes.
    assert value("ray_rayfit_kv_cache_planned_bytes") == planned.kv_cache_bytes
    assert 0 < value("ray_rayfit_kv_cache_bytes") <= planned.kv_cache_bytes
    assert value("ray_rayfit_process_rss_bytes") > 100 * 2**20
    # CPU: allocated is the engine's RSS, peak its high-water mark, both tagged with the Ray node.
    assert value("ray_rayfit_process_peak_rss_bytes") >= value("ray_rayfit_process_rss_bytes")
    node_ids = {n["NodeID"] for n in ray.nodes()}
    for name in ("ray_rayfit_process_rss_bytes", "ray_rayfit_process_peak_rss_bytes"):
        assert {s.labels["node"] for s in found[name]} <= node_ids and found[name]


def test_gpu_series_name_each_card_of_a_split_model() -> None:
    """On a GPU each memory gauge has one series per card (checked here without Ray: no GPU on this box).
    torch's bare UUID gets NVML's `GPU-` prefix, as Ray's own GpuUuid label has it."""
    metrics = ModelMetrics(
        "big", (2, 3), 10 * 2**30, node="n1", gpu_uuids=("58d1f30c", "GPU-9e2a"), gpu_budgets=(6 * 2**30, 4 * 2**30)
    )
    assert metrics.gpu_tags(2) == {"model": "big", "gpu": "2", "GpuUuid": "GPU-58d1f30c", "node": "n1"}
    assert metrics.gpu_tags(3)["GpuUuid"] == "GPU-9e2a"
    fallback = ModelMetrics("small", (0,), 2**30, node="n1")  # planned on GPU 0, no card seen
    assert fallback.gpu_tags(0)["GpuUuid"] == "unknown"
    assert {"rayfit_gpu_memory_planned_bytes", "rayfit_gpu_memory_peak_bytes"} <= GPU_ONLY_METRIC_NAMES
