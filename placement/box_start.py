"""One GPU box as Ray nodes: the `ray start` commands, and `python -m placement start-box` that runs them.

The per-GPU mode (placement.gpu_nodes) starts a GPU-less head plus one raylet
per GPU on the same machine. Left to itself every raylet declares the whole
machine: all CPUs, all RAM as its `memory` resource and 30% of RAM as its
object store, so three raylets on a 2-GPU box show Ray three machines' worth.
Here each raylet is given its share (`--num-cpus`, `--memory`,
`--object-store-memory`) so that the sums equal what one `ray start` would
declare on the machine (`this_machine`, computed by Ray's own functions).

The split: equal parts, the remainder to the first raylet (the head on a head
box). The head runs Serve's controller, proxy and the HTTP ingress (and models
placed on CPU); each GPU node runs its GPU's model replicas. Ray's `--num-cpus`
takes whole CPUs only, so every raylet needs at least one: a machine with
fewer CPUs than raylets is refused (declare more with `--num-cpus`; Ray's CPUs
are a scheduling count, not cores).

Every GPU node also states its own card's accelerator type (placement.gpu_nodes):
`gpus` carries each GPU's NVML name, measured (`local_inventory`) or declared.

The single-node mode (one raylet holding all GPUs and a `gpu_slot_<i>` each,
placement.ray_options) stays behind `--single-node`: that one raylet declares
the machine by itself.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from placement.gpu_nodes import gpu_node_start_args
from placement.inventory import Gpu
from placement.units import MIB

# Ray's dashboard agent listens on this port by default: a second raylet on the box would clash.
DEFAULT_AGENT_PORT = 52365
# Ray refuses an object store below this (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES, Ray 2.60).
MIN_OBJECT_STORE_BYTES = 75 * MIB
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Machine:
    """What one `ray start` would declare on a machine: whole CPUs, the `memory` resource, the object store."""

    cpus: int
    memory_bytes: int
    object_store_bytes: int


@dataclass(frozen=True)
class Share:
    """One raylet's part of the machine."""

    cpus: int
    memory_bytes: int
    object_store_bytes: int

    def args(self) -> list[str]:
        return [
            f"--num-cpus={self.cpus}",
            f"--memory={self.memory_bytes}",
            f"--object-store-memory={self.object_store_bytes}",
        ]


@dataclass(frozen=True)
class RayStart:
    """One `ray start`: its arguments and the environment it runs with (CUDA_VISIBLE_DEVICES of a GPU node)."""

    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def shell(self, ray: str = "ray") -> str:
        env = " ".join(f"{key}={shlex.quote(value)}" for key, value in self.env)
        line = f"{ray} start " + " ".join(shlex.quote(a) for a in self.args)
        return f"{env} {line}" if env else line


def this_machine() -> Machine:
    """This machine as one `ray start` would declare it (Ray 2.60's own defaults, swap not counted)."""
    from ray._private import utils

    available = utils.estimate_available_memory()
    object_store = utils.resolve_object_store_memory(available)
    return Machine(
        cpus=int(utils.get_num_cpus()), memory_bytes=available - object_store, object_store_bytes=object_store
    )


def shares(machine: Machine, raylets: int) -> list[Share]:
    """`machine` split over `raylets`: equal parts, the remainders to the first; sums equal the machine."""
    if raylets < 1:
        raise ValueError(f"need at least one raylet, got {raylets}")
    if machine.cpus < raylets:
        raise ValueError(
            f"{machine.cpus} CPU(s) for {raylets} Ray nodes: Ray's --num-cpus takes whole CPUs and each node "
            "needs one; declare more with --num-cpus (a scheduling count, not cores)"
        )
    cpus, memory = machine.cpus // raylets, machine.memory_bytes // raylets
    store = machine.object_store_bytes // raylets
    if store < MIN_OBJECT_STORE_BYTES:
        raise ValueError(
            f"an object store of {machine.object_store_bytes} bytes split over {raylets} Ray nodes leaves each "
            f"{store}, below Ray's minimum of {MIN_OBJECT_STORE_BYTES}; pass a larger --object-store-memory"
        )
    first = Share(
        cpus=machine.cpus - cpus * (raylets - 1),
        memory_bytes=machine.memory_bytes - memory * (raylets - 1),
        object_store_bytes=machine.object_store_bytes - store * (raylets - 1),
    )
    return [first] + [Share(cpus, memory, store)] * (raylets - 1)


