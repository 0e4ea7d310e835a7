"""TVM's own dense attention, the "TVM baseline": Relax ``nn.attention`` (optionally masked),
legalised to TIR and scheduled by TVM's default rules (``s_tir.dlight`` on the GPU)."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..schedules.targets import as_target, is_gpu


def dense_attention_module(batch, heads, seq_len, head_dim, dtype, scale=None, with_mask=False):
    """Relax module ``main(q, k, v[, bias]) -> out``, all ``[batch, heads, seq_len, head_dim]``.

    With ``with_mask`` an additive float bias ``[batch, heads, seq_len, seq_len]`` (0 / -inf-like)
    is taken, so the baseline computes the same masked attention as the sparse kernels.
    """
    shape = (batch, heads, seq_len, head_dim)
    scale = float(1.0 / np.sqrt(head_dim) if scale is None else scale)
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType(shape, dtype))
    k = relax.Var("k", relax.TensorType(shape, dtype))
    v = relax.Var("v", relax.TensorType(shape, dtype))
    params = [q, k, v]
    bias = None
    if with_mask:
        bias = relax.Var("bias", relax.TensorType((batch, heads, seq_len, seq_len), dtype))
        params.append(bias)
    with bb.function("main", params):
        with bb.dataflow():
            # nn.attention takes [batch, seq, heads, dim]
            qt, kt, vt = (bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3])) for x in (q, k, v))
            out = bb.emit(relax.op.nn.attention(qt, kt, vt, bias, scale=scale))
            res = bb.emit_output(relax.op.permute_dims(out, [0, 2, 1, 3]))
        bb.emit_func_output(res)
    return bb.get()


def compile_dense_attention(batch, heads, seq_len, head_dim, dtype, target, scale=None,
                            with_mask=False):
    """Compile :func:`dense_attention_module` for ``target``; returns ``(vm, device)`` where
    ``vm["main"](q, k, v[, bias])`` runs it on TVM tensors."""
    target = as_target(target)
    mod = dense_attention_module(batch, heads, seq_len, head_dim, dtype, scale, with_mask)
    if is_gpu(target):
        from tvm.s_tir import dlight as dl

        mod = relax.transform.LegalizeOps()(mod)
        with target:
            mod = dl.ApplyDefaultSchedule(
                dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                dl.gpu.Fallback(),
            )(mod)
        dev = tvm.cuda(0)
    else:
        dev = tvm.cpu()
    ex = tvm.compile(mod, target=target)
    return relax.VirtualMachine(ex, dev), dev
