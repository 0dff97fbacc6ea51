"""Byte sizes: parse "24GB"/"24GiB" and print GiB, in one place."""

from __future__ import annotations

import re

GIB = 1024**3
MIB = 1024**2

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "24GB", "24GiB", "24", "512MiB".

    GPU makers' "24GB" means the card's GiB figure (an RTX 3090 reports 24 GiB),
    so GB and GiB are both read as GiB; a bare number is GiB too.
    """
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot read memory size {text!r}: use a number with GB/GiB/MB, e.g. 24GB")
    value, unit = float(match.group(1)), (match.group(2) or "gib").lower()
    scale = MIB if unit.startswith("m") else GIB
    return int(value * scale)


def gib(num_bytes: int | float) -> str:
    """Human GiB with two decimals: '15.23 GiB'."""
    return f"{num_bytes / GIB:.2f} GiB"
