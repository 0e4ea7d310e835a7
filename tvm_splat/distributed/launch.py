"""Run a function on ``world`` local ranks of a fresh process group (tests, benchmarks, quick
experiments without ``torchrun``).

:func:`run_ranks` spawns ``world`` processes with ``torch.multiprocessing`` (the ``spawn``
start method: safe with CUDA); each joins a process group on a free localhost port (``gloo``,
or ``nccl`` with rank r on GPU r), calls ``fn(rank, world, *args)`` and leaves the group. An
exception in any rank is raised in the caller with that rank's traceback; a run that passes
``timeout`` seconds (a hang: a rank waiting on a collective that another never enters) is killed
and raises ``TimeoutError``. ``fn`` must be importable by the children (a module-level
function of a module on their ``sys.path``, which they inherit from the caller).
"""
from __future__ import annotations

import os
import socket
import time

__all__ = ["free_port", "run_ranks"]


def free_port() -> int:
    """A localhost TCP port free at the time of the call (the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, world, port, backend, fn, args):
    import torch
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"  # world ranks share the machine's cores
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, backend: str = "gloo", timeout: float | None = None) -> None:
    """``fn(rank, world, *args)`` on ``world`` spawned ranks of a ``backend`` process group
    (``"gloo"`` or ``"nccl"``); returns when all have finished, raises the first rank's
    exception, or ``TimeoutError`` (every rank killed) after ``timeout`` seconds (None: wait)."""
    import torch.multiprocessing as mp

    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = mp.start_processes(_rank_entry, args=(world, free_port(), backend, fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = None if timeout is None else time.monotonic() + timeout
    while not ctx.join(timeout=None if deadline is None else max(0.1, deadline - time.monotonic())):
        if deadline is not None and time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} ranks did not finish in {timeout} s (a hang?)")
