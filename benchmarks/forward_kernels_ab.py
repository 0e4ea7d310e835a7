"""Forward kernel throughput of the default plan, for A/B runs of two versions of the code (CUDA GPU).

    python benchmarks/forward_kernels_ab.py LABEL OUT.json

Runs :data:`CASES` (fp16, seeded random inputs) with the planner's default knobs and times
``AttentionPlan.run`` by CUDA events over 50 back-to-back calls, the median of 7 windows
(:func:`tvm_splat.timing.throughput_ms`); each row also holds the output's absolute sum, which
must agree between the versions compared. For an A/B, run it once per version of the package
in one GPU lease (``PYTHONPATH=<other checkout> python ...``), alternating, and compare the
rows by case. One warm-up case runs first, untimed, so that no timed case meets the GPU's idle
clock. ``benchmarks/results/h200_forward_ab.json`` holds such runs.
"""
import json
import sys

import torch

from tvm_splat.formats import parse_pattern
from tvm_splat.planner import plan
from tvm_splat.timing import throughput_ms

#: (pattern, batch, heads, kv_heads, n, head_dim): models-suite shapes, partial-heavy first
CASES = [("global:4+window:256", 1, 12, 12, 4096, 64), ("global:4+window:256", 4, 12, 12, 4096, 64),
         ("global:4+window:256", 8, 16, 16, 4096, 64), ("global:64+block:64+window:32", 4, 12, 12, 4096, 64),
         ("global:4+window:128", 32, 12, 12, 1024, 64), ("window:256", 16, 16, 16, 2048, 64),
         ("causal_window:4095", 1, 32, 8, 8192, 128), ("window:1024", 1, 16, 16, 32768, 128),
         ("dilated:256:2", 1, 12, 12, 8192, 64), ("causal_strided:128", 1, 12, 12, 8192, 64),
         ("dilated:512:4", 1, 8, 8, 8192, 128)]  # the cp.async wgmma form (non-unit steps at d=128)


def run_case(pattern, b, h, kvh, n, d, label):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, n, d, device="cuda", dtype=torch.float16, generator=gen)
    k, v = (torch.randn(b, kvh, n, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(2))
    p = plan(parse_pattern(pattern), q.shape, k.shape, "float16", "cuda")
    out = p.run(q, k, v)
    ms = throughput_ms(lambda: p.run(q, k, v), calls=50, windows=7, warmup=5)
    return {"tree": label, "case": f"{pattern} b={b} n={n} d={d}", "ms": ms, "sum": float(out.float().abs().sum()),
            "knobs": repr(p.knobs)}


def main(label, out_path):
    if not torch.cuda.is_available():
        raise SystemExit("forward_kernels_ab.py needs a CUDA GPU")
    run_case(*CASES[0], label)  # warm-up: the GPU leaves its idle clock
    rows = []
    for case in CASES:
        rows.append(run_case(*case, label))
        print(json.dumps(rows[-1]), flush=True)
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
