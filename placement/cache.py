"""Where rayfit keeps files it makes once and reuses: assembled demo GGUFs, GGUF conversions."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "RAYFIT_CACHE"


def rayfit_cache_dir() -> Path:
    """`$RAYFIT_CACHE`, else `~/.cache/rayfit` (read at call time, never at import)."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "rayfit"
