"""Find a model's files on this machine: a local path, or the Hugging Face cache.

Reading never touches the network: the cache is read with `local_files_only=True`.
Only `fetch_config_from_hub` may download, one small config.json, and not when
`HF_HUB_OFFLINE` is set.
"""

from __future__ import annotations

import functools
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from huggingface_hub import constants, hf_hub_download, is_offline_mode, snapshot_download, try_to_load_from_cache

from placement.config import ModelSpec

_SAFETENSORS_INDEX = "model.safetensors.index.json"
# Long enough for a real connection across the world, short enough not to stall a plan.
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class LocalFiles:
    """What exists locally for one model; any part may be missing."""

    origin: str  # "local directory <path>", "HF cache <path>", "local file <path>"
    config: dict[str, Any] | None  # config.json, parsed
    safetensors: tuple[Path, ...]  # the weight files, all of them present
    gguf: Path | None
    missing_shards: tuple[str, ...] = ()  # listed in the index but not on disk (a partial download)


def find_local_files(spec: ModelSpec, *, cache_dir: Path | None = None) -> tuple[LocalFiles | None, str]:
    """The model's local files, or None and a line saying where it looked.

    `cache_dir`: the Hugging Face hub cache to read (default: huggingface_hub's).
    """
    path = Path(spec.model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return LocalFiles(f"local file {path}", None, (), path), ""
    if path.is_dir():
        return _from_dir(path, spec.gguf_file, f"local directory {path}"), ""
    snapshot = _cached_snapshot(spec, cache_dir)
    if snapshot is not None:
        gguf = _cached_gguf(spec, cache_dir) if spec.gguf_file else None
        files = _from_dir(snapshot, None, f"HF cache {snapshot}")
        return LocalFiles(files.origin, files.config, files.safetensors, gguf, files.missing_shards), ""
    return None, f"no local directory {spec.model!r} and nothing for it in the Hugging Face cache"


def fetch_config_from_hub(spec: ModelSpec, *, cache_dir: Path | None = None) -> bool:
    """Download the model's config.json (a few KB) into the HF cache; True when it arrived.

    Weights are never fetched here. Offline (`HF_HUB_OFFLINE=1`), a local path,
    or any hub error simply return False: the caller falls back to other sources.
    """
    if is_offline_mode() or Path(spec.model).expanduser().exists() or spec.model.count("/") != 1:
        return False
    if not _hub_reachable():
        return False
    try:
        hf_hub_download(spec.model, "config.json", revision=spec.revision, cache_dir=cache_dir, etag_timeout=5)
    except Exception:  # no network, no such repo, gated: all mean "not from the hub"
        return False
    return True


@functools.cache
def _hub_reachable() -> bool:
    """One quick TCP connect to the hub, once per process: without it a machine
    with no network waits through huggingface_hub's retries for every model."""
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _cached_snapshot(spec: ModelSpec, cache_dir: Path | None) -> Path | None:
    try:
        return Path(snapshot_download(spec.model, revision=spec.revision, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id: both mean "not here"
        return None


def _cached_gguf(spec: ModelSpec, cache_dir: Path | None) -> Path | None:
    assert spec.gguf_file is not None
    try:
        found = try_to_load_from_cache(spec.model, spec.gguf_file, cache_dir=cache_dir, revision=spec.revision)
    except Exception:  # an invalid repo id is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None


def _from_dir(directory: Path, gguf_file: str | None, origin: str) -> LocalFiles:
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    gguf = None
    if gguf_file:
        candidate = directory / gguf_file
        gguf = candidate if candidate.is_file() else None
    shards, missing = _safetensors_files(directory)
    return LocalFiles(origin, config, shards, gguf, missing)


def _safetensors_files(directory: Path) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    """The weight files: those the index names, else model.safetensors, else every *.safetensors.

    The index wins so a repo that also ships a consolidated copy is not counted twice.
    """
    index = directory / _SAFETENSORS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        present = tuple(directory / n for n in names if (directory / n).is_file())
        missing = tuple(n for n in names if not (directory / n).is_file())
        return present, missing
    single = directory / "model.safetensors"
    if single.is_file():
        return (single,), ()
    return tuple(sorted(directory.glob("*.safetensors"))), ()
