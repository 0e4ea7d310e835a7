"""Tune our attention kernels with MetaSchedule: evolutionary search + XGBoost cost model.

The measured inputs are real: MetaSchedule fills buffers with random data by default, which
for ACSR metadata would mean out-of-range columns, so the runner is given the actual segment
tables of the mask and random values only for q, k, v and scores.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm_ffi

from ..kernels import row_variant_funcs
from ..planner import AttentionPlan, plan
from ..records import open_database, workload_dir
from ..schedules.targets import as_target, is_gpu
from .space import mutators, row_space


@dataclass
class TuneResult:
    """Best latency per kernel (microseconds) and where its database lives."""

    best_us: dict = field(default_factory=dict)
    dirs: dict = field(default_factory=dict)
    trials: dict = field(default_factory=dict)


def _metadata_args(func, tables: dict) -> list:
    """For each parameter of ``func``: the int32 table of a plan it must receive (by parameter
    name), or None (random data)."""
    return [tables.get(p.name) for p in func.params]


# The argument lists of the last call to ``alloc_arguments`` in this process. MetaSchedule's
# LocalRunner keeps one worker process but asks it for arguments anew for every measured
# candidate; filling the [batch, heads, n, n] arrays of a dense task with fresh random data
# each time cost more than measuring the candidate.
_LAST_ARGS: dict = {}


def _random_array(shape, dtype, rng, block=1 << 20):
    """Standard-normal values of ``dtype`` (0/1 for integers): one random block repeated, so
    gigabyte arrays cost a copy rather than a random draw per element."""
    size = int(np.prod(shape, dtype=np.int64))
    if np.issubdtype(np.dtype(dtype), np.integer) or dtype == "bool":
        values = rng.integers(0, 2, min(size, block))
    else:
        values = rng.standard_normal(min(size, block), dtype=np.float32)
    return np.resize(values.astype(dtype), size).reshape(shape)


def alloc_arguments(device, args_info, alloc_repeat, fixed=None):
    """``alloc_repeat`` argument lists for MetaSchedule's runner: the arrays of ``fixed``
    where given (ACSR / plan tables), random data elsewhere (q, k, v, outputs). A call with
    the same arguments as the previous one in this process gets the same tensors back, so
    without ``fixed`` this is itself an ``f_alloc_argument`` making a task's random inputs
    once rather than once per measured candidate."""
    fixed = list(fixed) if fixed is not None else [None] * len(args_info)
    key = (str(device), repr(args_info), alloc_repeat,
           tuple(None if a is None else hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()
                 for a in fixed))
    if key in _LAST_ARGS:
        return _LAST_ARGS[key]
    _LAST_ARGS.clear()  # first free the previous task's tensors: dense ones take gigabytes
    rng = np.random.default_rng(0)
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for array, (_, dtype, shape) in zip(fixed, args_info):
            if array is None:
                array = _random_array(tuple(shape), dtype, rng)
            args.append(tvm.runtime.tensor(np.ascontiguousarray(array), device))
        repeated.append(args)
    _LAST_ARGS[key] = repeated
    return repeated


def _alloc_with_metadata(fixed):
    """MetaSchedule ``f_alloc_argument`` for one task: fixed arrays where given."""

    def alloc(device, args_info, alloc_repeat):
        return alloc_arguments(device, args_info, alloc_repeat, fixed)

    return alloc


# The logger MetaSchedule configures with ``logging.config.dictConfig`` on every tuning run.
META_SCHEDULE_LOGGER = "tvm.s_tir.meta_schedule"


@contextlib.contextmanager
def unnamed_log_handlers_detached():
    """Detach the handlers without a name from MetaSchedule's logger for the duration; attach
    them again afterwards.

    Every ``tune_tir`` / ``tune_relax`` runs ``meta_schedule.logging.create_loggers``, which
    lists the names of the handlers already on ``tvm.s_tir.meta_schedule`` in a dictConfig;
    an unnamed one (``get_name()`` is None) makes it fail with ``AttributeError: 'NoneType'
    object has no attribute 'format'``. After a first tuning run that logger no longer
    propagates, so anything attaching handlers to non-propagating loggers (pytest's log capture
    does, for every test phase) or a user's own ``addHandler`` set the trap for the next run.
    The detached handlers miss MetaSchedule's records of this run only.
    """
    logger = logging.getLogger(META_SCHEDULE_LOGGER)
    detached = [h for h in logger.handlers if h.get_name() is None]
    for handler in detached:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in detached:
            logger.addHandler(handler)  # no-op for a handler that is already there


def run_us(run_secs) -> float:
    """A measured candidate's latency in microseconds: the median of MetaSchedule's
    ``run_secs`` (a record's or a runner result's)."""
    return float(np.median([float(s) for s in run_secs])) * 1e6


def _progress_callback(progress, task, parts=False):
    """A measure callback that advances ``task`` of the rich ``progress`` and shows the best
    latency so far: the fastest candidate of any task, or with ``parts`` (tasks that each
    compute one part of a program, as the kernels of a Relax module) the sum of each task's
    best over the tasks measured so far."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    best = {}  # task id (0 without parts) -> best latency in us

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            key = task_id if parts else 0
            for res in runner_results:
                if res.run_secs:
                    us = run_us(res.run_secs)
                    best[key] = min(best.get(key, float("inf")), us)
            progress.update(task, advance=len(runner_results),
                            best=f"{sum(best.values()):.1f} us" if best else "-")

    return Progress()


