"""ACSR: construction, round trips, runs, metadata size, geometry, errors."""
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvm_splat.formats import (ACSR, KINDS, BlockLocal, Dense, DilatedWindow, Geometry,
                               GlobalTokens, PerHead, Strided, Window, parse_pattern)

SIZES = [1, 2, 5, 37, 50]

PATTERNS = [
    Dense(),
    Window(0), Window(3), Window(3, causal=True), Window(80),
    DilatedWindow(2, 3), DilatedWindow(3, 2, causal=True),
    Strided(4), Strided(4, 2, causal=True), Strided(5, 0), Strided(6, 9),
    BlockLocal(5), BlockLocal(7),
    GlobalTokens(3), GlobalTokens([0, 5, 7, 10, 40]),
    GlobalTokens(2) | Window(3),
    GlobalTokens(2) | Window(3, causal=True),
    GlobalTokens([1, 4]) | DilatedWindow(2, 3),
    GlobalTokens(3) | DilatedWindow(3, 2, causal=True),
    BlockLocal(4) | GlobalTokens([9]),
    GlobalTokens(2) | Strided(4),
    Window(2) | DilatedWindow(4, 3) | GlobalTokens([7]),
    DilatedWindow(2, 2) | DilatedWindow(2, 3),
]


def ids(p):
    return repr(p)[:60]


def tables(a):
    return a.seg_start, a.seg_step, a.seg_count, a.row_ptr


def assert_same_tables(a, b):
    assert (a.n, a.num_heads, a.max_segments) == (b.n, b.num_heads, b.max_segments)
    for x, y in zip(tables(a), tables(b)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.indices, b.indices)


def expand_runs_by_loop(run_table, n, s):
    """Rebuild per-row tables from Run objects one row at a time."""
    start = np.full((n, s), -99)
    step = np.full((n, s), -99)
    count = np.full((n, s), -99)
    for run in run_table:
        for r in range(run.nrows):
            i = run.row0 + r
            start[i] = [a + b * r for a, b in zip(run.start0, run.dstart)]
            step[i] = run.step
            count[i] = [a + b * r for a, b in zip(run.count0, run.dcount)]
    return start, step, count


def check_runs(a):
    for h, run_table in enumerate(a.runs):
        assert int(run_table.nrows.sum()) == a.n
        assert run_table.row0[0] == 0
        np.testing.assert_array_equal(run_table.row0[1:],
                                      np.cumsum(run_table.nrows)[:-1])
        start, step, count, row_ptr = run_table.expand()
        np.testing.assert_array_equal(start, a.seg_start[h])
        np.testing.assert_array_equal(step, a.seg_step[h])
        np.testing.assert_array_equal(count, a.seg_count[h])
        np.testing.assert_array_equal(row_ptr, a.row_ptr[h])
        looped = expand_runs_by_loop(run_table, a.n, a.max_segments)
        for x, y in zip(looped, (a.seg_start[h], a.seg_step[h], a.seg_count[h])):
            np.testing.assert_array_equal(x, y)


# ---- from_pattern ----------------------------------------------------------------------
@pytest.mark.parametrize("pattern", PATTERNS, ids=ids)
def test_from_pattern_round_trip(pattern, check_acsr):
    for n in SIZES:
        a = ACSR.from_pattern(pattern, n)
        assert a.num_heads == 1 and a.n == n
        check_acsr(a, pattern.dense_mask(n))
        np.testing.assert_array_equal(a.to_dense()[0], pattern.dense_mask(n))
        check_runs(a)
        assert int(a.nnz[0]) == pattern.nnz(n)


@pytest.mark.parametrize("pattern", PATTERNS, ids=ids)
def test_from_mask_and_csr_round_trips(pattern, check_acsr):
    for n in (5, 37):
        mask = pattern.dense_mask(n)
        a = ACSR.from_mask(mask)
        check_acsr(a, mask)
        check_runs(a)
        b = ACSR.from_csr(*a.to_csr(), n)
        assert_same_tables(a, b)
        from_pattern = ACSR.from_pattern(pattern, n)
        for x, y in zip(from_pattern.to_csr(), a.to_csr()):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("pattern", [Window(3), Window(2, causal=True), DilatedWindow(2, 3),
                                     BlockLocal(4), Dense(), GlobalTokens(2) | Window(3)],
                         ids=ids)
