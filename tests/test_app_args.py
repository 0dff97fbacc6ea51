"""The app's switches (deployments.app.AppArgs): read once where the app is built, a field over its
environment variable, and carried from there to every replica and its engine in their arguments.

The engine side runs for real on the tiny offline text model, in this process and in an engine process
of its own (deployments.engine.process: the switches travel in its Start message). The environment says
the opposite of the fields throughout, so an engine that read it would fail these tests. No Ray here:
`bind_app` only binds, and the tests build each engine from the arguments a replica would get.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fault_injection import WRAPPER, FaultyEngine

from deployments.app import CONTINUOUS_ENV, AppArgs, bind_app
from deployments.engine.generation import ModelFacts
from deployments.engine.host import ENGINE_WRAPPER_ENV, EngineOptions, build_engine
from deployments.engine.process import ENGINE_PROCESS_ENV, EngineProcess
from deployments.engine.verify import CPU_FALLBACK_ENV, PlacementMismatch
from placement.config import ModelSpec
from placement.plan import PlanEntry

ROLE = "tiny"
SWITCHES = ("engine_process", "continuous_batching", "allow_cpu_fallback", "engine_wrapper")
# A wrapper that cannot be imported: an engine that took it from the environment would fail to build.
NO_WRAPPER = "nowhere_at_all:nothing"


@pytest.fixture
def opposite_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every switch's environment variable set against what the tests' fields ask for."""
    monkeypatch.setenv(ENGINE_PROCESS_ENV, "0")
    monkeypatch.setenv(CONTINUOUS_ENV, "0")
    monkeypatch.setenv(CPU_FALLBACK_ENV, "0")
    monkeypatch.setenv(ENGINE_WRAPPER_ENV, NO_WRAPPER)


def _switches(args: AppArgs) -> tuple[Any, ...]:
    return tuple(getattr(args, name) for name in SWITCHES)


def test_unset_switches_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENGINE_PROCESS_ENV, CONTINUOUS_ENV, CPU_FALLBACK_ENV, ENGINE_WRAPPER_ENV):
        monkeypatch.delenv(name, raising=False)
    # Nothing set: production's values (each model decides how its engine runs and batches).
    assert _switches(AppArgs(model_config="m.yaml")) == (None, True, False, None)
    monkeypatch.setenv(ENGINE_PROCESS_ENV, "1")
    monkeypatch.setenv(CONTINUOUS_ENV, "0")
    monkeypatch.setenv(CPU_FALLBACK_ENV, "1")
    monkeypatch.setenv(ENGINE_WRAPPER_ENV, WRAPPER)
    assert _switches(AppArgs(model_config="m.yaml")) == (True, False, True, WRAPPER)
    # As before: only "1" turns a flag on, only "0" turns continuous batching off.
    monkeypatch.setenv(ENGINE_PROCESS_ENV, "yes")
    monkeypatch.setenv(CONTINUOUS_ENV, "1")
    monkeypatch.setenv(CPU_FALLBACK_ENV, "true")
    assert _switches(AppArgs(model_config="m.yaml"))[:3] == (False, True, False)


@pytest.mark.usefixtures("opposite_env")
def test_a_field_overrides_the_environment() -> None:
    # As the serve YAML's `args` give them.
    fields = {"engine_process": True, "continuous_batching": True, "allow_cpu_fallback": True}
    args = AppArgs.model_validate({"model_config": "m.yaml", **fields, "engine_wrapper": WRAPPER})
    assert _switches(args) == (True, True, True, WRAPPER)
    assert args.engine_options == EngineOptions(allow_cpu_fallback=True, wrapper=WRAPPER)
    # A field given as null is the field's own value too, not the environment's.
    assert AppArgs(model_config="m.yaml", engine_process=None, engine_wrapper=None).engine_process is None
    assert AppArgs(model_config="m.yaml", engine_wrapper=None).engine_wrapper is None


def _config(tmp_path: Path, model_dir: Path) -> Path:
    path = tmp_path / "model_configs.yaml"
    path.write_text(f"{ROLE}:\n  model: {model_dir}\n  dtype: float32\n  engine_process: true\n")
    return path


