"""`python -m placement`: dry-run plans and cluster start-up arguments.

Exit codes of `plan`: 0 a feasible plan, 1 no feasible plan (the message names
every model that does not fit), 2 a bad config or argument. With `--add`
(placement.add_model): 0 the new model fits and no running model moves, 1 it
does not fit now, 3 it fits only if running models move, 2 bad input. Exit
codes of `report`: 0 every model where planned and within budget, 1 not so, 2
the app could not be read. `calibrate`: 0 stored, 1 nothing to store, 2 the app
or the config could not be read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from placement.box_start_cli import start_box_command
from placement.config import ConfigError, load_model_configs
from placement.inventory import DEFAULT_SAFETY_MARGIN, Inventory, InventoryError, Reserve, parse_gpu_spec
from placement.plan import PlanError
from placement.render import plan_to_dict, print_advice, print_plan
from placement.rules import load_rules
from placement.units import parse_size

if TYPE_CHECKING:
    from placement.calibration import CalibrationKey, Measurement
    from placement.config import ModelSpec
    from placement.rules import SizeRules

app = typer.Typer(add_completion=False, no_args_is_help=True, help="rayfit placement: which model goes on which GPU.")
EXIT_INFEASIBLE = 1
EXIT_BAD_INPUT = 2
EXIT_MOVES = 3  # `plan --add`: the new model fits only if running models move


def _fail(console: Console, message: str, code: int) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    return typer.Exit(code)


def _host_ram_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _inventory(gpus: str | None, address: str | None, gpu_memory: str | None) -> Inventory:
    """From a spec, a running Ray cluster, or this machine's own GPUs, in that order."""
    gpu_memory_bytes = parse_size(gpu_memory) if gpu_memory else None
    if gpus is not None:
        return parse_gpu_spec(gpus, cpu_memory_bytes=_host_ram_bytes())
    if address is not None:
        import ray

        from placement.ray_inventory import inventory_from_ray

        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        try:
            return inventory_from_ray(gpu_memory_bytes=gpu_memory_bytes)
        finally:
            ray.shutdown()
    from placement.ray_inventory import local_inventory

    return local_inventory()


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="model_configs.yaml")],
    gpus: Annotated[
        str | None, typer.Option(help="Declared GPUs: 2x24GB, 24GB,48GB or none. Default: this machine's GPUs.")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Plan for a running Ray cluster (e.g. auto).")] = None,
    gpu_memory: Annotated[
        str | None, typer.Option(help="Memory of declared GPUs that cannot be measured (Ray nodes without NVML).")
    ] = None,
    rules: Annotated[Path | None, typer.Option(help="Size rules YAML (default: the shipped rules).")] = None,
    margin: Annotated[
        float, typer.Option(help="Share of each GPU kept free.", min=0.0, max=0.9)
    ] = DEFAULT_SAFETY_MARGIN,
    cuda_context: Annotated[str, typer.Option(help="Memory a CUDA context takes per GPU.")] = "512MiB",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    per_gpu: Annotated[
        bool, typer.Option("--per-gpu", help="Plan as if every GPU were its own Ray node (the per-GPU mode).")
    ] = False,
    add: Annotated[
        str | None,
        typer.Option(
            help="One more model for the running cluster (with --address): MODEL, ROLE=MODEL, or a one-role "
            "YAML entry '{role: {model: ..., ...}}'. Answers whether it fits now, where, and whether any "
            "running model moves; deploys nothing."
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(help="Measured figures (`calibrate`); default $RAYFIT_CALIBRATION or ~/.cache/rayfit/…"),
    ] = None,
    measured: Annotated[
        bool, typer.Option("--measured/--estimated", help="Use measured figures where stored, or estimates only.")
    ] = True,
) -> None:
    """Plan where each model of CONFIG runs, before anything loads."""
    console = Console(stderr=as_json)
    try:
        configs = load_model_configs(config)
        measurements = _measurements(calibration) if measured else {}
        addition = _parse_addition(add) if add is not None else None
        size_rules = load_rules(rules)
        reserve = Reserve(cuda_context_bytes=parse_size(cuda_context), safety_margin=margin)
        inventory = _inventory(gpus, address, gpu_memory)
        if per_gpu and not inventory.per_gpu_nodes:
            inventory = inventory.as_gpu_nodes()
    except (ConfigError, InventoryError, ValueError) as exc:
        raise _fail(console, str(exc), EXIT_BAD_INPUT) from exc

    from placement.calibration import calibrated
    from placement.demo_models import resolve_demo_models
    from placement.planner import make_plan
    from placement.sizing import SizingError, estimate_memory

    if addition is not None:
        _answer_addition(console, configs.models, addition, inventory, size_rules, reserve, as_json)
        return
    try:
        models = resolve_demo_models(configs.models)
        estimates = {role: estimate_memory(spec) for role, spec in models.items()}
    except (SizingError, FileNotFoundError) as exc:
        raise _fail(console, f"{config}: {exc}", EXIT_BAD_INPUT) from exc
    # Where a replica of the same model, context and device kind was measured, its peak (placement.calibration).
    estimates = calibrated(configs.models, estimates, inventory, measurements)
    try:
        result = make_plan(models, inventory, rules=size_rules, reserve=reserve, estimates=estimates)
    except PlanError as exc:
        from placement.advice import advise

        # What would make it fit: each change planned again with every model (placement.advice).
        failed = tuple(sorted(u.role for u in exc.unplaced))
        advice = advise(
            models,
            inventory,
            rules=size_rules,
            reserve=reserve,
            estimates=estimates,
            estimate=estimate_memory,
            failed=failed,
        )
        if as_json:
            payload = {"error": str(exc), "unplaced": [u.__dict__ for u in exc.unplaced], **advice.as_dict()}
            print(json.dumps(payload, indent=2))
            raise _fail(console, f"{exc}\n{advice.describe()}", EXIT_INFEASIBLE) from exc
        failure = _fail(console, str(exc), EXIT_INFEASIBLE)
        print_advice(advice, console)
        raise failure from exc
    if as_json:
        print(json.dumps(plan_to_dict(result), indent=2))
    else:
        print_plan(result, console)


def _measurements(path: Path | None) -> dict[CalibrationKey, Measurement]:
    from placement.calibration import default_path, load_measurements

    return load_measurements(path or default_path())


def _parse_addition(text: str) -> tuple[str, ModelSpec]:
    from placement.add_model import parse_addition

    return parse_addition(text)


def _answer_addition(
    console: Console,
    written: dict[str, ModelSpec],
    addition: tuple[str, ModelSpec],
    inventory: Inventory,
    size_rules: SizeRules,
    reserve: Reserve,
    as_json: bool,
) -> None:
    """`plan --add`: print the answer and exit 0 (fits, nothing moves), 1 (no room) or 3 (moves)."""
    from placement.add_model import check_addition
    from placement.demo_models import resolve_demo_model
    from placement.sizing import SizingError, estimate_memory

    role, spec = addition
    try:
        answer = check_addition(
            written,
            role,
            spec,
            inventory,
            resolve=resolve_demo_model,
            estimate=estimate_memory,
            rules=size_rules,
            reserve=reserve,
            # The running app was planned from estimates (deployments.app): so are both plans here.
            measurements={},
        )
    except (SizingError, FileNotFoundError, ValueError) as exc:
        raise _fail(console, f"--add {spec.model}: {exc}", EXIT_BAD_INPUT) from exc
    except PlanError as exc:
        raise _fail(console, f"the running config does not fit this cluster now: {exc}", EXIT_INFEASIBLE) from exc
    if as_json:
        print(json.dumps(answer.as_dict(), indent=2))
    else:
        console.print(answer.describe(), highlight=False, markup=False)
        for note in answer.notes:
            console.print(f"note: {note}", highlight=False, markup=False)
    if answer.verdict != "fits":
        raise typer.Exit(EXIT_INFEASIBLE if answer.verdict == "no_room" else EXIT_MOVES)


@app.command("ray-start-args")
def ray_start_args_command(
    gpus: Annotated[int | None, typer.Option(help="GPU count (default: this machine's GPUs).", min=0)] = None,
    label: Annotated[list[str] | None, typer.Option(help="Node label key=value (repeatable).")] = None,
    head: Annotated[
        bool, typer.Option("--head/--worker", help="Head node, or a worker (add --address=<head> yourself).")
    ] = True,
    per_gpu: Annotated[
        bool, typer.Option("--per-gpu", help="Print one `ray start` line per GPU (Ray accounts for each GPU).")
    ] = False,
    address: Annotated[str, typer.Option(help="--per-gpu: the head's address the GPU nodes join.")] = "127.0.0.1:6379",
    host: Annotated[
        str | None, typer.Option(help="--per-gpu: this box's name in the labels (default: hostname).")
    ] = None,
    group: Annotated[
        list[str] | None, typer.Option(help="--per-gpu: GPUs one node owns together, for a split model: 0,1.")
    ] = None,
    gpu_memory: Annotated[
        str | None, typer.Option(help="--per-gpu with --gpus: each declared GPU's memory (e.g. 24GB).")
    ] = None,
) -> None:
    """Print the `ray start` arguments that declare this node's GPUs and per-GPU resources.

    With --per-gpu: the shell lines that start this box as one Ray node per GPU (plus a GPU-less head
    unless --worker), each raylet seeing only its GPU and labelled with it (placement.gpu_nodes)."""
    from placement.ray_options import ray_start_args

    console = Console(stderr=True)
    if per_gpu:
        try:
            for line in _per_gpu_lines(gpus, gpu_memory, host, address, group or [], head):
                print(line)
        except ValueError as exc:
            raise _fail(console, str(exc), EXIT_BAD_INPUT) from exc
        return
    if gpus is None:
        from placement.ray_inventory import local_inventory

        gpus = local_inventory().gpu_count
    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _fail(console, f"label {item!r} must look like key=value", EXIT_BAD_INPUT)
        labels[key] = value
    print(" ".join(ray_start_args(gpus, node_labels=labels or None, head=head)))


def _per_gpu_lines(
    count: int | None, gpu_memory: str | None, host: str | None, address: str, groups: list[str], head: bool
) -> list[str]:
    """`ray start` lines for one node per GPU of this box (measured GPUs, or `count` declared ones), each
    with its share of the machine (placement.box_start)."""
    from placement.box_start_cli import per_gpu_lines

    return per_gpu_lines(count, gpu_memory, host, address, groups, head)


@app.command()
def report(
    url: Annotated[
        str, typer.Option(help="The running rayfit app (its /v1/placement is read).")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(envvar="RAYFIT_API_KEY", help="Bearer key, when the app requires one.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the app.", min=1)] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Where every model runs vs the plan, and what each GPU holds. Exit 1 when a model is not
    where the plan put it (or not running) or uses more than its budget; 2 when the app cannot be read."""
    import httpx

    from placement.report import build_report
    from placement.report_render import print_report, report_to_dict

    console = Console(stderr=as_json)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/placement"
    try:
        response = httpx.get(endpoint, headers=headers, timeout=timeout)
        response.raise_for_status()
        result = build_report(response.json())
    except (httpx.HTTPError, ValueError) as exc:
        raise _fail(console, f"cannot read {endpoint}: {exc}", EXIT_BAD_INPUT) from exc
    if as_json:
        print(json.dumps(report_to_dict(result), indent=2))
    else:
        print_report(result, console)
    if not result.ok:
        raise typer.Exit(EXIT_INFEASIBLE)


@app.command()
def calibrate(
    config: Annotated[Path, typer.Argument(help="model_configs.yaml the running app serves")],
    url: Annotated[
        str, typer.Option(help="The running rayfit app (its /v1/placement is read).")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(envvar="RAYFIT_API_KEY", help="Bearer key, when the app requires one.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option(help="Where to store them; default $RAYFIT_CALIBRATION or ~/.cache/rayfit/…")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the app.", min=1)] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was stored as JSON.")] = False,
) -> None:
    """Store what each running replica really held (weights, KV, peak) for later plans (placement.calibration).

    Run it after representative traffic: the peak counts from the replica's start, its largest request included."""
    import httpx

    from placement.calibration import CalibrationError, default_path, measurements_from_placement, save_measurements
    from placement.demo_models import resolve_demo_model
    from placement.sizing import SizingError, estimate_memory

    console = Console(stderr=as_json)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/placement"
    path = file or default_path()
    try:
        written = load_model_configs(config).models
        estimates = {role: estimate_memory(resolve_demo_model(spec)) for role, spec in written.items()}
        response = httpx.get(endpoint, headers=headers, timeout=timeout)
        response.raise_for_status()
        found, notes = measurements_from_placement(response.json(), written, estimates)
        stored = save_measurements(path, found) if found else {}
    except (ConfigError, SizingError, FileNotFoundError, CalibrationError) as exc:
        raise _fail(console, str(exc), EXIT_BAD_INPUT) from exc
    except (httpx.HTTPError, ValueError) as exc:
        raise _fail(console, f"cannot read {endpoint}: {exc}", EXIT_BAD_INPUT) from exc
    if as_json:
        print(json.dumps({"file": str(path), "stored": [m.as_dict() for m in found], "notes": notes}, indent=2))
    else:
        from placement.units import gib

        for m in found:
            console.print(
                f"{m.role}: {m.key.model} on {m.key.device_kind} at context {m.key.context_length}: peak "
                f"{gib(m.peak_bytes)} (weights {gib(m.weights_bytes)}, KV {gib(m.kv_bytes)}; planned "
                f"{gib(m.estimated_bytes)})",
                highlight=False,
                markup=False,
            )
        console.print(f"stored in {path} ({len(stored)} record(s))", highlight=False, markup=False)
    for note in notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    if not found:
        raise typer.Exit(EXIT_INFEASIBLE)


# The README's one command: this box as Ray nodes, per-GPU by default (placement.box_start_cli).
app.command("start-box")(start_box_command)


def main() -> None:
    app()
