"""`python -m deployments.deploy serve_config.yaml`: deploy (or redeploy) the serve config so that an
edited model_configs.yaml takes effect, restarting only the roles whose entries changed.

Why a command of rayfit's own and not `serve deploy` (read in Ray 2.60's serve/_private, and measured):
Serve's declarative path (`serve deploy`, `serve run serve_config.yaml`, KubeRay) rebuilds an app only
when its config's `args` (or import path, runtime env) change, so a file edited behind an unchanged
path is never read; and when it does rebuild, every deployment of the app gets one code version, a hash
of those args (`build_serve_application` passes it to every deployment), so any change restarts every
replica. Putting the file's content or a digest into `args` would make the edit seen, and still restart
every model.

This command takes the same file, runs each app's builder here (which reads model_configs.yaml afresh
and plans on the running cluster), and submits the app as `serve.run` does. On that path each
deployment keeps the version rayfit gives it, a hash of its own bind arguments (deployments.versions):
Serve restarts a role's replicas only when its entry or its placement changed, and the ingress, which
lists every role; the other replicas keep running. It is what `serve run deployments.app:build_app
model_config=...` does, with the serve config's app name, route prefix, args and HTTP options.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

# The fields of an app this command honours; the others are refused by name, never silently dropped
# (per-deployment overrides, for one: `serve.run` takes none, and a model's options belong in its entry).
APP_FIELDS = frozenset({"name", "route_prefix", "import_path", "args"})
CONFIG_FIELDS = frozenset({"applications", "proxy_location", "http_options", "grpc_options", "controller_options"})


class DeployConfigError(ValueError):
    """The serve config cannot be read, or asks for what this command cannot do."""


def load_serve_config(path: str | Path) -> ServeDeploySchema:
    """The serve config at `path`, validated by Serve's own schema, refusing the fields this command ignores."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DeployConfigError(f"{path}: cannot read the serve config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise DeployConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        config = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise DeployConfigError(f"{path}: not a Serve config: {exc}") from exc
    problems = [f"`{name}`" for name in sorted(config.model_fields_set - CONFIG_FIELDS)]
    for app in config.applications:
        problems += [f"`{app.name}.{name}`" for name in sorted(app.model_fields_set - APP_FIELDS)]
    if problems:
        raise DeployConfigError(
            f"{path}: {', '.join(problems)} cannot be applied by this command (it deploys as `serve.run` does); "
            f"use only {', '.join(sorted(APP_FIELDS))} per application, or deploy this file with `serve deploy`"
        )
    return config


def deploy_app(app: ServeApplicationSchema) -> None:
    """Build `app` here (its builder reads its files now) and submit it; returns once it is RUNNING."""
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    serve.run(built, name=app.name, route_prefix=app.route_prefix, blocking=False)


def deploy(config: ServeDeploySchema) -> None:
    """Start Serve with the config's options if it is not running (as `serve run` does), then deploy each app.

    A running Serve keeps its HTTP options (Serve logs a warning where the config differs)."""
    from ray.serve._private.api import serve_start

    serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=config.grpc_options.model_dump(),
        controller_options=config.controller_options,
    )
    for app in config.applications:
        deploy_app(app)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.deploy",
        description="Deploy a serve config; an edited model_configs.yaml restarts only the roles it changes.",
    )
    parser.add_argument("config", help="the serve config, e.g. serve_config.yaml")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or "auto",
        help="the Ray cluster (default: $RAY_ADDRESS, else auto: the cluster started on this machine)",
    )
    options = parser.parse_args(argv)

    from pydantic import ValidationError as ArgsError

    from placement.config import ConfigError
    from placement.plan import PlanError

    try:
        config = load_serve_config(options.config)
    except DeployConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    ray.init(address=options.address, namespace=SERVE_NAMESPACE, log_to_driver=False)
    try:
        deploy(config)
    except (ArgsError, ConfigError, PlanError) as exc:  # the args, models or plan: its own message, nothing deployed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = ", ".join(app.name for app in config.applications)
    print(f"deployed {names} from {options.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
