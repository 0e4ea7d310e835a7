"""Tuning the tiled fused kernel.

Its knobs come in three kinds. ``br``/``bc`` size the tile plan, so they change the kernel's
buffers and tables. For the warp-level ``mma`` kernel (fp16 on the GPU), ``warps``,
``m_tiles`` and ``stages`` shape the program itself. Everything else (``warps``,
``vector_bytes``, ``row_pad`` of the scheduled kernels) only changes the schedule. So every
(plan, program) is its own MetaSchedule task, whose design space holds its schedule variants,
each annotated with its knobs. The space is enumerated, not searched: every candidate of a
workload's tasks not yet in its MetaSchedule database is built in one batch (the builder's
workers, one per core, build them in parallel) and measured by MetaSchedule's runner
(:func:`measure_enumerated`), which feeds each task the real tables of its plan (the
:class:`~tvm_splat.planner.AttentionPlan` of those knobs: the same tables ``run`` uploads), and
every result is a record of that database.
The winner over all tasks is written to ``<root>/<target>/tiled_<spec.key>/best.json``
(:func:`tvm_splat.records.best_knobs_path`), which :func:`tvm_splat.planner.choose_knobs` reads
when the workload matches.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import logging
import multiprocessing
import os

import numpy as np
import tvm

from ..planner import AttentionPlan, plan
from ..kernels.tiled_mma import tma_loads_step
from ..records import best_knobs_path, open_database, workload_dir
from ..schedules.targets import is_gpu
from ..schedules.tiled import (TILE_BLOCK, TMA_HEAD_DIM_MULTIPLE, WGMMA_MIN_HEAD_DIM, TiledKnobs, apply_tiled_schedule,
                               default_tiled_knobs, tiled_funcs, tiled_program_name, uses_mma,
                               with_measured_variants)
from .tune import (RPCTracker, TuneResult, _metadata_args, alloc_arguments, local_builder, measure_runner,
                   prune_database, run_us, tuning_progress, tuning_target)

logger = logging.getLogger("tvm_splat.tuning")
PLAN_CHOICES = ((64, 64), (64, 128), (128, 64), (32, 64))
#: plans of the warp-level kernel (each with every (warps, m_tiles) giving ``br`` rows). 128x64
#: and 64x128 are left out by default: on the H100 they ran 1.5-2x slower than the best plan
#: (window:256, n=4096, ``tuning_logs/cuda-sm_90``); ask for them with ``plans=``.
MMA_PLAN_CHOICES = ((64, 64), (64, 32), (32, 64), (32, 32))
#: extra plans on Hopper: two warpgroups of the wgmma form (128 rows; see WGMMA_MIN_HEAD_DIM)
WGMMA_PLAN_CHOICES = ((128, 64),)
#: the plan of the warp-specialized TMA form (Hopper, head_dim from WGMMA_MIN_HEAD_DIM, a
#: tensor map loading the plan's blocks): searched with that program alone, the form its
#: default takes from WARP_SPECIALIZED_MIN_TILES row tiles
WARP_SPECIALIZED_PLAN = (128, 128)
KNOB_ANNOTATION = "tvm_splat.knobs"


def schedule_choices(base, target):
    """Valid schedule-level variations of ``base`` (same plan)."""
    out = []
    warps = (2, 4, 8) if is_gpu(target) else (base.warps,)
    vecs = (8, 16) if is_gpu(target) else (base.vector_bytes,)
    for w, vb, pad in itertools.product(warps, vecs, (0, 4)):
        try:
            kn = dataclasses.replace(base, warps=w, vector_bytes=vb, row_pad=pad)
        except ValueError:
            continue
        if kn.use_tensor_cores and (kn.br // 16) % kn.warps:
            continue
        out.append(kn)
    return out or [base]


def _knob_text(kn) -> str:
    return json.dumps(dataclasses.asdict(kn), sort_keys=True)


def _design_spaces(name, target, spec, choices):
    def space(sch):
        out = []
        for kn in choices:
            s = sch.copy()
            s.annotate(s.get_sblock(TILE_BLOCK), KNOB_ANNOTATION, _knob_text(kn))
            apply_tiled_schedule(s, name, target, kn, spec)
            out.append(s)
        return out

    return space


def program_choices(base, spec, target, stages=(1, 2), m_tiles=(1,), tma_steps=False):
    """Groups of knobs for one plan, each group one program (one MetaSchedule task) whose
    members differ only in their schedule. ``m_tiles=(1,)`` by default: two m-tiles per warp
    ran slower for every case of ``benchmarks/tc_variants.py`` on the H100 (register spills at
    d=128), so they are searched only when asked for. On Hopper the wgmma form joins, and its
    TMA form where a tensor map loads the plan's column blocks (``tma_steps``, read off the plan:
    one step for all, 1 or a dilation dividing n) and ``head_dim`` is a multiple of
    ``TMA_HEAD_DIM_MULTIPLE``; the plan ``WARP_SPECIALIZED_PLAN`` is one program, the TMA form's
    warp-specialized variant, where it applies (:func:`warp_specialized_applies`). The TMA
    programs carry the loop variants that won their A/B
    (:func:`~tvm_splat.schedules.tiled.with_measured_variants`)."""
    if not uses_mma(spec, base, target):
        return [schedule_choices(base, target)]
    if (base.br, base.bc) == WARP_SPECIALIZED_PLAN:  # that program alone, where it applies
        if not warp_specialized_applies(spec, target, stages, tma_steps):
            return []
        return [[with_measured_variants(dataclasses.replace(base, warps=8, m_tiles=1, stages=2, wgmma=True, tma=True,
                                                            warp_specialized=True), spec.head_dim)]]
    groups = []
    for warps, mt, st in itertools.product((1, 2, 4, 8), m_tiles, stages):
        if 16 * warps * mt != base.br:
            continue
        groups.append([dataclasses.replace(base, warps=warps, m_tiles=mt, stages=st)])
    if _has_wgmma(target) and base.br % 64 == 0 and spec.head_dim <= 256:  # Hopper: the wgmma form too
        groups += [[dataclasses.replace(base, warps=base.br // 16, m_tiles=1, stages=st, wgmma=True)] for st in stages]
        if 2 in stages and tma_steps and spec.head_dim % TMA_HEAD_DIM_MULTIPLE == 0:
            groups.append([with_measured_variants(dataclasses.replace(base, warps=base.br // 16, m_tiles=1, stages=2,
                                                                      wgmma=True, tma=True), spec.head_dim)])
    return groups


def warp_specialized_applies(spec, target, stages=(1, 2), tma_steps=False) -> bool:
    """Whether the tuning space holds the warp-specialized TMA program: Hopper, two-stage
    programs searched, a tensor map loading the plan's blocks, head_dim a multiple of
    ``TMA_HEAD_DIM_MULTIPLE`` from ``WGMMA_MIN_HEAD_DIM`` (at d=64 it lost on every shape)."""
    return (_has_wgmma(target) and 2 in stages and tma_steps and spec.head_dim % TMA_HEAD_DIM_MULTIPLE == 0
            and WGMMA_MIN_HEAD_DIM <= spec.head_dim <= 256)


def _has_wgmma(target) -> bool:
    return str(target.attrs.get("arch", "")) == "sm_90a"


def _args_signature(args_info):
    """``(dtype, shape)`` of each argument, from MetaSchedule's ``(kind, dtype, shape)`` infos."""
    return tuple((str(dtype), tuple(int(x) for x in shape)) for _, dtype, shape in args_info)


