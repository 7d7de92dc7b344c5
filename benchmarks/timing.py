"""Timing one callable on the device its tensors live on."""

from __future__ import annotations

import math
import re
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


# Where a step's device time goes, by the kernel names each source gives its kernels, first
# match wins: ditflow's Triton kernels, PyTorch's SDPA (cuDNN's, flash, memory-efficient: the
# blocks ditflow leaves alone, the VAE's attention), convolutions (cuDNN's implicit GEMMs),
# cuBLAS / CUTLASS matrix products, the kernels torch.compile's Inductor generates, and the rest
# (eager elementwise work, reductions, copies).
_KERNEL_CLASSES = (
    ("ditflow attention", re.compile(r"^_(fwd|bwd)_\w*kernel|flow_attention")),  # GPU, CPU
    ("SDPA", re.compile(r"sdpa|fmha|flash|attention", re.I)),
    ("convolution", re.compile(r"conv|implicit|fprop|dgrad|wgrad", re.I)),
    ("matrix products", re.compile(r"gemm|nvjet|xmma|cutlass|aten::(mm|addmm|bmm)$", re.I)),
    ("compiled (Inductor)", re.compile(r"^triton_")),
)


def _kernel_class(name: str) -> str:
    return next((label for label, pattern in _KERNEL_CLASSES if pattern.search(name)), "other")


def device_time_profile(fn: Callable[[], object], device: torch.device, top: int = 12,
                        per: int = 1) -> dict:
    """One call of ``fn`` under the profiler: its device kernels' total time, that time by
    kernel class, and the ``top`` kernels by time (ms; on a CPU, aten ops' self time); all
    divided by ``per`` (``fn`` runs that many steps: times and calls per step)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = [(e.key, e.count / per,
               (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / per)
              for e in prof.key_averages()
              if e.device_type == (DeviceType.CUDA if cuda else DeviceType.CPU)]
    events = sorted((e for e in events if e[2] > 0), key=lambda e: -e[2])
    by_class: dict[str, float] = {}
    for name, _, ms in events:
        by_class[_kernel_class(name)] = by_class.get(_kernel_class(name), 0.0) + ms
    return dict(total_ms=sum(ms for *_, ms in events),
                by_class=dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
                top=[dict(name=name[:120], calls=calls, ms=ms) for name, calls, ms in events[:top]])
