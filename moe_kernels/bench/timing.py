"""Timing for the benchmark: the measured peaks and the per-cell timer.

GPU: CUDA events around a batch of calls that cycle through rotating input/weight sets
(so the L2 cannot serve the next call from the last one's data); the median over the
samples, each sample being the batch time divided by its calls. CPU: ``perf_counter``
around single calls, after warm-up, median over the samples.

Peaks: a big matmul in the run's dtype (8192³ on a GPU, 1024³ on the CPU) and a big
device copy (counted as read + write), each the *best* of a few repeats: the roofline
is what the machine can do, not what it usually does.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .roofline import Roofline

__all__ = ["Timing", "measure_peaks", "time_calls", "cache_bytes", "available_memory_bytes", "memory_budget_bytes",
           "synchronize"]


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and min over ``samples`` samples."""

    median: float
    minimum: float
    samples: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(device: torch.device) -> int:
    """The last-level cache the rotation has to defeat: L2 on a GPU, the largest CPU
    cache listed in sysfs (32 MiB if unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                text = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def available_memory_bytes(device: torch.device) -> int:
    """Free device memory (GPU), or available RAM (CPU; 8 GiB if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def memory_budget_bytes(device: torch.device) -> int:
    """How much the rotation copies may take: 30% of free GPU memory; on the CPU 256 MiB
    (copying weights costs setup time there and the CPU is compute-bound anyway)."""
    if device.type == "cuda":
        return int(available_memory_bytes(device) * 0.3)
    return 256 << 20


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def measure_peaks(device: torch.device, dtype: torch.dtype, *, matmul_n: int | None = None,
                  copy_bytes: int | None = None, repeats: int | None = None) -> Roofline:
    """Peak matmul rate (in ``dtype``) and copy bandwidth of ``device``, measured now."""
    gpu = device.type == "cuda"
    n = matmul_n or (8192 if gpu else 1024)
    nbytes = copy_bytes or ((1 << 30) if gpu else (256 << 20))
    reps = repeats or (10 if gpu else 5)
    return Roofline(peak_flops=2.0 * n ** 3 / _matmul_seconds(n, device, dtype, reps),
                    peak_bytes=2.0 * (nbytes // 4) * 4 / _copy_seconds(nbytes // 4, device, reps))


def _matmul_seconds(n: int, device: torch.device, dtype: torch.dtype, reps: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    return _best_seconds(lambda: torch.mm(a, b), device, reps)


def _copy_seconds(numel: int, device: torch.device, reps: int) -> float:
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return _best_seconds(lambda: dst.copy_(src), device, reps)


def time_calls(calls: Sequence[Callable[[], object]], device: torch.device, *, warmup: int, repeats: int,
               budget_s: float) -> Timing:
    """Time ``calls`` (one per rotation set, used in turn). Stops sampling once
    ``budget_s`` is spent and at least ``min(3, repeats)`` samples exist (one sample
    when a single warm-up call already took a third of the budget)."""
    if not calls:
        raise ValueError("calls: expected at least one callable")
    k = 0

    def nxt() -> Callable[[], object]:
        nonlocal k
        fn = calls[k % len(calls)]
        k += 1
        return fn

    t_start = time.perf_counter()
    done = 0
    for _ in range(max(warmup, 1)):
        nxt()()
        synchronize(device)
        done += 1
        if time.perf_counter() - t_start > budget_s:  # a slow cell: one warm-up is enough
            break
    warm_s = (time.perf_counter() - t_start) / done
    samples: list[float] = []
    # Three samples for a median unless even one call eats the cell's budget.
    need = min(3, repeats) if 3 * warm_s <= budget_s else 1
    t_start = time.perf_counter()
    if device.type == "cuda":
        # Batch calls so that a sample is >= ~1 ms: event resolution is ~0.5 us and a
        # single decode-sized call is tens of microseconds.
        inner = int(min(100, max(1, math.ceil(1e-3 / max(warm_s, 1e-6)))))
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                nxt()()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)
            if len(samples) >= need and time.perf_counter() - t_start > budget_s:
                break
    else:
        for _ in range(repeats):
            fn = nxt()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
            if len(samples) >= need and time.perf_counter() - t_start > budget_s:
                break
    return Timing(statistics.median(samples), min(samples), len(samples))
