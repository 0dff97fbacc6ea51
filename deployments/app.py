"""The Serve application: config → plan → one deployment per role + the ingress.

`serve run serve_config.yaml` calls `build_app` with the YAML's `args`, typed
by `AppArgs` and validated once here. The builder plans before binding
anything: an infeasible plan raises the planner's message and no replica
starts. Each role's Ray options come from `placement.ray_options`, never from
the serve YAML.

Do not set `ray_actor_options` for a role in the serve YAML: Serve REPLACES the
code's dict with it (no merge), which drops the GPU pin and the slot resources.
A replica whose pin is missing refuses to start and says so
(`deployments.model.check_pin_present`).

Redeploying while the app runs: the inventory counts the app's own replicas'
GPU memory as available (placement.inventory), the plan is stable
(placement.planner), and each deployment carries a version derived from its
bind arguments (deployments.versions), so `serve.run` of the same config keeps
every replica; see deployments.versions for what the declarative
`serve deploy` path does instead. `python -m deployments.deploy
serve_config.yaml` (deployments.deploy) runs this builder that way from the
serve config: an edited model_configs.yaml restarts only the roles it changes.
"""

import logging
import os
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from deployments.engine.errors import RETRY_AFTER_S
from deployments.engine.host import ENGINE_WRAPPER_ENV, EngineOptions
from deployments.engine.process import ENGINE_PROCESS_ENV
from deployments.engine.verify import CPU_FALLBACK_ENV
from deployments.guard import (
    API_KEY_ENV,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_ONGOING,
    DEFAULT_MAX_QUEUED,
    DEFAULT_UNAVAILABLE_TIMEOUT_S,
    IngressSettings,
)
from deployments.ingress import Ingress
from deployments.model import ModelServer
from deployments.versions import versioned
from placement.add_model import RunningConfig
from placement.capacity import entry_capacity
from placement.config import ModelSpec, load_model_configs
from placement.demo_models import resolve_demo_models
from placement.gpu_nodes import GPU_LABEL
from placement.inventory import CUDA_CONTEXT_BYTES, DEFAULT_SAFETY_MARGIN, Inventory, Reserve, parse_gpu_spec
from placement.plan import GpuUsage, Plan, PlanEntry, placement_log_line
from placement.ray_options import GPU_SLOT_PREFIX
from placement.replica import ReplicaPlan
from placement.units import GIB, gib

logger = logging.getLogger("ray.serve")
# "0": every model runs without continuous batching (benchmarks compare both); else each spec decides.
# Read by AppArgs.continuous_batching's default, as the other switches' variables are by theirs.
CONTINUOUS_ENV = "RAYFIT_CONTINUOUS_BATCHING"


def _env_flag(name: str) -> bool | None:
    """A switch's environment variable: None when unset, else whether it is "1"."""
    value = os.environ.get(name)
    return None if value is None else value == "1"


# Requests the ingress takes beyond its own bound: to turn them away in JSON, and for
# /health, /v1/models and /v1/placement while generation requests fill the bound.
INGRESS_SHED_HEADROOM = 64


