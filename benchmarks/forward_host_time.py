"""Host time of the forward against its kernels: where a call goes when the kernel is short.

    python benchmarks/forward_host_time.py OUT.json [--pattern P] [--shape B H N D] [--dtype D] [--device cpu] [--profile]

Default: the quick suite's dilated ±256 step 2 (12 heads, n=4096, d=64, fp16), whose kernel takes
about 0.02-0.03 ms on an H100 or H200, while the bench measured 0.044-0.077 ms a call by
throughput on the thirtieth session's H100 (the ≥2× Flex target on dilated masks missed there by
throughput, met by kernel time). Rows, each as in ``training_host_time.py`` (``host_us``: wall
time to enqueue one call of 200 back-to-back; ``throughput_us``; ``kernel_us``: CUPTI GPU time):

* ``sparse_attention`` as the bench calls it (an ACSR mask, ``variant="tiled"``), and with the
  mask as a pattern string: the plan cache's lookup, ``run``'s checks, the output's allocation,
  the stream, the launches;
* ``plan.run``: the same without the lookup;
* ``launch``: the plan's launch steps alone into a preallocated output, inside the raw-stream
  context ``run`` enters (the same stream lookup; no checks, no allocation: the floor our Python
  can reach);
* ``torch.empty``: one output allocation, for scale.

Where ``host_us`` exceeds ``kernel_us`` the host sets the pace. ``--profile`` prints where the
bench's call's host time goes (cProfile, then torch.profiler's CPU table, in which the CUDA
driver's launch calls appear on a GPU) and writes the per-row figures as ``runs`` in the JSON.
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_host_time import host_us, profile_call

from tvm_splat import ACSR, parse_pattern, sparse_attention
from tvm_splat.attention import plan_for
from tvm_splat.devices import torch_raw_stream
from tvm_splat.timing import cuda_kernel_ms, throughput_ms


def _raw_stream(plan, stream):
    """The raw-stream context ``AttentionPlan.run`` launches in (CUDA: ``stream``, its
    :func:`~tvm_splat.devices.torch_raw_stream`), or none (CPU: ``stream`` None)."""
    if stream is None:
        return contextlib.nullcontext()
    import tvm_ffi

    return tvm_ffi.use_raw_stream(plan.device, stream())


def calls_of(pattern, shape, dtype, device):
    """``{row name: a call}`` of the case, on seeded random inputs, and the plan."""
    b, h, n, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=getattr(torch, dtype), generator=gen) for _ in range(3))
    acsr = ACSR.from_pattern(parse_pattern(pattern), n)
    plan = plan_for(q, k, v, acsr, variant="tiled")
    out = torch.empty_like(q)
    launch = plan._launcher()
    stream = torch_raw_stream(q.device.index) if device == "cuda" else None

    def launch_only():
        with _raw_stream(plan, stream):
            launch(q, k, v, out)

    calls = {
        "sparse_attention": lambda: sparse_attention(q, k, v, acsr, variant="tiled"),
        "sparse_attention (pattern string)": lambda: sparse_attention(q, k, v, pattern, variant="tiled"),
        "plan.run": lambda: plan.run(q, k, v),
        "launch": launch_only,
        "torch.empty": lambda: torch.empty_like(q),
    }
    return calls, plan


def main(out_path, pattern="dilated:256:2", shape=(1, 12, 4096, 64), dtype="float16", device="cuda", profile=False):
    calls, plan = calls_of(pattern, shape, dtype, device)
    rows = []
    for name, fn in calls.items():
        fn()
        row = {"call": name, "host_us": host_us(fn, device),
               "throughput_us": throughput_ms(fn, calls=50, windows=5, warmup=3, device=device) * 1e3,
               "kernel_us": (cuda_kernel_ms(fn, calls=10, warmup=1) * 1e3
                             if device == "cuda" and name != "torch.empty" else None)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    profiled = profile_call(calls["sparse_attention"], device) if profile else None
    if profiled:
        print(profiled)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    b, h, n, d = shape
    result = {"device": name, "case": f"{pattern} b={b} h={h} n={n} d={d} {dtype}", "plan": repr(plan),
              "steps": [step.kernel for step in plan.steps], "runs": rows}
    if profiled:
        result["profile"] = profiled
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--pattern", default="dilated:256:2")
    parser.add_argument("--shape", type=int, nargs=4, default=(1, 12, 4096, 64), metavar=("B", "H", "N", "D"))
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--profile", action="store_true", help="print where the bench's call's host time goes")
    args = parser.parse_args()
    main(args.out, args.pattern, tuple(args.shape), args.dtype, args.device, args.profile)
