"""Design spaces: our own schedules, with their knobs sampled by MetaSchedule.

A knob that only changes a loop split is a *decision* in the trace
(``sample_categorical`` / ``sample_perfect_tile``): evolutionary search mutates and re-samples
it. A knob that changes the structure of the schedule is enumerated instead: each value gives
its own design space, and the search measures all of them.
"""
from __future__ import annotations

from ..schedules.row import apply_row_schedule
from ..schedules.targets import is_gpu, max_threads

THREAD_CHOICES = (32, 64, 128, 256, 512)


def row_space(target):
    """``ScheduleFn`` body for the row kernels: threads per block (GPU) or rows per parallel
    task (CPU) are decisions."""

    def space(sch):
        if is_gpu(target):
            choices = [t for t in THREAD_CHOICES if t <= max_threads(target)]
            threads = sch.sample_categorical(candidates=choices, probs=[1.0 / len(choices)] * len(choices))
            apply_row_schedule(sch, target, threads)
        else:
            from ..kernels.row import ROW_BLOCK

            block = sch.get_sblock(ROW_BLOCK)
            fused = sch.fuse(*sch.get_loops(block))
            outer, inner = sch.split(fused, sch.sample_perfect_tile(fused, n=2, max_innermost_factor=64))
            sch.parallel(outer)
        return sch

    return space


def mutators(target):
    """Mutators that act on the decisions our spaces make."""
    from tvm.s_tir import meta_schedule as ms

    if is_gpu(target):
        return {ms.mutator.MutateThreadBinding(): 1.0}
    return {ms.mutator.MutateTileSize(): 1.0}
