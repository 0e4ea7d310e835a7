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


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("variant", ["fused", "tiled_cuda_cores", "row", "separate"])
@pytest.mark.parametrize("name,acsr,heads", CASES, ids=[c[0] for c in CASES])
def test_cuda_matches_dense(name, acsr, heads, variant, dtype, rng):
    from tvm_splat import sparse_attention

    q, k, v = qkv(rng, 3, heads, acsr.n, 64, dtype)
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    if variant == "tiled_cuda_cores":
        from tvm_splat.schedules.tiled import TiledKnobs

        out = sparse_attention(tq, tk, tv, acsr, variant="tiled", knobs=TiledKnobs(use_tensor_cores=False))
    else:
        out = sparse_attention(tq, tk, tv, acsr, variant=variant)
    assert out.is_cuda and out.dtype == tq.dtype and out.shape == tq.shape
    ref = masked_attention(q, k, v, dense_mask(acsr))
    tol = 1e-3 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=tol, rtol=tol)


#: tensor-core forms of the tiled kernel besides the default (fp16 only)
TC_FORMS = {
    "wmma": dict(tc_kernel="wmma"),
    "mma_one_stage": dict(stages=1),
    "mma_bc32_w2": dict(br=32, bc=32, warps=2),
    "mma_bc128": dict(bc=128),
    "mma_w8": dict(br=128, warps=8),
    "mma_m_tiles2": dict(br=64, warps=2, m_tiles=2),
}


@pytest.mark.parametrize("form", sorted(TC_FORMS))
@pytest.mark.parametrize("name,acsr,heads", CASES, ids=[c[0] for c in CASES])
def test_cuda_tensor_core_forms_match_dense(name, acsr, heads, form, rng):
    from tvm_splat import sparse_attention
    from tvm_splat.schedules.tiled import TiledKnobs

    q, k, v = qkv(rng, 2, heads, acsr.n, 64, "float16")
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    knobs = TiledKnobs(use_tensor_cores=True, **TC_FORMS[form])
    out = sparse_attention(tq, tk, tv, acsr, variant="tiled", knobs=knobs)
    ref = masked_attention(q, k, v, dense_mask(acsr))
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=2e-2, rtol=2e-2)


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