def _signature(func):
    """The argument signature of a task, as its runner will see it."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    return _args_signature(a.as_json() for a in ArgInfo.from_prim_func(func))


def _alloc_by_signature(tables):
    """MetaSchedule ``f_alloc_argument`` for several tasks: each argument list is matched to
    its task's plan tables by the (dtype, shape) signature of the arguments."""

    def alloc(device, args_info, alloc_repeat):
        fixed = tables.get(_args_signature(args_info), [None] * len(args_info))
        return alloc_arguments(device, args_info, alloc_repeat, fixed)

    return alloc


def _batches(tasks):
    """Split tasks so that, within a batch, one argument signature means one set of tables
    (two plans with equal table shapes but other contents go to different runs)."""
    batches = []
    for name, (func, choices, fixed) in tasks.items():
        sig = _signature(func)
        for batch in batches:
            other = batch["tables"].get(sig)
            if other is None or all(_same(a, b) for a, b in zip(other, fixed)):
                batch["tasks"][name] = (func, choices)
                batch["tables"][sig] = fixed
                break
        else:
            batches.append({"tasks": {name: (func, choices)}, "tables": {sig: fixed}})
    return batches


def _same(a, b):
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def tiled_tasks(workload: AttentionPlan, target, plans=None, stages=(1, 2), workers=None) -> dict:
    """The programs :func:`tune_tiled` measures for ``workload`` on ``target``: name ->
    ``(PrimFunc, knob choices, fixed tables)``, one per plan shape of ``plans`` (default: the
    target's) and program of :func:`program_choices`, the TMA form where the candidate plan's
    column blocks share one step a tensor map loads (1, or a dilation dividing n), and at
    head_dim >= 128 the warp-specialized program on its own plan (``WARP_SPECIALIZED_PLAN``)
    where the same holds. The PrimFuncs are made by ``workers`` processes (:func:`program_funcs`)."""
    spec, acsr = workload.spec, workload.acsr
    tc = default_tiled_knobs(spec, target).use_tensor_cores
    mma = uses_mma(spec, TiledKnobs(use_tensor_cores=tc), target)
    if plans is None:
        plans = MMA_PLAN_CHOICES + (WGMMA_PLAN_CHOICES if _has_wgmma(target) else ()) if mma else PLAN_CHOICES
        if mma and warp_specialized_applies(spec, target, stages, tma_steps=True):
            plans += (WARP_SPECIALIZED_PLAN,)
    programs = {}  # name -> (plan shape, knob choices, fixed tables)
    for br, bc in plans:
        try:
            base = TiledKnobs(br=br, bc=bc, use_tensor_cores=tc)
        except ValueError:
            continue
        candidate = plan(acsr, workload.q_shape, workload.kv_shape, spec.dtype, None, target=target,
                         scale=spec.scale, variant="tiled", knobs=base)
        tma_steps = tma_loads_step(candidate.tile_plan.shape.step, spec.seq_len)
        for choices in program_choices(base, spec, target, stages, tma_steps=tma_steps):
            programs[tiled_program_name(choices[0], mma)] = (candidate.tile_plan.shape, choices, candidate.tables)
    funcs = program_funcs(spec, target, {name: (shape, choices[0]) for name, (shape, choices, _) in programs.items()},
                          workers)
    tasks = {}
    for name, (_, choices, tables) in programs.items():
        if isinstance(funcs[name], ValueError):  # a program this spec cannot run (e.g. head_dim)
            logger.info("skipping %s: %s", name, funcs[name])
            continue
        func = funcs[name].with_attr("global_symbol", name)
        tasks[name] = (func, choices, _metadata_args(func, tables))
    return tasks


