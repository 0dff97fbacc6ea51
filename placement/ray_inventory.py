"""An `Inventory` read from a running Ray cluster, or from this machine.

`inventory_from_ray` asks Ray which nodes are alive and what they declare
(GPU count, `gpu_slot_*` resources, labels, memory), then reads each GPU node's
real GPUs (name, total, free, uuid, and every process holding memory on it)
with a tiny task run ON that node: only the node itself can see its GPUs and
its processes. A node whose GPUs are declared but not visible (declared GPUs
on a CPU machine, as in tests) gets `gpu_memory_bytes` as each GPU's total,
or a clear error asking for `--gpu-memory`.

Each process NVML lists on a GPU is attributed by `gpu_processes`: a rayfit
model replica carries `ROLE_ENV` in its environment (placement.ray_options
sets it), read from `/proc/<pid>/environ`, so its memory counts as the plan's
own (placement.inventory). A pid that cannot be read there (another user,
another PID namespace: inside a container NVML reports host pids) is matched
against the reports the node's replicas write, by GPU UUID
(placement.held_memory); what neither way explains counts as foreign: the
plan then has less room, never more.

`local_inventory` reads this machine's GPUs without Ray, for `ray-start-args`
and a dry-run plan on a GPU box.

A per-GPU node (placement.gpu_nodes: started with its own CUDA_VISIBLE_DEVICES
and labelled `rayfit.io/gpu`) is read differently: its GPU gets the HOST index
its labels name (Ray maps a replica's GPU through the raylet's own
CUDA_VISIBLE_DEVICES, so the replica sees that index), and a declared GPU
takes its size from the `rayfit.io/gpu-memory-mib` label.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from placement.gpu_nodes import GpuNodeInfo, gpu_node_of
from placement.held_memory import rayfit_role, read_held, with_held
from placement.inventory import LOCAL_NODE, Gpu, GpuProcess, Inventory, InventoryError, Node
from placement.ray_options import CUDA_DEVICE_ORDER, CUDA_VISIBLE_DEVICES, PCI_BUS_ID, gpu_slot_resource

# A probe task only imports pynvml/torch; if it has not answered by then the node is stuck.
PROBE_TIMEOUT_S = 120.0


def _visible_selectors() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of indices/UUIDs, or None when unset (all GPUs)."""
    value = os.environ.get(CUDA_VISIBLE_DEVICES)
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def gpu_processes(listed: Iterable[tuple[int, int | None]]) -> tuple[GpuProcess, ...]:
    """NVML's (pid, used bytes) list for one GPU, each attributed to a rayfit role or to nobody.

    Sorted by pid and merged per pid (NVML lists a process once as compute and
    once as graphics when it is both), so the result does not depend on NVML's order.
    """
    known: dict[int, list[int]] = {}
    for pid, nbytes in listed:
        known.setdefault(pid, []).extend([] if nbytes is None else [nbytes])
    used = {pid: max(sizes) if sizes else None for pid, sizes in known.items()}
    return tuple(GpuProcess(pid=pid, used_bytes=used[pid], rayfit_role=rayfit_role(pid)) for pid in sorted(used))


def _nvml_processes(pynvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    listed: list[tuple[int, int | None]] = []
    for query in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            listed += [(int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory)) for p in query(handle)]
        except pynvml.NVMLError:
            continue  # not supported here (some vGPU/MIG setups): those processes count as foreign
    return gpu_processes(listed)


