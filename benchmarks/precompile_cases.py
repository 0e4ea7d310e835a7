"""Compile the kernels of ``forward_kernels_ab.CASES`` on a machine without a GPU, for a GPU lease.

    python benchmarks/precompile_cases.py CASES [--dtype D ...] [--sms 132] [--variants JSON] [--worker I --workers N]

``CASES``: indices into :data:`forward_kernels_ab.CASES` (``7,6,14``). Each case's plan is made as
``plan(mask, q, k, dtype, "cuda")`` makes it on an H100 or H200 (their sm_90a target; the tuning
record of the workload or the default knobs as a GPU of ``--sms`` SMs runs them:
:func:`tvm_splat.planner.knobs_on_sms`, the warp-specialized form's persistent form and its
program order) and compiled into
``$TVM_SPLAT_CACHE_DIR``. Carry that folder to the GPU machine and set the variable there: the
benchmarks then load the libraries instead of compiling them (about 7 s a kernel on this
machine's two cores; the cache key holds a fingerprint of the kernel sources, so a folder is
good for the code it was built from: build one per checkout or tree of an A/B, with
``PYTHONPATH`` on the tree). Loading a library for CUDA fails here after it was written (no CUDA
runtime): that error is expected and reported as ``built``. ``--worker I --workers N``: this
process takes every ``N``-th job from ``I`` on (run ``N`` in parallel). ``--variants``: the JSON list
``forward_kernels_ab.py --variants`` takes (``'[{}, {"early_rescale": false}]'``): each case is
built once per variant, its knobs overridden as that script overrides them (``{}``: the plan
as made); a variant the knobs refuse is reported as ``refused`` and not counted as a failure,
as that script reports its row as an ``error``.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forward_kernels_ab import CASES

from tvm_splat.formats import parse_pattern
from tvm_splat.planner import knobs_on_sms, plan
from tvm_splat.schedules.targets import arch_specific, as_target

#: the compile target of the lent H100 and H200 (both sm_90a)
TARGET = "nvidia/nvidia-h100"


def device_plan(case: int, dtype: str, sms: int, variant: dict | None = None):
    """The plan the GPU machine makes for ``CASES[case]`` in ``dtype`` (with ``sms`` SMs), its
    knobs overridden by ``variant`` (:class:`~tvm_splat.schedules.tiled.TiledKnobs` fields, as in
    ``forward_kernels_ab.variant_plan``; ``ValueError`` where the knobs refuse them)."""
    pattern, b, h, kvh, n, d = CASES[case]
    workload = (parse_pattern(pattern), (b, h, n, d), (b, kvh, n, d), dtype, None)
    target = arch_specific(as_target(TARGET))
    made = plan(*workload, target=target, variant="tiled")
    knobs = dataclasses.replace(knobs_on_sms(made.knobs, sms, made.acsr, b * h), **(variant or {}))
    return made if knobs == made.knobs else plan(*workload, target=target, variant="tiled", knobs=knobs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", type=lambda text: [int(i) for i in text.split(",")])
    parser.add_argument("--dtype", action="append", choices=("float16", "bfloat16"))
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--variants", type=json.loads, default=[{}])
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    jobs = [(case, dtype, variant) for dtype in (args.dtype or ["bfloat16"]) for case in args.cases
            for variant in args.variants]
    failed = 0
    for index, (case, dtype, variant) in enumerate(jobs):
        if index % args.workers != args.worker:
            continue
        start = time.time()
        try:
            made = device_plan(case, dtype, args.sms, variant)
        except ValueError as err:
            if not variant:  # the case's own plan: an error, as before variants
                raise
            print(f"case {case} {dtype} {variant}: refused: {err}", flush=True)  # forward_kernels_ab's error row
            continue
        try:
            made.compiled()
            outcome = "built"
        except RuntimeError as err:  # the library is written before the CUDA loader is looked for
            outcome = "built" if "loader" in str(err) else f"failed: {err}"
        except Exception as err:  # noqa: BLE001 - a plan that does not build is reported, the rest go on
            outcome = f"failed: {type(err).__name__}: {err}"
        failed += outcome != "built"
        print(f"case {case} {dtype} {made.knobs!r}: {outcome} ({time.time() - start:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
