"""Arithmetic-progression segments of mask rows, as flat numpy arrays.

A *segment* is the column set ``{start + step*k : 0 <= k < count}`` of one row (``step >= 1``).
This module is pure array code with no knowledge of patterns or of the ACSR class:

* :func:`decompose_sorted_columns` splits sorted CSR rows into greedy maximal segments,
* :func:`merge_row_segments` turns possibly overlapping closed-form segments (what
  ``Pattern.row_segments`` returns) into disjoint ones without enumerating dense rows,
* :func:`expand_segments` lists the columns of segments,
* :func:`greedy_run_starts` is the shared "cut a sequence into maximal affine runs" step,
  used both for columns within a row and for rows within a head (see ``runs.py``).

Everything is vectorised over rows; the only Python loops run over the number of
segments per row or over the number of runs in the longest row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "SegmentList",
    "greedy_run_starts",
    "decompose_sorted_columns",
    "merge_row_segments",
    "expand_segments",
]


@dataclass(frozen=True, eq=False)
class SegmentList:
    """Flat list of segments of one head, each array int64 of shape [m].

    Sorted by (row, start). Within a row the segments are disjoint (by construction of the
    producers below; nothing here re-checks it).
    """

    row: np.ndarray
    start: np.ndarray
    step: np.ndarray
    count: np.ndarray

    def __len__(self) -> int:
        return int(self.row.shape[0])

    def take(self, keep: np.ndarray) -> "SegmentList":
        """Subset by a boolean mask or an index array (order preserved)."""
        return SegmentList(self.row[keep], self.start[keep], self.step[keep], self.count[keep])

    def segments_per_row(self, n: int) -> np.ndarray:
        """int64 [n]: number of segments in each row."""
        return np.bincount(self.row, minlength=n).astype(np.int64)

    def nnz_per_row(self, n: int) -> np.ndarray:
        """int64 [n]: number of columns in each row."""
        out = np.zeros(n, dtype=np.int64)
        np.add.at(out, self.row, self.count)
        return out


def _empty_segments() -> SegmentList:
    z = np.zeros(0, dtype=np.int64)
    return SegmentList(z, z, z, z)


def _concat(parts: list[SegmentList]) -> SegmentList:
    parts = [p for p in parts if len(p)]
    if not parts:
        return _empty_segments()
    return SegmentList(*(np.concatenate([getattr(p, f) for p in parts])
                         for f in ("row", "start", "step", "count")))


def _sorted_by_row_start(seg: SegmentList) -> SegmentList:
    order = np.lexsort((seg.start, seg.row))
    return seg.take(order)


def greedy_run_starts(pair_ok: np.ndarray, same_key: np.ndarray, group_first: np.ndarray,
                      group_end: np.ndarray) -> np.ndarray:
    """Cut elements ``0..m-1`` into greedy maximal runs; return bool [m], True at run starts.

    ``pair_ok`` bool [m-1]: elements p and p+1 may share a run (False across group borders).
    ``same_key`` bool [max(m-2, 0)]: pairs p and p+1 have the same difference ("key"), so a
    run through p, p+1, p+2 stays affine. ``group_first``/``group_end`` int [G]: element
    ranges of the non-empty groups (rows); runs never cross them.

    Greedy: a run starting at element a takes the key of pair a and extends while the
    following pairs are ok and share it; the next run starts right after. Any two elements
    form a run, so only the starts depend on earlier choices; we follow all groups' chains
    in parallel (iterations = runs in the longest group).
    """
    m = int(pair_ok.shape[0]) + 1
    starts = np.zeros(m, dtype=bool)
    if m == 0 or group_first.size == 0:
        return starts
    # last pair of the equal-key stretch containing each pair p
    cont = np.zeros(max(m - 1, 0), dtype=bool)
    if m >= 3:
        cont[:-1] = pair_ok[:-1] & pair_ok[1:] & same_key
    pair_idx = np.arange(m - 1)
    stop_at = np.where(cont, m, pair_idx)
    last_pair = np.minimum.accumulate(stop_at[::-1])[::-1] if m > 1 else stop_at
    # element where a run starting at a ends, then the next start
    run_end = np.arange(m)
    if m > 1:
        ok = pair_ok
        run_end[:-1] = np.where(ok, last_pair + 1, run_end[:-1])
    next_start = run_end + 1

    cur = np.asarray(group_first, dtype=np.int64)
    end = np.asarray(group_end, dtype=np.int64)
    while cur.size:
        starts[cur] = True
        cur = next_start[cur]
        alive = cur < end
        cur, end = cur[alive], end[alive]
    return starts


def decompose_sorted_columns(n: int, row_of: np.ndarray, cols: np.ndarray) -> SegmentList:
    """Arithmetic runs of CSR rows: contiguous pieces first, then greedy maximal runs.

    ``row_of``, ``cols``: int64 [nnz], sorted by (row, col) with no repeated (row, col).
    Returns segments sorted by (row, start); a single column gets step 1.

    Every maximal contiguous piece (>= 2 adjacent columns) becomes one segment, and the
    columns between such pieces are cut greedily. Plain greedy would sometimes glue a
    stray column to the start of a band (``1, 5, 6`` -> ``[1, 5] [6]``); taking contiguous
    pieces whole reproduces windows, blocks, global tokens and strided bands instead.
    """
    m = int(cols.shape[0])
    if m == 0:
        return _empty_segments()
    row_of = np.asarray(row_of, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    same_row = row_of[1:] == row_of[:-1]
    diff = cols[1:] - cols[:-1]
    adjacent = same_row & (diff == 1)
    in_piece = np.zeros(m, dtype=bool)
    in_piece[1:] |= adjacent
    in_piece[:-1] |= adjacent
    # a pair may share a run inside one contiguous piece, or between two loose columns
    pair_ok = adjacent | (same_row & ~in_piece[1:] & ~in_piece[:-1])
    same_key = diff[1:] == diff[:-1]
    first = np.flatnonzero(np.concatenate(([True], ~pair_ok)))
    end = np.concatenate((first[1:], [m]))
    is_start = greedy_run_starts(pair_ok, same_key, first, end)
    s = np.flatnonzero(is_start)
    count = np.diff(np.concatenate((s, [m])))
    step = np.ones_like(count)
    long = count > 1
    step[long] = cols[s[long] + 1] - cols[s[long]]
    return SegmentList(row_of[s], cols[s], step, count)


def expand_segments(seg: SegmentList) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns of all segments in segment order then k order.

    Returns (segment id, k, column), each int64 [sum(count)].
    """
    count = seg.count
    total = int(count.sum())
    seg_id = np.repeat(np.arange(len(seg), dtype=np.int64), count)
    first = np.cumsum(count) - count
    k = np.arange(total, dtype=np.int64) - np.repeat(first, count)
    col = seg.start[seg_id] + seg.step[seg_id] * k
    return seg_id, k, col


