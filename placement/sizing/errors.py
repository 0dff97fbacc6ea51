"""The one error sizing raises."""

from __future__ import annotations


class SizingError(ValueError):
    """No source could size a model; the message names the model and every source tried."""
