"""The transposed structure of a mask: for each key column, the query rows that see it.

The backward pass of attention accumulates ``dK`` and ``dV`` per *key*, so it walks the mask by
columns. This module gives that structure as plain data beside the ACSR, as an ACSR of the
transposed mask (row ``j`` of the result holds the query rows ``i`` with ``mask[i, j]``):

* :func:`transpose_pattern` in closed form, per pattern class: windows, dilated windows,
  non-causal strided, block-local, global tokens and dense masks are symmetric (their own
  transpose; global rows and columns swap into each other); a causal window, causal dilated
  window or causal strided pattern becomes its anti-causal twin (:class:`Transposed`); unions
  and per-head patterns transpose part by part. No n x n array is built.
* :func:`transpose_acsr` for any ACSR (irregular masks, CSR fallback rows, masks built from a
  boolean array): from the ACSR's own segments, re-cut into affine segments of the transposed
  rows (irregular ones fall back to CSR again).
* :func:`transposed_acsr` picks the closed form when the mask is a pattern and the generic path
  otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import check_int, check_sequence_length
from .acsr import ACSR
from .patterns import (BlockLocal, Dense, DilatedWindow, GlobalTokens, Pattern, PerHead, Strided,
                       Union, Window, _column, _reach)
from .segments import decompose_sorted_columns

__all__ = ["Transposed", "transpose_pattern", "transpose_acsr", "transposed_acsr"]

#: pattern classes whose mask equals its transpose whatever their arguments
_ALWAYS_SYMMETRIC = (Dense, BlockLocal, GlobalTokens)
#: pattern classes that are symmetric unless ``causal``
_SYMMETRIC_UNLESS_CAUSAL = (Window, DilatedWindow, Strided)


@dataclass(frozen=True)
class Transposed(Pattern):
    """The transpose of a causal ``Window``, ``DilatedWindow`` or ``Strided`` pattern: row
    ``i`` holds the columns ``j`` with ``part``'s ``mask[j, i]`` (an anti-causal pattern: every
    column is ``>= i``). Build it with :func:`transpose_pattern`."""

    part: Pattern

    def __post_init__(self):
        if not (isinstance(self.part, _SYMMETRIC_UNLESS_CAUSAL) and self.part.causal):
            raise ValueError(f"Transposed holds a causal Window, DilatedWindow or Strided pattern, "
                             f"got {self.part!r} (use transpose_pattern)")

    def _contains(self, i, j, n):
        return self.part._contains(j, i, n)

    def _segments(self, i, n):
        part = self.part
        if isinstance(part, Window):  # causal: j in [i - w, i]  ->  columns [i, i + w]
            hi = np.minimum(i + _reach(part.width, n), n - 1)
            return _column(i, np.ones_like(i), hi - i + 1)
        if isinstance(part, DilatedWindow):  # j = i + d k, -w <= k <= 0  ->  i + d k, 0 <= k <= w
            d = _reach(part.dilation, n)
            k_hi = np.minimum(_reach(part.width, n), (n - 1 - i) // d)
            return _column(i, np.full_like(i, d), k_hi + 1)
        # Strided, causal: (|i - j| < local or (i - j) % s == 0) and j <= i  ->  the same with j >= i
        s, local = _reach(part.stride, n), _reach(part.local, n)
        band_hi = np.minimum(i + local - 1, n - 1)
        start = np.stack([i, i], axis=1)
        step = np.stack([np.ones_like(i), np.full_like(i, s)], axis=1)
        count = np.stack([np.maximum(band_hi - i + 1, 0), (n - 1 - i) // s + 1], axis=1)
        return start, step, count

    def _mask_mod(self, n):
        inner = self.part._mask_mod(n)

        def transposed(b, h, q_idx, kv_idx):
            return inner(b, h, kv_idx, q_idx)

        return transposed


def transpose_pattern(pattern: Pattern) -> Pattern:
    """The pattern of ``pattern``'s transposed mask, in closed form (see the module docstring):
    ``transpose_pattern(p).dense_mask(n) == p.dense_mask(n).T`` (per head for ``PerHead``).
    Raises ``ValueError`` for a pattern class it has no closed form for."""
    if isinstance(pattern, Transposed):
        return pattern.part
    if isinstance(pattern, _ALWAYS_SYMMETRIC):
        return pattern
    if isinstance(pattern, _SYMMETRIC_UNLESS_CAUSAL):
        return Transposed(pattern) if pattern.causal else pattern
    if isinstance(pattern, Union):
        return Union(tuple(transpose_pattern(p) for p in pattern.parts))
    if isinstance(pattern, PerHead):
        return PerHead(tuple(transpose_pattern(p) for p in pattern.heads))
    raise ValueError(f"no closed-form transpose for {type(pattern).__name__}; "
                     "build its ACSR and use transpose_acsr")


def transpose_acsr(acsr: ACSR, max_segments: int = 4) -> ACSR:
    """The ACSR of ``acsr``'s transposed mask, per head, from its segments (any mask: affine
    rows, CSR fallback rows, empty rows). O(nnz log nnz); the transposed rows are cut into at
    most ``max_segments`` affine segments, else stored as CSR rows."""
    if not isinstance(acsr, ACSR):
        raise ValueError(f"transpose_acsr takes an ACSR, got {type(acsr).__name__}")
    max_segments = check_int("max_segments", max_segments, 1)
    heads, csrs = [], []
    for h in range(acsr.num_heads):
        row, col = acsr.value_columns(h)
        order = np.lexsort((row, col))  # by (col, row): the transposed (row, column) order
        t_row, t_col = col[order], row[order]
        heads.append(decompose_sorted_columns(acsr.n, t_row, t_col))
        csrs.append((t_row, t_col))
    return ACSR._from_segment_lists(acsr.n, heads, csrs, max_segments)


def transposed_acsr(mask, n: int, max_segments: int = 4) -> ACSR:
    """The transposed ACSR of ``mask`` for ``n`` rows: a pattern in closed form (falling back to
    :func:`transpose_acsr` for a pattern class without one), an ACSR by :func:`transpose_acsr`."""
    n = check_sequence_length(n)
    if isinstance(mask, ACSR):
        if mask.n != n:
            raise ValueError(f"the ACSR mask is for sequence length {mask.n}, not {n}")
        return transpose_acsr(mask, max_segments)
    if not isinstance(mask, Pattern):
        raise ValueError(f"expected an ACSR or a Pattern, got {type(mask).__name__}")
    try:
        transposed = transpose_pattern(mask)
    except ValueError:
        return transpose_acsr(ACSR.from_pattern(mask, n, max_segments), max_segments)
    return ACSR.from_pattern(transposed, n, max_segments)
