"""Padding masks: what is recognised as key padding, and the run-time key lengths."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from tvm.relax.frontend.torch import from_exported_program

from tvm_splat.relay_passes import SparsifyAttention
from tvm_splat.relay_passes._padding_mask import kv_lengths_from_padding_mask

B, H, N, D = 2, 2, 12, 4


def test_kv_lengths_of_right_padded_masks():
    mask = np.array([[1] * N, [1] * 5 + [0] * (N - 5), [0] * N], dtype=np.int64)
    lengths = kv_lengths_from_padding_mask(tvm.runtime.tensor(mask))
    assert lengths.numpy().dtype == np.int32
    np.testing.assert_array_equal(lengths.numpy(), [N, 5, 0])


@pytest.mark.parametrize("row", [[0, 1, 1, 1], [1, 0, 1, 0]])
def test_a_mask_that_is_not_right_padded_is_named(row):
    mask = np.array([[1, 1, 1, 1], row], dtype=np.int64)
    with pytest.raises(ValueError, match=r"attention_mask row 1 is not right-padded"):
        kv_lengths_from_padding_mask(tvm.runtime.tensor(mask))


class QueryPadding(torch.nn.Module):
    """A runtime mask over *queries* (``attention_mask[b, i]``, gathered like transformers
    gathers keys): not key padding, so not recognised."""

    def forward(self, q, k, v, attention_mask):
        rows = torch.arange(N)[None, None, :, None]
        batch = torch.arange(B)[:, None, None, None]
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        keep = causal & attention_mask.bool()[batch, rows]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def test_padding_over_queries_is_not_key_padding():
    g = torch.Generator().manual_seed(0)
    args = tuple(torch.randn(B, H, N, D, generator=g) for _ in range(3)) + \
        (torch.ones(B, N, dtype=torch.long),)
    mod = from_exported_program(torch.export.export(QueryPadding().eval(), args))
    sparsify = SparsifyAttention()
    sparsify(mod)
    (site,) = sparsify.report.sites
    assert not site.rewritten and "recognised padding mask" in site.reason
