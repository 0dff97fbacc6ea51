"""Prometheus metrics of one model replica, through Ray Serve's metrics API.

Ray exports them from each node's metrics agent with a `ray_` prefix (counters
also get `_total`), e.g. `ray_rayfit_requests_total{model="summarizer",gpu="0",
status="ok"}`; Serve adds `application`, `deployment` and `replica` tags. Every
metric carries `model` (the role) and `gpu` (the host GPU index, "0+1" for a
split, "cpu" on CPU). Names are listed in METRIC_NAMES and the README.

Per-role GPU memory, one series per GPU the replica uses (a split model: one per
GPU), tagged `model`, `gpu` (host index), `GpuUuid` (the card, named as Ray's own
`ray_node_gram_used` names it, so a query can join or deduplicate on it) and `node`
(the Ray node id):

- `rayfit_gpu_memory_planned_bytes`: the plan's budget on that GPU, which torch's
  allocator is capped at (the engine process's CUDA context is charged beside it);
- `rayfit_gpu_memory_allocated_bytes` / `_reserved_bytes`: torch's figures now;
- `rayfit_gpu_memory_peak_bytes`: the most torch's allocator has reserved there
  since the engine started (the load included).

A replica on CPU has no GPU series: its planned memory is `rayfit_memory_planned_bytes`
(gpu="cpu"), its allocated `rayfit_process_rss_bytes` and its peak
`rayfit_process_peak_rss_bytes` (the engine process's resident set and its high-water mark).
"""

from __future__ import annotations

from collections.abc import Mapping

from ray.serve.metrics import Counter, Gauge, Histogram

TAG_KEYS = ("model", "gpu")
# Per GPU: the card by Ray's own label name for it (GpuUuid, as on ray_node_gram_used) and the Ray node.
GPU_TAG_KEYS = ("model", "gpu", "GpuUuid", "node")
# CPU memory: where it is held.
CPU_MEMORY_TAG_KEYS = ("model", "gpu", "node")
# Seconds. TTFT spans a CPU prefill on a test box to a 27B prefill on a GPU.
TTFT_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
# Seconds between streamed deltas (about one token each): 5 ms (H100, small model) to 2 s (CPU).
ITL_BOUNDARIES = [0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0]
REQUEST_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]

METRIC_NAMES = (
    "rayfit_requests",
    "rayfit_prompt_tokens",
    "rayfit_generated_tokens",
    "rayfit_request_latency_seconds",
    "rayfit_time_to_first_token_seconds",
    "rayfit_inter_token_latency_seconds",
    "rayfit_memory_planned_bytes",
    "rayfit_kv_cache_planned_bytes",
    "rayfit_kv_cache_bytes",
    "rayfit_gpu_memory_planned_bytes",
    "rayfit_gpu_memory_allocated_bytes",
    "rayfit_gpu_memory_reserved_bytes",
    "rayfit_gpu_memory_peak_bytes",
    "rayfit_process_rss_bytes",
    "rayfit_process_peak_rss_bytes",
)
# Exported only by a replica on a GPU (a CPU replica reports RSS instead: module docstring).
GPU_ONLY_METRIC_NAMES = frozenset(name for name in METRIC_NAMES if name.startswith("rayfit_gpu_memory_"))


def gpu_tag(gpu_indices: tuple[int, ...]) -> str:
    """'1', '0+1' or 'cpu': the `gpu` tag of a replica on those host GPUs."""
    return "+".join(str(i) for i in gpu_indices) if gpu_indices else "cpu"


