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
