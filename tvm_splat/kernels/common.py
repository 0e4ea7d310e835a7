"""Pieces the attention kernels share: constants, TIR expression builders and steps.

The builders are Python functions returning TIR expressions (called from inside TVMScript,
like ``T.if_then_else``), so a kernel body names a step instead of spelling out its
arithmetic; the steps shared by the warp-level tensor-core kernels (forward and training) are
``T.macro``\\ s made by a factory for the kernel's constants (:func:`row_segment_cache`).
"""
from __future__ import annotations

import contextlib
import math

import tvm
from tvm.script import tirx as T

NEG_INIT = -1.0e30  # running-max start: finite, so exp2(m_old - m_new) never sees inf - inf
LOG2E = math.log2(math.e)


def normalised(acc, row_sum):
    """``acc / row_sum`` for a finished softmax row, and exactly 0 for a row that attended to
    nothing (``row_sum == 0``). A NaN ``row_sum`` (a non-finite score: +inf in q, inf - inf)
    propagates as NaN like dense attention, instead of passing for an empty row."""
    return T.if_then_else(row_sum == T.float32(0), T.float32(0), acc / row_sum)


def natural_lse(row_max, row_sum):
    """The natural-log log-sum-exp ``(M + log2 L) ln 2`` of a finished softmax row kept in
    base 2 (``row_max`` M of the ``log2(e)``-scaled scores, ``row_sum`` L), ``-inf`` for a row
    that attended to nothing (``L == 0``); a NaN L (a non-finite score) gives NaN."""
    return T.if_then_else(row_sum == T.float32(0), T.float32(-math.inf),
                          (row_max + T.log2(row_sum)) * T.float32(math.log(2.0)))


def segment_member(start, last, sigma, seg_sigma, col):
    """Whether ``col`` lies on the segment ``start, start + sigma, .., last`` of a row, where
    the segment's effective step is ``seg_sigma`` and the column block's step is ``sigma``
    (only segments of the block's step can hold its columns; ``seg_sigma == 0``: unused)."""
    return T.And(T.And(seg_sigma == sigma, col >= start),
                 T.And(col <= last, T.truncmod(col - start, sigma) == 0))


def any_of(conds):
    """The OR of a non-empty Python list of TIR conditions (unrolled at generation time)."""
    out = conds[0]
    for c in conds[1:]:
        out = T.Or(out, c)
    return out


# ---------------------------------------------------------------------------- key lengths
#: name of the per-batch key-length buffer (``[batch]`` int32) of kernels with ``has_kv_len``
KV_LEN = "kv_len"


def key_length(spec, kv_len, b):
    """Keys of batch ``b`` that exist: ``min(kv_len[b], seq_len)`` for a spec with key lengths
    (the clamp keeps every load inside k and v whatever the buffer holds; values are checked
    against [0, n] where they enter, :func:`tvm_splat.planner.AttentionPlan.run`), else the
    Python int ``seq_len``, so a kernel without lengths compares against the same constant it
    always did."""
    if not spec.has_kv_len:
        return spec.seq_len
    return T.min(kv_len[b], spec.seq_len)


def clipped_count(start, step, count, length):
    """How many columns ``start + step * k`` (``k < count``, ``step > 0``) lie below ``length``:
    an affine segment clipped to the valid keys (0 when it starts past them)."""
    return T.max(0, T.min(count, T.floordiv(length - start + step - 1, T.max(step, 1))))


def without_unused_kv_len(spec, func):
    """``func`` itself when ``spec.has_kv_len``; otherwise ``func`` without its ``kv_len``
    parameter, which its body then never reads (:func:`key_length` gave the constant
    ``seq_len``). Kernels are written once with the parameter; this keeps the signature and the
    generated code of kernels without lengths exactly what they were."""
    if spec.has_kv_len:
        return func
    params = [p for p in func.params if p.name != KV_LEN]
    if len(params) != len(func.params) - 1:
        raise ValueError(f"kernel {func.attrs['global_symbol']} has no {KV_LEN} parameter")
    return tvm.tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


