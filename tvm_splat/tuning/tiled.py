"""Tuning the tiled fused kernel.

Its knobs come in two kinds. ``br``/``bc`` size the tile plan, so they change the kernel's
buffers: each (br, bc) is its own MetaSchedule workload. ``warps``, ``vector_bytes`` and
``row_pad`` only change the schedule: for one plan, every valid combination is a design space
of one ``ScheduleFn``, each measured by MetaSchedule (the schedule is annotated with its knobs,
so the best record names them). The winner over all plans is written to
``<root>/<target>/fused_<spec.key>/best.json``, which :func:`tuned_tiled_knobs` reads when the
workload matches.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import tvm

from ..kernels.spec import AttentionSpec
from ..schedules.targets import as_target, is_gpu
from .logs import open_database, workload_dir
from .tune import TuneResult, _alloc_with_metadata, _metadata_args, _progress_callback, prune_database, tuning_target

logger = logging.getLogger("tvm_splat.tuning")
PLAN_CHOICES = ((64, 64), (64, 128), (128, 64), (32, 64))
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
    from ..schedules.tiled import TILE_BLOCK, apply_tiled_schedule

    def space(sch):
        out = []
        for kn in choices:
            s = sch.copy()
            s.annotate(s.get_sblock(TILE_BLOCK), KNOB_ANNOTATION, _knob_text(kn))
            apply_tiled_schedule(s, name, target, kn, spec)
            out.append(s)
        return out

    return space


def best_knobs_path(spec, target, root=None) -> Path:
    return workload_dir("fused", spec, target, root) / "best.json"


def tuned_tiled_knobs(spec: AttentionSpec, target, root=None):
    """Knobs of the best tuning record for this workload, or None."""
    from ..schedules.tiled import TiledKnobs

    path = best_knobs_path(spec, as_target(target), root)
    if not path.exists():
        return None
    return TiledKnobs(**json.loads(path.read_text())["knobs"])


def tune_tiled(acsr, batch, heads, head_dim, dtype, target, *, plans=PLAN_CHOICES, root=None,
               console=None, scale=None) -> TuneResult:
    """Measure every plan and schedule variation of the tiled kernel; keep the best."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from tvm.s_tir import meta_schedule as ms

    from ..attention import default_tiled_knobs
    from ..schedules.tiled import TiledKnobs, tiled_funcs
    from ..schedules.tile_plan import plan_tiles

    target = tuning_target(target)
    spec = AttentionSpec.from_acsr(acsr, batch, heads, head_dim, dtype, scale)
    tc = default_tiled_knobs(dtype, target).use_tensor_cores
    result, best = TuneResult(), (float("inf"), None)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("best {task.fields[best]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for br, bc in plans:
            try:
                base = TiledKnobs(br=br, bc=bc, use_tensor_cores=tc)
            except ValueError:
                continue
            plan = plan_tiles(acsr, base)
            func = tiled_funcs(spec, plan.shape, base)["tiled"].with_attr("global_symbol", "main")
            choices = schedule_choices(base, target)
            tag = f"tiled{'_tc' if tc else ''}"
            path = workload_dir(tag, spec, target, root) / plan.shape.key
            path.mkdir(parents=True, exist_ok=True)
            task = progress.add_task(f"tiled {br}x{bc}", total=len(choices), best="-")
            mod = tvm.IRModule({"main": func})
            with tempfile.TemporaryDirectory() as work:
                ms.tune_tir(
                    mod, target, work, max_trials_global=len(choices), num_trials_per_iter=len(choices),
                    space=ms.space_generator.ScheduleFn(_design_spaces("tiled", target, spec, choices),
                                                        sch_rules=[], postprocs=[], mutator_probs={}),
                    cost_model="xgb", database=open_database(path, create=True),
                    builder=ms.builder.LocalBuilder(timeout_sec=300, max_workers=1),
                    runner=ms.runner.LocalRunner(timeout_sec=60, f_alloc_argument=_alloc_with_metadata(
                        _metadata_args(func, acsr, plan))),
                    measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                       _progress_callback(progress, task)],
                    num_tuning_cores=1,
                )
            prune_database(path, keep=1)
            db = open_database(path)
            recs = db.get_top_k(db.commit_workload(mod), 1) if db else []
            if not recs:
                continue
            us = float(np.median([float(s) for s in recs[0].run_secs])) * 1e6
            knobs = _annotated_knobs(recs[0].trace)
            result.best_us[f"tiled_{br}x{bc}"] = us
            result.dirs[f"tiled_{br}x{bc}"] = str(path)
            if knobs is not None and us < best[0]:
                best = (us, knobs)
    if best[1] is not None:
        out = best_knobs_path(spec, target, root)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"knobs": best[1], "us": best[0]}, indent=1))
        result.dirs["best"] = str(out)
    return result


def _annotated_knobs(trace):
    """The knobs a record's trace annotated its tile block with."""
    for inst in trace.insts:
        if inst.kind.name == "Annotate" and str(inst.attrs[0]) == KNOB_ANNOTATION:
            return json.loads(str(inst.inputs[1]))
    return None
