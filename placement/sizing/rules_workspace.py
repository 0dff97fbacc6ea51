"""Bytes the per-request logits rules need at a decode step (deployments.engine.row_logits).

A step's rules (grammar masks, penalties, logit bias, min_tokens / ignore_eos,
top-k, min-p) act on the scores of the rows that ask for them, in both
backends:

- a working copy of the batch's scores, and each grammar row's additive
  mask (0 / -inf), fp32: `rows × vocab × 4` bytes each, plus the mask's
  byte lookup (int64 indices, `rows × vocab` bytes) and llguidance's bitmask
  (`rows × vocab / 8`): together under `rows × vocab × 12` bytes;
- one row's rules at a time: its copy and up to four temporaries
  (repetition penalty, top-k, min-p, the masked copy): `vocab × 24` bytes.

Measured with torch's profiler on the demo's 49,152-token vocabulary
(tests/test_structured.py): 1, 4 and 8 rows with every rule held at most
`4 × rows × vocab + 9 × vocab` bytes, under what is stated here.
`rows` is every sequence that may decode at once (the pool's batch plus
the side slots), as for the logprob workspace. The grammar engine's own
state (compiled grammars, matchers) is host memory, not on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

_BYTES_PER_ROW_TOKEN = 12
_BYTES_PER_TOKEN = 24


@dataclass(frozen=True)
class RulesWorkspace:
    vocab_size: int
    sequences: int

    @property
    def total_bytes(self) -> int:
        return (self.sequences * _BYTES_PER_ROW_TOKEN + _BYTES_PER_TOKEN) * self.vocab_size

    def describe(self) -> str:
        return (
            f"logits rules {self.total_bytes / 2**20:.1f} MiB: ({self.sequences} sequences × "
            f"{_BYTES_PER_ROW_TOKEN} B + {_BYTES_PER_TOKEN} B) × vocab {self.vocab_size}"
        )
