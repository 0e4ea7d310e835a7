"""The ``tvm-splat`` command line: ``demo`` (default job), ``bench`` (GPU benchmark suite)."""
from __future__ import annotations

import argparse
import sys


def _demo(args):
    from .demo import run_demo

    run_demo(pattern=args.pattern, seq_len=args.seq, heads=args.heads, head_dim=args.head_dim,
             batch=args.batch, target=args.target, repeats=args.repeats)


def _bench(args):
    if getattr(args, "backward", False):
        from .bench.backward import run_backward_bench

        run_backward_bench(args)
        return
    from .bench.run import run_bench

    run_bench(args)


def _workload(args, pattern, seq_len, heads, head_dim, batch, dtype, kv_heads=None):
    """The plan of one tuning workload (compile only: tuning measures through MetaSchedule);
    ``kv_heads`` (default ``heads``) key/value heads: a GQA workload's records are its own."""
    from .planner import plan

    return plan(pattern, (batch, heads, seq_len, head_dim), (batch, kv_heads or heads, seq_len, head_dim), dtype,
                None, target=args.target)


def _check_through_plan(workload, console):
    """After tuning: plan the workload as ``sparse_attention`` would and, when this machine has
    the target's device, run it once against the float64 reference."""
    import numpy as np

    from .devices import is_gpu_device
    from .planner import plan
    from .reference import masked_attention

    dev = None
    import tvm

    if workload.target.kind.name == "llvm":
        dev = tvm.cpu()
    elif tvm.cuda(0).exist:
        dev = tvm.cuda(0)
    tuned = plan(workload.acsr, workload.q_shape, workload.kv_shape, workload.spec.dtype, dev,
                 target=workload.target, scale=workload.spec.scale, variant=workload.variant)
    console.print(f"plan after tuning: {tuned.variant}, knobs from {tuned.knobs_source}: {tuned.knobs}")
    if dev is None or workload.spec.dtype == "bfloat16":
        return tuned
    rng = np.random.default_rng(0)
    q = rng.standard_normal(tuned.q_shape).astype(tuned.spec.dtype)
    k, v = (rng.standard_normal(tuned.kv_shape).astype(tuned.spec.dtype) for _ in range(2))
    if is_gpu_device(dev):
        import torch

        out = tuned.run(*(torch.from_numpy(x).cuda() for x in (q, k, v))).float().cpu().numpy()
    else:
        out = tuned.run(q, k, v)
    mask = tuned.acsr.to_dense()
    ref = masked_attention(q, k, v, mask if tuned.acsr.num_heads > 1 else mask[0], scale=tuned.spec.scale)
    console.print(f"tuned kernel run once: max |error| vs float64 reference {np.abs(out - ref).max():.2e}")
    return tuned


def _autotune(args):
    from rich.console import Console

    from .tuning import tune_attention, tune_tiled

    console = Console()
    if _rpc(args) is not None and args.dense:  # checks the RPC flags before any work
        raise SystemExit("--rpc-tracker measures our kernels; --dense tunes TVM's dense attention here only")
    if args.suite:
        _autotune_suite(args, console)
        return
    if args.dense:
        from .baselines.tvm_dense import tune_dense_attention

        path = tune_dense_attention(args.batch, args.heads, args.seq, args.head_dim, args.dtype,
                                    args.target, trials=args.trials, with_mask=True, root=args.log_dir,
                                    console=console)
        console.print(f"TVM dense attention (masked) tuned -> {path}")
        return
    workload = _workload(args, args.pattern, args.seq, args.heads, args.head_dim, args.batch, args.dtype,
                         args.kv_heads)
    variants = ("tiled", "row", "separate") if args.variant == "all" else (args.variant,)
    for variant in variants:
        if variant == "tiled":
            res = tune_tiled(workload, plans=args.plans, stages=args.stages, root=args.log_dir, console=console,
                             rpc=_rpc(args))
            for name, us in res.best_us.items():
                console.print(f"tiled/{name}: best {us:.1f} us -> {res.dirs[name]}")
            if "best" in res.dirs:
                console.print(f"best knobs -> {res.dirs['best']}")
        else:
            res = tune_attention(workload, trials=args.trials, variant=variant, root=args.log_dir, console=console,
                                 rpc=_rpc(args))
            for name, us in res.best_us.items():
                console.print(f"{variant}/{name}: best {us:.1f} us -> {res.dirs[name]}")
        if args.log_dir is None:  # records where plan() looks: show that it picks them up
            _check_through_plan(_workload_variant(workload, variant), console)


