"""``tvm-splat bench``: time every implementation on every case of a suite, in one process, on
the same inputs; check each output against a float64 reference; write JSON + PNG + tables.

Each implementation gets three timings (:func:`measure`): per-call latency ``ms`` (one call,
one synchronisation; median), ``throughput_ms`` (calls back to back between two CUDA events,
one call already queued when the start event is recorded; per call; median of windows) and
``kernel_ms`` (GPU time of its kernels, CUPTI), and with ``--sustained S`` a fourth,
``sustained_ms`` (S seconds of calls back to back, the last two thirds timed: the rate at the
GPU's power cap, see :data:`TIMINGS`), plus the cost of its first call
(``first_call_s``: compile + run; for ours with cold compile caches) and of building it
(``setup_s``: FlexAttention's block mask, TVM dense's compile, ...).
"""
from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import baselines as B
from .flex import FallbackWatch, configure_dynamo, eager_probe_works, recompile_limit_hit
from .inputs import make_inputs, reference_output
from .suite import SUITES, suite

# Name -> factory(inputs) -> fn() -> output.
IMPLEMENTATIONS = {
    "sdpa_dense": B.sdpa_dense,
    "sdpa_masked": B.sdpa_masked,
    "flex": B.flex_attention,
    "flex_gather": B.flex_gather,  # extra: mask_mod loads from the dense mask (patternless masks)
    "tvm_dense": B.tvm_dense,
    "tvm_dense_tuned": B.tvm_dense_tuned,
    "splat_row": B.tvm_splat_variant("row"),
    "splat_separate": B.tvm_splat_variant("separate"),
    "splat_tiled_cuda_cores": B.tvm_splat_tiled(False),
    "splat_fused_untuned": B.tvm_splat_fused_untuned,  # default knobs, tuning logs ignored
    "splat_fused": B.tvm_splat_variant("auto"),  # the default: tiled, tensor cores for fp16, tuned knobs if logged
}
# Our differentiable op, timed forward + backward by `tvm-splat bench --backward` only (bench/backward.py).
TRAINING_IMPL = "splat_train"
# What a plain `tvm-splat bench` runs; the other entries are extras chosen with --impl.
DEFAULT_IMPLS = ("sdpa_dense", "sdpa_masked", "flex", "tvm_dense", "tvm_dense_tuned",
                 "splat_fused_untuned", "splat_fused")
OURS = ("splat_row", "splat_separate", "splat_tiled_cuda_cores", "splat_fused_untuned", "splat_fused")
FLEX = ("flex", "flex_gather")
# Dense SDPA computes a different function (no mask): its error is recorded, not judged.
UNMASKED = ("sdpa_dense",)
# Largest |output - float64 reference| accepted, ~20 units in the last place at 1.0 for the 16-bit
# types. Measured (CPU SDPA against the float64 reference, window / global + window / causal
# window masks, n = 1024-2048): 0.0005-0.0011 in fp16, 0.004-0.012 in bf16 (8-10x, the ratio of
# their epsilons 2**-10 and 2**-7).
TOLERANCE = {"float16": 2e-2, "bfloat16": 1.6e-1, "float32": 1e-3}
# The timing fields, their speedup keys, and what they measure. ``sustained`` is timed only with
# ``--sustained S``: a throughput window lasts ~5 ms (THROUGHPUT_WINDOW_MS), 4-5 calls of a 1 ms
# kernel, too short for the GPU's power limit to pull its clock down, while a prefill loop of
# seconds runs at the cap, which slows each implementation by how much power it draws, so the two
# can rank differently. H100, window +-1024 n=32k (results/h100_forty_first_sustained.json): ours
# 518 (bf16) and 540 (fp16) TFLOP/s in the windows, 491 and 478 with --sustained 3 at 1500 and
# 1455 MHz; FlexAttention 383 and 358, then 355 and 347 at 1710 and 1680 MHz (all at ~700 W).
TIMINGS = {"throughput": "throughput_ms", "latency": "ms", "kernel": "kernel_ms", "sustained": "sustained_ms"}
# H100 SXM: dense fp16 tensor-core peak and HBM3 bandwidth.
H100_PEAK_TFLOPS = 989.0
H100_BANDWIDTH_TBS = 3.35

