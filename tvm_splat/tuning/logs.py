"""Tuning logs: ``<root>/<target>/<workload>/`` holds one MetaSchedule JSON database.

``<root>`` is ``$TVM_SPLAT_TUNING_LOGS`` if set, else the ``tuning_logs/`` folder of this
repository (where the committed H100 records live), else ``./tuning_logs``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import tvm

from ..schedules.targets import as_target, target_name

logger = logging.getLogger("tvm_splat.tuning")
_ANNOUNCED: set = set()


def log_root() -> Path:
    env = os.environ.get("TVM_SPLAT_TUNING_LOGS")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "tuning_logs"
    return repo if repo.is_dir() else Path("tuning_logs")


def workload_name(kernel: str, spec) -> str:
    return f"{kernel}_{spec.key}"


def workload_dir(kernel: str, spec, target, root=None) -> Path:
    return Path(root or log_root()) / target_name(as_target(target)) / workload_name(kernel, spec)


def open_database(path: Path, create=False):
    from tvm.s_tir import meta_schedule as ms

    if not create and not (path / "database_tuning_record.json").exists():
        return None
    path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(path), allow_missing=True)


def apply_best(kernel: str, func, spec, target, root=None):
    """The best tuned schedule of ``func`` for ``target`` as a PrimFunc, or ``None`` (and a
    one-time message) when no record matches this workload."""
    path = workload_dir(kernel, spec, target, root)
    db = open_database(path)
    sch = None
    if db is not None:
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        sch = db.query_schedule(mod, target=as_target(target), workload_name="main")
    if sch is None:
        key = (str(path), "miss")
        if key not in _ANNOUNCED:
            _ANNOUNCED.add(key)
            logger.info("no tuning record for %s; using the default schedule", path.name)
        return None
    key = (str(path), "hit")
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        logger.info("applying tuned schedule from %s", path)
    return sch.mod["main"]
