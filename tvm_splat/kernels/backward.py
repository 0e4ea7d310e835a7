"""TensorIR kernels for training: the forward with its row log-sum-exp, and the backward
(FlashAttention-2 math) over the ACSR rows and the transposed ACSR (unscheduled).

Three PrimFuncs (``BACKWARD_KERNEL_NAMES``), each one row of a mask per program in a block named
``"row"`` (:data:`~tvm_splat.kernels.row.ROW_BLOCK`), so the row schedule maps them to threads
or parallel tasks:

* ``fwd_lse`` — per query row ``(b, h, i)``: ``out`` as the row kernel computes it (online
  softmax over the row's ACSR segments) and ``lse[b, h, i] = log(sum_j exp(scale q_i . k_j))``
  (natural log; ``-inf`` for a row that attends to nothing);
* ``bwd_dq`` — per query row: ``delta[b, h, i] = rowsum(dout_i * out_i) - dlse[b, h, i]``, then
  over the row's segments ``p_ij = exp(scale q_i . k_j - lse_i)``, ``dp_ij = dout_i . v_j``,
  ``ds_ij = p_ij (dp_ij - delta_i)``, ``dq_i = scale sum_j ds_ij k_j`` (P is recomputed from q, k
  and the lse; nothing per nonzero is stored);
* ``bwd_dkdv`` — per key ``(b, kv_head, j)``: over the query heads of its group and the rows
  ``i`` of the *transposed* mask's row ``j`` (the query rows that see key ``j``),
  ``dv_j = sum p_ij dout_i`` and ``dk_j = scale sum ds_ij q_i``. Grouped-query attention sums
  over the group inside the program: nothing is repeated in memory and no atomics are needed.

``dlse`` is the gradient reaching the ``lse`` output (zeros when only ``out`` is used):
``d lse_i / d s_ij = p_ij``, so it enters as ``ds_ij += p_ij dlse_i``, folded into ``delta``.

Only the nonzeros of a row (or of a transposed row) are visited, so masked-out keys, values,
queries and output gradients contribute exactly nothing: a NaN there cannot reach a gradient.
Inputs are float16, bfloat16, float32 (accumulation in float32) or float64 (accumulation in
float64, for ``torch.autograd.gradcheck`` on the CPU); ``lse``, ``dlse`` and ``delta`` are in
the accumulation dtype; gradients are in the input dtype.

Buffer shapes: q, out, dout, dq ``[B, H, N, D]``; k, v, dk, dv ``[B, KVH, N, D]``; lse, dlse,
delta ``[B, H, N]``; the row ACSR tables as in :class:`~tvm_splat.kernels.spec.AttentionSpec`;
the transposed tables ``tseg_* [HM, N, St]`` and ``tindices [HM, Lt]`` (same mask heads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm.script import tirx as T

from .common import LOG2E, NEG_INIT
from .row import ROW_BLOCK, _column
from .spec import AttentionSpec

BACKWARD_KERNEL_NAMES = ("fwd_lse", "bwd_dq", "bwd_dkdv")
LN2 = math.log(2.0)


@dataclass(frozen=True)
class BackwardSpec:
    """The static facts of one training workload: ``rows`` is the spec of the mask (query rows,
    as the forward kernels see it) and ``columns`` the spec of its transpose (key rows); both
    share shapes, dtype, scale and mask heads."""

    rows: AttentionSpec
    columns: AttentionSpec

    def __post_init__(self):
        a, b = self.rows, self.columns
        same = ("batch", "heads", "kv_heads", "seq_len", "head_dim", "dtype", "mask_heads", "scale")
        differ = [f for f in same if getattr(a, f) != getattr(b, f)]
        if differ:
            raise ValueError(f"the row and column specs differ in {differ}")

    @classmethod
    def from_acsrs(cls, acsr, transposed, batch, heads, head_dim, dtype, scale=None, kv_heads=None):
        """Spec of ``acsr`` and its transpose ``transposed`` (an ACSR of the transposed mask,
        :mod:`tvm_splat.formats.transpose`) for q ``[batch, heads, n, head_dim]``."""
        if transposed.n != acsr.n or transposed.num_heads != acsr.num_heads:
            raise ValueError(f"the transposed ACSR (n={transposed.n}, {transposed.num_heads} heads) does "
                             f"not match the mask (n={acsr.n}, {acsr.num_heads} heads)")
        make = lambda m: AttentionSpec.from_acsr(m, batch, heads, head_dim, dtype, scale, kv_heads)  # noqa: E731
        return cls(make(acsr), make(transposed))

    @property
    def key(self) -> str:
        c = self.columns
        return f"{self.rows.key}_t{c.max_segments}_l{c.index_len}_{'idx' if c.has_indexed else 'aff'}"


def _const(value: float, dtype: str):
    return tvm.tirx.const(value, dtype)


def forward_lse_func(spec: AttentionSpec):
    """``fwd_lse``: out and the natural-log row log-sum-exp (see the module docstring)."""
    B, H, KVH, G, N, D = spec.batch, spec.heads, spec.kv_heads, spec.group, spec.seq_len, spec.head_dim
    HM, S, L, dt, acc_t = spec.mask_heads, spec.max_segments, spec.index_len, spec.dtype, spec.accum_dtype
    c2 = _const(spec.scale * LOG2E, acc_t)  # base-2 exponentials, the scale folded in
    zero, ln2, neg_inf = _const(0.0, acc_t), _const(LN2, acc_t), _const(-math.inf, acc_t)

    @T.prim_func(s_tir=True)
    def fwd_lse(
        q: T.Buffer((B, H, N, D), dt),
        k: T.Buffer((B, KVH, N, D), dt),
        v: T.Buffer((B, KVH, N, D), dt),
        seg_start: T.Buffer((HM, N, S), "int32"),
        seg_step: T.Buffer((HM, N, S), "int32"),
        seg_count: T.Buffer((HM, N, S), "int32"),
        indices: T.Buffer((HM, L), "int32"),
        out: T.Buffer((B, H, N, D), dt),
        lse: T.Buffer((B, H, N), acc_t),
    ):
        T.func_attr({"global_symbol": "fwd_lse", "tirx.noalias": True})
        for b, h, i in T.grid(B, H, N):
            with T.sblock(ROW_BLOCK):
                vb, vh, vi = T.axis.remap("SSS", [b, h, i])
                T.reads(q[vb, vh, vi, 0:D], k[vb, vh // G, 0:N, 0:D], v[vb, vh // G, 0:N, 0:D],
                        seg_start[0:HM, vi, 0:S], seg_step[0:HM, vi, 0:S], seg_count[0:HM, vi, 0:S],
                        indices[0:HM, 0:L])
                T.writes(out[vb, vh, vi, 0:D], lse[vb, vh, vi])
                hm = T.floormod(vh, HM)
                acc = T.alloc_buffer((D,), acc_t, scope="local")
                # running max, running sum, rescale factor, new max, current probability
                st = T.alloc_buffer((5,), acc_t, scope="local")
                col = T.alloc_buffer((1,), "int32", scope="local")  # the key column j
                for d in T.serial(D):
                    acc[d] = zero
                st[0] = _const(NEG_INIT, acc_t)
                st[1] = zero
                for s in T.serial(S):
                    for j in T.serial(seg_count[hm, vi, s]):
                        col[0] = _column(spec, seg_start, seg_step, indices, hm, vi, s, j)
                        st[4] = zero
                        for d in T.serial(D):
                            st[4] = st[4] + T.Cast(acc_t, q[vb, vh, vi, d]) * T.Cast(acc_t, k[vb, vh // G, col[0], d])
                        st[4] = st[4] * c2
                        st[3] = T.max(st[0], st[4])
                        st[2] = T.exp2(st[0] - st[3])
                        st[4] = T.exp2(st[4] - st[3])
                        st[1] = st[1] * st[2] + st[4]
                        for d in T.serial(D):
                            acc[d] = acc[d] * st[2] + st[4] * T.Cast(acc_t, v[vb, vh // G, col[0], d])
                        st[0] = st[3]
                for d in T.serial(D):
                    out[vb, vh, vi, d] = T.Cast(dt, T.if_then_else(st[1] == zero, zero, acc[d] / st[1]))
                lse[vb, vh, vi] = T.if_then_else(st[1] == zero, neg_inf, (st[0] + T.log2(st[1])) * ln2)

    return fwd_lse


def backward_dq_func(spec: AttentionSpec):
    """``bwd_dq``: ``delta`` and ``dq`` per query row over its ACSR segments."""
    B, H, KVH, G, N, D = spec.batch, spec.heads, spec.kv_heads, spec.group, spec.seq_len, spec.head_dim
    HM, S, L, dt, acc_t = spec.mask_heads, spec.max_segments, spec.index_len, spec.dtype, spec.accum_dtype
    c2, log2e = _const(spec.scale * LOG2E, acc_t), _const(LOG2E, acc_t)
    scale, zero = _const(spec.scale, acc_t), _const(0.0, acc_t)

    @T.prim_func(s_tir=True)
    def bwd_dq(
        q: T.Buffer((B, H, N, D), dt),
        k: T.Buffer((B, KVH, N, D), dt),
        v: T.Buffer((B, KVH, N, D), dt),
        out: T.Buffer((B, H, N, D), dt),
        dout: T.Buffer((B, H, N, D), dt),
        lse: T.Buffer((B, H, N), acc_t),
        dlse: T.Buffer((B, H, N), acc_t),
        seg_start: T.Buffer((HM, N, S), "int32"),
        seg_step: T.Buffer((HM, N, S), "int32"),
        seg_count: T.Buffer((HM, N, S), "int32"),
        indices: T.Buffer((HM, L), "int32"),
        dq: T.Buffer((B, H, N, D), dt),
        delta: T.Buffer((B, H, N), acc_t),
    ):
        T.func_attr({"global_symbol": "bwd_dq", "tirx.noalias": True})
        for b, h, i in T.grid(B, H, N):
            with T.sblock(ROW_BLOCK):
                vb, vh, vi = T.axis.remap("SSS", [b, h, i])
                T.reads(q[vb, vh, vi, 0:D], k[vb, vh // G, 0:N, 0:D], v[vb, vh // G, 0:N, 0:D],
                        out[vb, vh, vi, 0:D], dout[vb, vh, vi, 0:D], lse[vb, vh, vi], dlse[vb, vh, vi],
                        seg_start[0:HM, vi, 0:S], seg_step[0:HM, vi, 0:S], seg_count[0:HM, vi, 0:S],
                        indices[0:HM, 0:L])
                T.writes(dq[vb, vh, vi, 0:D], delta[vb, vh, vi])
                hm = T.floormod(vh, HM)
                acc = T.alloc_buffer((D,), acc_t, scope="local")
                # delta, lse in base 2, score then probability, dp then ds
                st = T.alloc_buffer((4,), acc_t, scope="local")
                col = T.alloc_buffer((1,), "int32", scope="local")  # the key column j
                st[0] = zero
                for d in T.serial(D):
                    acc[d] = zero
                    st[0] = st[0] + T.Cast(acc_t, dout[vb, vh, vi, d]) * T.Cast(acc_t, out[vb, vh, vi, d])
                st[0] = st[0] - dlse[vb, vh, vi]
                st[1] = lse[vb, vh, vi] * log2e
                for s in T.serial(S):
                    for j in T.serial(seg_count[hm, vi, s]):
                        col[0] = _column(spec, seg_start, seg_step, indices, hm, vi, s, j)
                        st[2] = zero
                        st[3] = zero
                        for d in T.serial(D):
                            st[2] = st[2] + T.Cast(acc_t, q[vb, vh, vi, d]) * T.Cast(acc_t, k[vb, vh // G, col[0], d])
                            st[3] = st[3] + T.Cast(acc_t, dout[vb, vh, vi, d]) * T.Cast(acc_t, v[vb, vh // G, col[0], d])
                        st[2] = T.exp2(st[2] * c2 - st[1])
                        st[3] = st[2] * (st[3] - st[0])
                        for d in T.serial(D):
                            acc[d] = acc[d] + st[3] * T.Cast(acc_t, k[vb, vh // G, col[0], d])
                for d in T.serial(D):
                    dq[vb, vh, vi, d] = T.Cast(dt, acc[d] * scale)
                delta[vb, vh, vi] = st[0]

    return bwd_dq


def backward_dkdv_func(spec: BackwardSpec):
    """``bwd_dkdv``: ``dk`` and ``dv`` per key over the transposed ACSR, summed over the query
    heads of the key's group."""
    rows, cols = spec.rows, spec.columns
    B, H, KVH, G, N, D = rows.batch, rows.heads, rows.kv_heads, rows.group, rows.seq_len, rows.head_dim
    HM, S, L, dt, acc_t = cols.mask_heads, cols.max_segments, cols.index_len, rows.dtype, rows.accum_dtype
    c2, log2e = _const(rows.scale * LOG2E, acc_t), _const(LOG2E, acc_t)
    scale, zero = _const(rows.scale, acc_t), _const(0.0, acc_t)

    @T.prim_func(s_tir=True)
    def bwd_dkdv(
        q: T.Buffer((B, H, N, D), dt),
        k: T.Buffer((B, KVH, N, D), dt),
        v: T.Buffer((B, KVH, N, D), dt),
        dout: T.Buffer((B, H, N, D), dt),
        lse: T.Buffer((B, H, N), acc_t),
        delta: T.Buffer((B, H, N), acc_t),
        tseg_start: T.Buffer((HM, N, S), "int32"),
        tseg_step: T.Buffer((HM, N, S), "int32"),
        tseg_count: T.Buffer((HM, N, S), "int32"),
        tindices: T.Buffer((HM, L), "int32"),
        dk: T.Buffer((B, KVH, N, D), dt),
        dv: T.Buffer((B, KVH, N, D), dt),
    ):
        T.func_attr({"global_symbol": "bwd_dkdv", "tirx.noalias": True})
        for b, kh, j in T.grid(B, KVH, N):
            with T.sblock(ROW_BLOCK):
                vb, vkh, vj = T.axis.remap("SSS", [b, kh, j])
                T.reads(q[vb, vkh * G:vkh * G + G, 0:N, 0:D], k[vb, vkh, vj, 0:D], v[vb, vkh, vj, 0:D],
                        dout[vb, vkh * G:vkh * G + G, 0:N, 0:D], lse[vb, vkh * G:vkh * G + G, 0:N],
                        delta[vb, vkh * G:vkh * G + G, 0:N], tseg_start[0:HM, vj, 0:S],
                        tseg_step[0:HM, vj, 0:S], tseg_count[0:HM, vj, 0:S], tindices[0:HM, 0:L])
                T.writes(dk[vb, vkh, vj, 0:D], dv[vb, vkh, vj, 0:D])
                acc_k = T.alloc_buffer((D,), acc_t, scope="local")
                acc_v = T.alloc_buffer((D,), acc_t, scope="local")
                # score then probability, dp then ds
                st = T.alloc_buffer((2,), acc_t, scope="local")
                row = T.alloc_buffer((1,), "int32", scope="local")  # the query row i
                for d in T.serial(D):
                    acc_k[d] = zero
                    acc_v[d] = zero
                for g in T.serial(G):
                    hm = T.floormod(vkh * G + g, HM)
                    for s in T.serial(S):
                        for t in T.serial(tseg_count[hm, vj, s]):
                            row[0] = _column(cols, tseg_start, tseg_step, tindices, hm, vj, s, t)
                            st[0] = zero
                            st[1] = zero
                            for d in T.serial(D):
                                st[0] = st[0] + T.Cast(acc_t, k[vb, vkh, vj, d]) * T.Cast(
                                    acc_t, q[vb, vkh * G + g, row[0], d])
                                st[1] = st[1] + T.Cast(acc_t, v[vb, vkh, vj, d]) * T.Cast(
                                    acc_t, dout[vb, vkh * G + g, row[0], d])
                            st[0] = T.exp2(st[0] * c2 - lse[vb, vkh * G + g, row[0]] * log2e)
                            st[1] = st[0] * (st[1] - delta[vb, vkh * G + g, row[0]])
                            for d in T.serial(D):
                                acc_v[d] = acc_v[d] + st[0] * T.Cast(acc_t, dout[vb, vkh * G + g, row[0], d])
                                acc_k[d] = acc_k[d] + st[1] * T.Cast(acc_t, q[vb, vkh * G + g, row[0], d])
                for d in T.serial(D):
                    dk[vb, vkh, vj, d] = T.Cast(dt, acc_k[d] * scale)
                    dv[vb, vkh, vj, d] = T.Cast(dt, acc_v[d])

    return bwd_dkdv


def backward_funcs(spec: BackwardSpec) -> dict:
    """The three training PrimFuncs by name (``BACKWARD_KERNEL_NAMES``)."""
    return {"fwd_lse": forward_lse_func(spec.rows), "bwd_dq": backward_dq_func(spec.rows),
            "bwd_dkdv": backward_dkdv_func(spec)}