def _union_of_intervals(n: int, seg: SegmentList) -> SegmentList:
    """Merge step-1 segments (or single columns) that overlap or touch; result step 1."""
    if not len(seg):
        return seg
    seg = _sorted_by_row_start(seg)
    lo = seg.start
    hi = seg.start + seg.step * (seg.count - 1) + 1
    # running max of interval ends within each row, via row-offset keys (rows sorted)
    key = seg.row * (n + 1) + hi
    running = np.maximum.accumulate(key)
    prev_end = np.full(len(seg), -1, dtype=np.int64)
    prev_end[1:] = running[:-1] - seg.row[1:] * (n + 1)  # negative when the row changed
    opens = lo > prev_end  # touching (lo == prev_end) merges
    first = np.flatnonzero(opens)
    last = np.concatenate((first[1:], [len(seg)])) - 1
    row = seg.row[first]
    start = lo[first]
    stop = running[last] - row * (n + 1)
    return SegmentList(row, start, np.ones_like(start), stop - start)


def _subtract_by_priority(seg: SegmentList) -> SegmentList:
    """Make segments of each row disjoint by enumerating their columns.

    Segments are taken in priority order (contiguous first, then larger step, longer
    first); a column already covered by a higher-priority segment of the row is dropped,
    and what is left of a segment splits into pieces with the segment's own step. This
    keeps pattern structure, e.g. strided rows become [residues below band], band,
    [residues above band].
    """
    if not len(seg):
        return seg
    order = np.lexsort((seg.start, -seg.count, seg.step, seg.row))
    seg = seg.take(order)
    seg_id, k, col = expand_segments(seg)
    last = seg.start + seg.step * (seg.count - 1)
    keep = np.ones(col.shape[0], dtype=bool)
    most = int(seg.segments_per_row(int(seg.row.max()) + 1).max())
    for back in range(1, most):
        other = seg_id - back
        valid = other >= 0
        other = np.where(valid, other, 0)
        valid &= seg.row[other] == seg.row[seg_id]
        o_start = seg.start[other]
        covered = (valid & (col >= o_start) & (col <= last[other])
                   & ((col - o_start) % seg.step[other] == 0))
        keep &= ~covered
    seg_id, k, col = seg_id[keep], k[keep], col[keep]
    if not seg_id.size:
        return _empty_segments()
    new_piece = np.ones(seg_id.shape[0], dtype=bool)
    new_piece[1:] = (seg_id[1:] != seg_id[:-1]) | (k[1:] != k[:-1] + 1)
    first = np.flatnonzero(new_piece)
    count = np.diff(np.concatenate((first, [seg_id.shape[0]])))
    sid = seg_id[first]
    return SegmentList(seg.row[sid], col[first], seg.step[sid], count)