def _replica_arguments(args: AppArgs) -> tuple[str, ModelSpec, PlanEntry, EngineOptions]:
    """The arguments `bind_app` binds the role's ModelServer with (read off Serve's bound application)."""
    ingress = bind_app(args)._bound_deployment  # Serve keeps a bound deployment's arguments there
    role, spec, entry, options = ingress.init_args[0][ROLE]._bound_deployment.init_args
    assert isinstance(entry, PlanEntry) and isinstance(options, EngineOptions)
    return role, ModelSpec.model_validate(spec), entry, options


def _build(spec: ModelSpec, entry: PlanEntry, options: EngineOptions) -> tuple[Any, ModelFacts]:
    """What ModelServer does with its arguments: the engine in this process or in one of its own."""
    if spec.engine_process:
        engine = EngineProcess(spec, entry, ROLE, options)
        return engine, engine.facts
    return build_engine(spec, entry, options)


@pytest.mark.usefixtures("opposite_env")
@pytest.mark.parametrize("engine_process", [True, False], ids=["engine-process", "in-replica"])
def test_the_switches_reach_each_replica_and_its_engine(
    engine_process: bool, tmp_path: Path, tiny_text_model_dir: Path
) -> None:
    """The model's config says `engine_process: true`; the app's field decides, the environment does not."""
    config = _config(tmp_path, tiny_text_model_dir)
    args = AppArgs(
        model_config=str(config),
        gpus="none",
        engine_process=engine_process,
        continuous_batching=True,
        engine_wrapper=WRAPPER,
    )
    role, spec, entry, options = _replica_arguments(args)
    assert role == ROLE
    assert (spec.engine_process, spec.continuous_batching) == (engine_process, True)
    assert entry.replica is not None and entry.replica.continuous  # the plan budgets the app's choice
    assert options == EngineOptions(allow_cpu_fallback=False, wrapper=WRAPPER)
    engine, _ = _build(spec, entry, options)
    try:
        assert isinstance(engine, EngineProcess) == engine_process
        # The fault-injection wrapper's own report keys: the field's wrapper is the one built in.
        assert {"held", "gated"} <= engine.load_report().keys()
        if not engine_process:
            assert isinstance(engine, FaultyEngine)
    finally:
        engine.close()


@pytest.mark.cpu_only(reason="a GPU plan falls back to CPU only where CUDA is missing")
@pytest.mark.usefixtures("opposite_env")
@pytest.mark.parametrize("engine_process", [True, False], ids=["engine-process", "in-replica"])
def test_the_cpu_fallback_reaches_the_engine_from_the_field_alone(
    engine_process: bool, tmp_path: Path, tiny_text_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU plan on this CUDA-less machine: the engine loads on CPU when the app's field allows it
    (the environment says no), and refuses when the field says no (the environment says yes)."""
    config = _config(tmp_path, tiny_text_model_dir)
    args = AppArgs(
        model_config=str(config),
        gpus="1x24GB",
        engine_process=engine_process,
        allow_cpu_fallback=True,
        engine_wrapper=None,
    )
    _, spec, entry, options = _replica_arguments(args)
    assert entry.device == "gpu" and options.allow_cpu_fallback
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", entry.cuda_visible_devices)  # Ray's pin, as the replica has it
    engine, facts = _build(spec, entry, options)
    try:
        assert facts.cpu_fallback and facts.device == "cpu"
        assert engine.memory_report()["device"] == "cpu"
    finally:
        engine.close()

    monkeypatch.setenv(CPU_FALLBACK_ENV, "1")
    args = AppArgs(
        model_config=str(config),
        gpus="1x24GB",
        engine_process=engine_process,
        allow_cpu_fallback=False,
        engine_wrapper=None,
    )
    _, spec, entry, options = _replica_arguments(args)
    assert not options.allow_cpu_fallback
    with pytest.raises(PlacementMismatch, match="CUDA is not available"):
        _build(spec, entry, options)