# A back-to-back window lasts at least this long: its two ends (event records, the pipeline
# filling and draining) cost about one launch, 5-10 us for a kernel and 0.05-0.1 ms for
# FlexAttention's launch path (H200, issue 14), so at most 2% of the window. An implementation
# slower than that gets one call per window: its launch cost is then under 2% of a call anyway.
THROUGHPUT_WINDOW_MS = 5.0
# Calls per window are capped: 500 calls of 10 us fill the 5 ms window already.
MAX_WINDOW_CALLS = 500
THROUGHPUT_WINDOWS = 5
# A median of fewer than 3 samples is not one.
MIN_REPEATS = 3


@dataclass(frozen=True)
class RunOptions:
    device: str = "cuda"
    max_repeats: int = 50  # latency samples of a fast implementation
    impl_seconds: float = 1.0  # measuring time per implementation and case, after the first calls
    peak_tflops: float = H100_PEAK_TFLOPS
    bandwidth_tbs: float = H100_BANDWIDTH_TBS
    sustained_seconds: float = 0.0  # > 0: also time this long back to back (``sustained_ms``)


def seconds_type(option: str):
    """An argparse ``type`` for ``option``: a finite number of seconds, 0 (off) or more, refused
    otherwise with a message naming the option (``--sustained`` here; ``--warm`` of
    ``benchmarks/forward_kernels_ab.py``)."""
    import argparse

    def seconds(text) -> float:
        value = float(text)
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"{option} takes a number of seconds >= 0 (0: off), got {text}")
        return value

    return seconds


_seconds = seconds_type("--sustained")


def add_bench_args(p):
    p.add_argument("--suite", default="quick", choices=SUITES)
    p.add_argument("--pattern", action="append", default=None,
                   help="only cases whose pattern is one of these (repeatable)")
    p.add_argument("--impl", action="append", default=None, choices=sorted([*IMPLEMENTATIONS, TRAINING_IMPL]),
                   help=f"only these implementations (repeatable; default: {', '.join(DEFAULT_IMPLS)})")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON and PNG")
    p.add_argument("--prefix", default="h100", help="file name prefix (h100_suite.json, ...)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: check the harness itself (no CUDA events, no kernel times)")
    p.add_argument("--repeats", type=int, default=50, help="latency samples of a fast implementation")
    p.add_argument("--impl-seconds", type=float, default=1.0,
                   help="time to spend measuring one implementation on one case; slow ones get fewer "
                        f"samples (never under {MIN_REPEATS})")
    p.add_argument("--peak-tflops", type=float, default=H100_PEAK_TFLOPS)
    p.add_argument("--bandwidth-tbs", type=float, default=H100_BANDWIDTH_TBS)
    p.add_argument("--sustained", type=_seconds, default=0.0, metavar="SECONDS",
                   help="also time SECONDS of calls back to back per implementation and case, the last two "
                        "thirds (sustained_ms): the rate under the GPU's power cap, which the ~5 ms throughput "
                        "windows do not reach for kernels of a millisecond; off by default")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="stop starting new cases after this many seconds (results so far are kept)")
    p.add_argument("--backward", action="store_true",
                   help="time forward + backward of the differentiable op against Flex and dense SDPA "
                        "(bench/backward.py; writes <prefix>_<suite>_backward.json)")
    p.add_argument("--resume", action="store_true",
                   help="keep the cases already in the output JSON and run only the missing ones "
                        "(long suites in several calls)")


def _count(value, low, high) -> int:
    return int(min(high, max(low, math.floor(value))))


