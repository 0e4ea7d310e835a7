"""The CPU numerics tests, on CUDA tensors (run on the GPU machine; skipped without a GPU)."""
import numpy as np
import pytest

from tvm_splat.reference import masked_attention
from tvm_splat.testing import dense_mask, mask_cases, qkv

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CASES = mask_cases()


def _cuda(arrays, dtype):
    """numpy float32 arrays -> CUDA tensors of ``dtype``, and the rounded values as float64."""
    ts = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda().to(getattr(torch, dtype)) for x in arrays]
    return ts, [t.double().cpu().numpy() for t in ts]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("variant", ["tiled", "tiled_cuda_cores", "row", "separate"])
@pytest.mark.parametrize("name,acsr,heads", CASES, ids=[c[0] for c in CASES])
def test_cuda_matches_dense(name, acsr, heads, variant, dtype, rng):
    from tvm_splat import sparse_attention

    (tq, tk, tv), (q, k, v) = _cuda(qkv(rng, 3, heads, acsr.n, 64, "float32"), dtype)
    if variant == "tiled_cuda_cores":
        from tvm_splat.schedules.tiled import TiledKnobs

        out = sparse_attention(tq, tk, tv, acsr, variant="tiled", knobs=TiledKnobs(use_tensor_cores=False))
    else:
        out = sparse_attention(tq, tk, tv, acsr, variant=variant)
    assert out.is_cuda and out.dtype == tq.dtype and out.shape == tq.shape
    ref = masked_attention(q, k, v, dense_mask(acsr))
    tol = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 4e-2}[dtype]
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=tol, rtol=tol)


#: tensor-core forms of the tiled kernel besides the default
TC_FORMS = {
    "mma_one_stage": dict(stages=1),
    "mma_bc32_w2": dict(br=32, bc=32, warps=2),
    "mma_bc128": dict(bc=128),
    "mma_w8": dict(br=128, warps=8),
    "mma_m_tiles2": dict(br=64, warps=2, m_tiles=2),
    "mma_split_kv": dict(bc=16, split_blocks=1),  # every tile of 2+ blocks split into 1-block chunks
    "mma_split_kv_one_stage": dict(bc=16, stages=1, split_blocks=2),
    "wgmma": dict(wgmma=True),
    "wgmma_one_stage": dict(wgmma=True, stages=1),
    "wgmma_two_warpgroups_bc128": dict(br=128, warps=8, bc=128, wgmma=True),
    "wgmma_bc16_split_kv": dict(bc=16, wgmma=True, split_blocks=1),
    "wgmma_pipelined": dict(wgmma=True, stages=4),
    "wgmma_pipelined_two_warpgroups_bc16_split": dict(br=128, warps=8, bc=16, wgmma=True, stages=4, split_blocks=3),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("form", sorted(TC_FORMS))
@pytest.mark.parametrize("name,acsr,heads", CASES, ids=[c[0] for c in CASES])
def test_cuda_tensor_core_forms_match_dense(name, acsr, heads, form, dtype, rng):
    from tvm_splat import sparse_attention
    from tvm_splat.schedules.tiled import TiledKnobs

    (tq, tk, tv), (q, k, v) = _cuda(qkv(rng, 2, heads, acsr.n, 64, "float32"), dtype)
    knobs = TiledKnobs(use_tensor_cores=True, **TC_FORMS[form])
    out = sparse_attention(tq, tk, tv, acsr, variant="tiled", knobs=knobs)
    ref = masked_attention(q, k, v, dense_mask(acsr))
    tol = 2e-2 if dtype == "float16" else 4e-2
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("head_dim", [16, 128])
def test_cuda_mma_kernel_other_head_dims(head_dim, rng):
    from tvm_splat import ACSR, parse_pattern, sparse_attention

    acsr = ACSR.from_pattern(parse_pattern("global:3+dilated:9:2"), 203)
    q, k, v = qkv(rng, 2, 3, acsr.n, head_dim, "float16")
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    out = sparse_attention(tq, tk, tv, acsr)
    ref = masked_attention(q, k, v, dense_mask(acsr))
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=2e-2, rtol=2e-2)


def test_cuda_fast_path_follows_the_torch_stream(rng):
    """A second call (fast path) runs on torch's current stream: work queued before it on a
    side stream is seen, and the result matches the first call."""
    from tvm_splat import sparse_attention

    q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    first = sparse_attention(q, k, v, "window:17")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        q2 = q * 2  # queued on the side stream
        second = sparse_attention(q2, k, v, "window:17")
    torch.cuda.synchronize()
    third = sparse_attention(q * 2, k, v, "window:17")
    torch.testing.assert_close(second, third)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("pattern,n,d", [("causal_window:40", 333, 128), ("global:5+dilated:6:3", 250, 64),
                                         ("strided:16", 257, 64), ("dilated:24:3", 301, 128)])
