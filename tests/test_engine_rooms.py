"""deployments/ in three rooms, imports only downward: Serve (deployments/*.py) → OpenAI
(deployments/openai_api) → engine (deployments/engine) → placement. And the engine's face
(deployments.engine.protocol) kept by both engines: in-process and the process proxy."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from deployments.engine.core import Engine
from deployments.engine.process import EngineProcess
from deployments.engine.protocol import EngineProtocol

ROOT = Path(__file__).resolve().parent.parent
# Lower rank: lower room. A module may import its own room or any room below.
RANKS = {"placement": 0, "engine": 1, "openai_api": 2, "serve": 3}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "placement":
        return "placement"
    if parts[0] != "deployments":
        return None
    if len(parts) > 1 and parts[1] in ("engine", "openai_api"):
        return parts[1]
    return "serve"


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from deployments import x`
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def upward_imports() -> list[str]:
    """Every import of a higher room, as 'module -> imported'."""
    found = []
    for path in sorted([*(ROOT / "deployments").rglob("*.py"), *(ROOT / "placement").rglob("*.py")]):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        here = room_of(module)
        for imported in sorted(imports_of(path)):
            there = room_of(imported)
            if there is not None and here is not None and RANKS[there] > RANKS[here]:
                found.append(f"{module} ({here}) -> {imported} ({there})")
    return found


def test_imports_only_go_downward() -> None:
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    # The same rule on a module that breaks it: the engine importing the ingress.
    module = tmp_path / "bad.py"
    module.write_text("from deployments.ingress import Ingress\nimport deployments.openai_api.protocol\n")
    upward = [name for name in sorted(imports_of(module)) if RANKS[room_of(name) or "placement"] > RANKS["engine"]]
    assert upward == ["deployments.ingress", "deployments.ingress.Ingress", "deployments.openai_api.protocol"]


def _protocol_members() -> list[str]:
    return [name for name in vars(EngineProtocol) if not name.startswith("_")]


@pytest.mark.parametrize("implementation", [Engine, EngineProcess], ids=["in-process", "process proxy"])
def test_both_engines_keep_the_protocol(implementation: type) -> None:
    members = _protocol_members()
    assert {"generate_async", "open_stream", "generate_batch", "kv_report", "last_progress", "close"} <= set(members)
    for name in members:
        declared = inspect.getattr_static(EngineProtocol, name)
        kept = inspect.getattr_static(implementation, name, None)
        assert kept is not None, f"{implementation.__name__} has no {name}"
        if isinstance(declared, property):
            assert isinstance(kept, property), f"{implementation.__name__}.{name} is not a property"
            continue
        assert inspect.iscoroutinefunction(kept) == inspect.iscoroutinefunction(declared), name
        wanted = list(inspect.signature(declared).parameters.values())
        given = list(inspect.signature(kept).parameters.values())
        # The protocol's parameters first, by name and default; any further one has a default.
        assert [(p.name, p.default) for p in given[: len(wanted)]] == [(p.name, p.default) for p in wanted], name
        assert all(p.default is not inspect.Parameter.empty for p in given[len(wanted) :]), name
