"""The transposed structure (formats/transpose.py) equals the dense transpose for every pattern
class, unions, per-head masks and CSR masks, in closed form and from the ACSR; twice is the
original."""
import numpy as np
import pytest

from tvm_splat.formats import (ACSR, BlockLocal, Dense, DilatedWindow, GlobalTokens, PerHead, Strided,
                               Window)
from tvm_splat.formats.transpose import (Transposed, transpose_acsr, transpose_pattern,
                                         transposed_acsr)

PATTERNS = {
    "dense": Dense(),
    "window": Window(3),
    "window wider than n": Window(100),
    "causal window": Window(4, causal=True),
    "causal window 0": Window(0, causal=True),
    "dilated": DilatedWindow(3, 2),
    "causal dilated": DilatedWindow(2, 3, causal=True),
    "strided": Strided(5),
    "strided local 2": Strided(4, 2),
    "causal strided": Strided(6, causal=True),
    "causal strided local 0": Strided(4, 0, causal=True),
    "block-local": BlockLocal(7),
    "global": GlobalTokens(3),
    "global scattered": GlobalTokens((1, 5, 6, 30)),
    "global + causal window": GlobalTokens(2) | Window(3, causal=True),
    "bigbird-like": GlobalTokens(2) | BlockLocal(8) | Window(1),
    "causal strided + dilated": Strided(5, causal=True) | DilatedWindow(2, 4, causal=True),
}
LENGTHS = (1, 2, 23, 37)


def _dense_t(mask):
    return np.swapaxes(mask, -1, -2)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name", PATTERNS)
def test_closed_form_transpose_is_the_dense_transpose(name, n, check_acsr):
    pattern = PATTERNS[name]
    transposed = transpose_pattern(pattern)
    np.testing.assert_array_equal(transposed.dense_mask(n), pattern.dense_mask(n).T)
    check_acsr(ACSR.from_pattern(transposed, n), pattern.dense_mask(n).T)  # the closed-form segments
    mod = transposed.mask_mod(n)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    np.testing.assert_array_equal(np.broadcast_to(mod(0, 0, i, j), (n, n)), pattern.dense_mask(n).T)


@pytest.mark.parametrize("name", PATTERNS)
def test_generic_transpose_of_the_pattern_acsr(name, check_acsr):
    pattern, n = PATTERNS[name], 37
    acsr = ACSR.from_pattern(pattern, n)
    check_acsr(transpose_acsr(acsr), pattern.dense_mask(n).T)


def test_symmetric_patterns_are_their_own_transpose():
    for name in ("dense", "window", "dilated", "strided", "block-local", "global", "bigbird-like"):
        assert transpose_pattern(PATTERNS[name]) == PATTERNS[name], name


def test_causal_patterns_become_anti_causal():
    t = transpose_pattern(Window(4, causal=True))
    assert isinstance(t, Transposed)
    mask = t.dense_mask(20)
    assert not np.tril(mask, -1).any() and mask[0, :5].all()  # every column at or after its row


def test_transpose_twice_is_the_original():
    for name, pattern in PATTERNS.items():
        assert transpose_pattern(transpose_pattern(pattern)) == pattern, name
    acsr = ACSR.from_mask(np.random.default_rng(3).random((31, 31)) < 0.3, max_segments=2)
    np.testing.assert_array_equal(transpose_acsr(transpose_acsr(acsr)).to_dense(), acsr.to_dense())


def test_per_head_masks(check_acsr):
    pattern = PerHead((Window(2, causal=True), DilatedWindow(2, 3), Strided(4, causal=True)))
    n = 29
    expected = _dense_t(pattern.dense_mask(n))
    check_acsr(ACSR.from_pattern(transpose_pattern(pattern), n), expected)
    check_acsr(transposed_acsr(pattern, n), expected)
    check_acsr(transpose_acsr(ACSR.from_pattern(pattern, n)), expected)


def test_irregular_csr_masks_and_empty_rows_and_columns(check_acsr):
    rng = np.random.default_rng(4)
    mask = rng.random((3, 34, 34)) < 0.25
    mask[:, [0, 9]] = False  # empty rows
    mask[:, :, [3, 33]] = False  # empty columns: empty rows of the transpose
    acsr = ACSR.from_mask(mask, max_segments=2)
    assert acsr.has_indexed
    t = transpose_acsr(acsr, max_segments=2)
    assert t.has_indexed  # the irregular transposed rows fall back to CSR too
    check_acsr(t, _dense_t(mask))
    check_acsr(transposed_acsr(acsr, 34), _dense_t(mask))
    indptr, indices = ACSR.from_mask(mask[0]).to_csr()
    check_acsr(transpose_acsr(ACSR.from_csr(indptr, indices, 34)), mask[0].T)


def test_fully_empty_mask(check_acsr):
    acsr = ACSR.from_mask(np.zeros((5, 5), dtype=bool))
    check_acsr(transpose_acsr(acsr), np.zeros((5, 5), dtype=bool))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="takes an ACSR"):
        transpose_acsr(Window(3))
    with pytest.raises(ValueError, match="sequence length 10"):
        transposed_acsr(ACSR.from_pattern(Window(2), 10), 12)
    with pytest.raises(ValueError, match="causal"):
        Transposed(Window(3))
    with pytest.raises(ValueError, match="expected an ACSR or a Pattern"):
        transposed_acsr("window:3", 10)