def measure(fn, opts: RunOptions):
    """Run ``fn`` once (the first call, timed), then the three timings, each given about a third
    of ``opts.impl_seconds``. Returns ``(first output, fields)``."""
    from ..timing import cuda_kernel_ms, cuda_median_ms, median_ms, synchronize, throughput_ms

    dev = opts.device
    t0 = time.perf_counter()
    out = fn()
    synchronize(dev)
    first_call_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    synchronize(dev)
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    share_ms = opts.impl_seconds * 1e3 / 3
    # the two calls above warmed everything up: no more warm-up calls below
    repeats = _count(share_ms / estimate_ms, MIN_REPEATS, max(MIN_REPEATS, opts.max_repeats))
    ms = cuda_median_ms(fn, repeats, warmup=0) if dev == "cuda" else median_ms(fn, repeats, warmup=0)
    calls = _count(math.ceil(THROUGHPUT_WINDOW_MS / estimate_ms), 1, MAX_WINDOW_CALLS)
    windows = _count(share_ms / (calls * estimate_ms), MIN_REPEATS, THROUGHPUT_WINDOWS)
    fields = {
        "first_call_s": first_call_s,
        "ms": ms,
        "throughput_ms": throughput_ms(fn, calls, windows, warmup=0, device=dev),
        "kernel_ms": cuda_kernel_ms(fn, calls=_count(share_ms / estimate_ms, 1, 20), warmup=0)
        if dev == "cuda" else None,
        "samples": {"latency": repeats, "throughput_calls": calls, "throughput_windows": windows},
    }
    if opts.sustained_seconds > 0:
        total = _count(opts.sustained_seconds * 1e3 / fields["throughput_ms"], 3, 10**7)
        # a third untimed brings the GPU to its power cap's steady clock; one window over the rest
        fields["sustained_ms"] = throughput_ms(fn, total - total // 3, 1, warmup=total // 3, device=dev)
        fields["samples"]["sustained_calls"] = total
    return out, fields


def run_impl(name, inputs, ref, opts: RunOptions, flop, nbytes) -> dict:
    """One implementation on one case: timings and figures, or why there are none (``skipped``,
    ``unsupported`` for ours on a dtype / head count it lacks, ``refused`` for a Flex run that was
    not compiled, ``error``)."""
    import torch

    from ..timing import synchronize

    res = {}
    watch = FallbackWatch() if name in FLEX else None
    try:
        t0 = time.perf_counter()
        fn = IMPLEMENTATIONS[name](inputs)
        synchronize(opts.device)
        res["setup_s"] = time.perf_counter() - t0
        out, fields = measure(fn, opts)
        res["max_abs_err"] = float((out.to(torch.float64) - ref).abs().max())
        res["correct"] = None if name in UNMASKED else res["max_abs_err"] <= TOLERANCE[inputs.dtype]
        del out
        refusal = watch.reason(fn) if watch is not None else None
        if refusal:
            return {"refused": refusal, **res}
        res.update(fields)
        res["tflops"] = flop / (res["throughput_ms"] * 1e-3) / 1e12
        if "sustained_ms" in res:
            res["sustained_tflops"] = flop / (res["sustained_ms"] * 1e-3) / 1e12
        res["roofline_fraction"] = B.roofline_fraction(res["throughput_ms"], flop, nbytes, opts.peak_tflops,
                                                       opts.bandwidth_tbs)
        if name == "splat_fused":
            res["knobs"] = B.fused_knobs_used(inputs)
    except B.Skip as why:
        res["skipped"] = str(why)
    except torch.cuda.OutOfMemoryError as err:
        res["skipped"] = f"out of memory: {str(err).splitlines()[0]}"[:300]
    except Exception as err:  # keep the suite going; the JSON records the failure
        message = f"{type(err).__name__}: {err}"[:500]
        if watch is not None and recompile_limit_hit(err):
            res["refused"] = f"dynamo's recompile limit was hit (it would have run eagerly): {message}"
        elif name in OURS and (inputs.gqa or inputs.dtype == "bfloat16") \
                and isinstance(err, (ValueError, NotImplementedError, TypeError)):
            res["unsupported"] = message
        else:
            res["error"] = message
    finally:
        if opts.device == "cuda":
            torch.cuda.empty_cache()
    return res


def run_case(case, impls, opts: RunOptions, console):
    """Every implementation in ``impls`` on ``case``, same inputs; ours compile with cold caches."""
    inputs = make_inputs(case, opts.device)
    acsr = inputs.acsr
    nnz_mean = float(np.mean(acsr.nnz))
    flop = B.flops(case.batch, case.heads, nnz_mean, case.head_dim)
    nbytes = B.min_bytes(case.batch, case.heads, case.kv_heads, case.seq_len, case.head_dim,
                         inputs.q.element_size())
    row = {"case": case.as_dict(), "name": case.name, "density": float(acsr.density),
           "nnz_per_head": nnz_mean, "causal": inputs.causal, "results": {}}
    ref = reference_output(inputs)
    with B.cold_compile_caches():
        for name in impls:
            res = run_impl(name, inputs, ref, opts, flop, nbytes)
            row["results"][name] = res
            console.print(f"  {name:22s} " + _status(res))
    add_speedups(row)
    return row


def _status(res) -> str:
    if "throughput_ms" in res:
        return (f"{res['throughput_ms']:.4f} ms back to back, {res['ms']:.4f} ms per call, "
                f"err {res['max_abs_err']:.1e}" + ("" if res["correct"] is not False else "  WRONG"))
    for key in ("unsupported", "refused", "skipped", "error"):
        if key in res:
            return f"{key}: {res[key]}"
    return ""


def _comparable(res) -> bool:
    """Timed, and not known to be wrong."""
    return "throughput_ms" in res and res.get("correct") is not False


def add_speedups(row):
    """``results[ours][f"{timing}_speedup"][base]`` = base's time / ours, for every timing both
    have, when both are timed and neither is wrong."""
    results = row["results"]
    for ours in OURS:
        mine = results.get(ours, {})
        if not _comparable(mine):
            continue
        for key, field in TIMINGS.items():
            if mine.get(field):
                mine[f"{key}_speedup"] = {base: r[field] / mine[field] for base, r in results.items()
                                          if base != ours and _comparable(r) and r.get(field)}


def summarise(rows):
    """``summary[ours][base]``: geomean and min speedup of ours over base across the cases where
    both ran (``geomean_throughput_speedup``, ``min_throughput_speedup``, ``throughput_cases``,
    and the same for ``latency`` and ``kernel``)."""
    out = {}
    for ours in OURS:
        per_base = {}
        for base in IMPLEMENTATIONS:
            entry = {}
            for key in TIMINGS:
                ratios = [r["results"][ours][f"{key}_speedup"][base] for r in rows
                          if base in r["results"].get(ours, {}).get(f"{key}_speedup", {})]
                if ratios:
                    entry[f"geomean_{key}_speedup"] = B.geomean(ratios)
                    entry[f"min_{key}_speedup"] = min(ratios)
                    entry[f"{key}_cases"] = len(ratios)
            if entry:
                per_base[base] = entry
        if per_base:
            out[ours] = per_base
    return out


def summarise_by_dtype(rows):
    """:func:`summarise` over the cases of each dtype separately."""
    dtypes = sorted({r["case"]["dtype"] for r in rows})
    return {dt: summarise([r for r in rows if r["case"]["dtype"] == dt]) for dt in dtypes}


def _cell(res, field) -> str:
    if res.get(field) is not None:
        return f"{res[field]:.3f}" + (" ✗" if res.get("correct") is False else "")
    for key, label in (("unsupported", "unsup"), ("refused", "refused"), ("skipped", "skip"), ("error", "err")):
        if key in res:
            return label
    return "-"


def print_table(rows, summary, console):
    """Throughput first (the figure for training and prefill), then per-call latency and kernels."""
    from rich.table import Table

    impls = [i for i in IMPLEMENTATIONS if any(i in r["results"] for r in rows)]
    for key, title in (("throughput", "back to back, ms per call (median of windows)"),
                       ("latency", "one call + one sync, ms (median)"),
                       ("kernel", "GPU time of the kernels, ms (CUPTI)"),
                       ("sustained", "back to back for --sustained seconds, ms per call (the last two thirds)")):
        field = TIMINGS[key]
        if not any(res.get(field) is not None for r in rows for res in r["results"].values()):
            continue  # no kernel times on the CPU
        table = Table(title=f"sparse attention: {title}")
        table.add_column("case")
        table.add_column("density", justify="right")
        for i in impls:
            table.add_column(i, justify="right")
        table.add_column("fused / flex", justify="right")
        for r in rows:
            res = r["results"]
            speedup = res.get("splat_fused", {}).get(f"{key}_speedup", {}).get("flex")
            table.add_row(r["name"], f"{r['density']:.3f}", *[_cell(res.get(i, {}), field) for i in impls],
                          f"{speedup:.2f}x" if speedup else "-")
        console.print(table)
    for ours, per in summary.items():
        for key in TIMINGS:
            parts = [f"{b} {s[f'geomean_{key}_speedup']:.2f}x (min {s[f'min_{key}_speedup']:.2f}x, "
                     f"{s[f'{key}_cases']} cases)" for b, s in per.items() if f"geomean_{key}_speedup" in s]
            if parts:
                console.print(f"[bold]{ours}[/] {key} speedup, geomean: " + ", ".join(parts))


def _meta(args, opts, impls):
    import torch
    import tvm

    meta = {
        "command": shlex.join(["tvm-splat", *getattr(args, "argv", sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if opts.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "tvm": tvm.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "max_repeats": opts.max_repeats,
        "impl_seconds": opts.impl_seconds, "peak_tflops": opts.peak_tflops,
        "bandwidth_tbs": opts.bandwidth_tbs, "sustained_seconds": opts.sustained_seconds,
        "reference": "float64 masked attention (bench/inputs.py)",
        "tolerance": TOLERANCE, "implementations": list(impls),
        "ours_first_call": "cold: empty in-memory kernel cache and a fresh TVM_SPLAT_CACHE_DIR per case "
                           "(untuned and tuned share kernels when their knobs agree)",
    }
    if any(i in FLEX for i in impls):
        meta["dynamo"] = configure_dynamo()
        meta["flex_eager_probe_works"] = eager_probe_works()
    return meta


def run_bench(args):
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log file: wide enough for a column per implementation
        console = Console(width=220)
    opts = RunOptions(args.device, args.repeats, args.impl_seconds, args.peak_tflops, args.bandwidth_tbs,
                      getattr(args, "sustained", 0.0))
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("tvm-splat bench needs a CUDA GPU (torch.cuda.is_available() is False); "
                             "--device cpu checks the harness on the CPU")
    cases = [c for c in suite(args.suite) if not args.pattern or c.pattern in args.pattern]
    impls = args.impl or list(DEFAULT_IMPLS)
    if TRAINING_IMPL in impls:
        raise ValueError(f"{TRAINING_IMPL} is timed forward + backward: run tvm-splat bench --backward")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _meta(args, opts, impls)
    rows = []
    start = time.time()
    json_path = out_dir / f"{args.prefix}_{args.suite}.json"
    if args.resume and json_path.exists():
        previous = json.loads(json_path.read_text())
        rows = previous["cases"]  # all of them: a filtered resume must not drop earlier cases
        meta["resumed_from"] = previous["meta"].get("date")
    done = {r["name"] for r in rows}
    todo = [c for c in cases if c.name not in done]

    def write():
        json_path.write_text(json.dumps({"meta": meta, "summary": summarise(rows),
                                         "summary_by_dtype": summarise_by_dtype(rows), "cases": rows},
                                        indent=1))

    for i, case in enumerate(todo):
        if time.time() - start > args.time_budget:
            console.print(f"[yellow]time budget reached; {len(todo) - i} cases not run[/]")
            meta["cases_not_run"] = [c.name for c in todo[i:]]
            break
        console.print(f"[bold]{case.name}[/]")
        rows.append(run_case(case, impls, opts, console))
        write()
    write()
    print_table(rows, summarise(rows), console)
    from .plot import plot_speedups

    plot_speedups(rows, out_dir / f"{args.prefix}_{args.suite}.png")
    console.print(f"wrote {json_path}")
    return rows