def program_funcs(spec, target, programs: dict, workers=None) -> dict:
    """name -> the ``tiled`` PrimFunc of ``programs`` (name -> (plan shape, knobs)), or the
    ``ValueError`` that refused it. ``workers`` processes (default: one per core for 8 programs
    or more on machines of 4 cores or more, else 1) each parse some of them (``spawn``: fresh
    interpreters, each importing tvm_splat first) and send them back as TVM JSON (a
    warp-specialized program: 0.7 MB, 0.07 s to save, 0.2 s to load). TVMScript's parser makes a program in 1-4 s; on the H200
    machine about 20 s of each models-suite workload's ~50 s of tuning went outside the build
    and measurement, serially here. On this 2-core machine two workers took 27 s against 16 s
    serially for 10 programs (the imports), hence the 4-core floor. On the H200 machine (16
    workers) the models suite's other 32 workloads then took 48.7 s each, against 45-55 s a
    workload for the 8 tuned before (other workloads, parsed serially): no saving shows, and the
    progress bars put 28-42 s of each in the build and measurement. Any failure of the pool
    falls back to parsing here."""
    jobs = [(name, spec, shape, knobs, target.export()) for name, (shape, knobs) in programs.items()]
    if workers is None:  # spawned workers pay for their imports: many programs, several cores
        cores = os.cpu_count() or 1
        workers = cores if cores >= 4 and len(jobs) >= 8 else 1
    if workers > 1 and len(jobs) > 1:
        try:
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)),
                                                        mp_context=multiprocessing.get_context("spawn")) as pool:
                return {name: tvm.ir.load_json(made) if isinstance(made, str) else made
                        for name, made in pool.map(_program_json, jobs)}
        except Exception as why:  # noqa: BLE001 - a broken pool costs time, not the tuning run
            logger.warning("making the programs in %d processes failed (%s); making them here", workers, why)
    return {name: made for name, made in map(_program_func, jobs)}


def _program_func(job):
    """``(name, PrimFunc or the ValueError refusing it)`` of one :func:`program_funcs` job."""
    name, spec, shape, knobs, target = job
    try:
        return name, tiled_funcs(spec, shape, knobs, tvm.target.Target(target))["tiled"]
    except ValueError as why:
        return name, why


def _program_json(job):
    """:func:`_program_func` in a worker process: the PrimFunc as TVM JSON."""
    name, made = _program_func(job)
    return name, made if isinstance(made, ValueError) else tvm.ir.save_json(made)


