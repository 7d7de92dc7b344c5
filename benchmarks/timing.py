"""Timing one callable on the device its tensors live on."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch


def _median_wall_ms(fn: Callable[[], object], device: torch.device, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench(fn: Callable[[], object], device: torch.device, runs: int | None = None
          ) -> tuple[float, float]:
    """(median ms, peak MiB above the memory held before the call).

    CUDA: ``triton.testing.do_bench`` after a warm-up, peak from the caching allocator. CPU: the
    median of a few wall-clock runs after one warm-up; peak memory is NaN because a process's
    peak RSS cannot be reset (``benchmarks.cpu_kernel`` measures it with a process per case).
    ``runs``: the median of that many wall-clock runs after the warm-up on any device, for calls
    of seconds (``do_bench`` would run such a call about eight times for one sample).
    """
    if device.type != "cuda":
        fn()
        return _median_wall_ms(fn, device, runs or 5), math.nan

    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    if runs is not None:
        return _median_wall_ms(fn, device, runs), peak
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"), peak
