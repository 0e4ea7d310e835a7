"""Segment helpers: the fast merge paths agree with column enumeration."""
import numpy as np
import pytest

from tvm_splat.formats import DilatedWindow, GlobalTokens, Strided, Window
from tvm_splat.formats.segments import (decompose_sorted_columns, expand_segments,
                                        greedy_run_starts, merge_row_segments)


def columns_by_row(seg, n):
    seg_id, _, col = expand_segments(seg)
    rows = [[] for _ in range(n)]
    for r, c in zip(seg.row[seg_id], col):
        rows[r].append(int(c))
    return rows


@pytest.mark.parametrize("pattern", [
    Window(3) | Window(1, causal=True) | GlobalTokens([4, 9]),  # intervals only
    Strided(4, 3) | GlobalTokens(2),  # intervals + one progression (closed form)
    DilatedWindow(2, 2) | DilatedWindow(3, 3) | Window(1),  # enumeration
], ids=repr)
def test_merge_row_segments_is_disjoint_union(pattern):
    n = 29
    seg = merge_row_segments(*pattern.row_segments(n))
    mask = pattern.dense_mask(n)
    assert (np.diff(seg.row) >= 0).all()
    for i, cols in enumerate(columns_by_row(seg, n)):
        assert len(cols) == len(set(cols))
        assert sorted(cols) == list(np.flatnonzero(mask[i]))
    assert (seg.step >= 1).all() and (seg.count >= 1).all()


def test_greedy_run_starts_follows_greedy_rule():
    cols = np.array([0, 1, 2, 4, 6, 7, 9])  # diffs 1 1 2 2 1 2
    row = np.zeros_like(cols)
    seg = decompose_sorted_columns(10, row, cols)
    # contiguous pieces [0, 1, 2] and [6, 7] stay whole, the loose 4 and 9 between them
    assert list(zip(seg.start, seg.step, seg.count)) == [(0, 1, 3), (4, 1, 1), (6, 1, 2),
                                                          (9, 1, 1)]
    pair_ok = np.ones(6, dtype=bool)
    diff = np.diff(cols)
    starts = greedy_run_starts(pair_ok, diff[1:] == diff[:-1], np.array([0]), np.array([7]))
    # plain greedy: [0 1 2] [4 6] [7 9]
    assert np.flatnonzero(starts).tolist() == [0, 3, 5]


def test_decompose_rows_are_independent():
    row = np.array([0, 0, 0, 2, 2, 3])
    cols = np.array([1, 3, 5, 0, 7, 4])
    seg = decompose_sorted_columns(4, row, cols)
    assert list(zip(seg.row, seg.start, seg.step, seg.count)) == [
        (0, 1, 2, 3), (2, 0, 7, 2), (3, 4, 1, 1)]
