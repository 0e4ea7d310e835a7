"""Which kernel family is fastest on the CPU (``llvm``): the measurement behind
``tvm_splat.planner.CPU_VARIANT`` (the default of ``variant="auto"`` without a GPU).

    python benchmarks/cpu_variants.py benchmarks/results/cpu_variants.json

Every variant runs the same float32 inputs through ``plan(...).run`` (compiled before timing),
alternating variants over three rounds so that load on the machine falls on all of them; each
figure is the median of the rounds' medians. Every output is checked against the float64 dense
reference.
"""
import json
import platform
import statistics
import sys
import time

import numpy as np

from tvm_splat import parse_pattern, plan
from tvm_splat.reference import masked_attention
from tvm_splat.timing import median_ms

#: (pattern, n, heads, head_dim, batch): the demo's case first, then sizes a CPU user runs
CASES = (
    ("global:4+window:32", 512, 4, 64, 1),
    ("window:64", 2048, 8, 64, 1),
    ("dilated:64:2", 2048, 8, 64, 1),
    ("strided:32", 1024, 8, 64, 1),
    ("block:64", 2048, 8, 64, 2),
    ("global:8+window:128", 4096, 4, 64, 1),
)
VARIANTS = ("tiled", "row", "separate")


def main(out_path):
    rows = []
    for pattern, n, heads, d, batch in CASES:
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((batch, heads, n, d)).astype("float32") for _ in range(3))
        ref = masked_attention(q, k, v, parse_pattern(pattern).dense_mask(n))
        plans = {name: plan(pattern, q.shape, None, "float32", "cpu", variant=name) for name in VARIANTS}
        errs = {name: float(np.abs(p.run(q, k, v) - ref).max()) for name, p in plans.items()}  # compiles
        times = {name: [] for name in VARIANTS}
        for _ in range(3):
            for name, p in plans.items():
                times[name].append(median_ms(lambda p=p: p.run(q, k, v), repeats=7, warmup=1))
        row = {"case": f"{pattern} n={n} h={heads} d={d} b={batch}",
               "ms": {name: statistics.median(t) for name, t in times.items()}, "max_abs_err": errs}
        row["fastest"] = min(row["ms"], key=row["ms"].get)
        rows.append(row)
        print(row["case"], {k: round(v, 2) for k, v in row["ms"].items()}, "fastest:", row["fastest"], flush=True)
    wins = {name: sum(r["fastest"] == name for r in rows) for name in VARIANTS}
    geo = {name: float(np.exp(np.mean([np.log(r["ms"][name]) for r in rows]))) for name in VARIANTS}
    meta = {"command": f"python benchmarks/cpu_variants.py {out_path}", "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "wins": wins, "geomean_ms": geo, "cases": rows}, f, indent=1)
    print("wins", wins, "geomean ms", {k: round(v, 2) for k, v in geo.items()})


if __name__ == "__main__":
    main(sys.argv[1])
