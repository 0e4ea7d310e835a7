"""Ours beside cuDNN's dense kernel at the window's tile length, measured as the bench measures (CUDA GPU).

    python benchmarks/vendor_bound.py OUT.json [--dtype bfloat16] [--rounds 2] [--impl-seconds 0.5]
                                      [--snake] [--clock-log CLOCKS.csv]

Issue 16 asks for 550 TFLOP/s effective on window ±1024 (case 7 of
:data:`forward_kernels_ab.CASES`: n=32768, 16 heads, d=128), "within reach of FA3's dense
efficiency". What a dense kernel of that class reaches depends on how long its row tiles are,
so this script sets ours beside PyTorch's dense SDPA with only the cuDNN backend (the fastest
dense kernel on the lent H100 and H200: ``forward_case.py --dense``) at the window's tile
length, each timed by :func:`tvm_splat.bench.run.measure` (per-call latency, back-to-back
throughput, CUPTI kernel time: ``tvm-splat bench``'s three measures), in one process, the
rows of a case on the same seeded q, k, v tensors. The rows, in this order each round:

* ``ours_window``: our kernel (the planner's default for the device) on case 7;
* ``cudnn_tiles16``: cuDNN on case 16 (dense n=2048, b=16: each 128-row tile walks 16 blocks
  of 128, case 7's tiles 16.72 on average);
* ``ours_tiles16``: our kernel on case 16 (every block FULL: the same work as cuDNN's row);
* ``cudnn_dense``: cuDNN on case 7's q, k, v (dense n=32768: 256 blocks a tile).

Rates: ``effective`` is ``4·B·H·nnz·d`` over the time (the issue's measure; dense rows: all
n² scores), ``computed`` counts what the kernel computes: every score of every block its tile
plan walks (:meth:`~tvm_splat.formats.tile_plan.TilePlan.stats`), so window ±1024's computed
work is 1 / (1 - 0.0575) of its effective work. The summary's ``bound`` per measure is the
median of ``cudnn_tiles16``'s rate times the window's ``1 - masked_share``: the effective rate
of a kernel that computed the window's blocks as fast as cuDNN computes dense tiles of that
length. ``ours_of_bound`` and ``target_of_bound`` (550 / bound) set ours and the target
beside it.

``--snake`` runs odd rounds in the reverse order (``ours_window`` then follows
``cudnn_tiles16`` or itself, never ``cudnn_dense``). In the fortieth session this script's
window row read 534-541 TFLOP/s in bf16 while the bench's own window row read 559-583 on the same
lease. In every round after the first, that row followed cuDNN's dense row, which makes 14 ms
calls at the power cap. ``--clock-log`` samples ``nvidia-smi`` every 50 ms through the rounds
(:func:`forward_case.clock_sampler`) and gives each row the medians of the samples taken
while it ran (``clock``: SM clock, power, temperature, throttle reasons), and the summary
the median SM clock of each row name (``sm_clock_mhz``).
"""
import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forward_case import clock_sampler, clock_summary, dense_call, make_plan, work_flop
from forward_kernels_ab import CASES

#: issue 16's target for window ±1024, effective TFLOP/s
TARGET_TFLOPS = 550.0

#: (row name, case index, implementation): the order each round runs them
ROWS = (("ours_window", 7, "ours"), ("cudnn_tiles16", 16, "cudnn"), ("ours_tiles16", 16, "ours"),
        ("cudnn_dense", 7, "cudnn"))

#: ``--clock-log``'s sampling interval: about ten samples in a row of the default 0.5 s
CLOCK_INTERVAL_MS = 50


def round_rows(rnd: int, snake: bool = False) -> tuple:
    """The rows of round ``rnd`` in the order they run: :data:`ROWS`, reversed in odd rounds
    with ``snake``."""
    return ROWS[::-1] if snake and rnd % 2 else ROWS


#: bench.run.measure's fields that are times of one call, and the name of each measure
MEASURES = {"throughput_ms": "throughput", "ms": "latency", "kernel_ms": "kernel"}


def computed_scores_per_head(tile_plan) -> float:
    """The scores the tile plan computes for one mask head: every ``br`` x ``bc`` score of every
    block its tiles walk, kept by the mask or not."""
    return tile_plan.stats()["scores"] / tile_plan.num_heads