def build_kernel(mod, target, _params=None):
    """MetaSchedule build function (``f_build``) for our kernels.

    The default one imports ``tvm.s_tir.tensor_intrin`` in every fresh builder process, which
    parses TVMScript for hundreds of intrinsics (about 15 s on a CPU core) while the modules
    it builds are already scheduled, tensorized included; LocalBuilder restarts its pool on
    every batch, so that import dominated the time of a tuning run."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def local_builder(timeout_sec, max_workers=None):
    """MetaSchedule's LocalBuilder with :func:`build_kernel`; ``max_workers`` defaults to half
    the cores (the other half is left to the runner and the search)."""
    from tvm.s_tir import meta_schedule as ms

    if max_workers is None:
        max_workers = max(1, (os.cpu_count() or 2) // 2)
    return ms.builder.LocalBuilder(timeout_sec=timeout_sec, max_workers=max_workers, f_build=build_kernel)


@dataclass(frozen=True)
class RPCTracker:
    """Where MetaSchedule measures candidates instead of this machine: TVM's RPC tracker at
    ``host:port`` and the servers registered under ``key`` (one per GPU), started with::

        python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190     # needs tornado
        CUDA_VISIBLE_DEVICES=0 python -m tvm.exec.rpc_server --tracker HOST:9190 --key h200 --no-fork &
        CUDA_VISIBLE_DEVICES=1 python -m tvm.exec.rpc_server --tracker HOST:9190 --key h200 --no-fork &

    ``--no-fork``: a spawned process per session (the safer choice with CUDA). ``workers``:
    candidates measured at once (default: the servers the tracker lists under ``key``).
    ``session_timeout_s``: seconds one candidate's session may take (upload, link, measure).
    Known issue, cause not found: on the shared 2-core CPU host the *first* session of a tuning
    run hung after loading the module until its timeout in 7 runs of 9 (forked and ``--no-fork``
    servers alike, ``TVM_NUM_THREADS=1`` or not), and was recorded as a failed candidate; every
    later session measured in 2-11 s. Not tried on GPU servers."""

    host: str
    port: int
    key: str
    workers: int | None = None
    session_timeout_s: int = 120

    @classmethod
    def parse(cls, address: str, key: str, workers: int | None = None, session_timeout_s: int = 120) -> "RPCTracker":
        """From ``"HOST:PORT"`` and a key; ``ValueError`` naming what is wrong."""
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"the RPC tracker must be HOST:PORT, got {address!r}")
        if not key:
            raise ValueError("an RPC tracker needs the key its servers registered with (--rpc-key)")
        return cls(host, int(port), key, workers, session_timeout_s)

    def servers(self) -> int:
        """How many servers the tracker lists under ``key`` (asks the tracker)."""
        from tvm import rpc

        info = rpc.connect_tracker(self.host, self.port).summary()
        return sum(1 for s in info["server_info"] if s["key"].split(":", 1)[-1] == self.key)


def measure_runner(f_alloc_argument, rpc: RPCTracker | None = None, timeout_sec=60):
    """MetaSchedule's runner: ``LocalRunner`` (the default), or with ``rpc`` its ``RPCRunner``
    against TVM's tracker, one session per measured candidate. ``f_alloc_argument(device,
    args_info, alloc_repeat)`` makes the inputs (the plan's tables); for RPC it runs against
    the remote device, with the argument cache cleared first (remote tensors die with their
    session)."""
    from tvm.s_tir import meta_schedule as ms

    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=timeout_sec, f_alloc_argument=f_alloc_argument)
    workers = rpc.workers or rpc.servers()
    if workers < 1:
        raise ValueError(f"the RPC tracker {rpc.host}:{rpc.port} lists no server under key {rpc.key!r}")

    def alloc_remote(session, device, args_info, alloc_repeat):
        _LAST_ARGS.clear()
        return f_alloc_argument(device, args_info, alloc_repeat)

    config = ms.runner.RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                                 session_timeout_sec=rpc.session_timeout_s)
    return ms.runner.RPCRunner(config, f_alloc_argument=alloc_remote, max_workers=workers)


def tuning_progress(console=None):
    """The rich progress display of a tuning run: one bar per task with its best latency."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), console=console)


def tuning_target(target) -> tvm.target.Target:
    """MetaSchedule needs the core count of a CPU target."""
    target = as_target(target)
    if is_gpu(target) or "num-cores" in target.attrs:
        return target
    return tvm.target.Target({"kind": "llvm", "num-cores": os.cpu_count() or 1})


def prune_database(path, keep=1):
    """Keep only the ``keep`` best records of each workload (committed logs stay small)."""
    from tvm.s_tir import meta_schedule as ms

    db = open_database(path)
    if db is None:
        return
    tmp = tempfile.mkdtemp()
    fresh = ms.database.JSONDatabase(work_dir=tmp)
    seen = set()
    for rec in db.get_all_tuning_records():
        wl = rec.workload
        key = tvm_ffi.structural_hash(wl.mod)
        if key in seen:
            continue
        seen.add(key)
        new_wl = fresh.commit_workload(wl.mod)
        for best in db.get_top_k(wl, keep):
            fresh.commit_tuning_record(ms.database.TuningRecord(
                best.trace, new_wl, best.run_secs, best.target, best.args_info))
    for name in ("database_workload.json", "database_tuning_record.json"):
        shutil.move(os.path.join(tmp, name), os.path.join(path, name))
    shutil.rmtree(tmp, ignore_errors=True)


def tune_attention(workload: AttentionPlan, *, trials=64, variant="row", root=None, keep=1,
                   console=None, rpc: RPCTracker | None = None) -> TuneResult:
    """Tune every kernel of the row-parallel ``variant`` (``row`` / ``separate``) for the
    workload of ``workload`` (a plan: its ACSR, shapes, dtype, scale and target); resumes from
    an existing database. Writes ``<root>/<target>/<kernel>_<spec.key>/database_*.json`` and
    keeps the ``keep`` best records, which :func:`tvm_splat.records.apply_best` applies.
    ``rpc``: measure on the servers of TVM's RPC tracker (:class:`RPCTracker`) instead of here."""
    from tvm.s_tir import meta_schedule as ms

    spec = workload.spec
    target = tuning_target(workload.target)
    tables = plan(workload.acsr, workload.q_shape, workload.kv_shape, spec.dtype, None, target=target,
                  scale=spec.scale, variant=variant).tables
    result = TuneResult()
    with tuning_progress(console) as progress:
        for name, func in row_variant_funcs(spec, variant).items():
            func = func.with_attr("global_symbol", "main")
            path = workload_dir(name, spec, target, root)
            path.mkdir(parents=True, exist_ok=True)
            database = open_database(path, create=True)
            task = progress.add_task(f"tuning {name}", total=trials, best="-")
            space = ms.space_generator.ScheduleFn(row_space(target), sch_rules=[], postprocs=[],
                                                  mutator_probs=mutators(target))
            with tempfile.TemporaryDirectory() as work, unnamed_log_handlers_detached():
                ms.tune_tir(
                    tvm.IRModule({"main": func}), target, work, max_trials_global=trials,
                    num_trials_per_iter=min(32, trials), space=space, cost_model="xgb",
                    database=database,
                    builder=local_builder(120, max_workers=1),
                    runner=measure_runner(_alloc_with_metadata(_metadata_args(func, tables)), rpc),
                    measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                       _progress_callback(progress, task)],
                    num_tuning_cores=1,
                )
            prune_database(path, keep=keep)
            db = open_database(path)
            recs = db.get_top_k(db.commit_workload(tvm.IRModule({"main": func})), 1)
            result.best_us[name] = run_us(recs[0].run_secs) if recs else None
            result.dirs[name] = str(path)
            result.trials[name] = trials
    return result
