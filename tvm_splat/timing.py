"""Timing helpers for benchmarks: median of repeats after warm-up (never used in tests).

Three views of one implementation: per-call latency (one call, one synchronisation:
:func:`cuda_median_ms`, or :func:`median_ms` on the host), throughput (calls back to back,
:func:`throughput_ms`) and the GPU time of the kernels alone (:func:`cuda_kernel_ms`).
"""
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


def throughput_ms(fn, calls: int = 100, windows: int = 5, warmup: int = 3,
                  device: str = "cuda") -> float:
    """Time per call of ``fn()`` issued back to back, in milliseconds: ``calls`` calls between
    two CUDA events (the host clock for ``device="cpu"``), divided by ``calls``; the median of
    ``windows`` such windows. Launch overhead overlaps the previous call's GPU work here, as in
    a training step or a prefill loop; per-call latency does not see that. On the GPU one more
    call is queued before each window's start event, so that the window opens on a busy GPU, as
    in such a loop, and does not count the first call's host time (the launch path of a Python
    call, tens of microseconds, in a window of about 5 ms: 4-5 calls of a 1 ms kernel)."""
    if calls < 1 or windows < 1:
        raise ValueError(f"calls and windows must be >= 1, got {calls} and {windows}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    return statistics.median(_window_ms(fn, calls, device) / calls for _ in range(windows))


def _window_ms(fn, calls: int, device: str) -> float:
    if device == "cpu":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()  # queued ahead of the start event: the host is past its launch when the window opens
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def run_for(fn, seconds: float, batch: int = 50, device: str = "cuda") -> int:
    """Call ``fn()`` back to back for about ``seconds``, ``batch`` calls at a time with a
    synchronisation of ``device`` after each batch (a batch starts only while less than
    ``seconds`` have passed, so 0 seconds makes no call); returns the number of calls. The loop
    of a sustained load: a warm-up to the GPU's power cap, or a loop timed and clock-logged from
    outside (``benchmarks/forward_case.py --seconds``)."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(batch):
            fn()
        calls += batch
        synchronize(device)
    return calls


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device`` ("cpu": nothing is asynchronous)."""
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def cuda_kernel_ms(fn, calls: int = 20, warmup: int = 3) -> float:
    """GPU time of the kernels one call of ``fn()`` launches (CUPTI through torch.profiler),
    in milliseconds: the device work without the host's launch overhead. Copies and memsets
    are left out."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.key_averages()
                   if e.device_time_total > 0 and not e.key.startswith(("Memcpy", "Memset")))
    return total_us / calls / 1e3
