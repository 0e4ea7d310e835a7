"""``tvm-splat bench``: time every implementation on every case of a suite, in one process,
check each output against SDPA with the boolean mask, and write JSON + PNG + a table."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from . import baselines as B
from .suite import suite

# Name -> factory(q, k, v, mask_or_acsr). Ours take the ACSR, the others the boolean mask.
IMPLEMENTATIONS = {
    "sdpa_dense": B.sdpa_dense,
    "sdpa_masked": B.sdpa_masked,
    "flex": B.flex_attention,
    "tvm_dense": B.tvm_dense,
    "tvm_dense_tuned": B.tvm_dense_tuned,
    "splat_row": B.tvm_splat_variant("row"),
    "splat_separate": B.tvm_splat_variant("separate"),
    "splat_tiled_cuda_cores": B.tvm_splat_tiled(False),
    "splat_fused_untuned": B.tvm_splat_fused_untuned,  # default knobs, tuning logs ignored
    "splat_fused": B.tvm_splat_variant("auto"),  # the default: tiled, tensor cores for fp16, tuned knobs if logged
}
OURS = ("splat_row", "splat_separate", "splat_tiled_cuda_cores", "splat_fused_untuned", "splat_fused")
# Dense SDPA computes a different function (no mask): its error is recorded, not judged.
UNMASKED = ("sdpa_dense",)
REFERENCE = "sdpa_masked"
# H100 SXM: dense fp16 tensor-core peak and HBM3 bandwidth.
H100_PEAK_TFLOPS = 989.0
H100_BANDWIDTH_TBS = 3.35


def add_bench_args(p):
    p.add_argument("--suite", default="quick", choices=("tiny", "quick", "full"))
    p.add_argument("--pattern", action="append", default=None,
                   help="only cases whose pattern is one of these (repeatable)")
    p.add_argument("--impl", action="append", default=None, choices=sorted(IMPLEMENTATIONS),
                   help="only these implementations (repeatable; default: all)")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON and PNG")
    p.add_argument("--prefix", default="h100", help="file name prefix (h100_suite.json, ...)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--peak-tflops", type=float, default=H100_PEAK_TFLOPS)
    p.add_argument("--bandwidth-tbs", type=float, default=H100_BANDWIDTH_TBS)
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="stop starting new cases after this many seconds (results so far are kept)")
    p.add_argument("--resume", action="store_true",
                   help="keep the cases already in the output JSON and run only the missing ones "
                        "(long suites in several calls)")


def _check(out, ref, dtype):
    err = (out.float() - ref.float()).abs().max().item()
    tol = 2e-2 if dtype == "float16" else 1e-3
    return err, err <= tol


def run_case(case, impls, repeats, peak, bw, console):
    import torch

    from ..formats import ACSR, parse_pattern
    from ..timing import cuda_kernel_ms, cuda_median_ms

    acsr = ACSR.from_pattern(parse_pattern(case.pattern), case.seq_len)
    dev = "cuda"
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(case.batch, case.heads, case.seq_len, case.head_dim, device=dev,
                           dtype=dtype, generator=gen) for _ in range(3))
    mask = torch.from_numpy(acsr.to_dense()).to(dev)
    mask = mask[0] if acsr.num_heads == 1 else mask
    nnz_mean = float(np.mean(acsr.nnz))
    flop = B.flops(case.batch, case.heads, nnz_mean, case.head_dim)
    nbytes = B.min_bytes(case.batch, case.heads, case.seq_len, case.head_dim, q.element_size())
    row = {"case": case.as_dict(), "name": case.name, "density": float(acsr.density),
           "nnz_per_head": nnz_mean, "results": {}}
    ref = IMPLEMENTATIONS[REFERENCE](q, k, v, mask)()
    for name in impls:
        res = {}
        try:
            fn = IMPLEMENTATIONS[name](q, k, v, acsr if name in OURS else mask)
            out = fn()
            torch.cuda.synchronize()
            res["max_abs_err"], res["correct"] = _check(out, ref, case.dtype)
            if name in UNMASKED:
                res["correct"] = None
            ms = cuda_median_ms(fn, repeats=repeats)
            res["ms"] = ms
            res["tflops"] = flop / (ms * 1e-3) / 1e12
            res["roofline_fraction"] = B.roofline_fraction(ms, flop, nbytes, peak, bw)
            # device time of the kernels alone (no host launch overhead), for both sides
            res["kernel_ms"] = cuda_kernel_ms(fn)
            res["kernel_tflops"] = flop / (res["kernel_ms"] * 1e-3) / 1e12
            if name == "splat_fused":
                res["knobs"] = _fused_knobs_used(acsr, case)
        except B.Skip as why:
            res["skipped"] = str(why)
        except Exception as err:  # keep the suite going; the JSON records the failure
            res["error"] = f"{type(err).__name__}: {err}"[:500]
        finally:
            torch.cuda.empty_cache()
        row["results"][name] = res
        console.print(f"  {name:16s} " + (f"{res['ms']:.4f} ms  err {res['max_abs_err']:.1e}"
                                           if "ms" in res else res.get("skipped", res.get("error", ""))))
    for ours in OURS:
        for field, key in (("ms", "speedup"), ("kernel_ms", "kernel_speedup")):
            mine = row["results"].get(ours, {}).get(field)
            if mine:
                row["results"][ours][key] = {
                    base: r[field] / mine for base, r in row["results"].items() if field in r and base != ours
                }
    return row


def _fused_knobs_used(acsr, case):
    """The knobs the default path ran with, and whether they came from a tuning record."""
    import dataclasses

    from ..plan import plan

    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    used = plan(acsr, shape, shape, case.dtype, "cuda")
    return {"tuned": used.knobs_source == "tuned", **dataclasses.asdict(used.knobs)}


def summarise(rows):
    """Geomean speedup of each of ours over each baseline, across cases where both ran: per
    call (``speedup``, what a caller sees) and kernels only (``kernel_speedup``)."""
    out = {}
    for ours in OURS:
        per_base = {}
        for base in IMPLEMENTATIONS:
            for key, label in (("speedup", base), ("kernel_speedup", f"{base} (kernels)")):
                ratios = [r["results"][ours][key][base] for r in rows
                          if key in r["results"].get(ours, {}) and base in r["results"][ours][key]]
                if ratios:
                    per_base[label] = {"geomean": B.geomean(ratios), "min": min(ratios), "cases": len(ratios)}
        out[ours] = per_base
    return out


def print_table(rows, summary, console):
    from rich.table import Table

    impls = [i for i in IMPLEMENTATIONS if any(i in r["results"] for r in rows)]
    table = Table(title="sparse attention, median ms (fused speedup vs each)")
    table.add_column("case")
    table.add_column("density", justify="right")
    for i in impls:
        table.add_column(i, justify="right")
    for r in rows:
        cells = []
        for i in impls:
            res = r["results"].get(i, {})
            if "ms" in res:
                cells.append(f"{res['ms']:.3f}" + (" ✗" if res.get("correct") is False else ""))
            else:
                cells.append("skip" if "skipped" in res else ("err" if "error" in res else "-"))
        table.add_row(r["name"], f"{r['density']:.3f}", *cells)
    console.print(table)
    for ours, per in summary.items():
        console.print(f"[bold]{ours}[/] geomean speedup: " + ", ".join(
            f"{b} {s['geomean']:.2f}x" for b, s in per.items()))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = [i for i in IMPLEMENTATIONS if any("ms" in r["results"].get(i, {}) for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        ys = [r["results"].get(impl, {}).get("ms", np.nan) for r in rows]
        ax.bar(np.arange(len(rows)) + j * width, ys, width, label=impl)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2)
    ax.set_xticklabels([r["name"].replace(" ", "\n", 1) for r in rows], fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("ms (median, lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(args):
    import torch
    import tvm
    from rich.console import Console

    console = Console()
    if not torch.cuda.is_available():
        raise ValueError("tvm-splat bench needs a CUDA GPU (torch.cuda.is_available() is False)")
    cases = [c for c in suite(args.suite) if not args.pattern or c.pattern in args.pattern]
    impls = args.impl or list(IMPLEMENTATIONS)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "tvm-splat " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "tvm": tvm.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "repeats": args.repeats,
        "peak_tflops": args.peak_tflops, "bandwidth_tbs": args.bandwidth_tbs,
        "reference": REFERENCE,
    }
    rows = []
    start = time.time()
    json_path = out_dir / f"{args.prefix}_{args.suite}.json"
    if args.resume and json_path.exists():
        previous = json.loads(json_path.read_text())
        rows = previous["cases"]  # all of them: a filtered resume must not drop earlier cases
        meta["resumed_from"] = previous["meta"].get("date")
    done = {r["name"] for r in rows}
    todo = [c for c in cases if c.name not in done]
    for i, case in enumerate(todo):
        if time.time() - start > args.time_budget:
            console.print(f"[yellow]time budget reached; {len(todo) - i} cases not run[/]")
            meta["cases_not_run"] = [c.name for c in todo[i:]]
            break
        console.print(f"[bold]{case.name}[/]")
        rows.append(run_case(case, impls, args.repeats, args.peak_tflops, args.bandwidth_tbs, console))
        summary = summarise(rows)
        json_path.write_text(json.dumps({"meta": meta, "summary": summary, "cases": rows}, indent=1))
    summary = summarise(rows)
    json_path.write_text(json.dumps({"meta": meta, "summary": summary, "cases": rows}, indent=1))
    print_table(rows, summary, console)
    plot(rows, out_dir / f"{args.prefix}_{args.suite}.png")
    console.print(f"wrote {json_path}")
    return rows
