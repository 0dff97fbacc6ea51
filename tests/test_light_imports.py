"""The processes that never run a model must not load torch or transformers.

The ingress replica routes HTTP: loading torch cost it ~3.5 s of start-up on
every deploy and ~300 MiB of memory. The placement CLI answers `--help`, a bad
config and `ray-start-args` without sizing any model: loading torch made each
take ~4.5 s. A replica whose engine runs in its own process only forwards
requests to it (deployments.engine.process): the child alone needs them. Checked
in a fresh interpreter, since this test process has long imported both.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")


@pytest.mark.parametrize(
    "module",
    [
        "deployments.ingress",
        "placement.cli",
        "deployments.engine.process",
        "deployments.model",
        "deployments.engine.rules",
    ],
)
def test_module_does_not_load_torch_or_transformers(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"{module} loads {done.stdout.strip()}"


def test_the_engine_process_compiles_nothing_when_it_starts() -> None:
    """The engine's own process imports what it runs, not torch's compiler back end: a module that calls
    torch.compile at import (llguidance.torch does) loads inductor, ~2 s of CPU on every replica start."""
    # The child's own module, then the engine core it builds (imported when the engine is built).
    imports = "import sys, deployments.engine.child, deployments.engine.core"
    code = f"{imports}; print('torch._inductor.compile_fx' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False", "importing the engine loads torch._inductor.compile_fx"
