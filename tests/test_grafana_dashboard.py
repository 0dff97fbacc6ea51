"""deploy/grafana/rayfit_dashboard.json: every query names metrics rayfit defines, in Ray's dashboard shape.

A metric renamed in deployments.metrics and not on the dashboard would leave a panel silently empty;
this test names the panel and the name instead. Metrics as Prometheus sees them: Ray exports rayfit's
`<name>` as `ray_<name>` (counters `_total`, histograms `_bucket/_count/_sum`).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

from deployments.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "rayfit_dashboard.json"
GENERATOR = ROOT / "deploy" / "grafana" / "make_dashboard.py"
# Ray's own metrics a panel may show beside rayfit's (the card's memory in use, as the driver reports it).
RAY_METRICS = {"ray_node_gram_used"}
# A metric is the name before a selector's `{` (label names such as ray_io_cluster sit inside it).
METRIC = re.compile(r"\b(ray_[a-z_]+)\{")
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def _panels(panels: list[dict]) -> list[dict]:
    """Every graph panel, also those inside a collapsed row."""
    out = []
    for panel in panels:
        if panel.get("type") == "row":
            out += _panels(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def _rayfit_name(exported: str) -> str:
    name = exported.removeprefix("ray_")
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in METRIC_NAMES:
            return name.removesuffix(suffix)
    return name


def test_every_panel_queries_metrics_rayfit_defines() -> None:
    board = json.loads(DASHBOARD.read_text())
    panels = _panels(board["panels"])
    assert panels
    shown: set[str] = set()
    for panel in panels:
        assert panel["datasource"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        rayfit_in_panel = set()
        for target in panel["targets"]:
            names = set(METRIC.findall(target["expr"]))
            assert names, f"{panel['title']}: {target['expr']!r} names no metric"
            for exported in names - RAY_METRICS:
                assert _rayfit_name(exported) in METRIC_NAMES, f"{panel['title']}: {exported} is not rayfit's"
                rayfit_in_panel.add(_rayfit_name(exported))
        assert rayfit_in_panel, f"{panel['title']}: shows no rayfit metric"
        shown |= rayfit_in_panel
    # Every memory metric (planned, allocated, peak; GPU and CPU) has a panel.
    memory = {n for n in METRIC_NAMES if "memory" in n or "rss" in n or "kv_cache" in n}
    assert memory - shown == set()


def test_ray_metrics_it_uses_exist_in_this_ray() -> None:
    assert {f"ray_{name}" for name in METRICS_GAUGES} >= RAY_METRICS


def test_shape_is_rays_and_the_file_is_what_the_generator_writes() -> None:
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    # Ray's Grafana setup provisions a Prometheus datasource; its dashboards pick it through this variable.
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"Cluster", "Model"} <= set(variables)
    assert board["uid"] and board["title"]
    spec = importlib.util.spec_from_file_location("make_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Edited by hand or not regenerated after a panel change: run deploy/grafana/make_dashboard.py.
    assert module.dashboard() == board
