"""Callables for every implementation in the benchmark, on the inputs of one case.

Each factory takes a :class:`~tvm_splat.bench.inputs.CaseInputs` and returns
``fn() -> torch.Tensor [batch, heads, n, d]``, or raises :class:`Skip` with the reason (not
enough memory, feature missing). All run on the same q, k, v: k and v keep their KV heads (GQA)
and dtype; nothing is repeated or converted for any implementation.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

from .flex import flex_call, gather_mask_mod


class Skip(Exception):
    """This implementation does not run for this case (the message says why)."""


def sdpa_dense(inputs):
    """SDPA without a mask, the fair dense baseline: ``is_causal=True`` for causal masks (the
    flash kernels then skip the upper triangle), GQA through ``enable_gqa``."""
    import torch.nn.functional as F

    q, k, v, causal, gqa = inputs.q, inputs.k, inputs.v, inputs.causal, inputs.gqa
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def sdpa_masked(inputs):
    """SDPA with the boolean mask (out-of-memory is reported as a skip by the runner)."""
    import torch.nn.functional as F

    q, k, v, mask, gqa = inputs.q, inputs.k, inputs.v, inputs.mask, inputs.gqa
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def flex_attention(inputs):
    """FlexAttention with the pattern's analytic ``mask_mod`` (``(q_idx - kv_idx) ...``), as
    users write it."""
    if inputs.pattern is None:
        raise Skip("the mask has no pattern (built from a boolean mask or CSR): only the gather "
                   "form exists, run --impl flex_gather")
    return flex_call(inputs, inputs.pattern.mask_mod(inputs.n))


def flex_gather(inputs):
    """FlexAttention whose ``mask_mod`` gathers from the dense boolean mask: the only form for
    masks without a pattern, and the form the bench used before (an extra column)."""
    return flex_call(inputs, gather_mask_mod(inputs.mask))


def target_of(q):
    """The target ``sparse_attention`` compiles for when given ``q`` (the device's own)."""
    from ..devices import default_target, device_of

    return default_target(device_of(q))


def tvm_dense(inputs, tuned=False):
    """TVM's Relax ``nn.attention`` with an additive mask: dlight default GPU schedule, or the
    MetaSchedule records of ``tvm-splat autotune --dense`` with ``tuned``."""
    import torch
    import tvm

    from ..baselines import compile_dense_attention
    from ..baselines.tvm_dense import dense_fits

    q, k, v = inputs.q, inputs.k, inputs.v
    b, h, n, d = q.shape
    if inputs.gqa:
        raise Skip("TVM's dense attention takes as many KV heads as query heads (no GQA form)")
    if not dense_fits(b, h, n):
        raise Skip("dense score matrix does not fit in GPU memory")
    try:
        vm, _ = compile_dense_attention(b, h, n, d, inputs.dtype, target_of(q), with_mask=True, tuned=tuned)
    except FileNotFoundError as why:
        raise Skip(str(why)) from None
    mask = inputs.mask
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, -1e4)
    bias = bias.expand(b, h, n, n).contiguous()
    args = [tvm.runtime.from_dlpack(x) for x in (q, k, v, bias)]
    main = vm["main"]

    def run():
        return torch.from_dlpack(main(*args))

    return run


def tvm_dense_tuned(inputs):
    return tvm_dense(inputs, tuned=True)


# ---------------------------------------------------------------------------------- ours
def tvm_splat_variant(variant):
    """``sparse_attention(q, k, v, acsr, variant=...)`` on the inputs as they are (bf16 and
    GQA k/v included: an unsupported dtype or head count raises, and the runner records it)."""
    def factory(inputs):
        from ..attention import sparse_attention

        q, k, v, acsr = inputs.q, inputs.k, inputs.v, inputs.fresh_acsr()
        return lambda: sparse_attention(q, k, v, acsr, variant=variant)

    return factory


def tvm_splat_fused_untuned(inputs):
    """The default path with its default knobs, whatever the tuning logs hold: the knobs
    :func:`~tvm_splat.planner.plan` gives these inputs without a record, on their device (on a
    GPU the warp-specialized form's persistent form, as in ``splat_fused``)."""
    from ..attention import sparse_attention
    from ..devices import device_of
    from ..planner import plan, untuned_knobs

    q, k, v, acsr = inputs.q, inputs.k, inputs.v, inputs.fresh_acsr()
    workload = plan(acsr, q.shape, k.shape, inputs.dtype, device_of(q), target=target_of(q), variant="tiled")
    knobs = untuned_knobs(workload)
    return lambda: sparse_attention(q, k, v, acsr, variant="tiled", knobs=knobs)


def tvm_splat_tiled(use_tensor_cores):
    def factory(inputs):
        from ..attention import sparse_attention
        from ..schedules.tiled import TiledKnobs

        q, k, v, acsr = inputs.q, inputs.k, inputs.v, inputs.fresh_acsr()
        knobs = TiledKnobs(use_tensor_cores=use_tensor_cores)
        return lambda: sparse_attention(q, k, v, acsr, variant="tiled", knobs=knobs)

    return factory


def fused_knobs_used(inputs):
    """The knobs the default path runs with for these inputs (the plan ``sparse_attention``
    makes, through the one knob decision), and whether they came from a tuning record."""
    import dataclasses

    from ..devices import device_of
    from ..planner import plan

    q, k = inputs.q, inputs.k
    used = plan(inputs.acsr, q.shape, k.shape, inputs.dtype, device_of(q), target=target_of(q))
    fields = dataclasses.asdict(used.knobs) if used.knobs is not None else {}
    return {"variant": used.variant, "tuned": used.knobs_source == "tuned", **fields}


CACHE_DIR_VARIABLE = "TVM_SPLAT_CACHE_DIR"


@contextlib.contextmanager
def cold_compile_caches():
    """Inside, our kernels compile from nothing: the in-memory kernel cache is emptied and
    ``$TVM_SPLAT_CACHE_DIR`` points at a fresh temporary folder (removed on exit, the previous
    value restored). The one place that knows where our compile caches live."""
    from .. import compile as compile_module
    from ..attention import clear_plans

    compile_module.clear_memory_cache()
    clear_plans()  # a cached plan holds its compiled launcher
    previous = os.environ.get(CACHE_DIR_VARIABLE)
    with tempfile.TemporaryDirectory(prefix="tvm_splat_cold_") as folder:
        os.environ[CACHE_DIR_VARIABLE] = folder
        try:
            yield folder
        finally:
            if previous is None:
                os.environ.pop(CACHE_DIR_VARIABLE, None)
            else:
                os.environ[CACHE_DIR_VARIABLE] = previous


# ----------------------------------------------------------------------------- figures
def flops(batch, heads, nnz_per_head_mean, head_dim):
    """Effective FLOPs of sparse attention: 2 matmuls over the nonzeros: ``4·B·H·nnz·D``."""
    return 4.0 * batch * heads * nnz_per_head_mean * head_dim


def min_bytes(batch, heads, kv_heads, seq_len, head_dim, itemsize):
    """Compulsory traffic: read q, k, v and write the output once (k and v have ``kv_heads``)."""
    return (2.0 * heads + 2.0 * kv_heads) * batch * seq_len * head_dim * itemsize


def roofline_fraction(ms, flop, nbytes, peak_tflops, bandwidth_tbs):
    ideal_s = max(flop / (peak_tflops * 1e12), nbytes / (bandwidth_tbs * 1e12))
    return ideal_s / (ms * 1e-3)


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return float(np.exp(np.mean(np.log(xs)))) if xs else float("nan")
