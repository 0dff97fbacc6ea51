"""`/v1/placement` as one typed document: what the ingress answers, and what `placement report` and the demo read.

The ingress builds it (deployments.ingress) from the plan (deployments.app.entry_summary and gpu_summary),
each role's replica report (ModelServer.placement) and Ray's view of every replica
(deployments.placement_status.replica_locations):

  {"models": {role: {"status", "reason", "plan": PlannedRole | null,
                     "replica": ReplicaReport | ReplicaError, "replicas": [ReplicaLocation]}},
   "gpus": [PlannedGpu]}

The field names are the JSON's keys, so the JSON stays as it was. Dump with `exclude_unset=True`: a part
carries exactly the keys its producer wrote (the replica's `planned` is a subset of the plan entry's
keys, an error report has `status` and `reason` only when the deployment has one). Every part allows
keys it does not name, so a producer that adds one does not lose it here; the replica's memory report
is open by design (CUDA figures per local GPU, `cuda:<i>_<kind>_bytes`). Plan and replica fields are
optional, as readers meet documents written by hand and by older apps; the document's structure (each
role's status, plan and replica; each GPU's node, index and size) is required, and a document without
it fails to validate, naming the missing field.

Here, not in deployments/, because `placement report` reads it and placement/ never imports deployments/.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

# The role's placement, worked out by deployments.placement_status.role_status.
RoleStatus = Literal["ok", "misplaced", "unplaced", "unavailable"]


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class PlannedSlot(_Part):
    """Per-GPU mode: one GPU node a replica of the role is budgeted on, by its stable label."""

    gpu_label: str
    node_id: str | None = None  # the node carrying the label when planned; a replacement has another id
    gpu_indices: list[int] = []
    cuda_visible_devices: str | None = None
    fraction: float | None = None


class ReplicaPlanSummary(_Part):
    """What each replica builds (placement.replica.ReplicaPlan; deployments.app.replica_summary)."""

    context_length: int | None = None
    batch_sequences: int | None = None
    continuous_batching: bool | None = None
    dtype: str | None = None
    quantization: str | None = None
    weights_bytes: int | None = None
    kv_pool_bytes: int | None = None
    kv_side_sequences: int | None = None
    kv_side_bytes: int | None = None
    gpu_budget_bytes: list[int] = []
    max_tokens_cap: int | None = None


class GpuHeadroom(_Part):
    node_id: str
    index: int
    headroom_bytes: int


class CapacitySummary(_Part):
    """What the role's KV holds and the room left on its GPUs (placement.capacity.Capacity.as_dict)."""

    context_length: int | None = None
    sequences: int | None = None
    pool_sequences: int | None = None
    side_sequences: int | None = None
    tokens_at_batch_1: int | None = None
    kv_bytes: int | None = None
    replicas: int | None = None
    headroom_bytes: int | None = None
    gpus: list[GpuHeadroom] = []


class PlannedRole(_Part):
    """The plan's entry for a role (deployments.app.entry_summary); the replica's `planned` is a subset of it."""

    model: str | None = None  # the model id as written in the config
    device: str | None = None  # "cuda:1", "cuda:0+1", "cpu"
    node_id: str | None = None
    gpu_indices: list[int] = []
    cuda_visible_devices: str | None = None  # what the replica must see
    fraction: float | None = None
    memory_budget_bytes: int | None = None
    memory_budget: str | None = None  # the same budget for people: "15.23 GiB"
    kv_cache_bytes: int | None = None  # the KV part of the budget (None: a memory_gb lump, not itemized)
    replica_plan: ReplicaPlanSummary | None = None
    capacity: CapacitySummary | None = None
    estimate_source: str | None = None
    reason: str | None = None  # why the planner put it there
    replicas: int | None = None
    gpu_labels: list[str] = []  # per-GPU mode: the GPU nodes its replicas may run on ([] otherwise)
    slots: list[PlannedSlot] = []

    def slot_on(self, gpu_label: str | None) -> PlannedSlot | None:
        """Per-GPU mode: the slot the plan budgeted on the GPU node `gpu_label`, if any."""
        return next((slot for slot in self.slots if slot.gpu_label == gpu_label), None)


