"""What rayfit's own replicas say they hold on each GPU, by GPU UUID: how the inventory tells them from
foreign processes where NVML's pids cannot be read.

The inventory's first way (placement.ray_inventory): NVML lists each process on a GPU with its pid, and a
pid whose `/proc/<pid>/environ` carries ROLE_ENV is a rayfit replica's. Inside a container (a KubeRay pod)
NVML reports HOST pids, which mean nothing in the pod's PID namespace: every replica would count as
foreign, and a redeploy would plan against less room than the first deploy (on a box of two 24 GB cards,
no room for the 27B).

The second way, used for what the first leaves unattributed: each replica's engine writes a small report
on its node (`write_held`): its pid in its own namespace, its role, and per GPU UUID the bytes torch's
allocator holds there and the plan's cap. The probe, run ON that node (the same pod, so the same
namespace and the same files), reads the live reports (`read_held`: the pid is alive and its environment
still names the role, so a dead replica's file is ignored) and gives each report the NVML process on the
same GPU whose usage it explains (`attribute_held`): at least what torch holds, at most the cap plus what
a process holds outside torch's allocator (its CUDA context), nearest to torch's figure plus one context.
That process's NVML figure then counts as rayfit's, exactly as on the host.

A report whose pid NVML lists already attributed (the host, where pids resolve) explains nothing more: the
pid path stays first. An unmatched report claims nothing, so the rule still errs towards less room.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from placement.inventory import CUDA_CONTEXT_BYTES, MEMORY_GRAIN, Gpu
from placement.ray_options import ROLE_ENV
from placement.units import GIB

# Where reports are written: this directory when set (read at each call), else a per-user one under the
# system temp dir. Node-local on purpose: only processes on that node read it.
HELD_DIR_ENV = "RAYFIT_HELD_DIR"
# What one process holds on a GPU outside torch's allocator: the CUDA context (measured 0.3-0.6 GiB),
# cuBLAS/cuDNN handles, NCCL buffers. A report explains an NVML figure up to its cap plus this much.
OUTSIDE_ALLOCATOR_MAX_BYTES = 2 * GIB
# torch's figure may be read a moment after NVML's and have grown meanwhile: this much below it still matches.
READ_SKEW_BYTES = MEMORY_GRAIN


@dataclass(frozen=True)
class HeldGpu:
    """What one engine process holds on one GPU, as torch's allocator counts it."""

    uuid: str  # the GPU's UUID, 'GPU-…' or bare hex (compared without the prefix)
    reserved_bytes: int  # torch.cuda.memory_reserved: the allocator's blocks, the CUDA context excluded
    cap_bytes: int | None = None  # the plan's cap on this GPU (deployments.engine.memory.cap_gpu_memory)


@dataclass(frozen=True)
class HeldReport:
    """One engine process's report: who it is on its node, and what it holds per GPU."""

    role: str
    pid: int  # in the node's own PID namespace (the pod's, in a container), not NVML's
    gpus: tuple[HeldGpu, ...]


def same_uuid(a: str | None, b: str | None) -> bool:
    """Whether two GPU UUIDs name one card: NVML writes 'GPU-<hex>', torch the bare hex."""
    if not a or not b:
        return False
    bare = re.compile(r"^(GPU|MIG)-", re.IGNORECASE)
    return bare.sub("", a.strip()).lower() == bare.sub("", b.strip()).lower()


def held_dir() -> Path:
    value = os.environ.get(HELD_DIR_ENV)
    return Path(value) if value else Path(tempfile.gettempdir()) / f"rayfit-held-{os.getuid()}"