def test_mask_and_pattern_give_same_tables_for_simple_families(pattern):
    """Runs of the sorted columns reproduce the closed-form segments here (n > 1: a
    lone column keeps the pattern's step in from_pattern but gets step 1 from a mask)."""
    for n in (9, 37):
        assert_same_tables(ACSR.from_pattern(pattern, n), ACSR.from_mask(pattern.dense_mask(n)))


def test_window_is_one_affine_segment_per_row_and_three_runs():
    n, w = 50, 4
    a = ACSR.from_pattern(Window(w), n)
    assert a.max_segments == 1
    i = np.arange(n)
    np.testing.assert_array_equal(a.seg_start[0, :, 0], np.maximum(i - w, 0))
    np.testing.assert_array_equal(a.seg_step[0, :, 0], 1)
    np.testing.assert_array_equal(a.seg_count[0, :, 0],
                                  np.minimum(i + w, n - 1) - np.maximum(i - w, 0) + 1)
    runs = list(a.runs[0])
    assert [(r.row0, r.nrows) for r in runs] == [(0, w + 1), (w + 1, n - 2 * w - 1),
                                                 (n - w, w)]
    assert (runs[0].start0, runs[0].dstart, runs[0].count0, runs[0].dcount) == \
        ((0,), (0,), (w + 1,), (1,))
    assert (runs[1].start0, runs[1].dstart, runs[1].count0, runs[1].dcount) == \
        ((1,), (1,), (2 * w + 1,), (0,))
    assert (runs[2].dstart, runs[2].dcount, runs[2].step) == ((1,), (-1,), (1,))
    assert [r.value_offset for r in runs] == [int(a.row_ptr[0, r.row0]) for r in runs]
    assert len(ACSR.from_pattern(Window(w, causal=True), n).runs[0]) == 2
    assert len(ACSR.from_pattern(Window(0), n).runs[0]) == 1


def test_window_plus_global_merges_when_touching():
    n, w, g = 40, 3, 4
    a = ACSR.from_pattern(GlobalTokens(g) | Window(w), n)
    assert a.max_segments == 2
    for i in range(n):
        segs = [(int(a.seg_start[0, i, s]), int(a.seg_step[0, i, s]), int(a.seg_count[0, i, s]))
                for s in range(2)]
        if i < g:  # token rows are full
            assert segs == [(0, 1, n), (0, 1, 0)]
        elif i - w <= g:  # window reaches the tokens: one contiguous segment
            assert segs == [(0, 1, min(i + w, n - 1) + 1), (0, 1, 0)]
        else:
            assert segs == [(0, 1, g), (i - w, 1, min(i + w, n - 1) - (i - w) + 1)]


def test_strided_keeps_band_and_residue_structure():
    n, s = 40, 4
    a = ACSR.from_pattern(Strided(s), n)
    assert a.irregular_columns() == 0 and a.max_segments == 3
    i = 20
    segs = [(int(a.seg_start[0, i, k]), int(a.seg_step[0, i, k]), int(a.seg_count[0, i, k]))
            for k in range(3)]
    # residues below the band, the band |i - j| < 4, residues above it
    assert segs == [(0, 4, 5), (17, 1, 7), (24, 4, 4)]


def test_dilated_plus_global_keeps_dilation():
    n = 30
    a = ACSR.from_pattern(GlobalTokens(2) | DilatedWindow(3, 2), n)
    i = 15
    segs = [(int(a.seg_start[0, i, k]), int(a.seg_step[0, i, k]), int(a.seg_count[0, i, k]))
            for k in range(a.max_segments)]
    assert segs[:2] == [(0, 1, 2), (9, 2, 7)]


