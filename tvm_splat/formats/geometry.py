"""Geometry of an ACSR mask: what the tiling layer needs to pick a schedule.

:func:`analyse_geometry` reads the segment tables (never a dense mask) and returns a
:class:`Geometry`. The ``kind`` is a best guess used to choose a tiling; kernels must stay
correct for any kind.

Kinds, tried in this order (``global rows`` = full rows, ignored by the later tests):

* ``dense``: every row of every head is full;
* ``irregular``: some row fell back to an indexed (CSR) segment;
* ``block``: every row is one contiguous segment and the mask is block diagonal;
* ``band``: every row is one contiguous segment containing its diagonal, with
  non-decreasing first and last columns (windows, causal windows);
* ``dilated``: every row is one segment, all of one step d > 1;
* ``strided``: rows are a contiguous band around the diagonal plus segments of one step
  s > 1 on the diagonal's residue class (Sparse-Transformer strided);
* ``union``: anything else that is still affine (window + global tokens, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._checks import check_int

__all__ = ["Geometry", "analyse_geometry", "KINDS"]

KINDS = ("band", "dilated", "strided", "block", "union", "irregular", "dense")


@dataclass(frozen=True, eq=False)
class Geometry:
    """Shape facts of an ACSR mask.

    ``row_lo``/``row_hi``: int32 [Hm, n], first column and last column + 1 of each row
    (both 0 for an empty row).
    """

    kind: str
    n: int
    num_heads: int
    max_row_nnz: int
    max_segments: int
    irregular_rows: int
    dilation: int
    row_lo: np.ndarray = field(repr=False)
    row_hi: np.ndarray = field(repr=False)

    def column_band(self, tile_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Column range touched by each tile of ``tile_rows`` consecutive rows.

        Returns (lo, hi), int32 [Hm, ceil(n / tile_rows)]: min column and max column + 1
        over the non-empty rows of the tile; lo = hi = 0 for a tile with no nonzero.
        """
        tile_rows = check_int("tile_rows", tile_rows, 1)
        tiles = -(-self.n // tile_rows)
        pad = tiles * tile_rows - self.n
        nonempty = self.row_hi > self.row_lo
        lo = np.where(nonempty, self.row_lo, np.iinfo(np.int32).max).astype(np.int64)
        hi = np.where(nonempty, self.row_hi, -1).astype(np.int64)
        lo = np.pad(lo, ((0, 0), (0, pad)), constant_values=np.iinfo(np.int32).max)
        hi = np.pad(hi, ((0, 0), (0, pad)), constant_values=-1)
        lo = lo.reshape(self.num_heads, tiles, tile_rows).min(axis=2)
        hi = hi.reshape(self.num_heads, tiles, tile_rows).max(axis=2)
        empty = hi < 0
        lo[empty] = 0
        hi[empty] = 0
        return np.ascontiguousarray(lo, dtype=np.int32), np.ascontiguousarray(hi, dtype=np.int32)


def _row_extent(seg_start, seg_step, seg_count, indices):
    """First column and last column + 1 per row (0, 0 for empty rows), int64 [Hm, n]."""
    used = seg_count > 0
    indexed = used & (seg_step == 0)
    first = seg_start.astype(np.int64)
    last = seg_start + seg_step * (seg_count - 1).astype(np.int64)
    if indexed.any():
        h = np.broadcast_to(np.arange(seg_start.shape[0])[:, None, None], seg_start.shape)
        first = np.where(indexed, indices[h, np.where(indexed, seg_start, 0)], first)
        last_pos = np.where(indexed, seg_start + seg_count - 1, 0)
        last = np.where(indexed, indices[h, last_pos], last)
    big = np.iinfo(np.int64).max
    lo = np.where(used, first, big).min(axis=2)
    hi = np.where(used, last + 1, -1).max(axis=2)
    empty = ~used.any(axis=2)
    lo[empty] = 0
    hi[empty] = 0
    return lo, hi


def _common_long_step(step, count, rows):
    """Set of steps of segments with count >= 2 in the selected rows."""
    long = (count >= 2) & rows[:, None]
    return set(np.unique(step[long]).tolist())


def _head_kind(n, start, step, count, lo, hi) -> str:
    """Kind of one head from its affine tables [n, S] and row extents [n]."""
    row_nnz = count.sum(axis=1)
    used = count > 0
    nseg = used.sum(axis=1)
    local = (row_nnz < n) & (row_nnz > 0)  # full rows are global; empty rows say nothing
    if not local.any():
        return "dense" if (row_nnz == n).all() else "union"
    i = np.arange(n)
    steps = _common_long_step(step, count, local)
    if (nseg[local] <= 1).all():
        if steps <= {1}:
            contiguous = local & ((hi - lo) == row_nnz)
            if (contiguous == local).all():
                li, hi_, rows = lo[local], hi[local], i[local]
                holds_diag = (li <= rows) & (rows < hi_)
                # block diagonal: the first and last row of a row's column range have
                # the very same range (diagonal-only masks count as a band)
                same_block = ((lo[li] == li) & (hi[li] == hi_)
                              & (lo[hi_ - 1] == li) & (hi[hi_ - 1] == hi_))
                if holds_diag.all() and same_block.all() and (row_nnz[local] > 1).any():
                    return "block"
                monotone = (np.diff(li) >= 0).all() and (np.diff(hi_) >= 0).all()
                if holds_diag.all() and monotone:
                    return "band"
            return "union"
        if len(steps) == 1:
            return "dilated"
        return "union"
    big = steps - {1}
    if len(big) == 1:
        s = big.pop()
        strided_rows = True
        for slot in range(start.shape[1]):
            c, st, sv = count[:, slot], step[:, slot], start[:, slot]
            on = local & (c > 0)
            # step-s segments (and stray single columns) sit on the row's residue class
            res = on & ((st == s) | (c == 1)) & ~((st == 1) & (c > 1))
            if not ((sv[res] - i[res]) % s == 0).all():
                strided_rows = False
            # contiguous segments must be the band through the diagonal
            band = on & (st == 1) & (c > 1)
            if not ((sv[band] <= i[band]) & (i[band] < sv[band] + c[band])).all():
                strided_rows = False
        if strided_rows:
            return "strided"
    return "union"


def analyse_geometry(n, seg_start, seg_step, seg_count, indices) -> Geometry:
    """Geometry from ACSR tables ([Hm, n, S] int32) and ``indices`` ([Hm, L] int32)."""
    seg_start = np.asarray(seg_start, dtype=np.int64)
    seg_step = np.asarray(seg_step, dtype=np.int64)
    seg_count = np.asarray(seg_count, dtype=np.int64)
    hm, _, s = seg_start.shape
    lo, hi = _row_extent(seg_start, seg_step, seg_count, np.asarray(indices, dtype=np.int64))
    row_nnz = seg_count.sum(axis=2)
    indexed_rows = ((seg_step == 0) & (seg_count > 0)).any(axis=2)
    irregular = int(indexed_rows.sum())
    local = (row_nnz < n) & (row_nnz > 0)

    if (row_nnz == n).all():
        kind = "dense"
    elif irregular:
        kind = "irregular"
    else:
        kinds = {_head_kind(n, seg_start[h], seg_step[h], seg_count[h], lo[h], hi[h])
                 for h in range(hm)}
        kind = kinds.pop() if len(kinds) == 1 else "union"

    steps = set()
    for h in range(hm):
        rows = local[h] & ~indexed_rows[h]
        steps |= _common_long_step(seg_step[h], seg_count[h], rows)
    dilation = steps.pop() if len(steps) == 1 and min(steps) > 1 else 1

    return Geometry(kind=kind, n=int(n), num_heads=int(hm),
                    max_row_nnz=int(row_nnz.max()), max_segments=int(s),
                    irregular_rows=irregular, dilation=int(dilation),
                    row_lo=np.ascontiguousarray(lo, dtype=np.int32),
                    row_hi=np.ascontiguousarray(hi, dtype=np.int32))
