"""Out of device memory during a request: free what it held, tell the caller to retry.

A CUDA OOM in one generation leaves the model's weights intact: only that
batch's activations and KV cache were lost. Releasing them (gc, then the
caching allocator's free blocks) lets the replica serve the next request, so
the replica stays up and the request gets a retryable 503, not a 500.
"""

from __future__ import annotations

import gc
import logging

import torch

from deployments.errors import GenerationOutOfMemory

logger = logging.getLogger("ray.serve")


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError is torch.OutOfMemoryError (also on CPU builds).
    return isinstance(exc, torch.OutOfMemoryError)


def release_memory() -> None:
    """Drop the failed batch's tensors and return cached blocks to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def recover(role: str, exc: BaseException) -> GenerationOutOfMemory:
    """Free memory after `exc` and return the error each request of the batch gets."""
    release_memory()
    logger.warning("%s: out of device memory during generation; memory released, replica stays up", role)
    return GenerationOutOfMemory(
        f"out of device memory while generating ({str(exc).splitlines()[0] if str(exc) else 'OOM'}); "
        "the memory was released: retry, or send a shorter prompt or a smaller max_tokens"
    )