def test_per_head_pattern(check_acsr):
    p = PerHead((Window(2), Strided(3, causal=True), BlockLocal(4) | GlobalTokens(1),
                 Dense()))
    for n in (1, 13, 37):
        a = ACSR.from_pattern(p, n)
        assert a.num_heads == 4
        check_acsr(a, p.dense_mask(n))
        check_runs(a)
        np.testing.assert_array_equal(a.nnz, [h.nnz(n) for h in p.heads])
        assert a.max_nnz == n * n
        for h in range(4):
            b = ACSR.from_csr(*a.to_csr(h), n)
            np.testing.assert_array_equal(b.to_dense()[0], a.to_dense()[h])
        from_mask = ACSR.from_mask(p.dense_mask(n))
        np.testing.assert_array_equal(from_mask.to_dense(), a.to_dense())


def test_n_equals_one():
    for p in (Window(3), Strided(2), GlobalTokens(4), BlockLocal(3), DilatedWindow(2, 2)):
        a = ACSR.from_pattern(p, 1)
        np.testing.assert_array_equal(a.to_dense(), [[[True]]])
        assert a.nnz.tolist() == [1] and a.density == 1.0
        assert len(a.runs[0]) == 1


def test_small_max_segments_forces_indexed_rows(check_acsr):
    n = 37
    p = GlobalTokens(2) | Strided(5)
    for max_segments in (1, 2, 3):
        a = ACSR.from_pattern(p, n, max_segments=max_segments)
        assert a.max_segments <= max_segments
        check_acsr(a, p.dense_mask(n))
        check_runs(a)
        indexed = (a.seg_step == 0) & (a.seg_count > 0)
        assert indexed.any()
        assert (indexed[..., 1:] == 0).all(), "indexed rows use slot 0 only"
        assert (a.seg_count[..., 1:][indexed.any(axis=2)] == 0).all()
        assert a.geometry().irregular_rows == int(indexed.any(axis=2).sum())
        assert a.geometry().kind == "irregular"
        assert a.irregular_columns() == int(a.seg_count[indexed].sum())
        b = ACSR.from_csr(*a.to_csr(), n, max_segments=max_segments)
        np.testing.assert_array_equal(b.to_dense(), a.to_dense())


def test_mask_with_empty_rows(check_acsr):
    mask = np.zeros((6, 6), dtype=bool)
    mask[1, [0, 2, 4]] = True
    mask[4, 5] = True
    a = ACSR.from_mask(mask)
    check_acsr(a, mask)
    check_runs(a)
    np.testing.assert_array_equal(a.row_ptr[0], [0, 0, 3, 3, 3, 4, 4])
    assert (a.seg_start[0, 1, 0], a.seg_step[0, 1, 0], a.seg_count[0, 1, 0]) == (0, 2, 3)
    assert a.columns(0, 0).size == 0
    lo, hi = a.geometry().column_band(2)
    np.testing.assert_array_equal(lo, [[0, 0, 5]])
    np.testing.assert_array_equal(hi, [[5, 0, 6]])


def test_all_empty_mask(check_acsr):
    mask = np.zeros((4, 4), dtype=bool)
    a = ACSR.from_mask(mask)
    check_acsr(a, mask)
    assert a.nnz.tolist() == [0] and a.density == 0.0 and a.max_segments == 1
    assert a.indices.shape == (1, 1)
    assert a.to_csr()[1].size == 0 and a.csr_permutation().size == 0
    lo, hi = a.geometry().column_band(3)
    assert lo.tolist() == hi.tolist() == [[0, 0]]


def test_from_mask_accepts_torch_and_heads(check_acsr):
    rng = np.random.default_rng(3)
    mask = rng.random((3, 11, 11)) < 0.3
    a = ACSR.from_mask(torch.from_numpy(mask))
    assert a.num_heads == 3
    check_acsr(a, mask)
    b = ACSR.from_mask(mask[:1])
    assert b.num_heads == 1
    np.testing.assert_array_equal(b.to_dense()[0], mask[0])