def _workload_variant(workload, variant):
    from .planner import plan

    return plan(workload.acsr, workload.q_shape, workload.kv_shape, workload.spec.dtype, None,
                target=workload.target, scale=workload.spec.scale, variant=variant)


def _autotune_suite(args, console):
    """Tune the tiled kernel (and with ``--dense`` TVM's dense attention, once per shape) for
    every case of a bench suite; cases with a record already are skipped (resumable)."""
    import time

    from rich.table import Table

    from .bench.suite import suite
    from .records import best_knobs_path
    from .tuning import tune_tiled

    start, table = time.time(), Table(title=f"autotune --suite {args.suite} ({args.target})")
    for col in ("case", "best program", "best us", "programs"):
        table.add_column(col)
    shapes_done = set()
    for case in suite(args.suite):
        if time.time() - start > args.time_budget:
            console.print(f"[yellow]time budget reached at {case.name}; run again to continue[/]")
            break
        if args.dense:
            shape = (case.batch, case.heads, case.seq_len, case.head_dim, case.dtype)
            if shape not in shapes_done:
                from .baselines.tvm_dense import dense_fits, dense_log_dir, tune_dense_attention

                shapes_done.add(shape)
                if not dense_fits(case.batch, case.heads, case.seq_len):
                    console.print(f"TVM dense attention {shape}: the dense scores do not fit in GPU memory, skipped")
                    continue
                if dense_log_dir(*shape, args.target, True, args.log_dir).joinpath("tuned.json").exists():
                    console.print(f"TVM dense attention {shape}: already tuned, skipped")
                    continue
                path = tune_dense_attention(*shape, args.target, trials=args.trials, with_mask=True,
                                            root=args.log_dir, console=console)
                console.print(f"TVM dense attention {shape} -> {path}")
            continue
        workload = _workload(args, case.pattern, case.seq_len, case.heads, case.head_dim, case.batch, case.dtype,
                             case.kv_heads)
        if best_knobs_path(workload.spec, args.target, args.log_dir).exists():
            console.print(f"{case.name}: already tuned, skipped")
            continue
        console.print(f"[bold]{case.name}[/]")
        res = tune_tiled(workload, plans=args.plans, stages=args.stages, root=args.log_dir, console=console,
                         rpc=_rpc(args))
        if res.best_us:
            name, us = min(res.best_us.items(), key=lambda kv: kv[1])
            table.add_row(case.name, name, f"{us:.1f}", str(len(res.best_us)))
    console.print(table)


def _rpc(args):
    """The RPC tracker of ``--rpc-tracker`` / ``--rpc-key``, or None (measure here)."""
    if args.rpc_tracker is None and args.rpc_key is None:
        return None
    from .tuning.tune import RPCTracker

    if args.rpc_tracker is None or args.rpc_key is None:
        raise SystemExit("--rpc-tracker and --rpc-key go together")
    try:
        return RPCTracker.parse(args.rpc_tracker, args.rpc_key, args.rpc_workers, args.rpc_timeout)
    except ValueError as why:
        raise SystemExit(str(why)) from None


def _plans(text):
    """``"64x64,32x32"`` -> ``((64, 64), (32, 32))``."""
    try:
        plans = tuple(tuple(int(x) for x in item.lower().split("x")) for item in text.split(","))
    except ValueError:
        plans = ()
    if not plans or any(len(p) != 2 or min(p) <= 0 for p in plans):
        raise argparse.ArgumentTypeError(f"plans must look like 64x64,32x32, got {text!r}")
    return plans


