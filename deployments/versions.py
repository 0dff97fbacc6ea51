"""Deployment versions that change only when what a replica is built from changes.

How Ray Serve 2.60 decides to restart a replica on a redeploy (read in
ray/serve/_private/version.py, deployment_state.py, application_state.py and
measured on this machine with a two-deployment app, comparing replica pids):

- A replica is restarted when its deployment's version requires it:
  `DeploymentVersion.requires_actor_restart` compares the code version and the
  hashes of `ray_actor_options` and of the placement-group options. Bind (init)
  arguments are NOT compared: with an unchanged version and changed init
  arguments the replica kept running with its old arguments (measured).
  Deployment-config changes (max_ongoing_requests, health checks, ...) only
  reconfigure the running replica.
- `serve.run(app)` (Python, imperative) gives every deployment a RANDOM code
  version unless the deployment carries one (`_private/client.py`), so every
  `serve.run` restarts every replica, even of an identical app (measured: new
  pids after serving the same app twice).
- `serve deploy`, `serve run serve_config.yaml`, the REST API and KubeRay
  (declarative) give every deployment of an app one code version: a hash of
  the app's import_path, runtime_env and args (`get_app_code_version`).
  Redeploying an unchanged config is a no-op: `build_app` is not even called,
  so an edit to model_configs.yaml alone is NOT picked up (measured). Any
  change to `args` (the API key, say) rebuilds the app and restarts EVERY
  replica (measured: all pids new), whatever rayfit does; the stable plan
  (placement.planner) then puts each model back where it was, with the same
  options, instead of failing for lack of room or swapping GPUs.

So on the imperative path rayfit gives each deployment its own version, a hash
of rayfit's code and of that deployment's bind arguments (`versioned`). The
same config on the same cluster gives the same versions and, because the plan
is stable, the same `ray_actor_options`: Serve leaves every replica alone
(measured by tests/test_redeploy.py). Changing one model restarts that model
and the ingress (it holds every role's summary) only. Serve refuses
`Deployment.options(version=...)` unless `_internal=True` is passed (its own
flag); the declarative path ignores the version (it overrides it with the
app's code version). tests/test_redeploy.py proves the imperative behaviour
on the Ray in use, so a Ray upgrade that drops it fails there.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from ray.serve import Deployment

# The packages whose code a replica runs: a change to any of their files is a new version.
_CODE_ROOTS = ("deployments", "placement")
_CODE_SUFFIXES = (".py", ".yaml")


@functools.cache
def code_digest() -> str:
    """sha256 over rayfit's own source files (paths and bytes), computed once per process."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for package in _CODE_ROOTS:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in _CODE_SUFFIXES and path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """JSON-able form of bind arguments: dataclasses as dicts, anything else by its str()."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def version_of(*bind_args: Any) -> str:
    """A deployment version from rayfit's code and the deployment's bind arguments (16 hex digits)."""
    payload = json.dumps([code_digest(), _plain(list(bind_args))], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def versioned(deployment: Deployment, *bind_args: Any) -> Deployment:
    """`deployment` carrying `version_of(*bind_args)` (see the module docstring for why).

    A separate `.options` call: with `_internal=True` Serve does not record the
    options passed as user-configured, so only the version goes through it.
    """
    return deployment.options(version=version_of(*bind_args), _internal=True)