def test_cuda_grouped_query_attention(pattern, n, d, kv_heads, dtype, rng):
    """GQA / MQA on tensor cores: k, v with 1 or 2 heads for 4 query heads, odd n; with the
    default knobs (dilated at d=128: the mma form, one component of blocks of step 3)."""
    from tvm_splat import parse_pattern, sparse_attention

    (tq,), (q,) = _cuda([rng.standard_normal((2, 4, n, d))], dtype)
    (tk, tv), (k, v) = _cuda([rng.standard_normal((2, kv_heads, n, d)) for _ in range(2)], dtype)
    out = sparse_attention(tq, tk, tv, pattern)
    ref = masked_attention(q, k, v, parse_pattern(pattern).dense_mask(n))
    tol = 2e-2 if dtype == "float16" else 4e-2
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("variant", ["tiled", "tiled_cuda_cores", "row", "separate"])
@pytest.mark.parametrize("stages", [1, 2])
def test_cuda_nan_in_masked_keys_and_values_does_not_leak(variant, stages, rng):
    """Padding with garbage: keys/values 48..63 are NaN and masked out for every row, one more
    NaN value row is attended by a few rows only. Exactly the rows that attend a NaN get NaN."""
    from tvm_splat import ACSR, sparse_attention
    from tvm_splat.schedules.tiled import TiledKnobs

    n = 64
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        mask[i, max(0, i - 4):min(48, i + 5)] = True  # a window clipped to the 48 valid keys
    acsr = ACSR.from_mask(mask)
    q, k, v = (rng.standard_normal((1, 2, n, 64)).astype(np.float32) for _ in range(3))
    k[:, :, 48:] = np.nan
    v[:, :, 48:] = np.nan
    v[:, 1, 20, 5] = np.nan  # attended by rows 16..24 of head 1
    (tq, tk, tv), (q64, k64, v64) = _cuda([q, k, v], "float16")
    kwargs = {"variant": "tiled" if variant.startswith("tiled") else variant}
    if variant.startswith("tiled"):
        kwargs["knobs"] = TiledKnobs(use_tensor_cores=variant == "tiled", stages=stages)
    out = sparse_attention(tq, tk, tv, acsr, **kwargs).double().cpu().numpy()
    ref = masked_attention(q64, k64, v64, mask)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert np.isnan(ref).sum() == 9  # column d=5 of rows 16..24 of head 1
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(out[ok], ref[ok], atol=2e-2, rtol=2e-2)