def rayfit_role(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The rayfit model role process `pid` serves (its environment's ROLE_ENV), or None."""
    try:
        environ = (proc / str(pid) / "environ").read_bytes()
    except OSError:  # gone, another user's, or not in this PID namespace
        return None
    prefix = f"{ROLE_ENV}=".encode()
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace") or None
    return None


def write_held(report: HeldReport, directory: Path | None = None) -> Path:
    """Write (or replace) `report` on this node, atomically: a reader never sees half a file."""
    directory = held_dir() if directory is None else directory
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{report.pid}.json"
    body = {
        "role": report.role,
        "pid": report.pid,
        "gpus": [{"uuid": g.uuid, "reserved_bytes": g.reserved_bytes, "cap_bytes": g.cap_bytes} for g in report.gpus],
    }
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(body))
    os.replace(partial, path)
    return path


def read_held(directory: Path | None = None, proc: Path = Path("/proc")) -> tuple[HeldReport, ...]:
    """The live reports on this node, by pid: a file whose process is gone (or whose pid now belongs to a
    process without that role) is left out; an unreadable one too."""
    directory = held_dir() if directory is None else directory
    reports = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        try:
            body = json.loads(path.read_text())
            report = HeldReport(
                role=str(body["role"]),
                pid=int(body["pid"]),
                gpus=tuple(
                    HeldGpu(
                        str(g["uuid"]),
                        int(g["reserved_bytes"]),
                        None if g["cap_bytes"] is None else int(g["cap_bytes"]),
                    )
                    for g in body["gpus"]
                ),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # removed meanwhile, or not one of ours
        if rayfit_role(report.pid, proc) == report.role:
            reports.append(report)
    return tuple(sorted(reports, key=lambda r: r.pid))


def _held_gpu(body: dict) -> HeldGpu:
    cap = body["cap_bytes"]
    return HeldGpu(str(body["uuid"]), int(body["reserved_bytes"]), None if cap is None else int(cap))


def _explains(used: int, held: HeldGpu) -> bool:
    ceiling = max(held.reserved_bytes, held.cap_bytes or 0) + OUTSIDE_ALLOCATOR_MAX_BYTES
    return held.reserved_bytes - READ_SKEW_BYTES <= used <= ceiling


def attribute_held(gpu: Gpu, reports: Iterable[HeldReport]) -> Gpu:
    """`gpu` with the processes rayfit's reports explain attributed to their roles (module docstring).

    Only processes the pid path left unattributed, and only reports whose pid that path did not find:
    on a host both ways name the same processes, and the result is `gpu` unchanged.
    """
    attributed = {p.pid for p in gpu.processes if p.rayfit_role is not None}
    pending = [
        (report.role, held)
        for report in reports
        if report.pid not in attributed
        for held in report.gpus
        if same_uuid(held.uuid, gpu.uuid)
    ]
    processes = list(gpu.processes)
    # Largest first: a big replica's window is the one a small process could fall into by chance.
    for role, held in sorted(pending, key=lambda item: (-item[1].reserved_bytes, item[0])):
        expected = held.reserved_bytes + CUDA_CONTEXT_BYTES
        candidates = [
            (abs(p.used_bytes - expected), p.pid, i)
            for i, p in enumerate(processes)
            if p.rayfit_role is None and p.used_bytes is not None and _explains(p.used_bytes, held)
        ]
        if candidates:
            _, _, index = min(candidates)
            processes[index] = replace(processes[index], rayfit_role=role)
    return replace(gpu, processes=tuple(processes))


def with_held(gpus: Iterable[Gpu], reports: Iterable[HeldReport]) -> list[Gpu]:
    """Every GPU with rayfit's reports attributed (`attribute_held`)."""
    reports = tuple(reports)
    return [attribute_held(gpu, reports) if reports else gpu for gpu in gpus]


def held_by_engine(
    role: str,
    pid: int,
    uuids: Iterable[str],
    report: Mapping[str, int | str],
    caps: Mapping[int, int],
) -> HeldReport:
    """The report of an engine process from its memory report (deployments.engine.verify.memory_report:
    'cuda:<local>_reserved_bytes'), its visible GPUs' UUIDs in local order and its caps by local index."""
    gpus = []
    for local, uuid in enumerate(uuids):
        reserved = report.get(f"cuda:{local}_reserved_bytes")
        if isinstance(reserved, int):
            gpus.append(HeldGpu(uuid=uuid, reserved_bytes=reserved, cap_bytes=caps.get(local)))
    return HeldReport(role=role, pid=pid, gpus=tuple(gpus))
