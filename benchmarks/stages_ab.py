"""The untuned fused kernel with one vs two K/V shared-memory stages on the quick suite (CUDA GPU).

    python benchmarks/stages_ab.py OUT.json [quick|heldout]

``heldout``: shapes outside the quick suite, to check a rule fitted on it.

Both forms run alternately (three rounds); kernel time is CUPTI, call time CUDA events; each
case reports the medians and the max difference between the two outputs.
"""
import dataclasses
import json
import statistics
import sys

import torch

from tvm_splat.attention import default_tiled_knobs, sparse_attention
from tvm_splat.bench.baselines import target_of
from tvm_splat.bench.suite import BenchCase, suite
from tvm_splat.formats import ACSR, parse_pattern
from tvm_splat.timing import cuda_kernel_ms, cuda_median_ms


HELDOUT = [
    BenchCase("window:128", 16384, 12, 64, 1),
    BenchCase("dilated:256:2", 4096, 12, 64, 4),
    BenchCase("window:256", 2048, 12, 64, 1),
    BenchCase("window:512", 8192, 16, 64, 1),
    BenchCase("block:256", 16384, 12, 64, 2),
    BenchCase("strided:64", 8192, 12, 64, 1),
    BenchCase("window:256", 4096, 16, 128, 4),
    BenchCase("global:64+window:256", 2048, 12, 64, 4),
]


def main(out_path, cases="quick"):
    rows = []
    for case in (HELDOUT if cases == "heldout" else suite(cases)):
        acsr = ACSR.from_pattern(parse_pattern(case.pattern), case.seq_len)
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(case.batch, case.heads, case.seq_len, case.head_dim, device="cuda",
                               dtype=torch.float16, generator=gen) for _ in range(3))
        base = default_tiled_knobs("float16", target_of(q))
        fns, outs = {}, {}
        for stages in (1, 2):
            knobs = dataclasses.replace(base, stages=stages)
            fns[stages] = lambda knobs=knobs: sparse_attention(q, k, v, acsr, variant="tiled", knobs=knobs)
            outs[stages] = fns[stages]().float()
        times = {(s, m): [] for s in (1, 2) for m in ("kernel", "call")}
        for _ in range(3):  # alternate, so drift falls on both forms
            for stages in (1, 2):
                times[stages, "kernel"].append(cuda_kernel_ms(fns[stages], calls=30))
                times[stages, "call"].append(cuda_median_ms(fns[stages], repeats=30))
        row = {"case": case.name, "max_diff": (outs[1] - outs[2]).abs().max().item(),
               **{f"s{s}_{m}_ms": statistics.median(t) for (s, m), t in times.items()}}
        row["kernel_s2_over_s1"] = row["s2_kernel_ms"] / row["s1_kernel_ms"]
        rows.append(row)
        print(f"{case.name:45s} diff {row['max_diff']:.1e}  kernel {row['s1_kernel_ms']:.4f} / "
              f"{row['s2_kernel_ms']:.4f} ms (2/1 {row['kernel_s2_over_s1']:.3f})  call "
              f"{row['s1_call_ms']:.4f} / {row['s2_call_ms']:.4f} ms", flush=True)
    geomean = statistics.geometric_mean(r["kernel_s2_over_s1"] for r in rows)
    print(f"geomean kernel time, 2 stages / 1 stage: {geomean:.3f}")
    meta = {"command": f"python benchmarks/stages_ab.py {out_path} {cases}", "device": torch.cuda.get_device_name(),
            "torch": torch.__version__}
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "geomean_kernel_s2_over_s1": geomean, "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