class AppArgs(BaseModel):
    """The `args:` of the app in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # Named `model_config` in the YAML (the user's term); pydantic reserves that attribute name.
    models_path: str = Field(alias="model_config", description="Path of model_configs.yaml")
    gpus: str | None = Field(
        default=None,
        description="Declared GPUs, e.g. '2x24GB' or 'none'; default: read from the running Ray cluster",
    )
    gpu_memory_gb: float | None = Field(
        default=None, gt=0, description="Size of each GPU Ray declares but cannot measure (CPU test boxes)"
    )
    rules: str | None = Field(default=None, description="Size rules YAML; default: placement's built-in rules")
    reserve_gb: float = Field(
        default=CUDA_CONTEXT_BYTES / GIB,
        ge=0,
        description="GiB of one CUDA context, charged per replica (its engine process) on each GPU it uses",
    )
    safety_margin: float = Field(
        default=DEFAULT_SAFETY_MARGIN, ge=0, lt=1, description="Share of each GPU kept free for peaks"
    )
    # Access and limits of the HTTP ingress.
    api_key: SecretStr | None = Field(
        default=None, description=f"Bearer key every route but /health requires; default: env {API_KEY_ENV}"
    )
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, gt=0, description="Larger request bodies get 413")
    ingress_max_ongoing_requests: int = Field(
        default=DEFAULT_MAX_ONGOING, gt=0, description="Generation requests the ingress works on at once"
    )
    ingress_max_queued_requests: int = Field(
        default=DEFAULT_MAX_QUEUED, ge=0, description="More wait for a turn; beyond them the ingress answers 503"
    )
    unavailable_timeout_s: float = Field(
        default=DEFAULT_UNAVAILABLE_TIMEOUT_S,
        gt=0,
        description="A request for a model with no running replica (loading, restarting) waits this long, then 503",
    )
    # Replica lifecycle (every model deployment).
    graceful_shutdown_timeout_s: float = Field(
        default=30, gt=0, description="A replica being stopped finishes its in-flight requests within this"
    )
    ingress_graceful_shutdown_timeout_s: float = Field(
        default=120,
        gt=0,
        description="The ingress drains longer: its requests may wait for a model replica that is being replaced",
    )
    health_check_period_s: float = Field(default=10, gt=0, description="Seconds between replica health checks")
    health_check_timeout_s: float = Field(default=30, gt=0, description="A health check longer than this fails")
    # Benchmark, dev and test switches. The app reads them here once, where it is built: a field left out
    # of the YAML defaults from its environment variable there (so a variable set for `serve run` or a
    # test's Ray still works). Replicas and engines get the values in their bind arguments, never from
    # their own environment.
    engine_process: bool | None = Field(
        default_factory=lambda: _env_flag(ENGINE_PROCESS_ENV),
        description="true/false: every replica runs its engine in a process of its own / inside itself, "
        f"whatever its model's `engine_process` says; unset: each model decides (default: env {ENGINE_PROCESS_ENV} "
        "as 1/0)",
    )
    continuous_batching: bool = Field(
        default_factory=lambda: os.environ.get(CONTINUOUS_ENV) != "0",
        description="false: no model runs continuous batching (benchmarks compare both; the plan budgets it); "
        f"true: each model's `continuous_batching` decides (default: false when env {CONTINUOUS_ENV}=0)",
    )
    allow_cpu_fallback: bool = Field(
        default_factory=lambda: os.environ.get(CPU_FALLBACK_ENV) == "1",
        description="Dev/test only: a GPU-planned model loads on CPU when its replica has no CUDA (the pin is "
        f"still checked); in production it would hide a broken pin (default: env {CPU_FALLBACK_ENV}=1)",
    )
    engine_wrapper: str | None = Field(
        default_factory=lambda: os.environ.get(ENGINE_WRAPPER_ENV) or None,
        description="Test only: 'module:callable', importable where the engine runs, that each engine is passed "
        f"through once built (fault injection; default: env {ENGINE_WRAPPER_ENV})",
    )

    @field_validator("gpus")
    @classmethod
    def _gpus_parse(cls, value: str | None) -> str | None:
        if value is not None:
            parse_gpu_spec(value)  # raises naming the bad spec and the expected form
        return value

    @property
    def reserve(self) -> Reserve:
        return Reserve(cuda_context_bytes=int(self.reserve_gb * GIB), safety_margin=self.safety_margin)

    @property
    def engine_options(self) -> EngineOptions:
        """The switches every replica hands on to its engine (deployments.engine.host.build_engine)."""
        return EngineOptions(allow_cpu_fallback=self.allow_cpu_fallback, wrapper=self.engine_wrapper)

    def applied(self, spec: ModelSpec) -> ModelSpec:
        """`spec` with the app's switches that override a model's config (the plan and the replica read them)."""
        update: dict[str, Any] = {}
        if not self.continuous_batching:
            update["continuous_batching"] = False
        if self.engine_process is not None:
            update["engine_process"] = self.engine_process
        return spec.model_copy(update=update) if update else spec

    def ingress_settings(self, specs: dict[str, ModelSpec]) -> IngressSettings:
        """Read when the app is built (never at import): the key from args, else from the environment."""
        key = self.api_key.get_secret_value() if self.api_key else os.environ.get(API_KEY_ENV)
        caps = {role: spec.max_tokens_cap for role, spec in specs.items()}
        return IngressSettings(
            api_key=key or None,
            max_body_bytes=self.max_body_bytes,
            max_tokens_caps=caps,
            max_ongoing_requests=self.ingress_max_ongoing_requests,
            max_queued_requests=self.ingress_max_queued_requests,
            unavailable_timeout_s=self.unavailable_timeout_s,
        )


def model_limits(spec: ModelSpec, args: AppArgs) -> dict[str, Any]:
    """Serve deployment options that bound one model's load and lifecycle (placement's options are separate)."""
    return {
        "max_ongoing_requests": spec.max_ongoing_requests,
        # Past this the ingress's handle call raises BackPressureError → 503 + Retry-After.
        "max_queued_requests": spec.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        "graceful_shutdown_timeout_s": args.graceful_shutdown_timeout_s,
        "health_check_period_s": args.health_check_period_s,
        "health_check_timeout_s": args.health_check_timeout_s,
    }


def ingress_limits(args: AppArgs) -> dict[str, Any]:
    """Serve's options for the ingress. The ingress bounds generation requests itself (guard.Admission:
    ongoing + queued, then a JSON 503); Serve lets in more than that, so requests past the bound reach
    the ingress and get its JSON answer rather than the proxy's plain-text 503 (measured on Ray 2.60:
    "Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1).")."""
    room = args.ingress_max_ongoing_requests + args.ingress_max_queued_requests + INGRESS_SHED_HEADROOM
    return {
        "max_ongoing_requests": room,
        # The proxy's queue holds requests while its router picks a replica, so a burst fills it even
        # when the ingress has room (measured: 8 at once against a queue of 1 → 5 plain-text 503s).
        # As large as the ingress's room: only a flood past both gets the proxy's plain-text 503.
        "max_queued_requests": room,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        # Killed at this timeout, an ingress replica's waiting requests get the proxy's bare 500
        # (measured: a redeploy under load, the model replaced while requests waited for it).
        "graceful_shutdown_timeout_s": args.ingress_graceful_shutdown_timeout_s,
    }


def ingress_options(args: AppArgs, inventory: Inventory) -> dict[str, Any]:
    """Serve's options for the ingress (`ingress_limits`) and, in the per-GPU mode, where it may run: on no
    GPU node. Those nodes have CPUs of their own (start-box gives each raylet its share), so the ingress's
    0.1 CPU could land there; a label selector keeps it off every GPU node the plan knows (a node without
    the `rayfit.io/gpu` label, such as the head, matches `!in(...)`), so a GPU node's failure or drain
    never takes the HTTP entry point with it. Serve replaces `ray_actor_options` whole: the ingress's own
    CPU share is repeated here."""
    options = ingress_limits(args)
    labels = sorted({node.gpu_node.gpu_label for node in inventory.nodes if node.gpu_node is not None})
    if inventory.per_gpu_nodes and labels:
        selector = {GPU_LABEL: f"!in({','.join(labels)})"}
        options["ray_actor_options"] = {**Ingress.ray_actor_options, "label_selector": selector}
    return options


def _inventory(args: AppArgs) -> Inventory:
    if args.gpus is not None:
        declared = parse_gpu_spec(args.gpus)
        # Declared GPUs still run on whatever Ray is up: ask for gpu_slot
        # resources only if that Ray has them, or the replicas never schedule.
        import ray

        if not ray.is_initialized():
            return declared
        has_slots = any(name.startswith(GPU_SLOT_PREFIX) for name in ray.cluster_resources())
        return Inventory(nodes=tuple(replace(node, has_gpu_slots=has_slots) for node in declared.nodes))
    from placement.ray_inventory import inventory_from_ray

    memory = int(args.gpu_memory_gb * GIB) if args.gpu_memory_gb else None
    return inventory_from_ray(gpu_memory_bytes=memory)


def entry_summary(entry: PlanEntry, model_id: str | None = None, gpus: tuple[GpuUsage, ...] = ()) -> dict[str, Any]:
    """A plan entry as JSON for /v1/placement; `model_id` as written in the config; `gpus`: the plan's, for
    the headroom its capacity shows."""
    return {
        "model": model_id or entry.model,
        "device": entry.device_label,
        "node_id": entry.node_id,
        "gpu_indices": list(entry.gpu_indices),
        # What the replica must see (placement.report compares it with what it reports).
        "cuda_visible_devices": entry.cuda_visible_devices,
        "fraction": entry.fraction,
        "memory_budget_bytes": entry.memory_budget_bytes,
        "memory_budget": gib(entry.memory_budget_bytes),
        # The KV part of that budget, which the replica's engine must stay within (None: not itemized).
        "kv_cache_bytes": entry.kv_budget_bytes,
        # What each replica builds (placement.replica): the engine checks its pool and weights against these.
        "replica_plan": replica_summary(entry.replica) if entry.replica else None,
        # What its KV holds (sequences at its context, tokens at batch 1) and the room left on its GPUs.
        "capacity": entry_capacity(entry, gpus).as_dict(),
        "estimate_source": entry.estimate.source,
        "reason": entry.reason,
        # Per-GPU mode: every replica's budgeted place, by the GPU node's stable label ([] otherwise).
        "replicas": entry.replicas,
        "gpu_labels": list(entry.gpu_labels),
        "slots": [
            {
                "gpu_label": s.gpu_label,
                "node_id": s.node_id,
                "gpu_indices": list(s.gpu_indices),
                "cuda_visible_devices": entry.on_gpu_node(s.gpu_label).cuda_visible_devices,
                "fraction": s.fraction,
            }
            for s in entry.slots
        ],
    }


def replica_summary(plan: ReplicaPlan) -> dict[str, Any]:
    """A replica plan's numbers as JSON for /v1/placement."""
    return {
        "context_length": plan.context_length,
        "batch_sequences": plan.batch_sequences,
        "continuous_batching": plan.continuous,
        "dtype": plan.dtype,
        "quantization": plan.quantization.label,
        "weights_bytes": plan.weights_bytes,
        "kv_pool_bytes": plan.kv.pool_bytes if plan.kv else None,
        "kv_side_sequences": plan.kv.side_sequences if plan.kv else None,
        "kv_side_bytes": plan.kv.side_bytes if plan.kv else None,
        "gpu_budget_bytes": list(plan.gpu_budgets),
        "max_tokens_cap": plan.max_tokens_cap,
    }


