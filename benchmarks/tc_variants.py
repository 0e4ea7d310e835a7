"""Kernel-level comparison of the tiled kernel's GPU forms on one case (H100).

For a pattern and shape: FlexAttention and SDPA (dense, masked) as references, then the tiled
kernel with each knob setting given (tensor cores through ``mma``, CUDA cores),
each checked against SDPA with the mask; median ms of CUDA-event timings.

    python benchmarks/tc_variants.py --pattern window:256 --seq 4096 --heads 12 --head-dim 64 \
        --out benchmarks/results/h100_tc_variants.json
"""
import argparse
import json
import time

import torch
import tvm

from tvm_splat import ACSR, parse_pattern, sparse_attention
from tvm_splat.bench.baselines import flex_attention, sdpa_dense, sdpa_masked
from tvm_splat.bench.inputs import CaseInputs
from tvm_splat.schedules.tiled import TiledKnobs
from tvm_splat.timing import cuda_kernel_ms, cuda_median_ms, throughput_ms

VARIANTS = {
    "mma_w4_bc64": dict(br=64, bc=64, warps=4),
    "mma_w4_bc64_s1": dict(br=64, bc=64, warps=4, stages=1),
    "mma_w4_bc32": dict(br=64, bc=32, warps=4),
    "mma_w4_bc128": dict(br=64, bc=128, warps=4),
    "mma_w8_bc64": dict(br=128, bc=64, warps=8),
    "mma_w8_bc32": dict(br=128, bc=32, warps=8),
    "mma_w2_bc64": dict(br=32, bc=64, warps=2),
    "mma_w2_bc32": dict(br=32, bc=32, warps=2),
    "mma_w4_m2_bc64": dict(br=128, bc=64, warps=4, m_tiles=2),
    "mma_w2_m2_bc64": dict(br=64, bc=64, warps=2, m_tiles=2),
    "cuda_cores_64": dict(use_tensor_cores=False),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pattern", action="append", default=None)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variant", action="append", default=None, help=f"of {sorted(VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for pat in args.pattern or ["window:256"]:
        acsr = ACSR.from_pattern(parse_pattern(pat), args.seq)
        torch.manual_seed(0)
        q, k, v = (torch.randn(args.batch, args.heads, args.seq, args.head_dim, device="cuda",
                               dtype=torch.float16) for _ in range(3))
        inputs = CaseInputs(q, k, v, acsr, parse_pattern(pat))
        ref = sdpa_masked(inputs)().float()
        impls = {"sdpa_dense": sdpa_dense(inputs), "sdpa_masked": sdpa_masked(inputs)}
        try:
            impls["flex"] = flex_attention(inputs)
        except Exception as err:  # noqa: BLE001 - recorded, not fatal
            print("flex:", err)
        for name in args.variant or VARIANTS:
            knobs = TiledKnobs(**{"use_tensor_cores": True, **VARIANTS[name]})
            impls[name] = (lambda kn: lambda: sparse_attention(q, k, v, acsr, variant="tiled", knobs=kn))(knobs)
        for name, fn in impls.items():
            row = {"pattern": pat, "seq": args.seq, "heads": args.heads, "head_dim": args.head_dim,
                   "batch": args.batch, "impl": name}
            try:
                t0 = time.time()
                out = fn()
                row["first_call_s"] = time.time() - t0
                row["max_err"] = float((out.float() - ref).abs().nan_to_num(1e9).max())
                row["ms"] = cuda_median_ms(fn, repeats=args.repeats)
                row["ms_back_to_back"] = throughput_ms(fn, calls=50, windows=1)
                row["kernel_ms"] = cuda_kernel_ms(fn)
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "tvm": tvm.__version__,
                       "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
