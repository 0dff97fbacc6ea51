"""Bytes a replica needs to answer log-probability requests (the engine allocates exactly these).

What is held (deployments.engine.logprobs):

- **prompt scoring** (completions `echo` + `logprobs`): the prompt runs through
  the model in chunks of `chunk` positions; per chunk the model's logits
  (model dtype, and a second copy while a final soft-cap is applied), their
  fp32 copy and their fp32 log-softmax: `chunk × vocab × (2 × dtype + 8)`
  bytes. The chunk is the largest that fits PROMPT_WORKSPACE_BYTES. Its KV
  cache sits in a side slot (placement.sizing.kv_budget), not here.
- **generated tokens**: each decoding row that asks for logprobs keeps the
  log-softmax of its last step (fp32, `vocab × 4`) until its token is known,
  plus the next step's while it is computed: `sequences × vocab × 8` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

# What one chunk of prompt scoring may hold; the chunk (positions per forward pass) follows from it.
# 64 MiB: a Gemma 3 vocabulary (262,144) in bf16 scores 21 positions per pass; SmolLM2 (49,152) 113.
PROMPT_WORKSPACE_BYTES = 64 * 2**20
# Positions per prompt-scoring pass at most (more gains little: a pass of this many tokens is compute-bound).
MAX_PROMPT_CHUNK = 256
# fp32 bytes per vocabulary entry and position: the logits' fp32 copy plus their log-softmax.
_FP32_COPIES_BYTES = 8
# With a vocabulary this large assumed when the model's is unknown (the largest in common use: Gemma 3).
ASSUMED_VOCAB_SIZE = 262_144


@dataclass(frozen=True)
class LogprobWorkspace:
    vocab_size: int
    dtype_bytes: int
    sequences: int  # rows that may decode with logprobs at once (the pool's batch + side slots)

    @property
    def bytes_per_position(self) -> int:
        return self.vocab_size * (2 * self.dtype_bytes + _FP32_COPIES_BYTES)

    @property
    def chunk(self) -> int:
        """Prompt positions scored per forward pass."""
        return max(1, min(MAX_PROMPT_CHUNK, PROMPT_WORKSPACE_BYTES // self.bytes_per_position))

    @property
    def prompt_bytes(self) -> int:
        return self.chunk * self.bytes_per_position

    @property
    def decode_bytes(self) -> int:
        return self.sequences * self.vocab_size * _FP32_COPIES_BYTES

    @property
    def total_bytes(self) -> int:
        return self.prompt_bytes + self.decode_bytes

    def describe(self) -> str:
        return (
            f"logprob workspace {self.total_bytes / 2**20:.1f} MiB: prompt chunk {self.chunk} positions × "
            f"vocab {self.vocab_size} × {2 * self.dtype_bytes + _FP32_COPIES_BYTES} B + {self.sequences} "
            f"sequences × vocab × {_FP32_COPIES_BYTES} B"
        )
