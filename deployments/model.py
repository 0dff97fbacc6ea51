"""The Serve deployment for one model role: load on the planned device, serve.

One deployment per role, named by the role (`deployments.app` binds it with the
Ray options derived from the plan). The replica never re-decides placement: it
checks that Ray put it where the plan says, refuses to start otherwise, loads
the model there and logs one line saying where it is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from deployments.engine.errors import GenerationOutOfMemory, InvalidRequest, RetryableGenerationError
from deployments.engine.generation import (
    GenerationInput,
    GenerationOutput,
    SamplingParams,
    StreamDelta,
    checked_max_tokens,
)
from deployments.engine.host import EngineOptions
from deployments.engine.process import EngineProcess
from deployments.engine.protocol import EngineProtocol
from deployments.engine.verify import CPU_FALLBACK_ENV, entry_for_this_node, placement_log_line
from deployments.metrics import ModelMetrics, host_gpu_memory
from placement.config import ModelSpec
from placement.gpu_nodes import GPU_LABEL
from placement.held_memory import held_by_engine, write_held
from placement.plan import PlanEntry

logger = logging.getLogger("ray.serve")

__all__ = ["CPU_FALLBACK_ENV", "ModelServer"]  # the CPU fallback's switch lives with the placement check

# Requests one replica holds at once (Serve's max_ongoing_requests below).
MAX_ONGOING_REQUESTS = 32
# check_health generates one token with this; a wedged device or engine never
# finishes it, the check fails, and Serve replaces the replica.
HEALTH_PROBE = GenerationInput(params=SamplingParams(max_tokens=1, temperature=0.0), prompt="ok")
# Longer than one token takes on a busy CPU replica; Serve's own
# health_check_timeout_s (deployment option) bounds the check as well.
HEALTH_PROBE_TIMEOUT_S = 20.0
# After requests, the memory gauges are refreshed at most this often: a report is a blocking call to
# the engine's process, which would stall this replica's event loop (every stream's deltas) per request.
MEMORY_REFRESH_S = 1.0


@serve.deployment(
    # Batching needs several requests in flight per replica; the engine bounds
    # the real concurrency (the plan's batch_sequences).
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    health_check_period_s=10,
)
class ModelServer:
    """One model role. Methods are called through DeploymentHandles (ingress, agent code)."""

    def __init__(
        self, role: str, spec: ModelSpec | dict[str, Any], entry: PlanEntry, options: EngineOptions | None = None
    ):
        """`options`: the app's dev/test switches for the engine (deployments.app.AppArgs), handed on to
        wherever the engine is built; None: production's (no CPU fallback, no wrapper)."""
        self.role = role
        self.spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(spec)
        # Per-GPU mode: the slot of the GPU node Ray chose among those the plan allows (else the entry).
        entry = entry_for_this_node(entry)
        self.entry = entry
        if entry.replica is None:
            raise ValueError(f"{role}: plan entry without a replica plan (make plans with placement.planner)")
        self.plan = entry.replica  # the numbers this replica serves by (placement.replica)
        # Check the placement, then load and build the engine (deployments.engine.host), in the
        # process that will hold the model: the plan's GPU cap, then the weights, then a KV pool of
        # the plan's size. A wrong placement raises PlacementMismatch, a load failure ModelLoadError
        # naming the cause: Serve marks the deployment DEPLOY_FAILED with it, and the app's other
        # models keep serving. By default the engine runs in a child process with a GIL of its own
        # (deployments.engine.process), and this process never imports torch or transformers;
        # `engine_process: false` keeps it in this process (the app's `engine_process` switch sets it
        # for every model, deployments.app.plan_app).
        options = options or EngineOptions()
        self.engine: EngineProtocol
        if self.spec.engine_process:
            self.engine = EngineProcess(self.spec, entry, role, options)
            self.facts = self.engine.facts
        else:
            from deployments.engine.host import build_engine

            self.engine, self.facts = build_engine(self.spec, entry, options)
        self.cpu_fallback = self.facts.cpu_fallback
        load_entry = entry.on_cpu() if self.cpu_fallback else entry
        # A request waits on the event loop; a thread here only while one waits for a free sequence slot.
        self._continuous_pool = ThreadPoolExecutor(max_workers=MAX_ONGOING_REQUESTS, thread_name_prefix=role)
        self._probes = 0  # one-token health probes run (they are requests to the engine too)
        self._last_success = self._last_check = 0.0  # monotonic times: last finished generation, last health check
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        logger.info(placement_log_line(role, self.node_id, load_entry))
        # Tagged with where the model really runs (the CPU fallback reports "cpu").
        self.metrics = ModelMetrics(
            role,
            load_entry.gpu_indices,
            entry.memory_budget_bytes,
            entry.kv_budget_bytes,
            node=self.node_id,
            gpu_uuids=tuple(self.facts.gpu_uuids),
            gpu_budgets=self.plan.gpu_budgets if not self.cpu_fallback else (),
        )
        self._memory_refresh_due = False  # a refresh of the memory gauges is scheduled
        self._memory_report()

    def _refresh_memory_soon(self) -> None:
        """After a request: refresh the memory gauges within MEMORY_REFRESH_S, once for every request
        that finishes meanwhile (the last state of a burst is still reported)."""
        if not self._memory_refresh_due:
            self._memory_refresh_due = True
            asyncio.get_running_loop().call_later(MEMORY_REFRESH_S, self._refresh_memory)

    def _refresh_memory(self) -> None:
        self._memory_refresh_due = False
        try:
            self._memory_report()
        except RetryableGenerationError:
            pass  # the engine's process is gone: the health check replaces this replica

    def _memory_report(self) -> dict[str, int | str]:
        """The engine's memory report (model and KV bytes), also pushed to the memory gauges (cheap:
        no device sync; one call to an engine process)."""
        report = self.engine.memory_report()
        indices = () if self.cpu_fallback else self.entry.gpu_indices
        rss, peak_rss = report.get("rss_bytes"), report.get("peak_rss_bytes")
        self.metrics.memory(
            host_gpu_memory(report, indices, "allocated"),
            host_gpu_memory(report, indices, "reserved"),
            rss if isinstance(rss, int) else None,
            int(report["kv_built_bytes"]),
            peak=host_gpu_memory(report, indices, "peak_reserved"),
            peak_rss_bytes=peak_rss if isinstance(peak_rss, int) else None,
        )
        if indices and self.facts.gpu_uuids:
            # What the engine holds per GPU UUID, for a later plan on this node (placement.held_memory).
            pid = getattr(self.engine, "pid", os.getpid())
            held = held_by_engine(self.role, pid, self.facts.gpu_uuids, report, self.facts.memory_caps)
            try:
                write_held(held)
            except OSError as exc:
                logger.warning("%s: cannot write what it holds for the planner (%s)", self.role, exc)
        return report

    # ------------------------------------------------------------ generation

    def _check_cap(self, request: GenerationInput) -> None:
        """The plan's max_tokens cap, also for callers that bypass the protocol layer."""
        checked_max_tokens(request.params.max_tokens, self.plan.max_tokens_cap, self.role)

    def _engine_failure(self, exc: Exception) -> GenerationOutOfMemory:
        """What the caller gets for an engine failure: an out-of-memory error becomes the retryable 503
        answer (GenerationOutOfMemory, the memory freed first; an engine process sends it ready-made);
        any other error is re-raised as it is."""
        from deployments.engine.memory import out_of_memory_answer

        if (answer := out_of_memory_answer(self.role, exc)) is None:
            raise exc
        return answer

    def _rejected(self, exc: BaseException, start: float) -> BaseException:
        """A client's bad request: counted `invalid`, logged as one WARNING line, and RETURNED to the
        caller (Serve logs every exception a method raises as an ERROR with its traceback; the
        ingress and the handle client raise a returned exception as the typed 400)."""
        self.metrics.request_done("invalid", time.perf_counter() - start)
        logger.warning("%s: bad request: %s", self.role, exc)
        return exc

    async def generate(self, request: GenerationInput) -> GenerationOutput | BaseException:
        """One request. A bad request comes back as its InvalidRequest (returned, not raised)."""

        start = time.perf_counter()
        try:
            self._check_cap(request)
        except InvalidRequest as exc:
            return self._rejected(exc, start)
        try:
            result = await self._generate(request)
        except asyncio.CancelledError:
            self.metrics.request_done("cancelled", time.perf_counter() - start)
            raise
        except Exception:
            self.metrics.request_done("error", time.perf_counter() - start)
            raise
        if isinstance(result, InvalidRequest):
            return self._rejected(result, start)
        if isinstance(result, BaseException):
            # Anything else returned (e.g. OOM recovered) is ours, not the client's.
            self.metrics.request_done("error", time.perf_counter() - start)
            raise result
        self.metrics.request_done("ok", time.perf_counter() - start, result.prompt_tokens, result.completion_tokens)
        self._refresh_memory_soon()
        return result

    async def _generate(self, request: GenerationInput) -> GenerationOutput | BaseException:
        """One request through the engine, which decides how it runs: it joins the running batch, or a
        batch of side requests that arrive with it (deployments.engine.side_batches). The caller gone
        (Serve cancels this coroutine): the engine drops the request within a decode step, also while
        it still waits for a slot."""
        try:
            output = await self.engine.generate_async(request, self._continuous_pool)
        except InvalidRequest as exc:
            return exc
        except Exception as exc:
            return self._engine_failure(exc)
        self._last_success = time.monotonic()
        return output

    async def stream(self, request: GenerationInput) -> AsyncIterator[StreamDelta]:
        """Deltas as the engine produces them (Engine.open_stream: a pooled request's tokens
        come onto this event loop each decode step). Client disconnect → CancelledError → the
        engine stops the request. A bad request is yielded as its InvalidRequest (see `_rejected`)."""
        start = last = time.perf_counter()
        status, usage = "cancelled", (0, 0)  # stays "cancelled" when the client goes away mid-stream
        deltas: AsyncIterator[StreamDelta] | None = None
        try:
            self._check_cap(request)
            deltas = await self.engine.open_stream(request, self._continuous_pool)
            async for delta in deltas:
                now = time.perf_counter()
                if last == start:
                    self.metrics.first_token(now - start)
                else:
                    self.metrics.next_token(now - last)
                last = now
                if delta.completion_tokens is not None:
                    usage = (delta.prompt_tokens or 0, delta.completion_tokens)
                yield delta
            status = "ok"
            self._last_success = time.monotonic()
        except InvalidRequest as exc:
            status = "invalid"
            logger.warning("%s: bad request: %s", self.role, exc)
            yield exc  # type: ignore[misc]  # the ingress raises it as a 400
        except Exception as exc:
            status = "error"
            if (answer := self._engine_failure(exc)) is exc:
                raise  # the engine process's answer, ready-made
            raise answer from exc
        finally:
            if deltas is not None:
                await deltas.aclose()  # type: ignore[attr-defined]  # stops generating if still running
            self.metrics.request_done(status, time.perf_counter() - start, *usage)
            self._refresh_memory_soon()

    # ------------------------------------------------------------ reporting

    def placement(self) -> dict[str, Any]:
        """Planned vs actual, as this replica sees it."""
        import ray

        planned = {
            "device": self.entry.device_label,
            "gpu_indices": list(self.entry.gpu_indices),
            "fraction": self.entry.fraction,
            "node_id": self.entry.node_id,
            "memory_budget_bytes": self.entry.memory_budget_bytes,
            "kv_cache_bytes": self.entry.kv_budget_bytes,
            "replicas": self.entry.replicas,
            "gpu_labels": list(self.entry.gpu_labels),
            "reason": self.entry.reason,
        }
        actual = {
            "device": self.facts.device,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "node_id": self.node_id,
            "gpu_label": ray.get_runtime_context().get_node_labels().get(GPU_LABEL),
            "pid": os.getpid(),
            # The process holding the weights and the KV cache: this one, or its engine process.
            "engine_pid": getattr(self.engine, "pid", os.getpid()),
            "load_seconds": round(self.facts.load_seconds, 3),
            "quantization": self.facts.quantization,
            "cpu_fallback": self.cpu_fallback,
            # Ray sets OMP_NUM_THREADS from num_cpus: a CPU model with 0.5 CPUs computes on 1 thread.
            "torch_threads": self.facts.torch_threads,
            # The card(s) the engine really holds, as the driver names them (survives index remapping).
            "gpu_uuids": list(self.facts.gpu_uuids),
            "memory": self._memory_report(),
            # The torch allocator's cap per local GPU (the plan's budget); empty on CPU (report only).
            "memory_cap_bytes": {str(local): cap for local, cap in self.facts.memory_caps.items()},
        }
        return {"role": self.role, "model": self.spec.model, "planned": planned, "actual": actual}

    def load(self) -> dict[str, Any]:
        """What the engine holds right now (sequence slots in use, live pool requests, batcher restarts)
        and the replica's request outcomes so far: the proof that a cancelled request left nothing behind."""
        return {
            **self.engine.load_report(),
            "health_probes": self._probes,
            "outcomes": dict(self.metrics.outcomes),
        }

    def info(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "model": self.spec.model,
            "context_length": self.facts.context_length,
            "multimodal": self.facts.is_multimodal,
            "max_batch_size": self.plan.batch_sequences,
            "max_tokens_cap": self.plan.max_tokens_cap,
        }

    async def check_health(self) -> None:
        """Serve replaces the replica when this raises (or outlasts health_check_timeout_s).

        Liveness is tokens flowing: if any path produced a token since the last
        check (a 27B on one long answer finishes no request for minutes, but
        decodes all the time), the replica is alive and no probe competes with
        the batch. Otherwise a one-token probe: a dead CUDA context fails it, a
        wedged device or engine never finishes it. A probe lost to a transient
        out-of-memory, or to a batch the batcher restarted, is no reason to
        replace the replica.
        """
        last_check, self._last_check = self._last_check, time.monotonic()
        # An engine process that died raises here (EngineProcessLost): the check fails, Serve replaces us.
        if max(self._last_success, self.engine.last_progress) > last_check:
            return
        self._probes += 1
        probe = asyncio.to_thread(self.engine.generate_batch, [HEALTH_PROBE])
        try:
            await asyncio.wait_for(probe, HEALTH_PROBE_TIMEOUT_S)
        except TimeoutError as exc:
            raise RuntimeError(
                f"{self.role}: a one-token health probe did not finish in {HEALTH_PROBE_TIMEOUT_S:.0f} s; "
                "the model is wedged"
            ) from exc
        except RetryableGenerationError:
            logger.warning("%s: health probe lost to a restarted batch; the replica recovered", self.role)
            return
        except Exception as exc:
            self._engine_failure(exc)  # an out-of-memory: transient, the replica stays; anything else raises
            return
        self._last_success = time.monotonic()