class ModelMetrics:
    """The metrics of one replica of `role`, which runs on `gpu_indices` (empty: CPU) of Ray node `node`.

    `gpu_uuids` and `gpu_budgets`: per GPU, in the order of `gpu_indices` (local index order), the card's
    UUID and the plan's budget there; shorter when unknown (the CPU fallback has neither).
    """

    def __init__(
        self,
        role: str,
        gpu_indices: tuple[int, ...],
        planned_bytes: int,
        planned_kv_bytes: int | None = None,
        *,
        node: str = "",
        gpu_uuids: tuple[str, ...] = (),
        gpu_budgets: tuple[int, ...] = (),
    ):
        self.tags = {"model": role, "gpu": gpu_tag(gpu_indices)}
        self.role = role
        self.node = node
        self.gpu_indices = gpu_indices
        self.gpu_uuids = gpu_uuids
        # The same outcomes counted locally, so the replica can report them without a Prometheus scrape.
        self.outcomes: dict[str, int] = {}
        self.requests = Counter(
            "rayfit_requests",
            description="Requests by outcome (ok, invalid, error, cancelled).",
            tag_keys=(*TAG_KEYS, "status"),
        )
        self.prompt_tokens = Counter("rayfit_prompt_tokens", description="Prompt tokens processed.", tag_keys=TAG_KEYS)
        self.generated_tokens = Counter("rayfit_generated_tokens", description="Tokens generated.", tag_keys=TAG_KEYS)
        self.latency = Histogram(
            "rayfit_request_latency_seconds",
            description="Whole request, arrival to last token.",
            boundaries=REQUEST_BOUNDARIES,
            tag_keys=TAG_KEYS,
        )
        self.ttft = Histogram(
            "rayfit_time_to_first_token_seconds",
            description="Streamed requests: arrival to first delta.",
            boundaries=TTFT_BOUNDARIES,
            tag_keys=TAG_KEYS,
        )
        self.itl = Histogram(
            "rayfit_inter_token_latency_seconds",
            description="Streamed requests: time between consecutive deltas.",
            boundaries=ITL_BOUNDARIES,
            tag_keys=TAG_KEYS,
        )
        planned = Gauge("rayfit_memory_planned_bytes", description="Memory the plan budgets.", tag_keys=TAG_KEYS)
        planned.set(planned_bytes, tags=self.tags)
        self._planned = planned  # kept: a gauge whose object is collected may stop being exported
        # The KV contract, side by side: what the plan gave, and the engine's worst case over all paths.
        self._kv_planned = Gauge(
            "rayfit_kv_cache_planned_bytes", description="KV cache bytes the plan budgets.", tag_keys=TAG_KEYS
        )
        if planned_kv_bytes is not None:
            self._kv_planned.set(planned_kv_bytes, tags=self.tags)
        self.kv_cache = Gauge(
            "rayfit_kv_cache_bytes",
            description="KV cache bytes the engine may hold (pool as allocated + side slots at full context).",
            tag_keys=TAG_KEYS,
        )
        # Per physical GPU: a split model reports each of its GPUs under its own `gpu` tag.
        self._gpu_planned = Gauge(
            "rayfit_gpu_memory_planned_bytes",
            description="The plan's budget on this GPU (torch's cap; the CUDA context is charged beside it).",
            tag_keys=GPU_TAG_KEYS,
        )
        for index, budget in zip(gpu_indices, gpu_budgets, strict=False):
            self._gpu_planned.set(budget, tags=self.gpu_tags(index))
        self.allocated = Gauge(
            "rayfit_gpu_memory_allocated_bytes", description="torch allocated bytes per GPU.", tag_keys=GPU_TAG_KEYS
        )
        self.reserved = Gauge(
            "rayfit_gpu_memory_reserved_bytes", description="torch reserved bytes per GPU.", tag_keys=GPU_TAG_KEYS
        )
        self.peak = Gauge(
            "rayfit_gpu_memory_peak_bytes",
            description="Most bytes torch reserved per GPU since the engine started (the load included).",
            tag_keys=GPU_TAG_KEYS,
        )
        self.rss = Gauge(
            "rayfit_process_rss_bytes",
            description="Engine process RSS: a CPU model's allocated memory.",
            tag_keys=CPU_MEMORY_TAG_KEYS,
        )
        self.peak_rss = Gauge(
            "rayfit_process_peak_rss_bytes",
            description="Engine process peak RSS (high-water mark): a CPU model's peak memory.",
            tag_keys=CPU_MEMORY_TAG_KEYS,
        )

    def gpu_tags(self, index: int) -> dict[str, str]:
        """The tags of host GPU `index`'s series (its UUID when known)."""
        position = self.gpu_indices.index(index) if index in self.gpu_indices else -1
        uuid = self.gpu_uuids[position] if 0 <= position < len(self.gpu_uuids) else "unknown"
        if uuid != "unknown" and not uuid.upper().startswith(("GPU-", "MIG-")):
            uuid = f"GPU-{uuid}"  # torch gives the bare hex; Ray's GpuUuid (from NVML) has the prefix
        return {"model": self.role, "gpu": str(index), "GpuUuid": uuid, "node": self.node}

    def request_done(self, status: str, seconds: float, prompt_tokens: int = 0, generated_tokens: int = 0) -> None:
        self.outcomes[status] = self.outcomes.get(status, 0) + 1
        self.requests.inc(tags={**self.tags, "status": status})
        self.latency.observe(seconds, tags=self.tags)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens, tags=self.tags)
        if generated_tokens:
            self.generated_tokens.inc(generated_tokens, tags=self.tags)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds, tags=self.tags)

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds, tags=self.tags)

    def memory(
        self,
        allocated: Mapping[int, int],
        reserved: Mapping[int, int],
        rss_bytes: int | None,
        kv_cache_bytes: int | None = None,
        *,
        peak: Mapping[int, int] | None = None,
        peak_rss_bytes: int | None = None,
    ) -> None:
        """`allocated`/`reserved`/`peak`: host GPU index → bytes; `rss_bytes`/`peak_rss_bytes` for a CPU replica."""
        if kv_cache_bytes is not None:
            self.kv_cache.set(kv_cache_bytes, tags=self.tags)
        for gauge, values in ((self.allocated, allocated), (self.reserved, reserved), (self.peak, peak or {})):
            for index, value in values.items():
                gauge.set(value, tags=self.gpu_tags(index))
        cpu_tags = {**self.tags, "node": self.node}
        if rss_bytes is not None:
            self.rss.set(rss_bytes, tags=cpu_tags)
        if peak_rss_bytes is not None:
            self.peak_rss.set(peak_rss_bytes, tags=cpu_tags)


def host_gpu_memory(report: Mapping[str, int | str], gpu_indices: tuple[int, ...], kind: str) -> dict[int, int]:
    """`verify.memory_report`'s 'cuda:<local>_<kind>_bytes' (kind: allocated, reserved, peak_reserved) keyed
    by host GPU index instead.

    Local index i inside the replica is host GPU gpu_indices[i] (the pin sets
    CUDA_VISIBLE_DEVICES to the planned indices, in that order).
    """
    out: dict[int, int] = {}
    for local, host in enumerate(gpu_indices):
        value = report.get(f"cuda:{local}_{kind}_bytes")
        if isinstance(value, int):
            out[host] = value
    return out
