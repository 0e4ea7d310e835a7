"""Run a function on ``world`` local ranks of a fresh process group (tests, benchmarks, quick
experiments without ``torchrun``).

:func:`run_ranks` spawns ``world`` processes with ``torch.multiprocessing`` (the ``spawn``
start method: safe with CUDA); each joins a process group on a free localhost port (``gloo``,
or ``nccl`` with rank r on GPU r), calls ``fn(rank, world, *args)`` and leaves the group. An
exception in any rank is raised in the caller with the traceback of the rank that failed
**first**; a run that passes ``timeout`` seconds (a hang: a rank waiting on a collective that
another never enters) is killed and raises ``TimeoutError``. ``fn`` must be importable by the
children (a module-level function of a module on their ``sys.path``, which they inherit from
the caller).

Why "first" and not "whichever the join sees": when one rank raises, its peers fail too, a
moment later, as a consequence (gloo: "Connection closed by peer" in whatever collective or
rendezvous they were in). ``torch.multiprocessing``'s join reports the rank whose process it
finds dead first, and a rank that raised first can still be tearing down its group when a
peer's consequent error has already ended that peer's process (seen in CI: rank 1 failed on
purpose, rank 0's connection error was reported). So each rank records the time and traceback
of its own exception the moment it leaves ``fn`` (or the group's setup), before the group is
torn down, and the caller raises the earliest record (torchelastic's root-cause rule).
"""
from __future__ import annotations

import os
import pickle
import shutil
import socket
import tempfile
import time
import traceback

__all__ = ["free_port", "run_ranks"]


def free_port() -> int:
    """A localhost TCP port free at the time of the call (the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record_failure(failure_dir: str, rank: int) -> None:
    """Save this rank's current exception as ``(time_ns, traceback)`` in ``failure_dir/<rank>``
    (the first call of a rank only: the innermost handler sees the exception first)."""
    path = os.path.join(failure_dir, str(rank))
    if not os.path.exists(path):
        with open(path, "wb") as f:
            pickle.dump((time.time_ns(), traceback.format_exc()), f)


def _rank_entry(rank, world, port, backend, fn, args, failure_dir):
    import torch
    import torch.distributed as dist

    try:
        os.environ["OMP_NUM_THREADS"] = "1"  # world ranks share the machine's cores
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            fn(rank, world, *args)
        except BaseException:
            _record_failure(failure_dir, rank)  # before the teardown below closes the peers' connections
            raise
        finally:
            dist.destroy_process_group()
    except BaseException:
        _record_failure(failure_dir, rank)
        raise


def _first_failure(failure_dir: str, world: int):
    """``(rank, traceback, later_ranks)`` of the earliest recorded failure, or None."""
    records = []
    for rank in range(world):
        path = os.path.join(failure_dir, str(rank))
        if os.path.exists(path):
            with open(path, "rb") as f:
                when, trace = pickle.load(f)
            records.append((when, rank, trace))
    if not records:
        return None
    records.sort()
    return records[0][1], records[0][2], [rank for _, rank, _ in records[1:]]


def run_ranks(fn, world: int, *args, backend: str = "gloo", timeout: float | None = None) -> None:
    """``fn(rank, world, *args)`` on ``world`` spawned ranks of a ``backend`` process group
    (``"gloo"`` or ``"nccl"``); returns when all have finished, raises the exception of the rank
    that failed first as ``torch.multiprocessing.ProcessRaisedException`` (its traceback in the
    message, the ranks that failed after it named), or ``TimeoutError`` (every rank killed)
    after ``timeout`` seconds (None: wait)."""
    import torch.multiprocessing as mp

    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    failure_dir = tempfile.mkdtemp(prefix="tvm_splat_ranks_")
    try:
        ctx = mp.start_processes(_rank_entry, args=(world, free_port(), backend, fn, args, failure_dir),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not ctx.join(timeout=None if deadline is None else max(0.1, deadline - time.monotonic())):
                if deadline is not None and time.monotonic() >= deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    raise TimeoutError(f"{world} ranks did not finish in {timeout} s (a hang?)")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as joined:
            # every rank has ended here (the join terminated the rest)
            first = _first_failure(failure_dir, world)
            if first is None:  # no rank raised: one was killed or exited (a signal, os._exit)
                raise
            rank, trace, later = first
            after = f" (then rank{'s' if len(later) > 1 else ''} {', '.join(map(str, later))})" if later else ""
            raise mp.ProcessRaisedException(f"\n\n-- Process {rank:d} failed first{after}, with the following error:\n"
                                            f"{trace}", rank, ctx.processes[rank].pid) from joined
    finally:
        shutil.rmtree(failure_dir, ignore_errors=True)
