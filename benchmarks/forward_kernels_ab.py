"""Forward kernel throughput of the default plan, for A/B runs of two versions of the code (CUDA GPU).

    python benchmarks/forward_kernels_ab.py LABEL OUT.json [--cases I,J..] [--variants JSON] [--dtype bfloat16]
        [--reverse] [--warm SECONDS] [--kernel-time]

Runs :data:`CASES` (fp16 unless ``--dtype``, seeded random inputs; ``--cases``: their indices) with the planner's
default knobs and times
``AttentionPlan.run`` by CUDA events over 50 back-to-back calls, the median of 7 windows
(:func:`tvm_splat.timing.throughput_ms`); each row also holds the output's absolute sum, which
must agree between the versions compared. For an A/B, run it once per version of the package
in one GPU lease (``PYTHONPATH=<other checkout> python ...``), alternating, and compare the
rows by case. One warm-up case runs first, untimed, so that no timed case meets the GPU's idle
clock; ``--warm S`` then runs the first case's default plan back to back for ``S`` seconds,
untimed, so that the timed rows start where the GPU has settled under its power cap
(:func:`warm_gpu`; measured, it does not remove the rows that run slow at random places, so
differences under about 10% need ``forward_case.py --seconds``).
``benchmarks/results/h200_forward_ab.json`` holds such runs. ``--variants``: a JSON list
of :class:`~tvm_splat.schedules.tiled.TiledKnobs` overrides of each case's default knobs (``{}``
the default), e.g. ``'[{}, {"br": 128, "warps": 8}, {"split_blocks": 0}]'``, or ``'[{}, {"persistent":
132}]'`` (the persistent form, 132 thread blocks, of the cases whose default is warp-specialized):
one row per variant (``variant``, its knobs, and ``max_diff``, the largest difference of its
output from the first variant's); a variant the planner refuses is a row with its ``error``.
``--kernel-time``: each row also holds ``kernel_ms`` by CUPTI, for kernels short enough that the
host paces the calls (:func:`run_case`).
"""
import argparse
import dataclasses
import json

import torch

from tvm_splat.bench.run import seconds_type
from tvm_splat.formats import parse_pattern
from tvm_splat.planner import plan
from tvm_splat.timing import cuda_kernel_ms, run_for, throughput_ms

#: (pattern, batch, heads, kv_heads, n, head_dim): models-suite shapes, partial-heavy first
CASES = [("global:4+window:256", 1, 12, 12, 4096, 64), ("global:4+window:256", 4, 12, 12, 4096, 64),
         ("global:4+window:256", 8, 16, 16, 4096, 64), ("global:64+block:64+window:32", 4, 12, 12, 4096, 64),
         ("global:4+window:128", 32, 12, 12, 1024, 64), ("window:256", 16, 16, 16, 2048, 64),
         ("causal_window:4095", 1, 32, 8, 8192, 128), ("window:1024", 1, 16, 16, 32768, 128),
         ("dilated:256:2", 1, 12, 12, 8192, 64), ("causal_strided:128", 1, 12, 12, 8192, 64),
         ("dilated:512:4", 1, 8, 8, 8192, 128),  # the cp.async wgmma form (non-unit steps at d=128)
         ("dilated:256:2", 1, 12, 12, 4096, 64), ("dilated:128:4", 1, 12, 12, 4096, 64),  # the quick suite's
         ("causal_strided:128", 1, 16, 16, 8192, 128),  # a union's merge at d=128 (its tuned 32x32 tiles)
         # case 7's shape with wider windows: the same kernel over 65 and 256 column blocks a
         # 128-row tile instead of 17 (a tile's fixed costs spread thinner; 32767: every block
         # FULL, the work of dense attention, beside dense SDPA in forward_case.py --dense)
         ("window:4096", 1, 16, 16, 32768, 128), ("window:32767", 1, 16, 16, 32768, 128),
         # dense attention cut into case 7's 4,096 programs of 128 rows, 16 and 64 FULL blocks
         # a tile (window +-(n-1) keeps every key): ours and dense SDPA (--dense) on the same
         # work, so the cost of a tile beyond its blocks is read off both kernels alike
         ("window:2047", 16, 16, 16, 2048, 128), ("window:8191", 4, 16, 16, 8192, 128),
         # case 13 at batch 4 (64 heads: row tiles in groups), whose plan did not compile with
         # the first grouped decode (an int32 literal of 2**31 in TVM's FlattenBuffer)
         ("causal_strided:128", 4, 16, 16, 8192, 128),
         # the program order's rule (planner.head_group_default) between case 7's 17 blocks a
         # tile and case 14's 65: a sliding window of 33 blocks, and Mistral's causal window at
         # n=32k, whose tiles are 33 blocks long in 88% of the plan (a ramp of 1 to 32 before)
         ("window:2048", 1, 16, 16, 32768, 128), ("causal_window:4095", 1, 32, 8, 32768, 128),
         # a causal window of 8191 at n=32k (32 heads on 8): tiles of 65 blocks after a ramp of
         # 64, where the rule takes runs of 4 heads (0.4% over heads first's busiest block)
         ("causal_window:8191", 1, 32, 8, 32768, 128),
         # block-local attention, the models suite's and the quick suite's: one or two blocks a
         # tile, so each tile's loads and store bound it, not its GEMMs
         ("block:128", 1, 16, 16, 8192, 64), ("block:256", 1, 12, 12, 4096, 64)]