class ReplicaMemory(_Part):
    """What the replica's engine holds (deployments.engine memory_report). On GPU it adds, per local GPU i,
    `cuda:<i>_allocated_bytes`, `_reserved_bytes`, `_peak_reserved_bytes`, `_free_bytes` (device-wide, from
    the driver) and `_total_bytes`: kept as extra keys, read with `cuda_bytes`."""

    __pydantic_extra__: dict[str, int] = Field(init=False)  # the CUDA figures: bytes

    device: str | None = None
    weights_bytes: int | None = None
    rss_bytes: int | None = None  # CPU only: the process's resident set
    peak_rss_bytes: int | None = None
    kv_built_bytes: int | None = None  # the engine's KV worst case over all paths
    kv_pool_bytes: int | None = None
    kv_side_bytes: int | None = None
    kv_peak_bytes: int | None = None
    kv_sequences: int | None = None

    def cuda_bytes(self, kind: str) -> dict[int, int]:
        """'cuda:<local>_<kind>_bytes' → {local index: bytes}."""
        out = {}
        for key, value in (self.model_extra or {}).items():
            if key.startswith("cuda:") and key.endswith(f"_{kind}_bytes"):
                out[int(key[len("cuda:") :].split("_", 1)[0])] = value
        return out


class ActualPlacement(_Part):
    """Where the replica really runs, as it sees itself (ModelServer.placement's `actual`)."""

    device: str | None = None  # the replica's torch device ("cuda:0" is local, see cuda_visible_devices)
    cuda_visible_devices: str | None = None
    ray_gpu_ids: list[str] = []
    node_id: str | None = None
    gpu_label: str | None = None  # per-GPU mode: its node's `rayfit.io/gpu`
    pid: int | None = None
    engine_pid: int | None = None  # the process holding the weights and the KV cache
    load_seconds: float | None = None
    quantization: str | None = None
    cpu_fallback: bool = False
    torch_threads: int | None = None
    gpu_uuids: list[str] = []
    memory: ReplicaMemory = ReplicaMemory()
    memory_cap_bytes: dict[str, int] = {}  # the torch allocator's cap per local GPU; {} on CPU


class ReplicaReport(_Part):
    """A replica's answer to `placement()`: the plan as it was given, and where it runs."""

    role: str | None = None
    model: str | None = None
    planned: PlannedRole | None = None
    actual: ActualPlacement


class ReplicaError(_Part):
    """No answer from the role's replica: why, with its deployment's status when it has one."""

    error: str
    status: str | None = None  # Serve's deployment status ("DEPLOY_FAILED", "UNHEALTHY", ...)
    reason: str | None = None


def _replica_kind(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "report" if isinstance(value, ReplicaReport) else "error"
    return "report" if isinstance(value, dict) and "actual" in value else "error"


# An answer has `actual`; anything else is read as the error form (and must then say `error`).
Replica = Annotated[
    Annotated[ReplicaReport, Tag("report")] | Annotated[ReplicaError, Tag("error")],
    Discriminator(_replica_kind),
]


class ReplicaLocation(_Part):
    """One replica of a role as Ray sees it: Serve's state, its node, and its GPU node's label and indices."""

    replica_id: str | None
    state: str | None
    node_id: str | None
    gpu_label: str | None  # per-GPU mode: the node's `rayfit.io/gpu`; None on other nodes
    gpu_indices: list[int] | None  # from that label; None when the node says nothing
    pid: int | None = None


class RolePlacement(_Part):
    """One role: its status next to the plan, its replica's report, and every replica Ray has for it."""

    status: RoleStatus
    reason: str  # why it is not "ok" ("" when it is)
    plan: PlannedRole | None
    replica: Replica
    replicas: list[ReplicaLocation] = []


class PlannedGpu(_Part):
    """One GPU of the plan (deployments.app.gpu_summary)."""

    node_id: str
    index: int
    name: str | None = None
    total_bytes: int
    usable_bytes: int | None = None
    planned_bytes: int = 0
    roles: list[str] = []


class PlacementDocument(_Part):
    """The body of `/v1/placement`."""

    models: dict[str, RolePlacement]
    gpus: list[PlannedGpu]

    def to_json(self) -> dict[str, Any]:
        """The JSON the app answers: every part with exactly the keys its producer wrote."""
        return self.model_dump(mode="json", exclude_unset=True)
