"""Host time of the differentiable op against its kernels: where a training step's time goes
when the kernels are short.

    python benchmarks/training_host_time.py OUT.json [--pattern P] [--shape B H N D] [--device cpu] [--profile [CALL]]

Default: Longformer-base at batch 1 (``global:4+window:256``, 12 heads, n=4096, d=64, fp16 on
CUDA; float32 on the CPU), whose GPU kernels take about 0.36 ms for forward + backward. For
each of the plan's own ``forward`` and ``backward`` (``TrainingPlan``), the op's forward
(``sparse_attention`` with autograd recording), its backward (``torch.autograd.grad`` of one
retained graph), both (a fresh forward, then its gradients), and both through
``torch.compile(fullgraph=True)`` (which calls the custom op), and torch's own floor for such a
step (``autograd alone forward+backward``: an autograd Function that allocates its outputs and
gradients and launches nothing, :class:`NoKernels`; on CUDA its backward, like ours, runs on
autograd's device thread), three figures in microseconds:

* ``host_us``: wall time to enqueue one call (200 calls between two synchronizations);
* ``throughput_us``: back-to-back throughput (:func:`tvm_splat.timing.throughput_ms`: CUDA
  events, the host clock on the CPU);
* ``kernel_us``: GPU time of the kernels (:func:`tvm_splat.timing.cuda_kernel_ms`, CUPTI;
  None on the CPU, where the kernels run inside the host time).

Where ``host_us`` exceeds ``kernel_us`` the host sets the pace. ``--profile [CALL]`` prints where
one row's host time goes as well (:func:`profile_call`; default: the op's forward + backward;
``'compiled op forward+backward'`` for the compiled graph), and the plan's own methods' share of
it, on every thread (:func:`method_us`: on CUDA the backward runs on autograd's device thread,
which cProfile does not see), also written to the JSON as ``methods``.
"""
import argparse
import cProfile
import io
import json
import pstats
import time

import torch

from tvm_splat.autograd import register_mask, sparse_attention, training_plan_for
from tvm_splat.formats import parse_pattern
from tvm_splat.timing import cuda_kernel_ms, synchronize, throughput_ms

CALLS = 200


def host_us(fn, device, calls=CALLS):
    """Wall time per call of enqueuing ``calls`` back-to-back calls, microseconds."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    stop = time.perf_counter()
    synchronize(device)
    return (stop - start) / calls * 1e6


def profile_call(fn, device, calls=CALLS) -> str:
    """Where ``fn``'s host time goes, as text: a cProfile of ``calls`` calls (Python frames;
    time inside C++ lands in the calling frame's own time), then torch.profiler's CPU-side
    table of the same calls (ATen ops, the dispatcher's custom-op calls and autograd nodes, by
    self CPU time: what cProfile cannot see)."""
    fn()
    synchronize(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    synchronize(device)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    return text.getvalue() + "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)


#: the TrainingPlan methods :func:`method_us` times (inclusive: forward and backward hold the rest)
PLAN_METHODS = ("forward", "backward", "_inputs", "_new", "_scratch", "_on_stream", "_launch")


def method_us(fn, device, calls=CALLS) -> dict:
    """Per call of ``fn``, the wall time spent inside each of :data:`PLAN_METHODS` of
    :class:`~tvm_splat.training.TrainingPlan` (inclusive, summed over the calls of that method,
    on whichever thread ran it), in microseconds, with the number of calls of each: ``{method:
    {"us": .., "calls": ..}}``. The methods are wrapped for the measurement only."""
    from tvm_splat.training import TrainingPlan

    spent, count = dict.fromkeys(PLAN_METHODS, 0.0), dict.fromkeys(PLAN_METHODS, 0)
    originals = {name: getattr(TrainingPlan, name) for name in PLAN_METHODS}

    def timed(name, method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
                count[name] += 1
        return wrapper

    fn()
    synchronize(device)
    try:
        for name, method in originals.items():
            setattr(TrainingPlan, name, timed(name, method))
        for _ in range(calls):
            fn()
        synchronize(device)
    finally:
        for name, method in originals.items():
            setattr(TrainingPlan, name, method)
    return {name: {"us": spent[name] / calls * 1e6, "calls": count[name] / calls} for name in PLAN_METHODS}


class NoKernels(torch.autograd.Function):
    """What torch's autograd costs a forward + backward of one op on these tensors by itself:
    the op's outputs and gradients allocated, no kernel launched."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return torch.empty_like(q)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        return tuple(torch.empty_like(x) for x in ctx.saved_tensors)


def main(out_path, pattern="global:4+window:256", shape=(1, 12, 4096, 64), device="cuda", profile=None):
    b, h, n, d = shape
    dtype = torch.float16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    dout = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen)
    handle = register_mask(parse_pattern(pattern))
    out = sparse_attention(q, k, v, handle)
    plan = training_plan_for(q, k, handle, None)
    qd, kd, vd = (x.detach() for x in (q, k, v))
    plan_out, lse = plan.forward(qd, kd, vd)
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, handle), fullgraph=True)
    calls = {
        "plan.forward": lambda: plan.forward(qd, kd, vd),
        "plan.backward": lambda: plan.backward(qd, kd, vd, plan_out, lse, dout),
        "op forward": lambda: sparse_attention(q, k, v, handle),
        "op backward": lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
        "op forward+backward": lambda: torch.autograd.grad(sparse_attention(q, k, v, handle), (q, k, v), dout),
        "compiled op forward+backward": lambda: torch.autograd.grad(compiled(q, k, v), (q, k, v), dout),
        "autograd alone forward+backward": lambda: torch.autograd.grad(NoKernels.apply(q, k, v), (q, k, v), dout),
    }
    rows = []
    for name, fn in calls.items():
        fn()
        row = {"call": name, "host_us": host_us(fn, device),
               "throughput_us": throughput_ms(fn, calls=50, windows=5, warmup=3, device=device) * 1e3,
               "kernel_us": cuda_kernel_ms(fn, calls=10, warmup=1) * 1e3 if device == "cuda" else None}
        print(json.dumps(row), flush=True)
        rows.append(row)
    methods = None
    if profile:
        if profile not in calls:
            raise SystemExit(f"--profile takes one of {', '.join(calls)}, got {profile!r}")
        print(profile_call(calls[profile], device))
        methods = method_us(calls[profile], device)
        print(json.dumps({"call": profile, "methods": methods}, indent=1))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    case = f"{pattern} b={b} h={h} n={n} d={d} {str(dtype).removeprefix('torch.')}"
    result = {"device": name, "case": case, "plan": repr(plan), "runs": rows}
    if methods is not None:
        result["methods"] = {"call": profile, "per_call": methods}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--pattern", default="global:4+window:256")
    parser.add_argument("--shape", type=int, nargs=4, default=(1, 12, 4096, 64), metavar=("B", "H", "N", "D"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--profile", nargs="?", const="op forward+backward", default=None, metavar="CALL",
                        help="print where one call's host time goes (cProfile and torch.profiler's CPU table); "
                             "CALL: a row name, default 'op forward+backward'")
    args = parser.parse_args()
    main(args.out, args.pattern, tuple(args.shape), args.device, args.profile)