def _positive_int(text):
    """An int >= 1 (sizes, repeats, trials)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _stages(text):
    """``"1,2"`` -> ``(1, 2)``: K/V pipeline depths of the tiled kernel (1 or 2 each)."""
    try:
        stages = tuple(int(x) for x in text.split(","))
    except ValueError:
        stages = ()
    if not stages or any(s not in (1, 2) for s in stages):
        raise argparse.ArgumentTypeError(f"stages must be a comma-separated list of 1 and 2 (e.g. 1,2), got {text!r}")
    return stages


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvm-splat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build ACSR, compile kernels for the local target, check and time them")
    demo.add_argument("--pattern", default="global:4+window:32",
                      help="pattern, e.g. window:256, dilated:128:2, strided:128, block:64, global:16+window:256")
    demo.add_argument("--seq", type=_positive_int, default=512)
    demo.add_argument("--heads", type=_positive_int, default=4)
    demo.add_argument("--head-dim", type=_positive_int, default=64)
    demo.add_argument("--batch", type=_positive_int, default=1)
    demo.add_argument("--target", default=None, help="llvm, cuda or a tag such as nvidia/nvidia-h100 (default: local)")
    demo.add_argument("--repeats", type=_positive_int, default=10)
    demo.set_defaults(func=_demo)

    tune = sub.add_parser("autotune", help="tune our kernels with MetaSchedule (XGBoost cost model); resumable")
    tune.add_argument("--pattern", default="window:256")
    tune.add_argument("--seq", type=_positive_int, default=4096)
    tune.add_argument("--heads", type=_positive_int, default=12)
    tune.add_argument("--kv-heads", type=_positive_int, default=None,
                      help="key/value heads (GQA/MQA; must divide --heads; default: --heads)")
    tune.add_argument("--head-dim", type=_positive_int, default=64)
    tune.add_argument("--batch", type=_positive_int, default=1)
    tune.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    tune.add_argument("--target", default="nvidia/nvidia-h100")
    tune.add_argument("--trials", type=_positive_int, default=64, help="trials per row kernel (the tiled space is enumerated)")
    tune.add_argument("--variant", default="tiled", choices=("tiled", "row", "separate", "all"),
                      help="tiled: the tiled kernel's plan and schedule knobs; row/separate: the row kernels")
    tune.add_argument("--plans", type=_plans, default=None, metavar="BRxBC,...",
                      help="tile plans the tiled search measures, e.g. 64x64,32x32 (default: the built-in list)")
    tune.add_argument("--stages", type=_stages, default=(1, 2),
                      metavar="S,...", help="cp.async pipeline depths the tiled search measures (default: 1,2)")
    tune.add_argument("--log-dir", default=None, help="tuning log root (default: tuning_logs/)")
    tune.add_argument("--dense", action="store_true",
                      help="tune TVM's own dense (masked) attention instead: the tuned TVM baseline of the bench")
    tune.add_argument("--suite", default=None, choices=("tiny", "quick", "models", "full"),
                      help="tune every case of this bench suite (tiled kernel, or TVM dense with --dense) "
                           "instead of one workload; cases already tuned are skipped")
    tune.add_argument("--time-budget", type=float, default=float("inf"),
                      help="with --suite: start no new case after this many seconds")
    tune.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT",
                      help="measure on the RPC servers of TVM's tracker (python -m tvm.exec.rpc_tracker) instead of here")
    tune.add_argument("--rpc-key", default=None, help="the key the RPC servers registered with")
    tune.add_argument("--rpc-workers", type=_positive_int, default=None,
                      help="candidates measured at once over RPC (default: the servers the tracker lists under the key)")
    tune.add_argument("--rpc-timeout", type=_positive_int, default=120,
                      help="seconds one RPC session (upload, link, measure one candidate) may take")
    tune.set_defaults(func=_autotune)

    bench = sub.add_parser("bench", help="benchmark suite against SDPA, FlexAttention and TVM dense (needs a CUDA GPU)")
    from .bench.run import add_bench_args

    add_bench_args(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as given, for the records it writes (bench meta)
    try:
        args.func(args)
    except ValueError as err:
        print(f"tvm-splat: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
