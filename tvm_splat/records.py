"""Tuning records: where they live and how a workload's best one is read.

``<root>/<target>/<kernel>_<spec.key>/`` holds one MetaSchedule JSON database per tuned row
kernel (``row``, ``sddmm``, ``softmax``, ``spmm``) and, for the tiled kernel,
``tiled_<spec.key>/best.json`` (the winning :class:`~tvm_splat.schedules.tiled.TiledKnobs` and
every measured program's time) beside its database. ``<root>`` is ``$TVM_SPLAT_TUNING_LOGS`` if
set, else the ``tuning_logs/`` folder of this repository (where the committed GPU records live),
else ``./tuning_logs``.

This module only reads records (and names their paths); :mod:`tvm_splat.tuning` writes them.
It sits below :mod:`tvm_splat.compile` and :mod:`tvm_splat.planner`, which pick records up.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import tvm

from .schedules.targets import as_target, target_name
from .schedules.tiled import (TiledKnobs, program_form, program_without_variants, tiled_program_name, uses_mma,
                              with_measured_variants)

logger = logging.getLogger("tvm_splat.tuning")
_ANNOUNCED: set = set()  # (path, hit/miss) already logged once


def log_root() -> Path:
    env = os.environ.get("TVM_SPLAT_TUNING_LOGS")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1] / "tuning_logs"
    return repo if repo.is_dir() else Path("tuning_logs")


def workload_name(kernel: str, spec) -> str:
    return f"{kernel}_{spec.key}"


def workload_dir(kernel: str, spec, target, root=None) -> Path:
    return Path(root or log_root()) / target_name(as_target(target)) / workload_name(kernel, spec)


def open_database(path: Path, create=False):
    """The MetaSchedule JSON database in ``path`` (None when there is none and not ``create``)."""
    from tvm.s_tir import meta_schedule as ms

    if not create and not (path / "database_tuning_record.json").exists():
        return None
    path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(path), allow_missing=True)


def _announce(path: Path, hit: bool, what: str) -> None:
    key = (str(path), hit)
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        if hit:
            logger.info("applying tuned %s from %s", what, path)
        else:
            logger.info("no tuning record for %s; using the default %s", path.name, what)


def apply_best(kernel: str, func, spec, target, root=None):
    """The best tuned schedule of row kernel ``func`` for ``target`` as a PrimFunc, or ``None``
    (and a one-time message) when no record matches this workload."""
    path = workload_dir(kernel, spec, target, root)
    db = open_database(path)
    sch = None
    if db is not None:
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        sch = db.query_schedule(mod, target=as_target(target), workload_name="main")
    _announce(path, sch is not None, "schedule")
    return None if sch is None else sch.mod["main"]


def best_knobs_path(spec, target, root=None) -> Path:
    """Where the tiled kernel's best knobs of a workload are recorded."""
    return workload_dir("tiled", spec, target, root) / "best.json"


#: how much faster than the default program a record's winner must have measured for the
#: planner to take it (relative, of the default's time). The tuner times the ``tiled`` kernel
#: alone: not the split-KV ``split_merge`` nor a multi-component plan's ``merge``, whose cost
#: changes with the plan (global 64 + block 64 + window 32, n=4096, 12 heads: 16 split slots
#: of 64 rows in the default's 64x64 plan, 52 of 32 rows in the 32x32 plan that won its
#: record by 0.8%), while the default rules were measured end to end. And one program's time
#: moves by 1-2% between measurements (H200, ``h200_models.json``: the ``splat_fused`` and
#: ``splat_fused_untuned`` rows of one knob set 0.994-1.003x apart; window +-1024 fp16: 1137 us
#: in the tuner, 1156 us of kernel time in the bench).
TUNED_MIN_GAIN = 0.02


def tuned_tiled_knobs(spec, target, root=None, default_form: str | None = None, default_program: str | None = None):
    """Knobs of the best tuning record of the tiled kernel for this workload, or None.

    ``default_form``: the kernel form (:func:`~tvm_splat.schedules.tiled.tiled_form`) the
    workload would run untuned. A record whose search measured no program of that form (its
    ``programs_us``: tuned before the form existed) never compared its winner with the
    default, so it is stale and None is returned (a search narrowed to some plans still
    counts, as long as the form was in it). H200, quick suite
    (``benchmarks/results/h200_quick.json``, both rows in one process): of the 9 cases whose
    default is now the TMA form, the records tuned on the H100 before the wgmma/TMA forms
    existed were 1.14-1.49x slower than it on 7 and faster on 2 (window:128 and window:256 at
    batch 1, 0.78x and 0.94x); the dilated and strided records cover their defaults and stay.

    ``default_program``: the name of the program the workload runs untuned
    (:func:`~tvm_splat.schedules.tiled.tiled_program_name`). Where the record measured it and
    its winner, another program, was less than :data:`TUNED_MIN_GAIN` faster, None is returned
    too: a tie within what the tuner cannot see is the default's. A winner that is the default
    program itself (its best schedule knobs) is taken.

    The loop variants are not searched (each program of the tuning space has those its form
    won an A/B with, :func:`~tvm_splat.schedules.tiled.with_measured_variants`), so the
    winner takes its form's current ones, and programs compare without their variant suffixes:
    a record tuned before a form took a variant keeps its plan, form and schedule knobs and
    runs them with the variant (the eight warp-specialized records of the models suite, tuned
    before ``early_rescale`` won its A/B, run with it)."""
    path = best_knobs_path(spec, as_target(target), root)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    measured = record.get("programs_us")
    if default_form is not None and measured is not None \
            and not any(program_form(name) == default_form for name in measured):
        logger.info("ignoring the tiled knobs of %s: its search measured no program of the default's "
                    "form %r (re-tune to compare them)", path.parent, default_form)
        return None
    knobs = with_measured_variants(TiledKnobs.from_dict(record["knobs"]), spec.head_dim)
    default_us = (measured or {}).get(default_program)
    if default_us is None and default_program is not None:  # measured before the form took its variants
        default_us = {program_without_variants(name): us for name, us in (measured or {}).items()}.get(
            program_without_variants(default_program))
    winner = tiled_program_name(knobs, uses_mma(spec, knobs, as_target(target)))
    if default_us is not None and program_without_variants(winner) != program_without_variants(default_program) \
            and record["us"] > default_us * (1 - TUNED_MIN_GAIN):
        logger.info("keeping the default program %s of %s: the record's winner measured %.1f us against its "
                    "%.1f us, less than %.0f%% faster", default_program, path.parent, record["us"], default_us,
                    100 * TUNED_MIN_GAIN)
        return None
    _announce(path.parent, True, "tiled knobs")
    return knobs


def record_mark(paths) -> str:
    """Changes whenever one of the record files changes (so caches never serve a library
    compiled before a new record arrived)."""
    marks = []
    for path in paths:
        if path.exists():
            st = path.stat()
            marks.append(f"{path.name}:{st.st_mtime_ns}:{st.st_size}")
    return ",".join(marks)
