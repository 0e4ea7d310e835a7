"""Every kernel family (tiled, row, and separate = R-SDDMM, softmax, R-SpMM) equals dense masked
attention on the CPU."""
import numpy as np
import pytest
import tvm

from tvm_splat.compile import compile_attention
from tvm_splat.kernels import VARIANTS, AttentionSpec, row_variant_funcs
from tvm_splat.reference import masked_attention, masked_scores

from tvm_splat.testing import dense_mask, mask_cases, qkv

CASES = mask_cases()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name,acsr,heads", CASES, ids=[c[0] for c in CASES])
def test_attention_matches_dense_fp32(name, acsr, heads, variant, rng):
    from tvm_splat import sparse_attention

    batch = 3 if name == "window n=37" else 1
    q, k, v = qkv(rng, batch, heads, acsr.n, 8, "float32")
    out = sparse_attention(q, k, v, acsr, target="llvm", variant=variant)
    ref = masked_attention(q, k, v, dense_mask(acsr))
    assert out.shape == q.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=1e-3)


def test_empty_rows_give_zeros(rng):
    name, acsr, heads = next(c for c in CASES if c[0] == "empty rows")
    from tvm_splat import sparse_attention

    q, k, v = qkv(rng, 1, heads, acsr.n, 8, "float32")
    for variant in VARIANTS:
        out = sparse_attention(q, k, v, acsr, target="llvm", variant=variant)
        assert np.all(out[:, :, [0, 7, acsr.n - 1]] == 0)
        assert np.all(np.abs(out[:, :, 1]) > 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp16_inputs_accumulate_in_fp32(variant, rng):
    from tvm_splat import sparse_attention

    name, acsr, heads = CASES[6]  # global + window
    q, k, v = qkv(rng, 2, heads, acsr.n, 16, "float16")
    out = sparse_attention(q, k, v, acsr, target="llvm", variant=variant)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float64), masked_attention(q, k, v, dense_mask(acsr)),
                               atol=5e-3, rtol=1e-2)


@pytest.mark.parametrize("name,acsr,heads", CASES[:9], ids=[c[0] for c in CASES[:9]])
def test_sddmm_and_softmax_values_in_acsr_order(name, acsr, heads, rng):
    """Scores and probabilities land at row_ptr offsets in ACSR value order."""
    q, k, _ = qkv(rng, 2, heads, acsr.n, 8, "float32")
    spec = AttentionSpec.from_acsr(acsr, 2, heads, 8, "float32")
    lib = compile_attention(spec, "llvm", "separate")
    dev = tvm.cpu()
    meta = [tvm.runtime.tensor(a, dev) for a in
            (acsr.seg_start, acsr.seg_step, acsr.seg_count, acsr.row_ptr, acsr.indices)]
    scores = tvm.runtime.tensor(np.zeros((2, heads, spec.max_nnz), "float32"), dev)
    probs = tvm.runtime.tensor(np.zeros((2, heads, spec.max_nnz), "float32"), dev)
    lib["sddmm"](tvm.runtime.tensor(q, dev), tvm.runtime.tensor(k, dev), *meta, scores)
    lib["softmax"](scores, meta[3], probs)
    dense = masked_scores(q, k, dense_mask(acsr))
    s, p = scores.numpy(), probs.numpy()
    for h in range(heads):
        hm = h % acsr.num_heads
        for i in range(acsr.n):
            cols = acsr.columns(hm, i)
            lo, hi = acsr.row_ptr[hm, i], acsr.row_ptr[hm, i + 1]
            np.testing.assert_allclose(s[:, h, lo:hi], dense[:, h, i, cols], atol=1e-4, rtol=1e-4)
            if hi > lo:
                np.testing.assert_allclose(p[:, h, lo:hi].sum(-1), 1.0, atol=1e-5)


def test_variant_names_are_checked():
    spec = AttentionSpec(1, 1, 4, 4, "float32", 1, 1, 4, 1, False, 0.5)
    with pytest.raises(ValueError, match="not a row-parallel variant"):
        row_variant_funcs(spec, "flash")


def test_spec_rejects_bad_inputs():
    with pytest.raises(ValueError, match="unsupported dtype"):
        AttentionSpec(1, 1, 4, 4, "int8", 1, 1, 4, 1, False, 0.5)
    with pytest.raises(ValueError, match="mask has 3 heads"):
        AttentionSpec(1, 4, 4, 4, "float32", 3, 1, 4, 1, False, 0.5)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        AttentionSpec(1, 1, 0, 4, "float32", 1, 1, 4, 1, False, 0.5)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        AttentionSpec(1, 6, 4, 4, "float32", 1, 1, 4, 1, False, 0.5, kv_heads=4)
    with pytest.raises(ValueError, match="scale must be finite"):
        AttentionSpec(1, 1, 4, 4, "float32", 1, 1, 4, 1, False, float("nan"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_nan_keys_and_values_do_not_leak(variant, rng):
    """Padding with garbage: keys/values 48..63 are NaN and masked out for every row; one more
    NaN value row is attended by 9 rows of one head. Exactly those rows get NaN, every other
    output matches the reference (masked-out entries are selected away, never multiplied)."""
    from tvm_splat import sparse_attention
    from tvm_splat.formats import ACSR
    from tvm_splat.schedules.tiled import TiledKnobs

    n = 64
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        mask[i, max(0, i - 4):min(48, i + 5)] = True
    q, k, v = qkv(rng, 1, 2, n, 8, "float32")
    k[:, :, 48:] = np.nan
    v[:, :, 48:] = np.nan
    v[:, 1, 20, 5] = np.nan
    knobs = TiledKnobs(br=16, bc=16) if variant == "tiled" else None
    out = sparse_attention(q, k, v, ACSR.from_mask(mask), variant=variant, knobs=knobs)
    ref = masked_attention(q, k, v, mask)
    assert np.isnan(ref).sum() == 9  # column d=5 of rows 16..24 of head 1
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(out[ok], ref[ok], atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_non_finite_scores_propagate_like_dense_attention(variant, rng):
    """+inf in q makes an attended score infinite: dense attention gives NaN for that row, and
    so do we (never a plausible zero row)."""
    from tvm_splat import sparse_attention

    q, k, v = qkv(rng, 1, 2, 30, 8, "float32")
    q[0, 0, 10, 0] = np.inf
    out = sparse_attention(q, k, v, "window:3", variant=variant)
    assert np.isnan(out[0, 0, 10]).any()
    assert not np.isnan(out[0, 1]).any() and not np.isnan(np.delete(out[0, 0], 10, axis=0)).any()