def tune_tiled(workload: AttentionPlan, *, plans=None, root=None, console=None, stages=(1, 2),
               rpc: RPCTracker | None = None) -> TuneResult:
    """Measure every plan, program and schedule variation of the tiled kernel for the workload
    of ``workload`` (a plan of any variant: its ACSR, shapes, dtype, scale and target); keep the
    best record of each task in ``<root>/<target>/tiled_<spec.key>/`` and the best knobs in its
    ``best.json``. Re-running resumes from the database (measured candidates are not measured
    again). ``rpc``: measure on the servers of TVM's RPC tracker instead of here."""

    spec = workload.spec
    target = tuning_target(workload.target)
    tasks = tiled_tasks(workload, target, plans, stages)
    path = workload_dir("tiled", spec, target, root)
    path.mkdir(parents=True, exist_ok=True)
    result, records = TuneResult(), {}
    with tuning_progress(console) as progress:
        for run in _batches(tasks):
            trials = sum(len(c) for _, c in run["tasks"].values())
            bar = progress.add_task(f"tiled: {len(run['tasks'])} programs", total=trials, best="-")
            measure_enumerated(run, target, spec, open_database(path, create=True),
                               local_builder(300, max_workers=os.cpu_count() or 1),
                               measure_runner(_alloc_by_signature(run["tables"]), rpc),
                               lambda us: progress.update(bar, advance=1, best=f"{us:.1f} us" if us else "-"))
    prune_database(path, keep=1)
    db = open_database(path)
    for rec in (db.get_all_tuning_records() if db else ()):
        knobs = _annotated_knobs(rec.trace)
        if knobs is None or not rec.run_secs:
            continue
        us = run_us(rec.run_secs)
        kn = TiledKnobs.from_dict(knobs)
        name = tiled_program_name(kn, uses_mma(spec, kn, target))
        if name in tasks and us < records.get(name, (float("inf"),))[0]:
            records[name] = (us, knobs)
    for name, (us, _) in sorted(records.items()):
        result.best_us[name] = us
        result.dirs[name] = str(path)
    if records:
        us, knobs = min(records.values(), key=lambda r: r[0])
        out = best_knobs_path(spec, target, root)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"knobs": knobs, "us": us,
                                   "programs_us": {n: round(r[0], 2) for n, r in sorted(records.items())}},
                                  indent=1))
        result.dirs["best"] = str(out)
    return result


def measure_enumerated(run, target, spec, database, builder, runner, advance=lambda us: None):
    """Measure every candidate of a batch of :func:`_batches` (each task's knob choices, as
    :func:`_design_spaces` schedules them) not yet in ``database``, and commit a record for
    each (a failed one at 1e10 s, as MetaSchedule does, so that a resumed run skips it).

    The space is enumerated, so nothing is searched: all candidates of all tasks go to the
    builder in one batch (built in parallel by its workers), then to the runner. MetaSchedule's
    task scheduler, which this replaces here, builds one task's candidates at a time, and most
    tasks hold one candidate (a program of the ``mma`` kernel), so its builds ran one after the
    other: a tuning run of one workload on the H200 machine (16 cores) measured 10 of its 19
    programs in 210 s. ``advance(us)`` is called once per candidate with the best latency so far
    (None before any)."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    pending = []  # (workload, knob text, scheduled module, args info)
    for name, (func, choices) in run["tasks"].items():
        mod = tvm.IRModule({"main": func})
        workload = database.commit_workload(mod)
        done = {_knob_text(TiledKnobs.from_dict(k)) for k in (
            _annotated_knobs(r.trace) for r in database.get_top_k(workload, 1 << 20)) if k is not None}
        for knobs, sch in zip(choices, _design_spaces("tiled", target, spec, choices)(s_tir.Schedule(mod))):
            if _knob_text(knobs) in done:
                advance(None)
                continue
            pending.append((workload, sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)))
    if not pending:
        return
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch, _ in pending])
    runnable = [i for i, b in enumerate(built) if b.error_msg is None]
    device_type = "cpu" if target.kind.name == "llvm" else target.kind.name
    futures = runner.run([ms.runner.RunnerInput(built[i].artifact_path, device_type, pending[i][2])
                          for i in runnable])
    results = dict.fromkeys(range(len(pending)))
    for i, future in zip(runnable, futures):
        results[i] = future.result()
    best = None
    for i, (workload, sch, args_info) in enumerate(pending):
        res = results[i]
        ok = res is not None and res.error_msg is None and res.run_secs
        if not ok:
            why = built[i].error_msg if res is None else res.error_msg
            logger.info("candidate %s failed: %s", _annotated_knobs(sch.trace), str(why)[-1500:])
        run_secs = [tvm.tirx.FloatImm("float64", float(t)) for t in res.run_secs] if ok else \
            [tvm.tirx.FloatImm("float64", 1e10)]
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, run_secs, target, args_info))
        if ok:
            best = min(best or float("inf"), run_us(res.run_secs))
        advance(best)


def _annotated_knobs(trace):
    """The knobs a record's trace annotated its tile block with."""
    for inst in trace.insts:
        if inst.kind.name == "Annotate" and str(inst.attrs[0]) == KNOB_ANNOTATION:
            return json.loads(str(inst.inputs[1]))
    return None