def gpu_summary(usage: GpuUsage) -> dict[str, Any]:
    """One planned GPU as JSON for /v1/placement (placement.report reads it)."""
    return {
        "node_id": usage.node_id,
        "index": usage.index,
        "name": usage.name,
        "total_bytes": usage.total_bytes,
        "usable_bytes": usage.usable_bytes,
        "planned_bytes": usage.planned_bytes,
        "roles": list(usage.roles),
    }


def plan_app(
    args: AppArgs, inventory: Inventory | None = None
) -> tuple[dict[str, ModelSpec], dict[str, str], Inventory, Plan]:
    """Read the config and plan it: (loadable specs, role → model id as written, inventory, plan).

    `inventory` defaults to what `args` declares or the running Ray reports.
    Raises ConfigError / PlanError with their own messages (a PlanError lists the changes that would make
    the plan feasible, placement.advice); nothing is bound yet.
    """
    from placement.advice import plan_or_advise
    from placement.rules import load_rules

    configs = load_model_configs(args.models_path)
    model_ids = {role: spec.model for role, spec in configs.models.items()}
    specs = {role: args.applied(spec) for role, spec in resolve_demo_models(configs.models).items()}
    inventory = _inventory(args) if inventory is None else inventory
    rules = load_rules(args.rules) if args.rules else None
    plan = plan_or_advise(specs, inventory, rules=rules, reserve=args.reserve)
    return specs, model_ids, inventory, plan