# ---------------------------------------------------------------------------- tensor-core tiles
# Pieces of the warp-level kernels (kernels/tiled_mma.py, kernels/backward_mma.py), in which a
# thread owns a few rows of a tile ("row slots") and caches their segments in registers.

#: the V check's independent chains of packed FMAs: one a 32-bit word of a thread's 16-byte chunk
NONFINITE_CHAINS = 4


def nonfinite_fma(dtype):
    """The packed FMA of two 16-bit ``dtype`` (float16 / bfloat16) elements that a non-finite
    check chains, ``fma(chain, word, 0, chain)``: ``x 0 + c`` over both halves of ``word`` is a
    signed zero for a finite ``x`` and NaN for NaN or inf, and NaN stays NaN. One instruction a
    word, where an integer test (exponent mask, carry into the sign bit, sign mask) takes three."""
    return {"float16": T.ptx.fma.rn.f16x2, "bfloat16": T.ptx.fma.rn.bf16x2}[dtype]


def nonfinite_joined(chains):
    """Non-zero exactly when one of the :data:`NONFINITE_CHAINS` chains of :func:`nonfinite_fma`
    (a uint32 buffer) met a NaN or inf: the chains or-ed, their halves' sign bits dropped (a
    finite element leaves a signed zero)."""
    joined = chains[0]
    for c in range(1, NONFINITE_CHAINS):
        joined = joined | chains[c]
    return joined & T.uint32(0x7FFF7FFF)


def row_segment_cache(rows_per_thread, max_segments, tile_row):
    """The step ``cache_row_segments(sg, rows, seg_start, seg_count, seg_sigma, hm, w, lane,
    nrows)`` (a ``T.macro``) of a kernel whose threads own ``rows_per_thread`` row slots
    (slot ``r``: tile row ``tile_row(w, lane, r)``, global row ``rows[r]``): for every slot and
    segment ``s < max_segments`` of mask head ``hm``, ``sg[(r S + s) 3 + (0, 1, 2)]`` = (first
    column, last column, step), step 0 for an empty segment or a slot past the tile's
    ``nrows`` rows (int32 registers, ``3 rows_per_thread max_segments`` of them)."""
    RS, S = rows_per_thread, max_segments

    @T.macro
    def cache_row_segments(sg, rows, seg_start, seg_count, seg_sigma, hm, w, lane, nrows):
        # per thread row: (start, last, sigma) of every segment (sigma 0: none)
        for r in T.unroll(RS):
            for s in T.unroll(S):
                if tile_row(w, lane, r) < nrows:
                    sg[(r * S + s) * 3] = seg_start[hm, rows[r], s]
                    sg[(r * S + s) * 3 + 1] = (seg_start[hm, rows[r], s]
                                               + seg_sigma[hm, rows[r], s] * (seg_count[hm, rows[r], s] - 1))
                    sg[(r * S + s) * 3 + 2] = T.if_then_else(seg_count[hm, rows[r], s] > 0, seg_sigma[hm, rows[r], s],
                                                             0)
                else:
                    sg[(r * S + s) * 3 + 2] = 0

    return cache_row_segments


#: CUDA's limit on ``gridDim.y`` (``gridDim.x`` goes to 2**31 - 1)
GRID_Y_MAX = 65535


def tile_grid_rows(num_tiles: int, kernel: str) -> int:
    """``num_tiles``, the ``blockIdx.y`` extent of a tiled kernel's grid, checked against
    :data:`GRID_Y_MAX` (``ValueError`` naming the kernel otherwise).

    The tiled kernels launch ``(batch x heads, tiles)``: ``blockIdx.x``, which the GPU
    dispatches first, runs over the heads, so every head's program ``t`` starts before any
    head's program ``t + 1``. The tile plan puts each head's longest programs first, so the
    heaviest tiles of *all* heads start in the first wave (longest-first over the whole grid)
    instead of one head's at a time, whose last heavy tile then ends the kernel alone. The
    warp-level kernel (``tiled_mma``) reads its launch order through
    :func:`~tvm_splat.kernels.tiled_mma.program_tile`, which on grids of many heads takes a
    head's row tiles in groups instead, so that fewer heads' K and V share L2 at once."""
    if num_tiles > GRID_Y_MAX:
        raise ValueError(f"{kernel}: {num_tiles} row tiles per head exceed CUDA's grid limit of {GRID_Y_MAX}; "
                         f"use larger row tiles (br) or a shorter sequence")
    return num_tiles


