"""A parameter count read from a model's name: the last resort.

"gemma-3-27b-it" → 27e9, "Qwen2.5-1.5B" → 1.5e9, "SmolLM2-135M" → 135e6,
"Mixtral-8x7B" → 56e9. A size is a number directly followed by b/m and then a
separator or the end, and preceded by a separator or the start: "bnb-4bit"
(b followed by "it") and the version in "medgemma-1.5-4b" (1.5 followed by "-")
are not sizes; "A3B" in "Qwen3-30B-A3B" (active parameters) is not either.
"""

from __future__ import annotations

import re

_SIZE = re.compile(
    r"(?:^|(?<=[-_/.\s]))"  # start, or after a separator
    r"(?:(?P<experts>\d+)x)?"  # mixture of experts: 8x7b
    r"(?P<number>\d+(?:\.\d+)?)(?P<unit>[bm])"
    r"(?=$|[-_/.\s])",  # followed by a separator or the end
    re.IGNORECASE,
)
_SCALE = {"b": 1_000_000_000, "m": 1_000_000}


def guess_params_from_name(name: str) -> int | None:
    """The largest size mentioned in `name`, in parameters; None when there is none."""
    sizes = []
    for match in _SIZE.finditer(name):
        params = float(match.group("number")) * _SCALE[match.group("unit").lower()]
        if match.group("experts"):
            params *= int(match.group("experts"))  # upper bound: experts share attention weights
        sizes.append(int(params))
    return max(sizes) if sizes else None
