"""Fixtures for the format tests: an independent ACSR invariant checker."""
import numpy as np
import pytest


def _check_acsr(acsr, expected_dense=None):
    """Assert every documented ACSR invariant by plain Python loops (small n only).

    Returns the dense [Hm, n, n] mask rebuilt from the tables row by row.
    """
    hm, n, s = acsr.num_heads, acsr.n, acsr.max_segments
    for name in ("seg_start", "seg_step", "seg_count", "row_ptr", "indices"):
        arr = getattr(acsr, name)
        assert arr.dtype == np.int32, name
        assert arr.flags.c_contiguous, name
    assert acsr.seg_start.shape == acsr.seg_step.shape == acsr.seg_count.shape == (hm, n, s)
    assert s >= 1
    assert acsr.row_ptr.shape == (hm, n + 1)
    assert acsr.indices.ndim == 2 and acsr.indices.shape[0] == hm and acsr.indices.shape[1] >= 1
    dense = np.zeros((hm, n, n), dtype=bool)
    for h in range(hm):
        assert acsr.row_ptr[h, 0] == 0
        for i in range(n):
            cols = []
            for k in range(s):
                start, step, count = (int(t[h, i, k]) for t in
                                      (acsr.seg_start, acsr.seg_step, acsr.seg_count))
                assert count >= 0 and step >= 0
                if count == 0:
                    assert (start, step) == (0, 1), "unused slot not canonical"
                    continue
                if step == 0:
                    seg_cols = [int(acsr.indices[h, start + q]) for q in range(count)]
                    assert seg_cols == sorted(seg_cols)
                else:
                    seg_cols = [start + step * q for q in range(count)]
                cols.extend(seg_cols)
            assert len(cols) == len(set(cols)), f"row {i} of head {h} repeats a column"
            assert all(0 <= c < n for c in cols), f"row {i} of head {h} leaves [0, n)"
            assert acsr.row_ptr[h, i + 1] - acsr.row_ptr[h, i] == len(cols)
            assert list(acsr.columns(h, i)) == cols
            dense[h, i, cols] = True
        assert acsr.nnz[h] == acsr.row_ptr[h, n] == dense[h].sum()
    assert acsr.max_nnz == max(int(z) for z in acsr.nnz)
    assert acsr.density == pytest.approx(dense.sum() / (hm * n * n))
    acsr.validate()
    if expected_dense is not None:
        expected = np.asarray(expected_dense)
        if expected.ndim == 2:
            expected = expected[None]
        np.testing.assert_array_equal(dense, expected)
    return dense


@pytest.fixture
def check_acsr():
    return _check_acsr