def launch_bounds(min_blocks_per_sm: int):
    """The scope (``with launch_bounds(n):`` inside the block bindings, around the thread
    bindings) that asks the CUDA compiler to fit ``n`` thread blocks per SM
    (``__launch_bounds__(threads, n)``: registers a thread at most ``65536 / (n threads)``);
    ``n == 0``: no such request, the compiler's choice."""
    if min_blocks_per_sm:
        return T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", min_blocks_per_sm)
    return contextlib.nullcontext()


def block_range_cache(rows_per_thread, max_segments, bc, unit_step_branch=False):
    """``(block_ranges, in_block)`` of a kernel whose threads own ``rows_per_thread`` row slots
    with segments cached by :func:`row_segment_cache`, over column blocks of ``bc`` columns
    ``col0 + sig c`` (``0 <= c < bc``):

    * ``block_ranges(rng, sg, full, col0, sig, c_last)`` (a ``T.macro``, once per block): for
      every slot ``r`` and segment ``s``, the block columns the segment holds, ``rng[2 (r S + s)]
      .. rng[2 (r S + s) + 1]`` (int32 registers, ``2 rows_per_thread max_segments`` of them;
      empty: ``1 .. 0``). A segment of the block's step and residue holds the columns between two
      exact quotients; a FULL block (``full == 1``) holds all of them, in the first range.
      ``c_last``: None, or the last block column that may be attended (key lengths), which then
      caps every range.
    * ``in_block(rng, r, c)``: whether block column ``c`` lies in a range of slot ``r``: ``2 S``
      integer compares, where a test against the segments themselves needs a residue by the
      runtime step per score (measured in the training kernels,
      :mod:`tvm_splat.kernels.backward_mma`).

    ``unit_step_branch``: ``block_ranges`` first branches on the block's step (uniform over the
    block): at step 1 (windows, causal and block-local masks) a segment's range is its ends
    less ``col0``, without the residue and the two divisions by the runtime step (about 15
    instructions each, per row slot and segment)."""
    RS, S, BC = rows_per_thread, max_segments, bc

    def in_block(rng, r, c):
        return any_of([T.And(c >= rng[(r * S + s) * 2], c <= rng[(r * S + s) * 2 + 1]) for s in range(S)])

    def capped(hi, c_last):
        return hi if c_last is None else T.min(hi, c_last)

    @T.macro
    def block_ranges(rng, sg, full, col0, sig, c_last):
        for r in T.unroll(RS):
            for s in T.unroll(S):
                if full == 1:
                    rng[(r * S + s) * 2] = T.if_then_else(s == 0, 0, 1)
                    rng[(r * S + s) * 2 + 1] = T.if_then_else(s == 0, capped(BC - 1, c_last), 0)
                else:
                    if T.And(sg[(r * S + s) * 3 + 2] == sig, T.truncmod(col0 - sg[(r * S + s) * 3], sig) == 0):
                        rng[(r * S + s) * 2] = T.truncdiv(sg[(r * S + s) * 3] - col0, sig)
                        rng[(r * S + s) * 2 + 1] = capped(T.truncdiv(sg[(r * S + s) * 3 + 1] - col0, sig), c_last)
                    else:
                        rng[(r * S + s) * 2] = 1
                        rng[(r * S + s) * 2 + 1] = 0

    @T.macro
    def step_branched_ranges(rng, sg, full, col0, sig, c_last):
        # block_ranges twice, the step a literal 1 in the first copy (its residue and divisions
        # fold away)
        if sig == 1:
            block_ranges(rng, sg, full, col0, 1, c_last)
        else:
            block_ranges(rng, sg, full, col0, sig, c_last)

    return (step_branched_ranges if unit_step_branch else block_ranges), in_block