def test_from_csr_accepts_lists_per_head_and_unsorted_columns():
    indptr = [np.array([0, 2, 2]), np.array([0, 0, 2])]
    indices = [np.array([1, 0]), np.array([1, 0])]
    a = ACSR.from_csr(indptr, indices, 2)
    np.testing.assert_array_equal(a.to_dense(), [[[1, 1], [0, 0]], [[0, 0], [1, 1]]])
    ptr, idx = a.to_csr(0)
    assert ptr.dtype == np.int64 and idx.dtype == np.int32
    np.testing.assert_array_equal(ptr, [0, 2, 2])
    np.testing.assert_array_equal(idx, [0, 1])
    b = ACSR.from_csr([0, 1, 1], [1], 2)
    np.testing.assert_array_equal(b.to_dense()[0], [[0, 1], [0, 0]])


def test_csr_permutation_reorders_values():
    # two interleaved progressions: ACSR order differs from sorted CSR order
    p = DilatedWindow(2, 2) | DilatedWindow(2, 3)
    n = 20
    a = ACSR.from_pattern(p, n)
    row, col = a.value_columns(0)
    perm = a.csr_permutation(0)
    assert sorted(perm.tolist()) == list(range(int(a.nnz[0])))
    indptr, indices = a.to_csr(0)
    np.testing.assert_array_equal(col[perm], indices)
    assert not np.array_equal(perm, np.arange(perm.size)), "expected a real reordering"
    # values attached to (row, col) in ACSR order land on the right CSR slots
    values = row * 1000 + col
    csr_rows = np.repeat(np.arange(n), np.diff(indptr))
    np.testing.assert_array_equal(values[perm], csr_rows * 1000 + indices)


def test_mask_decomposition_keeps_contiguous_pieces_whole():
    # plain greedy would give [1, 5] [6]; the band [5, 6] is kept whole instead
    mask = np.zeros((1, 8, 8), dtype=bool)
    mask[0, 6, [1, 5, 6]] = True
    mask[0, 3, [0, 2, 4, 6]] = True  # one progression of step 2
    a = ACSR.from_mask(mask)
    assert [(int(a.seg_start[0, 6, s]), int(a.seg_step[0, 6, s]), int(a.seg_count[0, 6, s]))
            for s in range(2)] == [(1, 1, 1), (5, 1, 2)]
    assert (a.seg_start[0, 3, 0], a.seg_step[0, 3, 0], a.seg_count[0, 3, 0]) == (0, 2, 4)


def test_csr_permutation_is_identity_for_sorted_segments():
    a = ACSR.from_pattern(GlobalTokens(2) | Window(3), 30)
    np.testing.assert_array_equal(a.csr_permutation(), np.arange(int(a.nnz[0])))


