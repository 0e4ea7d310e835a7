"""Patterns: definitions against brute force, closed-form segments, parsing, errors."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_splat.formats import (BlockLocal, Dense, DilatedWindow, GlobalTokens, Pattern,
                               PerHead, Strided, Union, Window, parse_pattern)

SIZES = [1, 2, 5, 37, 50]


# ---- independent definitions: one (i, j) at a time -----------------------------------
def brute(pattern, n):
    def member(p, i, j):
        if isinstance(p, Dense):
            return True
        if isinstance(p, Window):
            hi = i if p.causal else i + p.width
            return i - p.width <= j <= hi
        if isinstance(p, DilatedWindow):
            ks = range(-p.width, 1 if p.causal else p.width + 1)
            return any(j == i + p.dilation * k for k in ks)
        if isinstance(p, Strided):
            if p.causal and j > i:
                return False
            return abs(i - j) < p.local or (i - j) % p.stride == 0
        if isinstance(p, BlockLocal):
            return i // p.block == j // p.block
        if isinstance(p, GlobalTokens):
            return i in p.tokens or j in p.tokens
        if isinstance(p, Union):
            return any(member(q, i, j) for q in p.parts)
        raise AssertionError(p)

    if isinstance(pattern, PerHead):
        return np.stack([brute(h, n) for h in pattern.heads])
    out = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            out[i, j] = member(pattern, i, j)
    return out


FAMILIES = [
    Dense(),
    Window(0), Window(3), Window(3, causal=True), Window(60),
    DilatedWindow(0, 2), DilatedWindow(2, 3), DilatedWindow(3, 2, causal=True), DilatedWindow(4, 1),
    Strided(4), Strided(4, 2), Strided(5, 0), Strided(3, causal=True), Strided(1), Strided(6, 9),
    BlockLocal(1), BlockLocal(5), BlockLocal(64),
    GlobalTokens(3), GlobalTokens([0, 5, 7, 10, 40]), GlobalTokens(()),
    GlobalTokens(2) | Window(3),
    GlobalTokens([1, 4]) | DilatedWindow(2, 3, causal=True),
    BlockLocal(4) | GlobalTokens([9]),
    Window(2) | DilatedWindow(4, 3) | GlobalTokens([7]),
    DilatedWindow(2, 2) | DilatedWindow(2, 3),
]


def ids(p):
    return repr(p)[:60]


@pytest.mark.parametrize("pattern", FAMILIES, ids=ids)
def test_dense_mask_matches_brute_force(pattern):
    for n in SIZES:
        mask = pattern.dense_mask(n)
        assert mask.dtype == np.bool_ and mask.shape == (n, n)
        np.testing.assert_array_equal(mask, brute(pattern, n), err_msg=f"n={n}")


@pytest.mark.parametrize("pattern", FAMILIES, ids=ids)
def test_nnz_and_density(pattern):
    for n in SIZES:
        expected = int(brute(pattern, n).sum())
        assert pattern.nnz(n) == expected
        assert pattern.density(n) == pytest.approx(expected / (n * n))
        assert pattern.num_heads == 1


@pytest.mark.parametrize("pattern", FAMILIES, ids=ids)
def test_row_segments_cover_exactly_the_row(pattern):
    for n in SIZES:
        start, step, count = pattern.row_segments(n)
        assert start.dtype == step.dtype == count.dtype == np.int64
        assert start.shape == step.shape == count.shape and start.shape[0] == n
        assert (step >= 1).all() and (count >= 0).all()
        unused = count == 0
        assert (start[unused] == 0).all() and (step[unused] == 1).all()
        expected = brute(pattern, n)
        for i in range(n):
            cols = set()
            for s, d, c in zip(start[i], step[i], count[i]):
                seg = [s + d * k for k in range(c)]
                assert all(0 <= col < n for col in seg), (i, s, d, c)
                cols.update(seg)
            assert cols == set(np.flatnonzero(expected[i])), f"n={n} row {i}"


def test_window_segment_is_closed_form():
    start, step, count = Window(2).row_segments(6)
    np.testing.assert_array_equal(start[:, 0], [0, 0, 0, 1, 2, 3])
    np.testing.assert_array_equal(count[:, 0], [3, 4, 5, 5, 4, 3])
    np.testing.assert_array_equal(step, 1)
    start, step, count = DilatedWindow(1, 2).row_segments(5)
    np.testing.assert_array_equal(start[:, 0], [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(step[:, 0], 2)
    np.testing.assert_array_equal(count[:, 0], [2, 2, 3, 2, 2])


def test_window_wider_than_n_is_dense():
    assert Window(100).dense_mask(7).all()
    assert Window(100).nnz(7) == 49
    assert Window(100, causal=True).nnz(7) == 28


def test_global_tokens_normalisation():
    assert tuple(GlobalTokens(3).tokens) == (0, 1, 2)
    assert GlobalTokens.first(3) == GlobalTokens(3) == GlobalTokens([2, 1, 0, 1]) == GlobalTokens(range(3))
    assert tuple(GlobalTokens(np.int64(2)).tokens) == (0, 1)
    assert tuple(GlobalTokens([5, np.int32(3)]).tokens) == (3, 5)
    assert GlobalTokens([1, 4, 7]) == GlobalTokens(range(7, 0, -3))
    assert hash(GlobalTokens([1, 4, 7])) == hash(GlobalTokens(range(1, 8, 3)))
    assert GlobalTokens([0, 5, 7]) != GlobalTokens([0, 5])
    assert GlobalTokens(0).nnz(4) == 0
    assert GlobalTokens(()) == GlobalTokens(0) == GlobalTokens(range(5, 2))


def test_global_tokens_repr():
    assert repr(GlobalTokens(16)) == "GlobalTokens(16)"
    assert repr(GlobalTokens([0, 5, 7])) == "GlobalTokens((0, 5, 7))"
    assert repr(GlobalTokens([9])) == "GlobalTokens(range(9, 10))"


@pytest.mark.parametrize("huge, equivalent", [
    (Window(2**63), Window(64)),
    (Window(2**200, causal=True), Window(64, causal=True)),
    (DilatedWindow(2**40, 2**40), Window(0)),  # only k = 0 lands inside [0, n)
    (DilatedWindow(1, 2**32), Window(0)),
    (DilatedWindow(2**40, 3), DilatedWindow(64, 3)),
    (Strided(2**70, 2**70), Dense()),
    (Strided(2**70, 2, causal=True), Window(1, causal=True)),
    (BlockLocal(2**70), Dense()),
], ids=ids)
def test_parameters_beyond_n_mean_n(huge, equivalent):
    """A width, dilation, stride or block of at least n acts as n: no int64 overflow
    (``Window(2**63)`` raised a C long overflow) and segment tables that fit int32 (a step of
    2**32 with one column per row was kept and wrapped to 0, a CSR segment, in the ACSR)."""
    n = 64
    np.testing.assert_array_equal(huge.dense_mask(n), brute(equivalent, n))
    start, step, count = huge.row_segments(n)
    assert max(int(start.max()), int(step.max()), int(count.max())) <= n
    assert huge.nnz(n) == int(brute(equivalent, n).sum())


def test_global_tokens_beyond_n_are_ignored():
    p = GlobalTokens([1, 10])
    mask = p.dense_mask(4)
    np.testing.assert_array_equal(mask, GlobalTokens([1]).dense_mask(4))
    assert p.nnz(4) == 4 + 4 - 1
    assert p.nnz(11) == 2 * 11 * 2 - 4


def test_union_flattens_and_or_operator():
    a, b, c = Window(1), BlockLocal(2), GlobalTokens(1)
    u = a | b | c
    assert isinstance(u, Union) and u.parts == (a, b, c)
    assert Union([a, Union((b, c))]).parts == (a, b, c)
    assert Union((a, b)) == Union([a, b])
    np.testing.assert_array_equal(u.dense_mask(9), a.dense_mask(9) | b.dense_mask(9)
                                  | c.dense_mask(9))


def test_per_head():
    p = PerHead((Window(1), Strided(3), BlockLocal(2) | GlobalTokens(1)))
    assert p.num_heads == 3
    mask = p.dense_mask(10)
    assert mask.shape == (3, 10, 10)
    np.testing.assert_array_equal(mask, brute(p, 10))
    assert p.nnz(10) == int(mask.sum())
    assert p.density(10) == pytest.approx(mask.sum() / (3 * 100))
    start, step, count = p.row_segments(10)
    assert start.shape[:2] == (3, 10) and start.shape == step.shape == count.shape
    for h in range(3):
        for i in range(10):
            cols = {s + d * k for s, d, c in zip(start[h, i], step[h, i], count[h, i])
                    for k in range(c)}
            assert cols == set(np.flatnonzero(mask[h, i]))


def test_patterns_are_frozen_and_hashable():
    w = Window(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.width = 4
    assert w == Window(3) and hash(w) == hash(Window(3))
    assert Strided(8) == Strided(8, 8)
    assert len({Window(3), Window(3), Window(3, causal=True)}) == 2


# ---- parsing ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("window:256", Window(256)),
    ("causal_window:128", Window(128, causal=True)),
    ("dilated:128:2", DilatedWindow(128, 2)),
    ("causal_dilated:4:3", DilatedWindow(4, 3, causal=True)),
    ("strided:128", Strided(128)),
    ("strided:128:64", Strided(128, 64)),
    ("causal_strided:16", Strided(16, causal=True)),
    ("block:64", BlockLocal(64)),
    ("global:16", GlobalTokens(16)),
    ("dense", Dense()),
    ("global:16+window:256", Union((GlobalTokens(16), Window(256)))),
    (" Global:2 + dilated:8:2 ", Union((GlobalTokens(2), DilatedWindow(8, 2)))),
])
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text, message", [
    ("sliding:4", "unknown pattern 'sliding'.*known: .*window"),
    ("window", "takes 1 argument"),
    ("window:1:2", "takes 1 argument"),
    ("dilated:4", "takes 2 argument"),
    ("strided:4:2:1", "takes 1-2 argument"),
    ("window:abc", "must be integers, got 'abc'"),
    ("window:-3", "window width must be >= 0, got -3"),
    ("", "non-empty"),
    ("window:2+", "empty part"),
])
def test_parse_pattern_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_pattern(text)


def test_parse_pattern_rejects_non_string():
    with pytest.raises(ValueError, match="non-empty string"):
        parse_pattern(None)


# ---- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("build, message", [
    (lambda: Window(-3), "window width must be >= 0, got -3"),
    (lambda: Window(2.5), "window width must be an integer, got 2.5"),
    (lambda: Window(True), "window width must be an integer"),
    (lambda: DilatedWindow(-1, 2), "window width must be >= 0, got -1"),
    (lambda: DilatedWindow(2, 0), "dilation must be >= 1, got 0"),
    (lambda: Strided(0), "stride must be >= 1, got 0"),
    (lambda: Strided(4, -1), "local window must be >= 0, got -1"),
    (lambda: BlockLocal(0), "block size must be >= 1, got 0"),
    (lambda: GlobalTokens([1, -2]), "global tokens must be >= 0, got -2"),
    (lambda: GlobalTokens(-1), "number of global tokens must be >= 0, got -1"),
    (lambda: GlobalTokens([1.5]), "global token must be an integer"),
    (lambda: GlobalTokens("abc"), "int count or a sequence"),
    (lambda: GlobalTokens.first(-2), "must be >= 0, got -2"),
    (lambda: Union(()), "at least one pattern"),
    (lambda: Union(Window(1)), "sequence of patterns"),
    (lambda: Union((Window(1), 3)), "Union parts must be patterns"),
    (lambda: Union((Window(1), PerHead((Window(1),)))), "PerHead cannot be nested inside Union"),
    (lambda: PerHead((Window(1),)) | Window(2), "PerHead cannot be nested inside Union"),
    (lambda: PerHead(()), "at least one head"),
    (lambda: PerHead(Window(1)), "sequence of patterns"),
    (lambda: PerHead((PerHead((Window(1),)),)), "PerHead cannot be nested inside PerHead"),
    (lambda: PerHead((Window(1), "window:3")), "heads must be patterns"),
])
def test_constructor_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("pattern", [Window(2), PerHead((Window(1), Dense())),
                                     GlobalTokens(1) | Strided(2)], ids=ids)
@pytest.mark.parametrize("method", ["dense_mask", "row_segments", "nnz", "density"])
def test_sequence_length_must_be_positive(pattern, method):
    with pytest.raises(ValueError, match="sequence length must be >= 1, got 0"):
        getattr(pattern, method)(0)
    with pytest.raises(ValueError, match="sequence length must be an integer"):
        getattr(pattern, method)(4.0)


def test_base_pattern_is_abstract():
    with pytest.raises(NotImplementedError):
        Pattern().dense_mask(3)


# ---- mask_mod: the analytic FlexAttention form -------------------------------------------
CAUSAL_FORMS = [
    Window(4, causal=True), DilatedWindow(2, 3, causal=True), Strided(4, 2, causal=True),
    Strided(3, 0, causal=True), GlobalTokens(2) | Window(3, causal=True),
    Window(5, causal=True) | Strided(4, 1, causal=True),
]
# parameters far beyond n (and beyond int32): the constants must be clamped, not overflow
HUGE_PARAMETERS = [
    Window(2**40), Window(2**40, causal=True), DilatedWindow(2**20, 2**40), DilatedWindow(3, 2**40),
    DilatedWindow(2**40, 3), Strided(2**40), Strided(3, 2**40), BlockLocal(2**40),
    GlobalTokens([1, 2**40]),
]
PER_HEAD = [
    PerHead((Window(1), Strided(3), BlockLocal(2) | GlobalTokens(1))),
    PerHead((Dense(), GlobalTokens(()), Window(2, causal=True), DilatedWindow(1, 4) | GlobalTokens([3]))),
]
MASK_MOD_SIZES = [1, 2, 5, 37, 67]


def _mask_mod_numpy(pattern, n, dtype=np.int64):
    """Evaluate ``pattern.mask_mod(n)`` on index grids: [n, n] (PerHead: [H, n, n])."""
    i = np.arange(n, dtype=dtype)[:, None]
    j = np.arange(n, dtype=dtype)[None, :]
    h = np.arange(pattern.num_heads, dtype=dtype)[:, None, None]
    shape = (pattern.num_heads, n, n) if isinstance(pattern, PerHead) else (n, n)
    out = pattern.mask_mod(n)(0, h if isinstance(pattern, PerHead) else 0, i, j)
    assert out.dtype == np.bool_
    return np.broadcast_to(out, shape)


def _mask_mod_torch(pattern, n):
    """The same on int32 torch tensors, the index dtype FlexAttention passes."""
    torch = pytest.importorskip("torch")
    i = torch.arange(n, dtype=torch.int32)[:, None]
    j = torch.arange(n, dtype=torch.int32)[None, :]
    h = torch.arange(pattern.num_heads, dtype=torch.int32)[:, None, None]
    out = pattern.mask_mod(n)(torch.zeros((), dtype=torch.int32), h, i, j)
    assert out.dtype == torch.bool
    shape = (pattern.num_heads, n, n) if isinstance(pattern, PerHead) else (n, n)
    return out.expand(shape).numpy()


@pytest.mark.parametrize("pattern", FAMILIES + CAUSAL_FORMS + HUGE_PARAMETERS + PER_HEAD, ids=ids)
def test_mask_mod_equals_dense_mask(pattern):
    for n in MASK_MOD_SIZES:
        expected = pattern.dense_mask(n)
        np.testing.assert_array_equal(_mask_mod_numpy(pattern, n), expected, err_msg=f"numpy n={n}")
        np.testing.assert_array_equal(_mask_mod_numpy(pattern, n, np.int32), expected,
                                      err_msg=f"numpy int32 n={n}")
        np.testing.assert_array_equal(_mask_mod_torch(pattern, n), expected, err_msg=f"torch n={n}")


@pytest.mark.parametrize("pattern", FAMILIES + CAUSAL_FORMS + PER_HEAD, ids=ids)
def test_mask_mod_equals_acsr_mask(pattern):
    """The mask ours runs (ACSR from the closed-form segments) is the mask Flex runs."""
    from tvm_splat.formats import ACSR

    for n in MASK_MOD_SIZES:
        acsr = ACSR.from_pattern(pattern, n).to_dense()
        np.testing.assert_array_equal(_mask_mod_numpy(pattern, n),
                                      acsr if isinstance(pattern, PerHead) else acsr[0], err_msg=f"n={n}")


@pytest.mark.parametrize("pattern", [Window(3), GlobalTokens([0, 5, 7]) | DilatedWindow(2, 3),
                                     Strided(4, 2, causal=True) | BlockLocal(5)] + PER_HEAD, ids=ids)
def test_mask_mod_runs_under_flex_vmap(pattern):
    """torch's own ``create_mask`` (the vmap FlexAttention's block masks are built with)."""
    pytest.importorskip("torch")
    from torch.nn.attention.flex_attention import create_mask

    n = 37
    heads = pattern.num_heads if isinstance(pattern, PerHead) else 1
    mask = create_mask(pattern.mask_mod(n), 1, heads, n, n, device="cpu")
    np.testing.assert_array_equal(mask[0].numpy(), pattern.dense_mask(n).reshape(heads, n, n))


class _CountingIndex:
    """An index that counts the operators applied to it (every result is the same object)."""

    def __init__(self):
        self.ops = 0

    def _op(self, *args):
        self.ops += 1
        return self

    __ge__ = __le__ = __gt__ = __lt__ = __eq__ = __and__ = __or__ = __rand__ = __ror__ = _op
    __sub__ = __rsub__ = __add__ = __mod__ = __floordiv__ = __abs__ = _op


def test_mask_mod_cost_is_independent_of_the_token_count():
    """A million global tokens are one arithmetic run: a few operators, not a table."""
    n = 2**21

    def ops(pattern):
        index = _CountingIndex()
        pattern.mask_mod(n)(0, 0, index, index)
        return index.ops

    assert ops(GlobalTokens(10**6)) == ops(GlobalTokens(2)) == 7  # per index: >=, <=, &; then |
    assert ops(GlobalTokens([0, 2, 4, 6, 8])) == 15  # a run of step 2 adds -, %, ==, & per index
    mod = GlobalTokens(10**6).mask_mod(n)
    assert bool(mod(0, 0, np.int64(n - 1), np.int64(999_999)))
    assert not bool(mod(0, 0, np.int64(n - 1), np.int64(10**6)))


def test_mask_mod_checks_n():
    with pytest.raises(ValueError, match="sequence length must be >= 1, got 0"):
        Window(2).mask_mod(0)
    with pytest.raises(NotImplementedError):
        Pattern().mask_mod(3)


@st.composite
def _patterns(draw):
    leaf = st.one_of(
        st.builds(Window, st.integers(0, 40), st.booleans()),
        st.builds(DilatedWindow, st.integers(0, 12), st.integers(1, 9), st.booleans()),
        st.builds(Strided, st.integers(1, 20), st.one_of(st.none(), st.integers(0, 20)), st.booleans()),
        st.builds(BlockLocal, st.integers(1, 40)),
        st.builds(GlobalTokens, st.lists(st.integers(0, 60), max_size=6)),
        st.just(Dense()),
    )
    parts = draw(st.lists(leaf, min_size=1, max_size=3))
    return parts[0] if len(parts) == 1 else Union(tuple(parts))


@settings(max_examples=150, deadline=None)
@given(pattern=_patterns(), n=st.integers(1, 70))
def test_mask_mod_property(pattern, n):
    np.testing.assert_array_equal(_mask_mod_numpy(pattern, n), pattern.dense_mask(n))