def _units(gpus: Sequence[Gpu], groups: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The GPU sets that get a raylet each: every group, and every GPU in none, by first index."""
    known = {gpu.index for gpu in gpus}
    grouped = [tuple(sorted(group)) for group in groups]
    for group in grouped:
        missing = [i for i in group if i not in known]
        if len(group) < 2 or missing:
            raise ValueError(f"GPU group {list(group)} needs two or more of this box's GPUs {sorted(known)}")
    in_groups = [i for group in grouped for i in group]
    if len(in_groups) != len(set(in_groups)):
        raise ValueError(f"GPU groups {[list(g) for g in grouped]} overlap")
    units = grouped + [(i,) for i in sorted(known) if i not in in_groups]
    return sorted(units, key=lambda unit: unit[0])


def box_commands(
    gpus: Sequence[Gpu],
    *,
    host: str,
    address: str,
    machine: Machine | None = None,
    groups: Sequence[Sequence[int]] = (),
    head: bool = True,
) -> list[RayStart]:
    """The `ray start`s of one box in the per-GPU mode: a GPU-less head (when `head`), then one raylet per
    GPU (or per group in `groups`, for split models), each seeing only its GPU(s) and stating its card.

    `gpus` is the box's GPU inventory (index, total bytes, NVML name). With `machine`, each raylet gets its
    share of it (`shares`); without, each declares the whole machine (Ray's default). Every GPU raylet gets
    its own dashboard agent port (the default one would clash on one box).
    """
    if not gpus:
        raise ValueError("no GPU on this box: nothing to start per GPU (declare them with --gpus and --gpu-memory)")
    by_index = {gpu.index: gpu for gpu in gpus}
    units = _units(gpus, groups)
    parts = shares(machine, len(units) + head) if machine is not None else None
    commands: list[RayStart] = []
    if head:
        port = address.rsplit(":", 1)[-1]
        commands.append(RayStart(("--head", f"--port={port}", "--num-gpus=0", *(parts[0].args() if parts else []))))
    for position, unit in enumerate(units, start=1):
        total = min(by_index[i].total_bytes for i in unit)
        names = {by_index[i].name for i in unit}
        # A group of different cards states none: a replica selecting one type must not get the other.
        name = names.pop() if len(names) == 1 else None
        args = gpu_node_start_args(
            host, unit, total, address=address, accelerator=name, agent_port=DEFAULT_AGENT_PORT + position
        )
        if parts:
            args += parts[position - 1 + head].args()
        # PCI bus order: the indices are NVML's, as the plan's are (placement.ray_options, "GPU order").
        env = (("CUDA_DEVICE_ORDER", "PCI_BUS_ID"), ("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in unit)))
        commands.append(RayStart(tuple(args), env))
    return commands


def declared_gpus(count: int, memory_bytes: int, accelerator: str | None = None) -> list[Gpu]:
    """`count` declared GPUs of `memory_bytes` each (a box whose GPUs cannot be measured, or a test)."""
    if memory_bytes <= 0:
        raise ValueError("declared GPUs need their memory (--gpu-memory, e.g. 24GB)")
    return [Gpu(index=i, total_bytes=memory_bytes, name=accelerator) for i in range(count)]


def local_gpus() -> list[Gpu]:
    """This machine's GPUs, measured (NVML, then torch.cuda)."""
    from placement.ray_inventory import local_inventory

    (node,) = local_inventory().nodes
    return list(node.gpus)


def ray_cli() -> str:
    """The `ray` next to this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


def run_commands(commands: Sequence[RayStart], *, env: Mapping[str, str], ray: str | None = None) -> None:
    """Run each `ray start` in order; raise RuntimeError naming the first that fails, with its output."""
    ray = ray or ray_cli()
    for command in commands:
        done = subprocess.run(
            [ray, "start", *command.args],
            env={**env, **dict(command.env)},
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"`{command.shell(ray)}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
