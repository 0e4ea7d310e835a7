"""PyTorch entry point: ``tvm_splat.torch.sparse_attention(q, k, v, pattern_or_acsr)``.

Tensors are shared with TVM through DLPack (no copies), kernels run on torch's current CUDA
stream, and each (shape, mask structure, dtype, target) is compiled once and cached in memory
and on disk (``$TVM_SPLAT_CACHE_DIR``).
"""
from __future__ import annotations

from .attention import sparse_attention as _sparse_attention


def sparse_attention(q, k, v, pattern_or_acsr, *, scale=None, variant="fused", knobs=None):
    """Sparse attention on torch tensors.

    q, k, v: ``torch.Tensor [batch, heads, seq_len, head_dim]``, float16 or float32, on one
    device (CUDA, or CPU for testing). ``pattern_or_acsr``: an :class:`~tvm_splat.ACSR`, a
    pattern (``Window(256) | GlobalTokens(16)``) or a pattern string. Returns a new tensor of
    the same shape, dtype and device. Not differentiable (inference kernels).
    """
    import torch

    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return _sparse_attention(q, k, v, pattern_or_acsr, scale=scale, variant=variant, knobs=knobs)