# ---- property tests on random masks ----------------------------------------------------
@st.composite
def random_masks(draw):
    heads = draw(st.integers(1, 2))
    n = draw(st.integers(1, 16))
    density = draw(st.sampled_from([0.0, 0.1, 0.3, 0.6, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    mask = rng.random((heads, n, n)) < density
    if draw(st.booleans()):  # add regular structure on top of the noise
        mask |= Window(draw(st.integers(0, 3))).dense_mask(n)
    return mask


# check_acsr is a stateless function, so sharing it across examples is safe
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mask=random_masks(), max_segments=st.integers(1, 4))
def test_random_masks_round_trip(mask, max_segments, check_acsr):
    a = ACSR.from_mask(mask, max_segments=max_segments)
    assert a.num_heads == mask.shape[0] and 1 <= a.max_segments <= max_segments
    check_acsr(a, mask)
    check_runs(a)
    np.testing.assert_array_equal(a.to_dense(), mask)
    for h in range(a.num_heads):
        indptr, indices = a.to_csr(h)
        np.testing.assert_array_equal(indptr, np.concatenate([[0], np.cumsum(mask[h].sum(1))]))
        np.testing.assert_array_equal(indices, np.nonzero(mask[h])[1])
        _, col = a.value_columns(h)
        np.testing.assert_array_equal(col[a.csr_permutation(h)], indices)
        b = ACSR.from_csr(indptr, indices, a.n, max_segments=max_segments)
        if a.num_heads == 1:
            assert_same_tables(a, b)
        np.testing.assert_array_equal(b.to_dense()[0], mask[h])
    lo, hi = a.geometry().column_band(3)
    expected_lo, expected_hi = brute_column_band(mask, 3)
    np.testing.assert_array_equal(lo, expected_lo)
    np.testing.assert_array_equal(hi, expected_hi)


# ---- metadata size ---------------------------------------------------------------------
def test_window_metadata_much_smaller_than_csr(record_property):
    n, w = 2048, 64
    a = ACSR.from_pattern(Window(w), n)
    nnz = Window(w).nnz(n)
    assert a.csr_metadata_bytes() == 4 * (n + 1) + 4 * nnz
    # 3 runs of (row0, nrows, offset) + 5 words for the single segment slot
    assert a.metadata_bytes() == 3 * 4 * (3 + 5)
    ratio = a.compression_ratio()
    assert ratio == pytest.approx(a.csr_metadata_bytes() / a.metadata_bytes())
    assert ratio > 1000
    record_property("window_compression_ratio", ratio)
    print(f"\nwindow({w}) n={n}: ACSR {a.metadata_bytes()} B vs CSR "
          f"{a.csr_metadata_bytes()} B, ratio {ratio:.0f}x")


def test_irregular_rows_count_their_indices():
    rng = np.random.default_rng(7)
    mask = rng.random((24, 24)) < 0.5
    a = ACSR.from_mask(mask, max_segments=1)
    assert a.irregular_columns() > 0
    run_bytes = sum(4 * len(r) * (3 + 5 * a.max_segments) for r in a.runs)
    assert a.metadata_bytes() == run_bytes + 4 * a.irregular_columns()
    b = ACSR.from_mask(np.stack([mask, mask]), max_segments=1)
    assert b.csr_metadata_bytes() == 2 * a.csr_metadata_bytes()


# ---- geometry --------------------------------------------------------------------------
def brute_column_band(dense, tile_rows):
    dense = np.asarray(dense)
    hm, n, _ = dense.shape
    tiles = -(-n // tile_rows)
    lo = np.zeros((hm, tiles), dtype=np.int32)
    hi = np.zeros((hm, tiles), dtype=np.int32)
    for h in range(hm):
        for t in range(tiles):
            cols = [j for i in range(t * tile_rows, min(n, (t + 1) * tile_rows))
                    for j in range(n) if dense[h, i, j]]
            if cols:
                lo[h, t], hi[h, t] = min(cols), max(cols) + 1
    return lo, hi


@pytest.mark.parametrize("pattern", PATTERNS + [PerHead((Window(1), BlockLocal(8)))], ids=ids)
def test_column_band_matches_brute_force(pattern):
    n = 37
    a = ACSR.from_pattern(pattern, n)
    dense = a.to_dense()
    for tile_rows in (1, 4, 16, 37, 64):
        lo, hi = a.geometry().column_band(tile_rows)
        assert lo.dtype == hi.dtype == np.int32
        assert lo.shape == (a.num_heads, -(-n // tile_rows))
        expected = brute_column_band(dense, tile_rows)
        np.testing.assert_array_equal(lo, expected[0])
        np.testing.assert_array_equal(hi, expected[1])


@pytest.mark.parametrize("pattern, kind, dilation", [
    (Window(4), "band", 1),
    (Window(4, causal=True), "band", 1),
    (Window(0), "band", 1),
    (DilatedWindow(3, 2), "dilated", 2),
    (DilatedWindow(3, 3, causal=True), "dilated", 3),
    (Strided(4), "strided", 1),
    (Strided(5, 2, causal=True), "strided", 1),
    (BlockLocal(8), "block", 1),
    (GlobalTokens(2) | Window(3), "union", 1),
    (GlobalTokens(2) | DilatedWindow(3, 2), "union", 1),
    (BlockLocal(8) | GlobalTokens(1), "union", 1),
    (Dense(), "dense", 1),
    (Window(500), "dense", 1),
], ids=ids)
def test_geometry_kind(pattern, kind, dilation):
    n = 50
    g = ACSR.from_pattern(pattern, n).geometry()
    assert isinstance(g, Geometry) and g.kind in KINDS
    assert g.kind == kind
    assert g.dilation == dilation
    assert g.irregular_rows == 0
    assert g.max_row_nnz == int(pattern.dense_mask(n).sum(1).max())
    # the mask alone gives the same answer
    assert ACSR.from_mask(pattern.dense_mask(n)).geometry().kind == kind


def test_geometry_irregular_and_fields():
    rng = np.random.default_rng(1)
    mask = rng.random((30, 30)) < 0.4
    a = ACSR.from_mask(mask, max_segments=2)
    g = a.geometry()
    assert g.kind == "irregular" and g.irregular_rows > 0
    assert g.max_segments == a.max_segments and g.n == 30 and g.num_heads == 1
    assert g.max_row_nnz == int(mask.sum(1).max())
    assert a.geometry() is g  # cached


def test_check_heads():
    shared = ACSR.from_pattern(Window(1), 8)
    shared.check_heads(1)
    shared.check_heads(12)
    per_head = ACSR.from_pattern(PerHead((Window(1), Window(2), Window(3))), 8)
    per_head.check_heads(3)
    with pytest.raises(ValueError, match="ACSR has 3 head masks but the input has 4 heads"):
        per_head.check_heads(4)
    with pytest.raises(ValueError, match="number of heads must be >= 1"):
        shared.check_heads(0)


def test_repr_is_short_and_informative():
    text = repr(ACSR.from_pattern(parse_pattern("window:4"), 32))
    assert text.startswith("ACSR(n=32, heads=1, nnz=")
    assert "kind='band'" in text and "runs=3" in text and len(text) < 120


# ---- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("mask, message", [
    (np.ones((3, 4), dtype=bool), "square.*3x4"),
    (np.ones((3, 3), dtype=np.float32), "boolean, got dtype float32"),
    (np.ones((3,), dtype=bool), "got 1 dimensions"),
    (np.ones((1, 2, 3, 3), dtype=bool), "got 4 dimensions"),
    (np.ones((0, 0), dtype=bool), "empty"),
    (np.ones((0, 3, 3), dtype=bool), "empty"),
    ([[True]], "numpy or torch"),
    (torch.ones(3, 3), "boolean, got dtype float32"),
])
def test_from_mask_errors(mask, message):
    with pytest.raises(ValueError, match=message):
        ACSR.from_mask(mask)


@pytest.mark.parametrize("indptr, indices, n, message", [
    ([0, 1], [0], 2, r"indptr must have shape \[n\+1=3\]"),
    ([1, 1, 1], [], 2, "indptr\\[0\\] must be 0"),
    ([0, 2, 1], [0, 1], 2, "non-decreasing; it drops at row 1"),
    ([0, 1, 2], [0], 2, "indptr\\[-1\\]=2 but indices has 1"),
    ([0, 1, 2], [0, 2], 2, "column index 2 outside \\[0, 2\\)"),
    ([0, 1, 2], [0, -1], 2, "column index -1 outside"),
    ([0, 2, 2], [1, 1], 2, "column 1 appears twice in row 0"),
    ([0, 1, 1], [0.5], 2, "indices must hold integers"),
    ([0, 1, 1], [[0]], 2, "indices must be 1-D"),
    ([0], [], 0, "sequence length must be >= 1, got 0"),
    ([np.array([0, 1, 1])], [np.array([0]), np.array([1])], 2, "indices has 2 heads"),
    ([np.array([0, 1, 1])], np.array([0]), 2, "indices must be one too"),
])
def test_from_csr_errors(indptr, indices, n, message):
    with pytest.raises(ValueError, match=message):
        ACSR.from_csr(indptr, indices, n)


def test_constructor_argument_errors():
    with pytest.raises(ValueError, match="sequence length must be >= 1, got 0"):
        ACSR.from_pattern(Window(2), 0)
    with pytest.raises(ValueError, match="pattern must be a Pattern"):
        ACSR.from_pattern("window:2", 4)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_segments must be >= 1, got {bad}"):
            ACSR.from_pattern(Window(2), 4, max_segments=bad)
        with pytest.raises(ValueError, match="max_segments must be >= 1"):
            ACSR.from_mask(np.eye(3, dtype=bool), max_segments=bad)
        with pytest.raises(ValueError, match="max_segments must be >= 1"):
            ACSR.from_csr([0, 1], [0], 1, max_segments=bad)
    with pytest.raises(ValueError, match="max_segments must be an integer"):
        ACSR.from_pattern(Window(2), 4, max_segments=2.0)


def test_accessor_errors():
    a = ACSR.from_pattern(Window(1), 5)
    with pytest.raises(ValueError, match="head must be < 1, got 1"):
        a.to_csr(1)
    with pytest.raises(ValueError, match="head must be >= 0, got -1"):
        a.csr_permutation(-1)
    with pytest.raises(ValueError, match="row must be < n=5, got 5"):
        a.columns(0, 5)
    with pytest.raises(ValueError, match="tile_rows must be >= 1, got 0"):
        a.geometry().column_band(0)


def test_table_constructor_errors():
    z = np.zeros((1, 4, 1), dtype=np.int64)
    with pytest.raises(ValueError, match="segment tables must share a shape"):
        ACSR(4, z, z, np.zeros((1, 3, 1), dtype=np.int64), np.zeros((1, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="indices must have shape"):
        ACSR(4, z, np.ones_like(z), z, np.zeros((1, 0), dtype=np.int64))


@pytest.mark.parametrize("table,value,message", [
    ("seg_step", 2**32, "seg_step holds 4294967296, outside the int32 range"),  # would wrap to 0 = CSR
    ("seg_start", -2**31 - 1, "seg_start holds -2147483649, outside the int32 range"),
    ("seg_count", 2**40, "seg_count holds 1099511627776, outside the int32 range"),
    ("indices", 2**31, "indices holds 2147483648, outside the int32 range"),
    ("seg_step", 2**70, "seg_step must be an integer array within int32, got dtype object"),
    ("seg_start", 1.5, "seg_start must be an integer array within int32, got dtype float64"),
])
def test_tables_outside_int32_are_refused_not_wrapped(table, value, message):
    shapes = {"seg_start": (1, 4, 1), "seg_step": (1, 4, 1), "seg_count": (1, 4, 1), "indices": (1, 1)}
    fill = {"seg_start": 0, "seg_step": 1, "seg_count": 1, "indices": 0}
    tables = {}
    for name, shape in shapes.items():
        values = [fill[name]] * int(np.prod(shape))
        if name == table:
            values[0] = value
        tables[name] = np.array(values).reshape(shape)  # int64, or object / float64 for the odd value
    with pytest.raises(ValueError, match=re.escape(message)):
        ACSR(4, tables["seg_start"], tables["seg_step"], tables["seg_count"], tables["indices"])


def test_validate_catches_broken_tables():
    a = ACSR.from_pattern(Window(1), 6)
    ok = (a.seg_start.copy(), a.seg_step.copy(), a.seg_count.copy(), a.indices.copy())
    start, step, count, indices = (x.copy() for x in ok)
    count[0, 2, 0] = 5  # row 2 now runs past n
    start[0, 2, 0] = 3
    with pytest.raises(ValueError, match="column outside"):
        ACSR(6, start, step, count, indices).validate()
    start, step, count, indices = (x.copy() for x in ok)
    wide = [np.concatenate([t, t], axis=2) for t in (start, step, count)]
    with pytest.raises(ValueError, match="twice"):
        ACSR(6, *wide, indices).validate()
    start, step, count, indices = (x.copy() for x in ok)
    step[0, 1, 0] = 0  # indexed segment pointing beyond indices
    with pytest.raises(ValueError, match="outside indices"):
        ACSR(6, start, step, count, indices).validate()