def test_cuda_non_finite_scores_give_nan_not_zeros(rng):
    """+inf in q (an attended score is not finite) gives NaN in that row, like dense attention."""
    from tvm_splat import sparse_attention

    q, k, v = (torch.randn(1, 2, 100, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    q[0, 0, 10, 0] = float("inf")
    for variant in ("tiled", "row", "separate"):
        out = sparse_attention(q, k, v, "window:8", variant=variant)
        assert torch.isnan(out[0, 0, 10]).any(), variant
        assert not torch.isnan(out[0, 1]).any() and not torch.isnan(out[0, 0, 30:]).any()


def test_cuda_heavy_global_rows(rng):
    """A few global rows walk all n columns while the others walk a window: correct in fp16 and
    bf16 at n = 2049, with the global rows' tile split-KV (the default rule splits it)."""
    from tvm_splat import parse_pattern, sparse_attention
    from tvm_splat.attention import plan_for

    for dtype in ("float16", "bfloat16"):
        (tq, tk, tv), (q, k, v) = _cuda(qkv(rng, 1, 4, 2049, 64, "float32"), dtype)
        assert plan_for(tq, tk, tv, "global:3+window:64").tile_plan.num_slots > 0
        out = sparse_attention(tq, tk, tv, "global:3+window:64")
        ref = masked_attention(q, k, v, parse_pattern("global:3+window:64").dense_mask(2049))
        np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("variant", ["tiled", "tiled_cuda_cores"])
@pytest.mark.parametrize("pattern,n,kv_heads", [("global:2+strided:32", 700, 2), ("global:4+window:100", 1500, 1),
                                                ("global:64+block:64+window:32", 1000, 4)])
def test_cuda_split_kv_forms(pattern, n, kv_heads, variant, rng):
    """Split-KV with one component (split-merge writes the output), two components (it writes
    the component's state, then the merge), GQA, and the CUDA-core form."""
    from tvm_splat import parse_pattern, sparse_attention
    from tvm_splat.schedules.tiled import TiledKnobs

    (tq,), (q,) = _cuda([rng.standard_normal((2, 4, n, 64))], "float16")
    (tk, tv), (k, v) = _cuda([rng.standard_normal((2, kv_heads, n, 64)) for _ in range(2)], "float16")
    knobs = TiledKnobs(use_tensor_cores=variant == "tiled", split_blocks=2)
    out = sparse_attention(tq, tk, tv, pattern, variant="tiled", knobs=knobs)
    ref = masked_attention(q, k, v, parse_pattern(pattern).dense_mask(n))
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("pattern,n,d,stages", [("causal_window:40", 333, 128, 2), ("global:5+dilated:6:3", 250, 64, 1),
                                                ("global:3+window:64", 2049, 128, 1), ("causal_window:300", 1001, 128, 4),
                                                ("global:2+strided:32", 700, 64, 4)])
def test_cuda_wgmma_gqa_and_head_dims(pattern, n, d, stages, kv_heads, dtype, rng):
    """The Hopper (wgmma) form: GQA/MQA, d = 64 and 128, odd n, one and two stages, split-KV."""
    from tvm_splat import parse_pattern, sparse_attention
    from tvm_splat.schedules.tiled import TiledKnobs

    (tq,), (q,) = _cuda([rng.standard_normal((2, 4, n, d))], dtype)
    (tk, tv), (k, v) = _cuda([rng.standard_normal((2, kv_heads, n, d)) for _ in range(2)], dtype)
    knobs = TiledKnobs(use_tensor_cores=True, wgmma=True, stages=stages)
    out = sparse_attention(tq, tk, tv, pattern, variant="tiled", knobs=knobs)
    ref = masked_attention(q, k, v, parse_pattern(pattern).dense_mask(n))
    tol = 2e-2 if dtype == "float16" else 4e-2
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("form", ["tma", "tma_two_warpgroups", "tma_bc16_split_kv", "tma_ws", "tma_ws_one_group",
                                  "tma_ws_persistent3", "tma_ws_one_group_persistent5"])
@pytest.mark.parametrize("pattern,n,d", [("dilated:24:3", 300, 128), ("dilated:17:2", 302, 64),
                                         ("dilated:9:4", 260, 64)])
def test_cuda_tma_dilated_forms(pattern, n, d, form, kv_heads, dtype, rng):
    """The TMA form on dilated masks: rows regrouped by residue, column blocks of one step > 1
    loaded through the 5-D tensor map (residue, row within the class; the last block of a
    class zero-filled past n); GQA/MQA, d = 64 and 128, split-KV. A NaN in one key and another
    value reaches exactly the rows whose mask holds them: the blocks loaded hold keys that many
    of their rows do not attend (window edges), and those rows stay finite."""
    from tvm_splat import parse_pattern, sparse_attention
    from tvm_splat.attention import plan_for
    from tvm_splat.schedules.tiled import TiledKnobs

    q = rng.standard_normal((2, 4, n, d))
    k, v = (rng.standard_normal((2, kv_heads, n, d)) for _ in range(2))
    k[0, 0, 101, 7] = np.nan
    v[1, kv_heads - 1, 150, 3] = np.nan
    (tq, tk, tv), (q64, k64, v64) = _cuda([q, k, v], dtype)
    knobs = TiledKnobs(use_tensor_cores=True, **TMA_FORMS[form])
    made = plan_for(tq, tk, tv, pattern, knobs=knobs)
    assert made.knobs.tma and made.tile_plan.shape.step == int(pattern.split(":")[-1])
    out = sparse_attention(tq, tk, tv, pattern, variant="tiled", knobs=knobs).double().cpu().numpy()
    ref = masked_attention(q64, k64, v64, parse_pattern(pattern).dense_mask(n))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert np.isnan(ref).any() and (~np.isnan(ref)).any()
    ok = ~np.isnan(ref)
    tol = 2e-2 if dtype == "float16" else 4e-2
    np.testing.assert_allclose(out[ok], ref[ok], atol=tol, rtol=tol)


@pytest.mark.parametrize("form", [dict(stages=1), dict(stages=2), dict(stages=4), dict(stages=2, tma=True),
                                  dict(tma=True, warp_specialized=True),
                                  dict(br=128, warps=8, bc=128, tma=True, warp_specialized=True),
                                  dict(tma=True, warp_specialized=True, persistent=1),
                                  dict(br=128, warps=8, bc=128, tma=True, warp_specialized=True, persistent=1),
                                  dict(br=128, warps=8, bc=128, tma=True, warp_specialized=True, lazy_rescale=True),
                                  dict(br=128, warps=8, bc=128, tma=True, warp_specialized=True, early_rescale=True,
                                       softmax_overlap=True),
                                  dict(stages=2, tma=True, fold_scale=True)],
                         ids=["one_stage", "two_stages", "pipelined", "tma", "tma_ws_one_group", "tma_ws",
                              "tma_ws_one_group_persistent1", "tma_ws_persistent1", "tma_ws_lazy_rescale",
                              "tma_ws_early_rescale_softmax_overlap", "tma_fold_scale"])
def test_cuda_wgmma_nan_in_masked_keys_and_values_does_not_leak(form, rng):
    """The NaN test of the other forms, on the wgmma forms (their exact P V path stages P in a
    region of its own: wgmma reads Q from shared memory for the whole tile; the TMA form's
    copies fetch the NaN rows too; the warp-specialized form checks V per consumer warpgroup
    and runs the exact path by PTX loads and stores, one block behind S). ``persistent=1``: one
    thread block walks both heads' tiles, so the second head's blocks (its NaN value, tagged by
    running block index) follow the first's through the same stages."""
    from tvm_splat import ACSR, sparse_attention
    from tvm_splat.schedules.tiled import TiledKnobs

    n = 64
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        mask[i, max(0, i - 4):min(48, i + 5)] = True
    acsr = ACSR.from_mask(mask)
    q, k, v = (rng.standard_normal((1, 2, n, 64)).astype(np.float32) for _ in range(3))
    k[:, :, 48:] = np.nan
    v[:, :, 48:] = np.nan
    v[:, 1, 20, 5] = np.nan
    (tq, tk, tv), (q64, k64, v64) = _cuda([q, k, v], "float16")
    knobs = TiledKnobs(use_tensor_cores=True, wgmma=True, **form)
    out = sparse_attention(tq, tk, tv, acsr, variant="tiled", knobs=knobs).double().cpu().numpy()
    ref = masked_attention(q64, k64, v64, mask)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(out[ok], ref[ok], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan], ids=["inf", "minus_inf", "nan"])
@pytest.mark.parametrize("d,form", [(64, dict(wgmma=True, tma=True, warp_specialized=True)),
                                    (128, dict(br=128, warps=8, bc=128, wgmma=True, tma=True, warp_specialized=True,
                                               persistent=1)),
                                    (64, dict(wgmma=True, tma=True)),
                                    (128, dict(br=128, warps=8, wgmma=True, tma=True)),
                                    (128, dict(wgmma=True, stages=2)),
                                    (64, dict(stages=2)), (128, dict(stages=1))],
                         ids=["ws_d64_one_group", "ws_d128_two_groups_persistent1", "tma_d64",
                              "tma_d128_two_warpgroups", "wgmma_d128", "mma_d64", "mma_d128_one_stage"])
def test_cuda_non_finite_masked_values_do_not_leak(d, form, value, dtype, rng):
    """Each tensor-core form's V check (a PARTIAL block's V stage tested for NaN and inf by
    packed FMAs, by each consumer warpgroup in the warp-specialized form; such a block takes the
    exact P V path) in both dtypes and with each non-finite value: keys and values 200..255 hold
    it and every row masks them out, so no row may see it; one NaN value of a kept key (head 1,
    key 37) reaches exactly the rows that keep that key (its column d=5). Also the test of the
    drafts that changed how V is checked (benchmarks/README.md, "The thirty-sixth session")."""
    from tvm_splat import ACSR, sparse_attention
    from tvm_splat.schedules.tiled import TiledKnobs

    n = 256
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        mask[i, max(0, i - 9):min(200, i + 10)] = True  # a window clipped to the 200 valid keys
    acsr = ACSR.from_mask(mask)
    q, k, v = (rng.standard_normal((1, 2, n, d)).astype(np.float32) for _ in range(3))
    k[:, :, 200:] = value
    v[:, :, 200:] = value
    v[:, 1, 37, 5] = np.nan  # kept by rows 28..46 of head 1
    (tq, tk, tv), (q64, k64, v64) = _cuda([q, k, v], dtype)
    knobs = TiledKnobs(use_tensor_cores=True, **form)
    out = sparse_attention(tq, tk, tv, acsr, variant="tiled", knobs=knobs).double().cpu().numpy()
    ref = masked_attention(q64, k64, v64, mask)
    assert np.isnan(ref).sum() == 19 and not np.isinf(ref).any()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert not np.isinf(out).any()
    ok = ~np.isnan(ref)
    tol = 2e-2 if dtype == "float16" else 4e-2
    np.testing.assert_allclose(out[ok], ref[ok], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("form", [dict(stages=2), dict(wgmma=True, stages=2), dict(br=128, warps=8, wgmma=True),
                                  dict(wgmma=True, tma=True),
                                  dict(br=128, warps=8, bc=128, wgmma=True, tma=True, warp_specialized=True),
                                  dict(bc=128, wgmma=True, tma=True, warp_specialized=True, split_blocks=1),
                                  dict(br=128, warps=8, bc=128, wgmma=True, tma=True, warp_specialized=True,
                                       early_rescale=True, softmax_overlap=True),
                                  dict(stages=2, fold_scale=True), dict(wgmma=True, tma=True, fold_scale=True)],
                         ids=["mma", "wgmma", "wgmma_two_warpgroups", "tma", "tma_ws", "tma_ws_one_group_split_kv",
                              "tma_ws_early_rescale_softmax_overlap", "mma_fold_scale", "tma_fold_scale"])
def test_cuda_lazy_rescale_rows_whose_max_moves_by_small_and_large_steps(form, dtype, rng):
    """``lazy_rescale``: the running max moves only when a block raises it by more than
    RESCALE_THRESHOLD (2^8), so a row's probabilities are taken against a max up to 8 (log2)
    below the true one and O is rescaled only in a warp where a row moved. Keys whose scores
    climb along the sequence (log2 units: a ramp of 0.1 a key, 6.4 a 64-key block, plus a wave
    of +-6) make every row's max move through both cases block after block: raises that keep
    the old max, and raises past the threshold; head 1 walks the ramp downwards (the max
    settles in the first block), head 2 has plain random scores. float64 reference, window and
    global rows, odd n, split-KV in one form; the knob off and on agree within rounding."""
    import dataclasses

    from tvm_splat import parse_pattern, sparse_attention
    from tvm_splat.schedules.tiled import TiledKnobs

    n, d, pattern = 777, 64 if "warps" not in form else 128, "global:2+window:200"
    j = np.arange(n)
    ramp = (0.1 * j + 6.0 * np.sin(j / 15.0)) * np.log(2)  # the scores (natural units) of heads 0 and 1
    q = rng.standard_normal((1, 3, n, d)) * 0.1
    k = rng.standard_normal((1, 3, n, d)) * 0.1
    v = rng.standard_normal((1, 3, n, d))
    q[:, :2, :, 0] = np.sqrt(d)  # times the softmax scale 1 / sqrt(d): the score is k[..., 0]
    k[:, 0, :, 0], k[:, 1, :, 0] = ramp, ramp[::-1]
    k[:, 2] = rng.standard_normal((n, d))
    q[:, 2] = rng.standard_normal((n, d))
    (tq, tk, tv), (q64, k64, v64) = _cuda([q, k, v], dtype)
    knobs = TiledKnobs(use_tensor_cores=True, lazy_rescale=True, **form)
    out = sparse_attention(tq, tk, tv, pattern, variant="tiled", knobs=knobs)
    exact = sparse_attention(tq, tk, tv, pattern, variant="tiled", knobs=dataclasses.replace(knobs, lazy_rescale=False))
    ref = masked_attention(q64, k64, v64, parse_pattern(pattern).dense_mask(n))
    tol = 2e-2 if dtype == "float16" else 4e-2
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=tol, rtol=tol)
    np.testing.assert_allclose(out.double().cpu().numpy(), exact.double().cpu().numpy(), atol=tol / 2, rtol=tol / 2)


#: TMA forms (K/V by cp.async.bulk.tensor into 128-byte-swizzled stages; two-stage wgmma)
TMA_FORMS = {
    "tma": dict(wgmma=True, tma=True),
    "tma_two_warpgroups": dict(br=128, warps=8, wgmma=True, tma=True),
    "tma_bc128": dict(bc=128, wgmma=True, tma=True),
    "tma_bc16_split_kv": dict(bc=16, wgmma=True, tma=True, split_blocks=1),
    # warp-specialized: a producer warpgroup, one or two consumer warpgroups
    "tma_ws": dict(br=128, warps=8, bc=128, wgmma=True, tma=True, warp_specialized=True),
    "tma_ws_one_group": dict(bc=128, wgmma=True, tma=True, warp_specialized=True),
    "tma_ws_bc16_split_kv": dict(br=128, warps=8, bc=16, wgmma=True, tma=True, warp_specialized=True, split_blocks=1),
    # their persistent form: a few thread blocks, each walking several tiles (and heads)
    "tma_ws_persistent3": dict(br=128, warps=8, bc=128, wgmma=True, tma=True, warp_specialized=True, persistent=3),
    "tma_ws_one_group_persistent5": dict(bc=128, wgmma=True, tma=True, warp_specialized=True, persistent=5),
    "tma_ws_bc16_split_kv_persistent2": dict(br=128, warps=8, bc=16, wgmma=True, tma=True, warp_specialized=True,
                                             split_blocks=1, persistent=2),
    # lazy rescaling: the running max moves only by more than RESCALE_THRESHOLD
    "tma_lazy_rescale": dict(wgmma=True, tma=True, lazy_rescale=True),
    "tma_ws_lazy_rescale": dict(br=128, warps=8, bc=128, wgmma=True, tma=True, warp_specialized=True,
                                lazy_rescale=True),
    # the warp-specialized loop's variants: O rescaled while S runs; the softmax kept beside P V
    "tma_ws_early_rescale": dict(br=128, warps=8, bc=128, wgmma=True, tma=True, warp_specialized=True,
                                 early_rescale=True),
    "tma_ws_softmax_overlap": dict(br=128, warps=8, bc=128, wgmma=True, tma=True, warp_specialized=True,
                                   softmax_overlap=True),
    "tma_ws_one_group_loop_variants": dict(bc=128, wgmma=True, tma=True, warp_specialized=True, lazy_rescale=True,
                                           early_rescale=True, softmax_overlap=True),
    "tma_ws_persistent3_loop_variants": dict(br=128, warps=8, bc=128, wgmma=True, tma=True, warp_specialized=True,
                                             persistent=3, lazy_rescale=True, early_rescale=True,
                                             softmax_overlap=True),
    # the scale folded into the exponent (as the warp-specialized form always does)
    "tma_fold_scale": dict(wgmma=True, tma=True, fold_scale=True),
    "tma_two_warpgroups_fold_scale": dict(br=128, warps=8, wgmma=True, tma=True, fold_scale=True),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("form", sorted(TMA_FORMS))
@pytest.mark.parametrize("pattern,n,d", [("window:17", 300, 64), ("causal_window:40", 333, 128),
                                         ("global:3+window:64", 2049, 128), ("block:32", 257, 64),
                                         ("causal_window:189", 190, 128)])
def test_cuda_tma_forms(pattern, n, d, form, kv_heads, dtype, rng):
    """The TMA form on unit-step masks: GQA/MQA, d = 64 and 128, odd n (the last block's rows
    past n arrive zero-filled from the tensor map), split-KV, heavy global rows."""
    from tvm_splat import parse_pattern, sparse_attention
    from tvm_splat.schedules.tiled import TiledKnobs

    (tq,), (q,) = _cuda([rng.standard_normal((2, 4, n, d))], dtype)
    (tk, tv), (k, v) = _cuda([rng.standard_normal((2, kv_heads, n, d)) for _ in range(2)], dtype)
    knobs = TiledKnobs(use_tensor_cores=True, **TMA_FORMS[form])
    out = sparse_attention(tq, tk, tv, pattern, variant="tiled", knobs=knobs)
    ref = masked_attention(q, k, v, parse_pattern(pattern).dense_mask(n))
    tol = 2e-2 if dtype == "float16" else 4e-2
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("form,d", [("tma", 64), ("tma_ws_persistent3", 128), ("tma_ws", 128)])
def test_cuda_many_heads_walk_row_tiles_in_groups(form, d, rng):
    """With batch x heads >= GROUPED_MIN_HEADS the programs walk a head's row tiles in groups
    (program_tile): every tile computed once, against float64, where the tiles do not fill
    the last group (d=64: 18 row tiles of 64, groups of 16 and 2), in the grid TMA form, the
    warp-specialized one, and its persistent form (3 thread blocks, 132 and 1 over the heads'
    tiles: 64 heads x 9 tiles of 128 rows). bf16, window +-100, 4 heads on 2 KV heads."""
    import dataclasses

    from tvm_splat import parse_pattern, sparse_attention
    from tvm_splat.kernels.tiled_mma import GROUPED_MIN_HEADS, program_group
    from tvm_splat.schedules.tiled import TiledKnobs

    batch, heads, n = 16, 4, 1093
    assert batch * heads >= GROUPED_MIN_HEADS and program_group(batch * heads) > 1
    (tq,), (q,) = _cuda([rng.standard_normal((batch, heads, n, d))], "bfloat16")
    (tk, tv), (k, v) = _cuda([rng.standard_normal((batch, 2, n, d)) for _ in range(2)], "bfloat16")
    knobs = TiledKnobs(use_tensor_cores=True, **TMA_FORMS[form])
    ref = masked_attention(q, k, v, parse_pattern("window:100").dense_mask(n))
    for persistent in ((3, 132, 1) if knobs.persistent else (0,)):
        out = sparse_attention(tq, tk, tv, "window:100", variant="tiled",
                               knobs=dataclasses.replace(knobs, persistent=persistent))
        np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=4e-2, rtol=4e-2)


#: (form, pattern, n, d): plan features the grouped program order meets, each with batch x heads
#: = 64 (groups of row tiles): a union's merge, split-KV chunks of heavy global rows, a TMA map
#: stepping by a dilation, the cp.async wgmma form of non-unit steps, the persistent form on a
#: causal plan (row tiles of unequal length, longest first)
GROUPED_CASES = [
    ("mma", dict(), "global:2+strided:32", 1093, 64),
    ("wgmma_two_warpgroups_bc128", dict(br=128, warps=8, bc=128, wgmma=True), "dilated:24:3", 1093, 128),
    ("tma_bc16_split_kv", TMA_FORMS["tma_bc16_split_kv"], "global:3+window:40", 1093, 64),
    ("tma_step2", TMA_FORMS["tma"], "dilated:17:2", 1094, 64),
    ("tma_ws_persistent3", TMA_FORMS["tma_ws_persistent3"], "causal_window:300", 1093, 128),
    ("tma_ws_bc16_split_kv_persistent2", TMA_FORMS["tma_ws_bc16_split_kv_persistent2"], "global:3+window:40",
     1093, 128),
]


@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("form,knobs,pattern,n,d", GROUPED_CASES, ids=[c[0] for c in GROUPED_CASES])
def test_cuda_grouped_programs_on_unions_split_kv_and_steps(form, knobs, pattern, n, d, lengths, rng):
    """The grouped program order (:func:`~tvm_splat.kernels.tiled_mma.program_tile`, batch 16 x
    4 heads on 2 KV heads) in every kernel form that has it, on the plans whose programs index
    more than a row tile (a union's per-component states, split-KV slots, stepped TMA maps) or
    walk tiles of unequal length (causal, persistent); with per-batch key lengths (NaN in every padded key and value) or without. bf16 against
    the float64 reference."""
    from tvm_splat import parse_pattern, sparse_attention
    from tvm_splat.kernels.tiled_mma import program_group
    from tvm_splat.schedules.tiled import TiledKnobs

    batch, heads = 16, 4
    assert program_group(batch * heads) > 1
    q = rng.standard_normal((batch, heads, n, d))
    k, v = (rng.standard_normal((batch, 2, n, d)) for _ in range(2))
    kv_lengths = rng.integers(0, n + 1, batch) if lengths else np.full(batch, n)
    kv_lengths[:2] = (n, 0) if lengths else (n, n)
    for b, length in enumerate(kv_lengths):
        k[b, :, length:] = np.nan
        v[b, :, length:] = np.nan
    (tq, tk, tv), (q, k, v) = _cuda([q, k, v], "bfloat16")
    out = sparse_attention(tq, tk, tv, pattern, variant="tiled", knobs=TiledKnobs(use_tensor_cores=True, **knobs),
                           kv_lengths=torch.from_numpy(kv_lengths).cuda() if lengths else None)
    mask = parse_pattern(pattern).dense_mask(n)
    ref = np.stack([masked_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask & (np.arange(n) < length))[0]
                    for b, length in enumerate(kv_lengths)])
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("head_group", [1, 5])
@pytest.mark.parametrize("form,knobs,pattern,n,d", GROUPED_CASES[2:], ids=[c[0] for c in GROUPED_CASES[2:]])
def test_cuda_head_group_order_changes_no_output(form, knobs, pattern, n, d, head_group, rng):
    """``head_group`` (runs of G heads, all their row tiles: :func:`~tvm_splat.kernels.tiled_mma.head_group_tile`)
    on batch 3 x 4 heads over 2 KV heads (12 grid heads: G = 5 leaves a short last run), in the
    forms with split-KV slots, stepped TMA maps and the persistent walk of a causal plan: the
    output equals the default order's to the bit (the order moves programs between thread
    blocks and rounds, not the arithmetic of one) and the float64 reference. bf16."""
    import dataclasses

    from tvm_splat import parse_pattern, sparse_attention
    from tvm_splat.schedules.tiled import TiledKnobs

    batch, heads = 3, 4
    (tq,), (q,) = _cuda([rng.standard_normal((batch, heads, n, d))], "bfloat16")
    (tk, tv), (k, v) = _cuda([rng.standard_normal((batch, 2, n, d)) for _ in range(2)], "bfloat16")
    default = TiledKnobs(use_tensor_cores=True, **knobs)
    out_default, out = (sparse_attention(tq, tk, tv, pattern, variant="tiled", knobs=order)
                        for order in (default, dataclasses.replace(default, head_group=head_group)))
    assert torch.equal(out, out_default)
    ref = masked_attention(q, k, v, parse_pattern(pattern).dense_mask(n))
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("form,knobs,pattern,n,d", GROUPED_CASES[2:], ids=[c[0] for c in GROUPED_CASES[2:]])
def test_cuda_l2_hints_change_no_output(form, knobs, pattern, n, d, rng):
    """``kv_evict_last`` (L2's evict_last on the K/V tensor copies) and, in the persistent
    forms, ``out_evict_first`` (evict_first on the TMA store of O), in the TMA forms with
    split-KV slots, stepped tensor maps and the persistent walk of a causal plan, batch 3 x 4
    heads on 2 KV heads, NaN in every padded key and value (per-batch key lengths): the output
    equals the unhinted one to the bit (a hint moves lines in L2, not values) and the float64
    reference. bf16."""
    import dataclasses

    from tvm_splat import parse_pattern, sparse_attention
    from tvm_splat.schedules.tiled import TiledKnobs

    batch, heads = 3, 4
    q = rng.standard_normal((batch, heads, n, d))
    k, v = (rng.standard_normal((batch, 2, n, d)) for _ in range(2))
    kv_lengths = np.array([n, n - 37, n // 2 + 5])
    for b, length in enumerate(kv_lengths):
        k[b, :, length:] = np.nan
        v[b, :, length:] = np.nan
    (tq, tk, tv), (q, k, v) = _cuda([q, k, v], "bfloat16")
    plain = TiledKnobs(use_tensor_cores=True, **knobs)
    out_plain, out = (sparse_attention(tq, tk, tv, pattern, variant="tiled", knobs=hinted,
                                       kv_lengths=torch.from_numpy(kv_lengths).cuda())
                      for hinted in (plain, dataclasses.replace(plain, kv_evict_last=True,
                                                                out_evict_first=bool(plain.persistent))))
    assert torch.equal(out, out_plain)
    mask = parse_pattern(pattern).dense_mask(n)
    ref = np.stack([masked_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask & (np.arange(n) < length))[0]
                    for b, length in enumerate(kv_lengths)])
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("persistent", [1, 4, 200])
@pytest.mark.parametrize("form", ["tma_ws_persistent3", "tma_ws_one_group_persistent5"])
def test_cuda_persistent_forms_walk_empty_tiles(form, persistent, dtype, rng):
    """The persistent forms where some row tiles have no column block (rows 128-255 attend
    nothing): a thread block walking them resets its state, takes no turn and no stage, and
    writes zeros; the tiles after them take up the running block count (stages, phases, V tags)
    where the last non-empty tile left it. One block (all tiles), four, and more blocks than
    programs (some walk nothing). n = 389, 3 heads on 1 KV head, d = 128 (two consumer
    warpgroups) or 64 (one)."""
    import dataclasses

    from tvm_splat import ACSR, sparse_attention
    from tvm_splat.schedules.tiled import TiledKnobs

    n, d = 389, 128 if form == "tma_ws_persistent3" else 64
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        if not 128 <= i < 256:
            mask[i, max(0, i - 70):i + 71] = True
    acsr = ACSR.from_mask(mask)
    (tq,), (q,) = _cuda([rng.standard_normal((2, 3, n, d))], dtype)
    (tk, tv), (k, v) = _cuda([rng.standard_normal((2, 1, n, d)) for _ in range(2)], dtype)
    knobs = dataclasses.replace(TiledKnobs(use_tensor_cores=True, **TMA_FORMS[form]), persistent=persistent)
    out = sparse_attention(tq, tk, tv, acsr, variant="tiled", knobs=knobs).double().cpu().numpy()
    ref = masked_attention(q, k, v, mask)
    assert not out[:, :, 128:256].any()
    tol = 2e-2 if dtype == "float16" else 4e-2
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
