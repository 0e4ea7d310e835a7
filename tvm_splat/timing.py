"""Timing helpers for benchmarks: median of repeats after warm-up (never used in tests)."""
from __future__ import annotations

import statistics
import time


def median_ms(fn, repeats: int = 20, warmup: int = 3, sync=None) -> float:
    """Median wall time of ``fn()`` in milliseconds; ``sync()`` (e.g. a device synchronise) is
    called before starting and after each call so asynchronous launches are timed fully."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cuda_median_ms(fn, repeats: int = 50, warmup: int = 5) -> float:
    """Median of CUDA-event timings of ``fn()`` on the current torch stream, in milliseconds."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
