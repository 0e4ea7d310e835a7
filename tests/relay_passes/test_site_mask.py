"""What counts as "masked" in an additive mask: -inf, or the lowest finite number of the dtype
the mask was made in (HuggingFace's ``finfo(dtype).min``), through casts to wider dtypes."""
import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from tvm_splat.reference import masked_attention
from tvm_splat.relay_passes import SparsifyAttention
from tvm_splat.relay_passes._site_mask import LOWEST_FINITE, effectively_minus_inf

N, H, D = 16, 2, 8


def keep_mask():
    i = np.arange(N)
    return np.abs(i[:, None] - i[None, :]) <= 2


class CastMask(torch.nn.Module):
    """HF eager in 16 bits: the mask is built in ``mask_dtype`` with ``fill`` and cast to the
    float32 scores before a float32 softmax."""

    def __init__(self, fill, mask_dtype):
        super().__init__()
        mask = torch.zeros(N, N, dtype=mask_dtype).masked_fill(~torch.from_numpy(keep_mask()), fill)
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) * D ** -0.5
        return torch.softmax(scores + self.mask.float(), dim=-1) @ v


def qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, H, N, D, generator=g) for _ in range(3))


def sparsify(model, args):
    mod = from_exported_program(torch.export.export(model.eval(), args))
    p = SparsifyAttention()
    return p(mod), p.report.sites[0]


@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lowest_finite_of_the_mask_dtype_masks(mask_dtype):
    args = qkv()
    new, site = sparsify(CastMask(torch.finfo(mask_dtype).min, mask_dtype), args)
    assert site.rewritten, site.reason
    ex = tvm.compile(new, "llvm")
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a.numpy()) for a in args])
    want = masked_attention(*(a.numpy() for a in args), keep_mask())
    np.testing.assert_allclose(out[0].numpy(), want, atol=2e-5)


@pytest.mark.parametrize("fill, mask_dtype", [
    (-60000.0, torch.float16),   # large, but not float16's lowest: a real (tiny) weight
    (-65504.0, torch.float32),   # float16's lowest made in float32: not float32's lowest
])
def test_other_large_negatives_are_re_weightings(fill, mask_dtype):
    _, site = sparsify(CastMask(fill, mask_dtype), qkv())
    assert not site.rewritten
    dtype = str(mask_dtype).split(".")[1]
    assert "neither 0 nor effectively -inf" in site.reason and f"the lowest {dtype}" in site.reason


def test_effectively_minus_inf_thresholds():
    assert LOWEST_FINITE["float16"] == -65504.0
    assert LOWEST_FINITE["bfloat16"] == float(torch.finfo(torch.bfloat16).min)
    assert LOWEST_FINITE["float32"] == float(torch.finfo(torch.float32).min)
    values = np.array([0.0, -np.inf, -65504.0, -65503.0, 2 * -65504.0, np.nan])
    assert effectively_minus_inf(values, "float16").tolist() == [False, True, True, False, True, False]
    assert effectively_minus_inf(values, "float32").tolist() == [False, True] + [False] * 4