def row_callable(case: int, impl: str, made):
    """``(fn, effective_flop, computed_flop, knobs)`` of one row: ``fn()`` runs the case once on
    ``made``, the case's ``(plan, q, k, v)`` (:func:`forward_case.make_plan`: the planner's
    default plan for the device), shared by the case's rows. Ours: that plan; cudnn: dense
    SDPA, cuDNN only, on the same q, k, v (no causal case here: every row is a full window or
    dense)."""
    pattern, b, h, _kvh, n, d = CASES[case]
    workload, q, k, v = made
    if impl == "cudnn":
        flop = work_flop(pattern, b, h, n, d, dense=True, causal=False)
        return dense_call("cudnn", q, k, v, False), flop, flop, None
    effective = work_flop(pattern, b, h, n, d, dense=False)
    computed = 4.0 * b * h * computed_scores_per_head(workload.tile_plan) * d
    return (lambda: workload.run(q, k, v)), effective, computed, repr(workload.knobs)


def summarize(rows: list) -> dict:
    """Medians by row name over the rounds, and the bound (module docstring) per measure."""
    by_name = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    medians = {}
    for name, group in by_name.items():
        medians[name] = {}
        for field, measure in MEASURES.items():
            ms = statistics.median(r[field] for r in group)
            medians[name][measure] = {"ms": ms, "effective_tflops": group[0]["effective_flop"] / ms / 1e9,
                                      "computed_tflops": group[0]["computed_flop"] / ms / 1e9}
    window = by_name["ours_window"][0]
    kept_share = window["effective_flop"] / window["computed_flop"]
    bound = {}
    for measure in MEASURES.values():
        b = medians["cudnn_tiles16"][measure]["computed_tflops"] * kept_share
        ours = medians["ours_window"][measure]["effective_tflops"]
        bound[measure] = {"bound_effective_tflops": b, "ours_effective_tflops": ours,
                          "ours_of_bound": ours / b, "target_of_bound": TARGET_TFLOPS / b,
                          "ours_computed_of_cudnn_tiles16": medians["ours_window"][measure]["computed_tflops"]
                          / medians["cudnn_tiles16"][measure]["computed_tflops"],
                          "ours_tiles16_of_cudnn_tiles16": medians["ours_tiles16"][measure]["computed_tflops"]
                          / medians["cudnn_tiles16"][measure]["computed_tflops"]}
    summary = {"window_masked_share": 1.0 - kept_share, "medians": medians, "bound": bound}
    clocks = {name: [r["clock"]["sm_clock_mhz"] for r in group if r.get("clock", {}).get("samples")]
              for name, group in by_name.items()}
    if any(clocks.values()):
        summary["sm_clock_mhz"] = {name: statistics.median(c) for name, c in clocks.items() if c}
    return summary


def main(out_path: str, dtype: str = "bfloat16", rounds: int = 2, impl_seconds: float = 0.5, snake: bool = False,
         clock_log: "str | None" = None) -> dict:
    import torch

    from tvm_splat.bench.run import RunOptions, measure

    if not torch.cuda.is_available():
        raise SystemExit("vendor_bound.py needs a CUDA GPU")
    if rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {rounds}")
    opts = RunOptions(impl_seconds=impl_seconds)
    cases = {case: make_plan(case, {}, dtype) for case in dict.fromkeys(case for _, case, _ in ROWS)}
    made = {(case, impl): row_callable(case, impl, cases[case]) for _, case, impl in ROWS}
    rows = []
    with clock_sampler(clock_log, CLOCK_INTERVAL_MS) if clock_log else contextlib.nullcontext():
        for rnd in range(rounds):
            for name, case, impl in round_rows(rnd, snake):
                fn, effective, computed, knobs = made[(case, impl)]
                start = time.time()
                _, fields = measure(fn, opts)
                row = {"round": rnd, "name": name, "case": list(CASES[case]), "dtype": dtype,
                       "effective_flop": effective, "computed_flop": computed, "knobs": knobs, **fields,
                       "start_s": start, "end_s": time.time()}
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("round", "name", "throughput_ms", "ms", "kernel_ms")}),
                      flush=True)
    if clock_log:
        samples = Path(clock_log).read_text()
        for row in rows:
            row["clock"] = clock_summary(samples, row["start_s"], row["end_s"])
    result = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": dtype,
                       "rounds": rounds, "impl_seconds": impl_seconds, "snake": snake,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "command": "python benchmarks/vendor_bound.py " + " ".join(sys.argv[1:])},
              "rows": rows, "summary": summarize(rows)}
    Path(out_path).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"]["bound"], indent=1))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file for every row and the summary")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="bfloat16")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the four rows, alternating")
    parser.add_argument("--impl-seconds", type=float, default=0.5, help="as tvm-splat bench's (0.5 in the suites)")
    parser.add_argument("--snake", action="store_true", help="odd rounds in the reverse order")
    parser.add_argument("--clock-log", help="CSV of nvidia-smi's samples through the rounds")
    args = parser.parse_args()
    main(args.out, args.dtype, args.rounds, args.impl_seconds, args.snake, args.clock_log)