def _intervals_minus_one_progression(n: int, seg: SegmentList) -> SegmentList:
    """Rows made of contiguous segments plus exactly one progression of step > 1
    (strided = band + residues, dilated + global tokens): disjoint pieces in closed form.

    The contiguous segments win; the progression keeps the columns outside their union,
    as pieces with its own step. No column is enumerated.
    """
    if not len(seg):
        return seg
    contiguous = (seg.step == 1) | (seg.count == 1)
    intervals = _union_of_intervals(n, seg.take(contiguous))
    prog = seg.take(~contiguous)  # one per row, rows ascending
    # index of each interval's row progression
    p = np.searchsorted(prog.row, intervals.row)
    a, d, c = prog.start[p], prog.step[p], prog.count[p]
    lo = intervals.start
    hi = intervals.start + intervals.count  # exclusive
    # k range [k_lo, k_hi) of the progression inside the interval, clamped to [0, c]
    k_lo = np.clip(-((a - lo) // d), 0, c)
    k_hi = np.clip((hi - 1 - a) // d + 1, 0, c)
    k_hi = np.maximum(k_hi, k_lo)
    # pieces of the progression: before each interval, and after the row's last one
    same_row_as_prev = np.zeros(len(intervals), dtype=bool)
    same_row_as_prev[1:] = intervals.row[1:] == intervals.row[:-1]
    prev_hi = np.where(same_row_as_prev, np.roll(k_hi, 1), 0)
    is_last = np.ones(len(intervals), dtype=bool)
    is_last[:-1] = ~same_row_as_prev[1:]
    begin = np.concatenate((prev_hi, k_hi[is_last]))
    end = np.concatenate((k_lo, c[is_last]))
    owner = np.concatenate((p, p[is_last]))
    # rows whose progression met no interval at all (cannot happen for mixed rows, but
    # keep the function total)
    untouched = np.setdiff1d(np.arange(len(prog)), p)
    begin = np.concatenate((begin, np.zeros_like(untouched)))
    end = np.concatenate((end, prog.count[untouched]))
    owner = np.concatenate((owner, untouched))
    keep = end > begin
    begin, end, owner = begin[keep], end[keep], owner[keep]
    pieces = SegmentList(prog.row[owner], prog.start[owner] + prog.step[owner] * begin,
                         prog.step[owner], end - begin)
    return _concat([intervals, pieces])


def _join_continuations(seg: SegmentList) -> SegmentList:
    """Join neighbouring segments (sorted by row, start) of equal step where the second
    continues the first, e.g. global tokens [0, g) and a window starting at g."""
    if len(seg) < 2:
        return seg
    last = seg.start + seg.step * (seg.count - 1)
    join = np.zeros(len(seg), dtype=bool)
    join[1:] = ((seg.row[1:] == seg.row[:-1]) & (seg.step[1:] == seg.step[:-1])
                & (seg.start[1:] == last[:-1] + seg.step[1:]))
    if not join.any():
        return seg
    first = np.flatnonzero(~join)
    count = np.add.reduceat(seg.count, first)
    return SegmentList(seg.row[first], seg.start[first], seg.step[first], count)


def merge_row_segments(start: np.ndarray, step: np.ndarray, count: np.ndarray) -> SegmentList:
    """Disjoint segments of the union of per-row closed-form segments.

    ``start``, ``step``, ``count``: int64 [n, P] as returned by ``Pattern.row_segments`` for
    one head (count 0 = unused; columns already inside [0, n)). Returns a SegmentList
    sorted by (row, start) whose segments are disjoint within each row.

    Rows with one segment pass through; rows made of contiguous pieces are merged as
    intervals; rows of intervals plus one progression are cut in closed form; only rows
    mixing several progressions of step > 1 enumerate their columns.
    """
    start = np.asarray(start, dtype=np.int64)
    step = np.asarray(step, dtype=np.int64)
    count = np.asarray(count, dtype=np.int64)
    n = int(start.shape[0])
    used = count > 0
    row = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], start.shape)
    seg = SegmentList(row[used], start[used], step[used], count[used])
    if not len(seg):
        return seg
    per_row = seg.segments_per_row(n)
    contiguous = (seg.step == 1) | (seg.count == 1)
    row_all_contiguous = np.bincount(seg.row, weights=~contiguous, minlength=n) == 0
    single = per_row[seg.row] == 1
    interval = ~single & row_all_contiguous[seg.row]
    progressions = np.bincount(seg.row, weights=~contiguous, minlength=n)
    one_progression = ~single & (progressions[seg.row] == 1)
    mixed = ~single & ~interval & ~one_progression
    merged = _concat([seg.take(single), _union_of_intervals(n, seg.take(interval)),
                      _intervals_minus_one_progression(n, seg.take(one_progression)),
                      _subtract_by_priority(seg.take(mixed))])
    return _join_continuations(_sorted_by_row_start(merged))
