"""Pieces every attention kernel shares: constants and TIR expression builders.

They are Python functions returning TIR expressions (called from inside TVMScript, like
``T.if_then_else``), so a kernel body names a step instead of spelling out its arithmetic.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

NEG_INIT = -1.0e30  # running-max start: finite, so exp2(m_old - m_new) never sees inf - inf
LOG2E = math.log2(math.e)


def normalised(acc, row_sum):
    """``acc / row_sum`` for a finished softmax row, and exactly 0 for a row that attended to
    nothing (``row_sum == 0``). A NaN ``row_sum`` (a non-finite score: +inf in q, inf - inf)
    propagates as NaN like dense attention, instead of passing for an empty row."""
    return T.if_then_else(row_sum == T.float32(0), T.float32(0), acc / row_sum)


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
