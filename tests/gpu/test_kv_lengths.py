"""Key lengths (padding masks) on CUDA tensors: every kernel form against the float64 padded
reference, NaN in every padded key and value (run on the GPU machine; skipped without a GPU)."""
import numpy as np
import pytest

from tvm_splat.testing import dense_mask, mask_cases

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CASES = mask_cases()
TOL = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 4e-2}


def _padded_reference(q, k, v, mask, lengths):
    from tvm_splat.reference import masked_attention

    n = q.shape[2]
    return np.stack([masked_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask & (np.arange(n) < length))[0]
                     for b, length in enumerate(lengths)])


def _cuda_inputs(rng, batch, heads, kv_heads, n, d, dtype, lengths):
    """CUDA q, k, v of ``dtype`` with NaN past every length, and their rounded float64 values."""
    q = rng.standard_normal((batch, heads, n, d))
    k, v = (rng.standard_normal((batch, kv_heads, n, d)) for _ in range(2))
    for b, length in enumerate(lengths):
        k[b, :, length:] = np.nan
        v[b, :, length:] = np.nan
    ts = [torch.from_numpy(x).cuda().to(getattr(torch, dtype)) for x in (q, k, v)]
    return ts, [t.double().cpu().numpy() for t in ts]


def _knobs(variant, **extra):
    from tvm_splat.schedules.tiled import TiledKnobs

    if variant == "tiled_cuda_cores":
        return "tiled", TiledKnobs(use_tensor_cores=False, **extra)
    if variant == "tiled":
        return "tiled", TiledKnobs(use_tensor_cores=True, **extra)
    return variant, None


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("variant", ["tiled", "tiled_cuda_cores", "row", "separate"])
@pytest.mark.parametrize("name,acsr,heads", CASES, ids=[c[0] for c in CASES])
def test_cuda_lengths_match_padded_dense(name, acsr, heads, variant, dtype, rng):
    from tvm_splat import sparse_attention

    if variant == "tiled" and dtype == "float32":
        pytest.skip("tensor cores take float16/bfloat16")
    n = acsr.n
    lengths = np.array([0, 1, n, n // 2 + 3])
    (tq, tk, tv), (q, k, v) = _cuda_inputs(rng, 4, heads, heads, n, 64, dtype, lengths)
    kind, knobs = _knobs(variant)
    out = sparse_attention(tq, tk, tv, acsr, variant=kind, knobs=knobs,
                           kv_lengths=torch.from_numpy(lengths).cuda())
    ref = _padded_reference(q, k, v, dense_mask(acsr), lengths)
    got = out.double().cpu().numpy()
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert not got[0].any()


#: tensor-core forms; block-local 64 makes FULL 64-column blocks that lengths 70 and 250 cut
TC_FORMS = {"two_stages": dict(stages=2), "one_stage": dict(stages=1), "bc128": dict(bc=128),
            "m_tiles2": dict(br=64, warps=2, m_tiles=2), "bc32_w2": dict(br=32, bc=32, warps=2)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("form", sorted(TC_FORMS))
@pytest.mark.parametrize("pattern", ["block:64", "global:3+causal_window:100", "global:2+strided:16"])
def test_cuda_tensor_core_forms_full_blocks_cross_lengths(pattern, form, dtype, rng):
    """FULL blocks crossing a length are masked; GQA (4 query heads on 2 KV heads); n = 301."""
    from tvm_splat import parse_pattern, sparse_attention

    n, lengths = 301, np.array([70, 301, 250, 0])
    (tq, tk, tv), (q, k, v) = _cuda_inputs(rng, 4, 4, 2, n, 64, dtype, lengths)
    kind, knobs = _knobs("tiled", **TC_FORMS[form])
    out = sparse_attention(tq, tk, tv, pattern, variant=kind, knobs=knobs, kv_lengths=lengths)
    ref = _padded_reference(q, k, v, parse_pattern(pattern).dense_mask(n), lengths)
    got = out.double().cpu().numpy()
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_heavy_global_rows_with_lengths(dtype, rng):
    """Global rows walk all of n = 4100 while window rows walk a few blocks (split-KV tiles in
    the tile plan); lengths cut through their chunks; Longformer-base's head shape, batch 3."""
    from tvm_splat import parse_pattern, sparse_attention

    n, pattern, lengths = 4100, "global:4+window:256", np.array([4100, 1999, 64])
    (tq, tk, tv), (q, k, v) = _cuda_inputs(rng, 3, 12, 12, n, 64, dtype, lengths)
    out = sparse_attention(tq, tk, tv, pattern, kv_lengths=torch.from_numpy(lengths).cuda())
    ref = _padded_reference(q, k, v, parse_pattern(pattern).dense_mask(n), lengths)
    got = out.double().cpu().numpy()
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_lengths_match_sdpa_with_the_same_boolean_mask(head_dim, rng):
    """Sliding window + padding on bf16, against PyTorch's SDPA with the boolean mask (rows
    without a key: zeros in both); the fast path takes new lengths on the second call."""
    from tvm_splat import parse_pattern, plan

    n, pattern = 1000, parse_pattern("causal_window:128")
    q, k, v = (torch.randn(3, 8, n, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    made = plan(pattern, q.shape, k.shape, "bfloat16", "cuda", kv_lengths=True)
    for lengths in (torch.tensor([1000, 517, 3], device="cuda"), torch.tensor([64, 1000, 999], device="cuda")):
        keep = torch.from_numpy(pattern.dense_mask(n)).cuda()[None, None] \
            & (torch.arange(n, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
        sdpa = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep)
        sdpa = torch.where(keep.any(-1, keepdim=True), sdpa, torch.zeros_like(sdpa))  # whatever the backend does
        ours = made.run(q, k, v, kv_lengths=lengths)
        torch.testing.assert_close(ours.float(), sdpa, atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("br,warps,ws,persistent", [(64, 4, False, 0), (128, 8, False, 0), (128, 8, True, 0),
                                                    (128, 8, True, 3), (64, 4, True, 5)],
                         ids=["64-4-False", "128-8-False", "128-8-True", "128-8-True-persistent3",
                              "64-4-True-persistent5"])
@pytest.mark.parametrize("pattern", ["block:64", "global:3+causal_window:100", "dilated:40:7"])
def test_cuda_tma_form_blocks_cross_lengths(pattern, br, warps, ws, persistent, dtype, rng):
    """The TMA form does not zero rows past a length: their scores are selected away and every
    block crossing a length checks its V (NaN there); GQA, n = 301, d = 128; a dilated mask's
    blocks (rows 7 apart, 301 = 7 x 43) cross a length at their last row, not at first + bc.
    ``ws``: the warp-specialized form, whose consumer warpgroups check V apart; ``persistent``:
    its persistent form, a few thread blocks each walking tiles of several batches (each tile
    its batch's length)."""
    from tvm_splat import parse_pattern, sparse_attention

    n, lengths = 301, np.array([70, 301, 250, 0])
    (tq, tk, tv), (q, k, v) = _cuda_inputs(rng, 4, 4, 2, n, 128, dtype, lengths)
    kind, knobs = _knobs("tiled", br=br, warps=warps, wgmma=True, tma=True, warp_specialized=ws,
                         persistent=persistent)
    out = sparse_attention(tq, tk, tv, pattern, variant=kind, knobs=knobs, kv_lengths=lengths)
    ref = _padded_reference(q, k, v, parse_pattern(pattern).dense_mask(n), lengths)
    got = out.double().cpu().numpy()
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, ref, atol=TOL[dtype], rtol=TOL[dtype])
