"""Run every awkward mask case on CUDA and record the max error vs the dense float64 reference.

    python benchmarks/gpu_correctness.py --out benchmarks/results/gpu_correctness.json
"""
import argparse
import json
import time

import numpy as np
import torch
import tvm

from tvm_splat import sparse_attention
from tvm_splat.reference import masked_attention
from tvm_splat.schedules.tiled import TiledKnobs
from tvm_splat.testing import dense_mask, mask_cases, qkv


def write(rows, args, partial):
    """Write the JSON after every case, so a run cut short still leaves its results."""
    result = {"device": torch.cuda.get_device_name(), "tvm": tvm.__version__, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "python benchmarks/gpu_correctness.py " + " ".join(f"--variant {v}" for v in args.variant or ()),
              "complete": not partial, "all_passed": all(r["passed"] for r in rows), "cases": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu_correctness.json")
    ap.add_argument("--variant", action="append", default=None,
                    help="tiled, tiled_cuda_cores, row, separate (repeatable; default: all)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for name, acsr, heads in mask_cases():
        for dtype in ("float32", "float16"):
            q, k, v = qkv(rng, 3, heads, acsr.n, 64, dtype)
            ref = masked_attention(q, k, v, dense_mask(acsr))
            tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
            for variant in args.variant or ("tiled", "tiled_cuda_cores", "row", "separate"):
                kw = {"variant": variant}
                if variant == "tiled_cuda_cores":
                    kw = {"variant": "tiled", "knobs": TiledKnobs(use_tensor_cores=False)}
                out = sparse_attention(tq, tk, tv, acsr, **kw).double().cpu().numpy()
                err = float(np.abs(out - ref).max())
                tol = 1e-3 if dtype == "float32" else 2e-2
                rows.append({"case": name, "n": acsr.n, "heads": heads, "batch": 3, "head_dim": 64,
                             "dtype": dtype, "variant": variant, "max_abs_err": err,
                             "tolerance": tol, "passed": err <= tol})
                print(f"{name:28s} {dtype:8s} {variant:9s} err {err:.2e} {'ok' if err <= tol else 'FAIL'}")
                write(rows, args, partial=True)
    result = write(rows, args, partial=False)
    print("all passed" if result["all_passed"] else "FAILURES")


if __name__ == "__main__":
    main()
