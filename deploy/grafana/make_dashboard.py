"""Writes rayfit_dashboard.json next to this file: rayfit's per-role memory panels, in the shape of Ray's own
Grafana dashboards (built with Ray's dashboard classes and panel factory, so the `${datasource}` variable,
the `$Cluster` filter and the panel templates are Ray's). Run it again after changing a panel:

    .venv/bin/python deploy/grafana/make_dashboard.py

The metric names come from deployments.metrics; tests/test_grafana_dashboard.py checks that every panel's
query names only metrics rayfit defines (or Ray's own GPU memory metric).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory
from ray.dashboard.modules.metrics.dashboards.common import DashboardConfig, Panel, Row, Target

OUT = Path(__file__).with_name("rayfit_dashboard.json")
UID = "rayfitMemoryDashboard"
# Ray's own filter for KubeRay clusters, and rayfit's role and GPU filters.
ROLE = 'model=~"$Model",{global_filters}'
GPU_SERIES = "(model, gpu, GpuUuid)"


def _by_role_gpu(metric: str) -> str:
    # One series per role and card; a role with several replicas on one card sums them.
    return f"sum by {GPU_SERIES} (ray_{metric}{{{{{ROLE}}}}})"


GPU_PANELS = [
    Panel(
        id=1,
        title="GPU memory per role: planned vs peak",
        description=(
            "Per role and GPU: the plan's budget there (torch's cap; the CUDA context is charged beside it) "
            "and the most torch has reserved since the engine started. Peak close to planned: the budget is "
            "used; peak far below: the plan could give the room to another model."
        ),
        unit="bytes",
        stack=False,
        fill=0,
        targets=[
            Target(expr=_by_role_gpu("rayfit_gpu_memory_planned_bytes"), legend="planned: {{model}} gpu {{gpu}}"),
            Target(expr=_by_role_gpu("rayfit_gpu_memory_peak_bytes"), legend="peak: {{model}} gpu {{gpu}}"),
        ],
    ),
    Panel(
        id=2,
        title="GPU memory per role: allocated and reserved now",
        description=(
            "torch's allocated bytes (tensors alive) and reserved bytes (its cached blocks) per role and GPU."
        ),
        unit="bytes",
        stack=False,
        fill=0,
        targets=[
            Target(expr=_by_role_gpu("rayfit_gpu_memory_allocated_bytes"), legend="allocated: {{model}} gpu {{gpu}}"),
            Target(expr=_by_role_gpu("rayfit_gpu_memory_reserved_bytes"), legend="reserved: {{model}} gpu {{gpu}}"),
        ],
    ),
    Panel(
        id=3,
        title="GPU memory by card: rayfit's roles and the card's use",
        description=(
            "Stacked: what each role's torch reserves on each card (by GPU UUID). Line: what the card has in use "
            "as the driver reports it (every process, CUDA contexts included), from Ray's own metric. In the "
            "per-GPU mode every raylet of a box reports every GPU it sees, so Ray's series repeat per raylet; "
            "the max over one GpuUuid shows each card once."
        ),
        unit="bytes",
        targets=[
            Target(
                expr=f"sum by (model, GpuUuid) (ray_rayfit_gpu_memory_reserved_bytes{{{{{ROLE}}}}})",
                legend="{{model}} on {{GpuUuid}}",
            ),
            Target(
                expr="max by (GpuUuid) (ray_node_gram_used{{{global_filters}}}) * 1024 * 1024",
                legend="in use on {{GpuUuid}} (driver)",
            ),
        ],
    ),
    Panel(
        id=4,
        title="KV cache per role: planned vs built",
        description=(
            "The KV bytes the plan budgets for the role, and the engine's worst case over all its paths "
            "(pool as allocated + side slots at full context). Built must stay at or below planned."
        ),
        unit="bytes",
        stack=False,
        fill=0,
        targets=[
            Target(
                expr=f"sum by (model, gpu) (ray_rayfit_kv_cache_planned_bytes{{{{{ROLE}}}}})",
                legend="planned: {{model}} ({{gpu}})",
            ),
            Target(
                expr=f"sum by (model, gpu) (ray_rayfit_kv_cache_bytes{{{{{ROLE}}}}})",
                legend="built: {{model}} ({{gpu}})",
            ),
        ],
    ),
]

CPU_PANELS = [
    Panel(
        id=5,
        title="CPU models: planned, allocated (RSS) and peak (RSS high-water mark)",
        description=(
            "A role on CPU has no GPU series: its planned memory is rayfit_memory_planned_bytes (gpu=cpu), its "
            "allocated memory the engine process's RSS, its peak that process's RSS high-water mark."
        ),
        unit="bytes",
        stack=False,
        fill=0,
        targets=[
            Target(
                expr=f'sum by (model) (ray_rayfit_memory_planned_bytes{{{{gpu="cpu",{ROLE}}}}})',
                legend="planned: {{model}}",
            ),
            Target(
                expr=f"sum by (model) (ray_rayfit_process_rss_bytes{{{{{ROLE}}}}})",
                legend="allocated (RSS): {{model}}",
            ),
            Target(
                expr=f"sum by (model) (ray_rayfit_process_peak_rss_bytes{{{{{ROLE}}}}})",
                legend="peak (RSS): {{model}}",
            ),
        ],
    ),
]

CONFIG = DashboardConfig(
    name="RAYFIT",
    default_uid=UID,
    panels=[],
    rows=[
        Row(title="GPU memory per role", id=100, panels=GPU_PANELS),
        Row(title="CPU models", id=101, panels=CPU_PANELS),
    ],
    standard_global_filters=['ray_io_cluster=~"$Cluster"'],
    base_json_file_name="serve_grafana_dashboard_base.json",
)


def _variable(name: str, label: str, query: str, description: str) -> dict:
    return {
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "datasource": "${datasource}",
        "definition": query,
        "description": description,
        "hide": 0,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "options": [],
        "query": {"query": query, "refId": "StandardVariableQuery"},
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
        "type": "query",
    }


def dashboard() -> dict:
    base_path = Path(factory.__file__).with_name("dashboards") / CONFIG.base_json_file_name
    base = json.loads(base_path.read_text())
    ray_vars = {v["name"]: v for v in base["templating"]["list"]}
    cluster = copy.deepcopy(ray_vars["Cluster"])
    for key in ("definition",):
        cluster[key] = factory._clean_empty_filters(cluster[key].format(global_filters=""))
    cluster["query"]["query"] = factory._clean_empty_filters(cluster["query"]["query"].format(global_filters=""))
    models = 'label_values(ray_rayfit_memory_planned_bytes{ray_io_cluster=~"$Cluster"}, model)'
    base.update(
        title="rayfit: memory per role",
        uid=UID,
        tags=["rayfit"],
        panels=factory._generate_grafana_panels(CONFIG, [], ""),
        templating={
            "list": [
                copy.deepcopy(ray_vars["datasource"]),
                cluster,
                _variable("Model", "Role", models, "rayfit model roles (the `model` label)."),
            ]
        },
    )
    base.pop("rayMeta", None)
    return base


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")
