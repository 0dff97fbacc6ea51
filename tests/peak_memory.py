"""The most bytes torch holds at once during a call: what the memory-contract tests compare with the plan."""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_allocated(call: Callable[[], object]) -> int:
    """Most bytes torch held at once during `call` (CPU allocations seen by the profiler, in op order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    running = peak = 0
    for _, size in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
        running += size
        peak = max(peak, running)
    return peak
