"""The offline demo, served for a benchmark the way `python -m deployments.demo` serves it.

Shared by the benchmarks that talk to the demo over HTTP (bench_guidellm,
bench_structured) and by those that need the demo's converted SmolLM2
directory (its tokenizer, or the peer server's model).
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_SERVE_CONFIG = REPO_ROOT / "examples" / "demo" / "serve_config.yaml"


def smollm2_dir() -> Path:
    """The converted SmolLM2 directory the demo loads (converted on first use; tokenizer files included)."""
    from deployments.engine.loading import convert_gguf
    from placement.demo_models import smollm2_gguf

    directory, name = smollm2_gguf()
    converted, _ = convert_gguf(directory / name)
    return converted


def start_demo() -> str:
    """The offline demo on a local Ray, on a free port; its base URL."""
    from deployments.demo import serve_config, start_ray

    start_ray(verbose=False)
    base_url, _ = serve_config(DEMO_SERVE_CONFIG, 0)
    return base_url


def stop_demo() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
