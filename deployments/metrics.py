"""Prometheus metrics of one model replica, through Ray Serve's metrics API.

Ray exports them from each node's metrics agent with a `ray_` prefix (counters
also get `_total`), e.g. `ray_rayfit_requests_total{model="summarizer",gpu="0",
status="ok"}`; Serve adds `application`, `deployment` and `replica` tags. Every
metric carries `model` (the role) and `gpu` (the host GPU index, "0+1" for a
split, "cpu" on CPU). Names are listed in METRIC_NAMES and the README.
"""

from __future__ import annotations

from collections.abc import Mapping

from ray.serve.metrics import Counter, Gauge, Histogram

TAG_KEYS = ("model", "gpu")
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
    "rayfit_gpu_memory_allocated_bytes",
    "rayfit_gpu_memory_reserved_bytes",
    "rayfit_process_rss_bytes",
)


def gpu_tag(gpu_indices: tuple[int, ...]) -> str:
    """'1', '0+1' or 'cpu': the `gpu` tag of a replica on those host GPUs."""
    return "+".join(str(i) for i in gpu_indices) if gpu_indices else "cpu"


class ModelMetrics:
    """The metrics of one replica of `role`, which runs on `gpu_indices` (empty: CPU)."""

    def __init__(
        self, role: str, gpu_indices: tuple[int, ...], planned_bytes: int, planned_kv_bytes: int | None = None
    ):
        self.tags = {"model": role, "gpu": gpu_tag(gpu_indices)}
        self.role = role
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
        self.allocated = Gauge(
            "rayfit_gpu_memory_allocated_bytes", description="torch allocated bytes per GPU.", tag_keys=TAG_KEYS
        )
        self.reserved = Gauge(
            "rayfit_gpu_memory_reserved_bytes", description="torch reserved bytes per GPU.", tag_keys=TAG_KEYS
        )
        self.rss = Gauge("rayfit_process_rss_bytes", description="Replica process RSS (CPU models).", tag_keys=TAG_KEYS)

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
    ) -> None:
        """`allocated`/`reserved`: host GPU index → bytes; `rss_bytes` for a CPU replica."""
        if kv_cache_bytes is not None:
            self.kv_cache.set(kv_cache_bytes, tags=self.tags)
        for index, value in allocated.items():
            self.allocated.set(value, tags={"model": self.role, "gpu": str(index)})
        for index, value in reserved.items():
            self.reserved.set(value, tags={"model": self.role, "gpu": str(index)})
        if rss_bytes is not None:
            self.rss.set(rss_bytes, tags=self.tags)


def host_gpu_memory(report: Mapping[str, int | str], gpu_indices: tuple[int, ...], kind: str) -> dict[int, int]:
    """`verify.memory_report`'s 'cuda:<local>_<kind>_bytes' keyed by host GPU index instead.

    Local index i inside the replica is host GPU gpu_indices[i] (the pin sets
    CUDA_VISIBLE_DEVICES to the planned indices, in that order).
    """
    out: dict[int, int] = {}
    for local, host in enumerate(gpu_indices):
        value = report.get(f"cuda:{local}_{kind}_bytes")
        if isinstance(value, int):
            out[host] = value
    return out