# No `from __future__ import annotations` here: Serve reads this annotation as a
# class to validate the YAML's `args` into AppArgs before calling the builder.
def build_app(args: AppArgs) -> Application:
    """Serve's app builder (`import_path: deployments.app:build_app`); a plain dict works too.

    Serve requires a builder of exactly one parameter; `bind_app` takes an inventory as well.
    """
    return bind_app(args)


def bind_app(args: AppArgs | dict[str, Any], inventory: Inventory | None = None) -> Application:
    """Plan on `inventory` (default: as `build_app` reads it) and bind one deployment per role + the ingress."""
    from placement.ray_options import deployment_options, placement_warnings

    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    specs, model_ids, inventory, plan = plan_app(args, inventory)
    for warning in plan.warnings:
        logger.warning("plan: %s", warning)

    handles = {}
    for entry in plan.entries:
        options = deployment_options(entry, inventory)
        for warning in placement_warnings(entry, inventory):
            # The pin still holds; only Ray's guard against a second app filling the GPU is missing.
            logger.warning("placement: %s", warning)
        logger.info("plan: %s: %s", placement_log_line(entry.role, entry.node_id, entry), entry.reason)
        # The spec travels as a dict: plain data across the Ray boundary.
        spec_dict = specs[entry.role].model_dump()
        limits = model_limits(specs[entry.role], args)
        # Same bind arguments, same version: a redeploy leaves the replica alone (deployments.versions).
        server = ModelServer.options(name=entry.role, **options, **limits)
        deployment = versioned(server, entry.role, spec_dict, entry, args.engine_options)
        handles[entry.role] = deployment.bind(entry.role, spec_dict, entry, args.engine_options)
    summaries = {entry.role: entry_summary(entry, model_ids[entry.role], plan.gpus) for entry in plan.entries}
    gpus = [gpu_summary(usage) for usage in plan.gpus]
    settings = args.ingress_settings(specs)
    # What the plan was made from, for /v1/placement/add (placement.add_model answers there, read-only).
    running = RunningConfig(
        models=load_model_configs(args.models_path).models,
        reserve=args.reserve,
        rules_path=args.rules,
        gpus=args.gpus,
        gpu_memory_bytes=int(args.gpu_memory_gb * GIB) if args.gpu_memory_gb else None,
    )
    # The handles are versioned by role name (their bound objects have no stable form).
    ingress = versioned(
        Ingress.options(**ingress_options(args, inventory)),
        sorted(handles),
        model_ids,
        summaries,
        settings,
        gpus,
        running,
    )
    return ingress.bind(handles, model_ids, summaries, settings, gpus=gpus, running=running)
