"""`python -m placement start-box`: start this box as Ray nodes, the per-GPU mode by default (placement.box_start).

Exit codes: 0 started (or printed, with --dry-run), 1 a `ray start` failed (its output is shown; the nodes
started before it keep running: `ray stop` ends them), 2 bad input.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated

import typer
from rich.console import Console

from placement.box_start import (
    Machine,
    RayStart,
    box_commands,
    declared_gpus,
    local_gpus,
    ray_cli,
    run_commands,
    this_machine,
)
from placement.units import parse_size

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _machine(num_cpus: int | None, memory: str | None, object_store_memory: str | None) -> Machine:
    """This machine as Ray would declare it, with whatever the caller declares instead."""
    measured = this_machine()
    store = measured.object_store_bytes if object_store_memory is None else parse_size(object_store_memory)
    return Machine(
        cpus=measured.cpus if num_cpus is None else num_cpus,
        memory_bytes=measured.memory_bytes if memory is None else parse_size(memory),
        object_store_bytes=store,
    )


def start_box_command(
    single_node: Annotated[
        bool,
        typer.Option(
            "--single-node",
            help="The fallback: one Ray node holding all GPUs with a gpu_slot_<i> each (Ray does not count "
            "rayfit's GPU use; README 'Which placement mode when').",
        ),
    ] = False,
    head: Annotated[
        bool, typer.Option("--head/--worker", help="Start the head too, or only this box's GPU nodes (join --address).")
    ] = True,
    address: Annotated[str, typer.Option(help="The head's address (the head's own port with --head).")] = (
        "127.0.0.1:6379"
    ),
    host: Annotated[str | None, typer.Option(help="This box's name in the GPU labels (default: hostname).")] = None,
    group: Annotated[
        list[str] | None, typer.Option(help="GPUs one node owns together, for a split model: 0,1 (repeatable).")
    ] = None,
    gpus: Annotated[
        int | None, typer.Option(help="Declare this many GPUs instead of measuring (needs --gpu-memory).", min=1)
    ] = None,
    gpu_memory: Annotated[str | None, typer.Option(help="Each declared GPU's memory (e.g. 24GB).")] = None,
    accelerator: Annotated[
        str | None, typer.Option(help="Each declared GPU's card (NVML name or Ray type, e.g. A100).")
    ] = None,
    num_cpus: Annotated[
        int | None, typer.Option(help="The machine's CPUs to share out (default: what Ray detects).", min=1)
    ] = None,
    memory: Annotated[
        str | None, typer.Option(help="The machine's Ray `memory` to share out (48GiB, 512MiB; a bare number is GiB).")
    ] = None,
    object_store_memory: Annotated[
        str | None, typer.Option(help="The machine's object store to share out (e.g. 16GiB).")
    ] = None,
    head_arg: Annotated[
        list[str] | None,
        typer.Option(help="Another `ray start` argument for the head, e.g. --head-arg=--metrics-export-port=8080."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the `ray start` lines, run nothing.")] = False,
) -> None:
    """Start this box as Ray nodes: a GPU-less head plus one node per GPU, each with its share of the
    machine's CPUs, memory and object store, so Ray counts every GPU rayfit's replicas hold."""
    console = Console(stderr=True)
    try:
        commands = _commands(
            single_node,
            head,
            address,
            host,
            group or [],
            gpus,
            gpu_memory,
            accelerator,
            num_cpus,
            memory,
            object_store_memory,
        )
    except ValueError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    if head and head_arg:
        commands[0] = RayStart(commands[0].args + tuple(head_arg), commands[0].env)
    ray = ray_cli()
    for command in commands:
        print(command.shell(ray))
    if dry_run:
        return
    try:
        run_commands(commands, env=os.environ, ray=ray)
    except RuntimeError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=False)
        raise typer.Exit(EXIT_FAILED) from exc
    console.print(f"started {len(commands)} Ray node(s); `ray status` shows them", highlight=False)


def _commands(
    single_node: bool,
    head: bool,
    address: str,
    host: str | None,
    groups: list[str],
    count: int | None,
    gpu_memory: str | None,
    accelerator: str | None,
    num_cpus: int | None,
    memory: str | None,
    object_store_memory: str | None,
) -> list[RayStart]:
    if count is not None and not gpu_memory:
        raise ValueError("--gpus needs --gpu-memory (each declared GPU's size, e.g. 24GB)")
    box = declared_gpus(count, parse_size(gpu_memory or "0"), accelerator) if count else local_gpus()
    if single_node:
        from placement.ray_options import ray_start_args

        args = ray_start_args(len(box), head=head)
        args += [f"--port={address.rsplit(':', 1)[-1]}"] if head else [f"--address={address}"]
        # One raylet declares the whole machine by itself; declared figures replace Ray's detection.
        for flag, value in (("num-cpus", num_cpus), ("memory", memory), ("object-store-memory", object_store_memory)):
            if value is not None:
                args.append(f"--{flag}={value if isinstance(value, int) else parse_size(value)}")
        return [RayStart(tuple(args))]
    machine = _machine(num_cpus, memory, object_store_memory)
    parsed = [[int(part) for part in item.split(",") if part.strip()] for item in groups]
    return box_commands(
        box, host=host or socket.gethostname(), address=address, machine=machine, groups=parsed, head=head
    )


def per_gpu_lines(
    count: int | None, gpu_memory: str | None, host: str | None, address: str, groups: list[str], head: bool
) -> list[str]:
    """`ray-start-args --per-gpu`: the lines `start-box` runs, for a shell (`| bash -e`)."""
    commands = _commands(False, head, address, host, groups, count, gpu_memory, None, None, None, None)
    return [command.shell() for command in commands]