def _gpus_from_nvml() -> list[Gpu] | None:
    """GPUs in CUDA_VISIBLE_DEVICES order via NVML; None when NVML is unusable.

    NVML ignores CUDA_VISIBLE_DEVICES and enumerates every physical GPU, so
    the selection is applied here to match what CUDA (and the plan) will index.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        selectors = _visible_selectors()
        if selectors is None:
            chosen = list(range(len(handles)))
        else:
            chosen = []
            for sel in selectors:
                if sel.isdigit() and int(sel) < len(handles):
                    chosen.append(int(sel))
                elif sel.startswith("GPU-"):
                    matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(sel)]
                    if not matches:
                        return None  # a selector NVML cannot resolve: let torch decide
                    chosen.append(matches[0])
                else:
                    return None  # MIG ids and the like: let torch decide
        gpus = []
        for position, physical in enumerate(chosen):
            mem = pynvml.nvmlDeviceGetMemoryInfo(handles[physical])
            name = _text(pynvml.nvmlDeviceGetName(handles[physical]))
            gpus.append(
                Gpu(
                    index=position,
                    total_bytes=int(mem.total),
                    free_bytes=int(mem.free),
                    name=name,
                    uuid=uuids[physical],
                    processes=_nvml_processes(pynvml, handles[physical]),
                )
            )
        return gpus
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else value


def _gpus_from_torch() -> list[Gpu]:
    """Fallback without NVML: no per-process usage, so all used memory counts as foreign.

    Indices in PCI bus order like NVML's: CUDA_DEVICE_ORDER is forced to PCI_BUS_ID
    here (and in the probe task's runtime_env) before CUDA initializes.
    """
    os.environ[CUDA_DEVICE_ORDER] = PCI_BUS_ID
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        uuid = getattr(props, "uuid", None)
        gpus.append(
            Gpu(
                index=index,
                total_bytes=int(total),
                free_bytes=int(free),
                name=props.name,
                uuid=f"GPU-{uuid}" if uuid is not None else None,
            )
        )
    return gpus


def probe_gpus() -> list[Gpu]:
    """This process's visible GPUs (NVML first, then torch.cuda); [] when none is seen. Each NVML process
    the pid path cannot attribute is matched against the node's replicas' reports (placement.held_memory)."""
    gpus = _gpus_from_nvml()
    if gpus is None:
        return _gpus_from_torch()
    return with_held(gpus, read_held())


def _available_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def local_inventory() -> Inventory:
    """This machine's GPUs as one node named LOCAL_NODE, read without Ray.

    Like a `--gpus` spec, it assumes Ray will be started with the slot
    resources (`ray_start_args`), so `has_gpu_slots` is True. A machine with no
    visible GPU gives a node with no GPUs.
    """
    return Inventory(
        nodes=(
            Node(
                node_id=LOCAL_NODE,
                gpus=tuple(probe_gpus()),
                cpu_memory_bytes=_available_ram_bytes(),
                has_gpu_slots=True,
            ),
        )
    )


def _probe_node() -> tuple[list[Gpu], str | None]:
    """Run ON a Ray node: its visible GPUs and the CUDA_VISIBLE_DEVICES it was started with."""
    return probe_gpus(), os.environ.get(CUDA_VISIBLE_DEVICES)


def _node_gpus(
    node_id: str, count: int, seen: list[Gpu], node_visible: str | None, gpu_memory_bytes: int | None
) -> tuple[Gpu, ...]:
    """The node's GPUs: measured when it can see them, else `count` declared ones of `gpu_memory_bytes`."""
    if seen:
        selectors = [part.strip() for part in (node_visible or "").split(",") if part.strip()]
        if node_visible is not None and selectors != [str(i) for i in range(len(selectors))]:
            # The replica pin replaces the node's CUDA_VISIBLE_DEVICES, so index 0 would mean host GPU 0.
            raise InventoryError(
                f"Ray node {node_id} was started with CUDA_VISIBLE_DEVICES={node_visible!r}; rayfit pins each "
                f"replica by host GPU index, which would override it. Start one Ray node per machine with all its "
                f"GPUs: `ray start` with the arguments from `rayfit-plan ray-start-args`"
            )
        if len(seen) < count:
            raise InventoryError(f"Ray node {node_id} declares {count} GPU(s) but only {len(seen)} are visible on it")
        return tuple(seen[:count])  # Ray's count is authoritative: the gpu_slot_* resources follow it
    if gpu_memory_bytes is None:
        raise InventoryError(
            f"Ray node {node_id} declares {count} GPU(s) but none can be seen on it (no NVML/CUDA device): "
            f"pass --gpu-memory (e.g. --gpu-memory 24GB) to give each declared GPU's size"
        )
    if gpu_memory_bytes <= 0:
        raise ValueError(f"gpu_memory_bytes must be positive, got {gpu_memory_bytes}")
    return tuple(Gpu(index=i, total_bytes=gpu_memory_bytes) for i in range(count))


def _gpu_node_gpus(
    node_id: str, gpu_node: GpuNodeInfo, count: int, seen: list[Gpu], gpu_memory_bytes: int | None
) -> tuple[Gpu, ...]:
    """A per-GPU (or GPU group) node's GPUs under their HOST indices, from its labels (placement.gpu_nodes).

    Ray sets each replica's CUDA_VISIBLE_DEVICES through the raylet's own, so the replica sees the
    host index the label names; the probe saw the same GPU as its local 0.
    """
    if len(gpu_node.indices) != count:
        raise InventoryError(
            f"Ray node {node_id} ({gpu_node.gpu_label}) declares {count} GPU(s) but its labels name "
            f"{len(gpu_node.indices)} ({list(gpu_node.indices)}); start it with the line from "
            "`python -m placement ray-start-args --per-gpu`"
        )
    if seen:
        if len(seen) < count:
            raise InventoryError(f"Ray node {node_id} declares {count} GPU(s) but only {len(seen)} are visible on it")
        return tuple(replace(gpu, index=index) for gpu, index in zip(seen, gpu_node.indices, strict=False))
    size = gpu_node.memory_bytes or gpu_memory_bytes
    if size is None:
        raise InventoryError(
            f"Ray node {node_id} ({gpu_node.gpu_label}) declares GPU(s) that cannot be seen and has no "
            "rayfit.io/gpu-memory-mib label: pass --gpu-memory (e.g. --gpu-memory 24GB)"
        )
    return tuple(Gpu(index=index, total_bytes=size) for index in gpu_node.indices)


def _has_gpu_slots(resources: dict[str, float], gpu_count: int) -> bool:
    return gpu_count > 0 and all(resources.get(gpu_slot_resource(i), 0) >= 1 for i in range(gpu_count))


def inventory_from_ray(*, gpu_memory_bytes: int | None = None) -> Inventory:
    """The alive nodes of the Ray cluster this process is connected to.

    Each GPU node is probed by a task pinned to it (NodeAffinitySchedulingStrategy,
    num_cpus=0, so a busy node still answers). Raises RuntimeError when a node's
    declared GPUs cannot be seen and `gpu_memory_bytes` is None, when it sees fewer
    GPUs than it declares, or when it was started with its own CUDA_VISIBLE_DEVICES
    subset (the replica pin would override it; see placement.ray_options).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        raise RuntimeError("inventory_from_ray needs a connected Ray: call ray.init(address=...) first")

    alive: list[dict[str, Any]] = [n for n in ray.nodes() if n.get("Alive")]
    # The probe numbers GPUs as the replicas will (PCI bus order, placement.ray_options).
    probe = ray.remote(num_cpus=0, max_retries=0, runtime_env={"env_vars": {CUDA_DEVICE_ORDER: PCI_BUS_ID}})(
        _probe_node
    )
    pending = {}
    for info in alive:
        if int(info["Resources"].get("GPU", 0)) > 0:
            strategy = NodeAffinitySchedulingStrategy(node_id=info["NodeID"], soft=False)
            pending[info["NodeID"]] = probe.options(scheduling_strategy=strategy).remote()
    seen = dict(zip(pending, ray.get(list(pending.values()), timeout=PROBE_TIMEOUT_S), strict=True))

    nodes = []
    for info in alive:
        resources: dict[str, float] = info["Resources"]
        count = int(resources.get("GPU", 0))
        node_id = info["NodeID"]
        memory = resources.get("memory")
        labels = dict(info.get("Labels") or {})
        gpu_node = gpu_node_of(labels)
        if not count:
            gpus: tuple[Gpu, ...] = ()
        elif gpu_node is not None:
            gpus = _gpu_node_gpus(node_id, gpu_node, count, seen.get(node_id, ([], None))[0], gpu_memory_bytes)
        else:
            gpus = _node_gpus(node_id, count, *seen.get(node_id, ([], None)), gpu_memory_bytes)
        nodes.append(
            Node(
                node_id=node_id,
                gpus=gpus,
                cpu_memory_bytes=int(memory) if memory is not None else None,
                address=info.get("NodeManagerAddress"),
                has_gpu_slots=_has_gpu_slots(resources, count),
                labels=labels,
                hostname=info.get("NodeManagerHostname"),
            )
        )
    labels = [node.gpu_node.gpu_label for node in nodes if node.gpu_node is not None]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        # A replica selects its GPU node by this label: two nodes with one label are one GPU to the plan.
        raise InventoryError(
            f"GPU node label(s) {', '.join(twice)} are carried by more than one Ray node; each GPU node needs "
            "its own rayfit.io/gpu (KubeRay: one worker group of one replica per GPU)"
        )
    return Inventory(nodes=Inventory(nodes=tuple(nodes)).sorted_nodes())
