"""Host time of the differentiable op against its kernels (CUDA GPU): where a training step's
time goes when the kernels are short.

    python benchmarks/training_host_time.py OUT.json [PATTERN [BATCH HEADS N HEAD_DIM]]

Default: Longformer-base at batch 1 (``global:4+window:256``, 12 heads, n=4096, d=64, fp16),
whose kernels take about 0.36 ms for forward + backward. For each of the plan's own
``forward`` and ``backward`` (``TrainingPlan``), the op's forward (``sparse_attention`` with
autograd recording), its backward (``torch.autograd.grad`` of one retained graph) and both
(a fresh forward, then its gradients), three figures in microseconds:

* ``host_us``: wall time to enqueue one call (200 calls between two synchronizations);
* ``throughput_us``: back-to-back throughput by CUDA events (:func:`tvm_splat.timing.throughput_ms`);
* ``kernel_us``: GPU time of the kernels (:func:`tvm_splat.timing.cuda_kernel_ms`, CUPTI).

Where ``host_us`` exceeds ``kernel_us`` the host sets the pace. ``--profile`` after the
arguments prints a cProfile of the op's forward + backward as well.
"""
import cProfile
import io
import json
import pstats
import sys
import time

import torch

from tvm_splat.autograd import register_mask, sparse_attention, training_plan_for
from tvm_splat.formats import parse_pattern
from tvm_splat.timing import cuda_kernel_ms, throughput_ms

CALLS = 200


def host_us(fn, calls=CALLS):
    """Wall time per call of enqueuing ``calls`` back-to-back calls, microseconds."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    stop = time.perf_counter()
    torch.cuda.synchronize()
    return (stop - start) / calls * 1e6


def main(out_path, pattern="global:4+window:256", b=1, h=12, n=4096, d=64, profile=False):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16, generator=gen).requires_grad_()
               for _ in range(3))
    dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.float16, generator=gen)
    handle = register_mask(parse_pattern(pattern))
    out = sparse_attention(q, k, v, handle)
    plan = training_plan_for(q, k, handle, None)
    qd, kd, vd = (x.detach() for x in (q, k, v))
    plan_out, lse = plan.forward(qd, kd, vd)
    calls = {
        "plan.forward": lambda: plan.forward(qd, kd, vd),
        "plan.backward": lambda: plan.backward(qd, kd, vd, plan_out, lse, dout),
        "op forward": lambda: sparse_attention(q, k, v, handle),
        "op backward": lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
        "op forward+backward": lambda: torch.autograd.grad(sparse_attention(q, k, v, handle), (q, k, v), dout),
    }
    rows = []
    for name, fn in calls.items():
        fn()
        row = {"call": name, "host_us": host_us(fn),
               "throughput_us": throughput_ms(fn, calls=50, windows=5, warmup=3, device="cuda") * 1e3,
               "kernel_us": cuda_kernel_ms(fn, calls=10, warmup=1) * 1e3}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(CALLS):
            calls["op forward+backward"]()
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        print(text.getvalue())
    case = f"{pattern} b={b} h={h} n={n} d={d} float16"
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "case": case, "plan": repr(plan), "runs": rows}, f, indent=1)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--profile"]
    if not args:
        raise SystemExit(__doc__)
    main(args[0], *(args[1:2]), *(int(a) for a in args[2:6]), profile="--profile" in sys.argv)
