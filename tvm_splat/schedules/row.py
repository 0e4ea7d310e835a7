"""Row-parallel schedule: one row of the ACSR mask per thread (GPU) or per task (CPU).

This is the simple, always-correct schedule for every kernel in
:mod:`tvm_splat.kernels.row`: their spatial loops ``batch, heads, rows`` sit outside the
block ``"row"``, so fusing them and mapping the fused loop to parallel workers is legal for any
mask. Geometry-aware tiled schedules live next to it and fall back to this one.
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir

from ..kernels.row import ROW_BLOCK
from .targets import as_target, is_gpu, max_threads


@dataclass(frozen=True)
class RowKnobs:
    """Knobs of :func:`row_schedule`. ``threads``: rows per thread block on the GPU."""

    threads: int = 128

    def __post_init__(self):
        if isinstance(self.threads, bool) or not isinstance(self.threads, int):
            raise ValueError(f"threads must be an int, got {self.threads!r}")
        if self.threads < 1 or self.threads & (self.threads - 1):
            raise ValueError(f"threads must be a power of two >= 1, got {self.threads}")


def apply_row_schedule(sch: s_tir.Schedule, target, threads=RowKnobs.threads) -> None:
    """Apply the row schedule to ``sch`` in place. ``threads`` may be an int or a sampled
    ``ExprRV`` (MetaSchedule's search decides it then; see :mod:`tvm_splat.tuning`)."""
    target = as_target(target)
    block = sch.get_sblock(ROW_BLOCK)
    fused = sch.fuse(*sch.get_loops(block))
    if is_gpu(target):
        if isinstance(threads, int):
            threads = min(threads, max_threads(target))
        bx, tx = sch.split(fused, [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    else:
        sch.parallel(fused)


def row_schedule(func: tvm.tirx.PrimFunc, target, knobs: RowKnobs = RowKnobs()) -> tvm.tirx.PrimFunc:
    """Schedule a row kernel for ``target``: GPU rows -> threads, CPU rows -> parallel tasks."""
    sch = s_tir.Schedule(func)
    apply_row_schedule(sch, target, knobs.threads)
    return sch.mod["main"]
