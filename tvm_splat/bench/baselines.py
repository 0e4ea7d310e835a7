"""Callables for every implementation in the benchmark, on torch tensors of one case.

Each factory returns ``fn() -> torch.Tensor [batch, heads, n, d]`` or raises
:class:`Skip` with the reason (not enough memory, feature missing).
"""
from __future__ import annotations

import numpy as np


class Skip(Exception):
    """This implementation does not run for this case (the message says why)."""


def sdpa_dense(q, k, v, mask):
    import torch.nn.functional as F

    return lambda: F.scaled_dot_product_attention(q, k, v)


def sdpa_masked(q, k, v, mask):
    import torch.nn.functional as F

    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def flex_attention(q, k, v, mask):
    """PyTorch FlexAttention, ``torch.compile``d, block mask from the same boolean mask."""
    import torch

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention as flex
    except ImportError as err:
        raise Skip(f"FlexAttention unavailable: {err}") from None
    heads = mask.shape[0] if mask.dim() == 3 else None

    if heads is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask[q_idx, kv_idx]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask[h, q_idx, kv_idx]

    n = q.shape[2]
    block_mask = create_block_mask(mask_mod, None, heads, n, n, device=q.device)
    compiled = torch.compile(flex)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def _target_of(q):
    """The target ``sparse_attention`` compiles for when given ``q`` (the device's own)."""
    from ..devices import default_target, device_of

    return default_target(device_of(q))


def tvm_dense(q, k, v, mask, tuned=False):
    """TVM's Relax ``nn.attention`` with an additive mask: dlight default GPU schedule, or the
    MetaSchedule records of ``tvm-splat autotune --dense`` with ``tuned``."""
    import torch
    import tvm

    from ..baselines import compile_dense_attention
    from ..baselines.tvm_dense import dense_fits

    b, h, n, d = q.shape
    if not dense_fits(b, h, n):
        raise Skip("dense score matrix does not fit in GPU memory")
    try:
        vm, _ = compile_dense_attention(b, h, n, d, str(q.dtype).replace("torch.", ""),
                                        _target_of(q), with_mask=True, tuned=tuned)
    except FileNotFoundError as why:
        raise Skip(str(why)) from None
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, -1e4)
    bias = bias.expand(b, h, n, n).contiguous()
    args = [tvm.runtime.from_dlpack(x) for x in (q, k, v, bias)]
    main = vm["main"]

    def run():
        return torch.from_dlpack(main(*args))

    return run


def tvm_dense_tuned(q, k, v, mask):
    return tvm_dense(q, k, v, mask, tuned=True)


def tvm_splat_variant(variant):
    def factory(q, k, v, acsr):
        from ..attention import sparse_attention

        return lambda: sparse_attention(q, k, v, acsr, variant=variant)

    return factory


def tvm_splat_fused_untuned(q, k, v, acsr):
    """The tiled path with its default knobs, whatever the tuning logs hold."""
    from ..attention import sparse_attention
    from ..plan import plan
    from ..schedules.tiled import default_tiled_knobs

    workload = plan(acsr, q.shape, k.shape, str(q.dtype).replace("torch.", ""), None, target=_target_of(q))
    knobs = default_tiled_knobs(workload.spec, workload.target)
    return lambda: sparse_attention(q, k, v, acsr, variant="tiled", knobs=knobs)


def tvm_splat_tiled(use_tensor_cores):
    def factory(q, k, v, acsr):
        from ..attention import sparse_attention
        from ..schedules.tiled import TiledKnobs

        knobs = TiledKnobs(use_tensor_cores=use_tensor_cores)
        return lambda: sparse_attention(q, k, v, acsr, variant="tiled", knobs=knobs)

    return factory


def flops(batch, heads, nnz_per_head_mean, head_dim):
    """Effective FLOPs of sparse attention: 2 matmuls over the nonzeros: ``4·B·H·nnz·D``."""
    return 4.0 * batch * heads * nnz_per_head_mean * head_dim


def min_bytes(batch, heads, seq_len, head_dim, itemsize):
    """Compulsory traffic: read q, k, v and write the output once."""
    return 4.0 * batch * heads * seq_len * head_dim * itemsize


def roofline_fraction(ms, flop, nbytes, peak_tflops, bandwidth_tbs):
    ideal_s = max(flop / (peak_tflops * 1e12), nbytes / (bandwidth_tbs * 1e12))
    return ideal_s / (ms * 1e-3)


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return float(np.exp(np.mean(np.log(xs)))) if xs else float("nan")