def case_inputs(pattern, b, h, kvh, n, d, dtype="float16"):
    """``(mask, q, k, v)`` of a case: its parsed pattern and seeded random inputs on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, n, d, device="cuda", dtype=getattr(torch, dtype), generator=gen)
    k, v = (torch.randn(b, kvh, n, d, device="cuda", dtype=getattr(torch, dtype), generator=gen) for _ in range(2))
    return parse_pattern(pattern), q, k, v


def variant_plan(mask, q, k, dtype, default, variant):
    """``default`` (the planner's plan of the case), or a plan of its knobs with ``variant``'s
    overrides (a dict of :class:`~tvm_splat.schedules.tiled.TiledKnobs` fields; ``{}``: the default)."""
    if not variant:
        return default
    return plan(mask, q.shape, k.shape, dtype, "cuda", knobs=dataclasses.replace(default.knobs, **variant))


def plan_once(plans, mask, q, k, dtype, default, variant):
    """:func:`variant_plan`, made once per distinct variant and kept in ``plans`` (a dict), so a
    variant listed twice times one plan object in both its rows, as the default's rows do.
    (Thirty-ninth session: with a new plan each row, a variant's second row ran 2-8% slower in 6
    of 7 processes, never the default's. Fortieth session: with one plan, each process's fourth
    row, the variant's second, still ran slow, so the plan was not the cause.)"""
    key = json.dumps(variant, sort_keys=True)
    if key not in plans:
        plans[key] = variant_plan(mask, q, k, dtype, default, variant)
    return plans[key]


def run_case(pattern, b, h, kvh, n, d, label, variants=({},), dtype="float16", kernel_time=False):
    """One row per knob variant of the case, in the order given (the first variant's output is
    the yardstick of ``max_diff``); a variant listed more than once reuses its plan
    (:func:`plan_once`). ``kernel_time``: each row also holds ``kernel_ms``, the GPU time of one
    call's kernels by CUPTI (:func:`~tvm_splat.timing.cuda_kernel_ms`, 50 calls), taken after its
    throughput rows. Kernels shorter than a call's host time are paced by the host in ``ms``:
    block-local 256 (0.018 ms kernels) read 19.4-20.9 or 28-36 us by run, whatever its tiling,
    against 17-21 us of ``AttentionPlan.run`` host time a call (forty-eighth session, H100,
    ``results/h100_forty_eighth_block_variants.json``); ``kernel_ms`` ranks such variants."""
    mask, q, k, v = case_inputs(pattern, b, h, kvh, n, d, dtype)
    default = plan(mask, q.shape, k.shape, dtype, "cuda")
    rows, first, plans = [], None, {}
    for variant in variants:
        row = {"tree": label, "case": f"{pattern} b={b} n={n} d={d}", **({"dtype": dtype} if dtype != "float16" else {}),
               **({"variant": variant} if variant else {})}
        try:
            p = plan_once(plans, mask, q, k, dtype, default, variant)
            out = p.run(q, k, v)
            first = out if first is None else first
            row.update(ms=throughput_ms(lambda: p.run(q, k, v), calls=50, windows=7, warmup=5),
                       sum=float(out.float().abs().sum()), max_diff=float((out.float() - first.float()).abs().max()),
                       knobs=repr(p.knobs))
            if kernel_time:
                row["kernel_ms"] = cuda_kernel_ms(lambda: p.run(q, k, v), calls=50)
        except Exception as err:  # noqa: BLE001 - a refused or failing variant is a result
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
    return rows


def warm_gpu(case, dtype: str, seconds: float) -> int:
    """Run ``case``'s default plan back to back for about ``seconds``
    (:func:`~tvm_splat.timing.run_for`, a sync every 20 calls), untimed; returns the number of
    calls. The rows a process times first can meet the GPU before it has settled under its
    700 W cap: in the fortieth session (H100, case 7 bf16, two
    processes of six rows) the fourth row ran 1.150 and 1.099 ms against 1.023-1.084 for the
    others, the rows after it fast again; in the forty-second (H200) case 7's four rows ran
    1.058, 1.063, 1.068 and 1.091 ms (bf16) while case 6, timed after them, stayed within 0.8%.
    The clock logs of such loops show a transient (``forward_case.py 7 --seconds 3``, H200,
    ``results/h200_forty_second_v_check.json``, ``clock_logs``): the SM clock fell from 1980 to
    1605-1710 MHz at the first sample under load; the power read (an average) rose to the cap
    over 0.8 s, and there the clock dipped to 1395-1470 MHz in all five logs before it held
    1545-1710 MHz at 686-692 W. One warm-up case (about 0.4 s of calls) ends before that dip.
    Measured since (forty-third session, H100, ``results/h100_forty_third_ablations.json``,
    ``row_positions``): the default plan as every variant, cases 7 and 6 (bf16), spread 5-14%
    between its rows in one process with ``--warm 3`` as without, the slow row at no fixed place.
    So the warm-up does not remove the slow rows, and a difference under about 10% needs the
    sustained rows of ``forward_case.py --seconds``."""
    mask, q, k, v = case_inputs(*case, dtype)
    warm = plan(mask, q.shape, k.shape, dtype, "cuda")
    return run_for(lambda: warm.run(q, k, v), seconds, batch=20)


def main(label, out_path, cases=None, variants=({},), dtype="float16", reverse=False, warm=0.0, kernel_time=False):
    """Time ``cases`` × ``variants`` and write the rows to ``out_path``. Each row's ``position``
    is its place among the process's timed rows (1 first). ``reverse``: each case's variants run
    last to first (the last variant is then the yardstick of ``max_diff``), so that two
    processes, one in each order, put every variant at every place of a case's rows. (Fortieth
    session: the fourth timed row of a process ran 4-8% slow, whichever variant it held.)
    ``warm``: seconds of :func:`warm_gpu` on the first case after the warm-up case, recorded in
    every row as ``warm_s`` (0: none, as before). ``kernel_time``: :func:`run_case`'s."""
    if not torch.cuda.is_available():
        raise SystemExit("forward_kernels_ab.py needs a CUDA GPU")
    chosen = [CASES[i] for i in (range(len(CASES)) if cases is None else cases)]
    run_case(*chosen[0], label, dtype=dtype)  # warm-up: the GPU leaves its idle clock
    if warm:
        warm_gpu(chosen[0], dtype, warm)
    rows = []
    for case in chosen:
        for row in run_case(*case, label, list(variants)[::-1] if reverse else variants, dtype, kernel_time=kernel_time):
            row["position"] = len(rows) + 1
            if warm:
                row["warm_s"] = warm
            print(json.dumps(row), flush=True)
            rows.append(row)
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)


def _case(text):
    case = int(text)
    if not 0 <= case < len(CASES):
        raise argparse.ArgumentTypeError(f"case indices run from 0 to {len(CASES) - 1}, got {text}")
    return case


def _indices(text):
    return [_case(i) for i in text.split(",")]


_warm = seconds_type("--warm")


def _variants(text):
    variants = json.loads(text)
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants) or not variants:
        raise argparse.ArgumentTypeError(f"--variants takes a JSON list of knob overrides, got {text}")
    return variants


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("label")
    parser.add_argument("out")
    parser.add_argument("--cases", type=_indices, default=None, help="indices of CASES, comma-separated")
    parser.add_argument("--variants", type=_variants, default=[{}], help="JSON list of TiledKnobs overrides")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--reverse", action="store_true", help="run each case's variants last to first")
    parser.add_argument("--warm", type=_warm, default=0.0,
                        help="seconds of the first case back to back, untimed, before the timed rows")
    parser.add_argument("--kernel-time", action="store_true",
                        help="each row also holds kernel_ms, one call's kernels by CUPTI")
    args = parser.parse_args()
    main(args.label, args.out, args.cases, args.variants, args.dtype, args.reverse, args.warm, args.kernel_time)
