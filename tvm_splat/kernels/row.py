"""TensorIR PrimFuncs for sparse attention over ACSR rows (unscheduled).

Each function walks the ACSR segments of one row and *computes* the key column of every
nonzero from the affine rule ``start + step * k``; only rows that fell back to CSR (segments
with ``step == 0``) load their columns from ``indices``. Loops over ``batch, heads, rows`` are
spatial and sit outside one block named ``"row"``; everything inside it is the per-row work,
so a schedule only has to map rows to threads (see ``tvm_splat.schedules``).

Buffer shapes and dtypes are documented on :class:`~tvm_splat.kernels.spec.AttentionSpec`
(k and v have ``kv_heads`` heads; query head ``h`` reads KV head ``h // group``).
Accumulation is float32 for every input dtype. Only the nonzeros of a row are ever visited,
so masked-out keys and values contribute exactly nothing (a NaN there cannot leak).

Key lengths (``spec.has_kv_len``, buffer ``kv_len [batch]`` int32 right before the first
output): key ``j`` of batch ``b`` exists only when ``j < kv_len[b]``. ``row`` and ``spmm`` clip
each affine segment's count to the valid keys (:func:`~.common.clipped_count`: keys past the
length are never visited) and test the columns of indexed (CSR) segments one by one; ``sddmm``
writes ``-FLT_MAX`` for a nonzero past the length (``softmax`` then gives it probability 0, and
``spmm``, which skips it, never reads it). A row left with no valid key gives zeros.
"""
from __future__ import annotations

from tvm.script import tirx as T

from .common import LOG2E, NEG_INIT, clipped_count, key_length, normalised, without_unused_kv_len
from .spec import AttentionSpec

ROW_BLOCK = "row"


def _column(spec, seg_start, seg_step, indices, hm, i, s, k):
    """Column of the k-th nonzero of segment s (a TIR expression)."""
    affine = seg_start[hm, i, s] + seg_step[hm, i, s] * k
    if not spec.has_indexed:
        return affine
    # if_then_else is lazy: affine rows never touch `indices`.
    return T.if_then_else(
        seg_step[hm, i, s] > 0, affine, indices[hm, seg_start[hm, i, s] + k]
    )


def _extent(spec, seg_start, seg_step, seg_count, kv_len, hm, b, i, s):
    """Nonzeros of segment s of row i to visit: all of them, or with key lengths the affine
    segment clipped to ``kv_len[b]`` (an indexed segment is visited whole and tested per column,
    :func:`_tests_columns`)."""
    count = seg_count[hm, i, s]
    if not spec.has_kv_len:
        return count
    clipped = clipped_count(seg_start[hm, i, s], seg_step[hm, i, s], count, key_length(spec, kv_len, b))
    if not spec.has_indexed:
        return clipped
    return T.if_then_else(seg_step[hm, i, s] > 0, clipped, count)


def _tests_columns(spec) -> bool:
    """Whether the visited nonzeros still need a ``col < kv_len[b]`` test: only with key lengths
    and indexed (CSR) segments, whose columns no count clipping can bound."""
    return spec.has_kv_len and spec.has_indexed


def sddmm_func(spec: AttentionSpec):
    """R-SDDMM: ``scores[b, h, row_ptr[i] + j] = scale * q[b, h, i] . k[b, h, col(i, j)]``."""
    B, H, KVH, G, N, D = spec.batch, spec.heads, spec.kv_heads, spec.group, spec.seq_len, spec.head_dim
    HM, S, NNZ, L, dt = spec.mask_heads, spec.max_segments, spec.max_nnz, spec.index_len, spec.dtype
    scale = T.float32(spec.scale)

    @T.macro
    def score(q, k, seg_start, seg_step, indices, scores, acc, pos, vb, vh, hm, vi, s, j):
        acc[0] = T.float32(0)
        for d in T.serial(D):
            acc[0] = acc[0] + T.Cast("float32", q[vb, vh, vi, d]) * T.Cast(
                "float32",
                k[vb, vh // G, _column(spec, seg_start, seg_step, indices, hm, vi, s, j), d],
            )
        scores[vb, vh, pos[0] + j] = acc[0] * scale

    @T.prim_func(s_tir=True)
    def sddmm(
        q: T.Buffer((B, H, N, D), dt),
        k: T.Buffer((B, KVH, N, D), dt),
        seg_start: T.Buffer((HM, N, S), "int32"),
        seg_step: T.Buffer((HM, N, S), "int32"),
        seg_count: T.Buffer((HM, N, S), "int32"),
        row_ptr: T.Buffer((HM, N + 1), "int32"),
        indices: T.Buffer((HM, L), "int32"),
        kv_len: T.Buffer((B,), "int32"),
        scores: T.Buffer((B, H, NNZ), "float32"),
    ):
        T.func_attr({"global_symbol": "sddmm", "tirx.noalias": True})
        for b, h, i in T.grid(B, H, N):
            with T.sblock(ROW_BLOCK):
                vb, vh, vi = T.axis.remap("SSS", [b, h, i])
                T.reads(q[vb, vh, vi, 0:D], k[vb, vh // G, 0:N, 0:D], seg_start[0:HM, vi, 0:S],
                        seg_step[0:HM, vi, 0:S], seg_count[0:HM, vi, 0:S], row_ptr[0:HM, vi],
                        indices[0:HM, 0:L])
                T.writes(scores[vb, vh, 0:NNZ])
                hm = T.floormod(vh, HM)
                pos = T.alloc_buffer((1,), "int32", scope="local")
                acc = T.alloc_buffer((1,), "float32", scope="local")
                pos[0] = row_ptr[hm, vi]
                for s in T.serial(S):
                    for j in T.serial(seg_count[hm, vi, s]):
                        if spec.has_kv_len:
                            if _column(spec, seg_start, seg_step, indices, hm, vi, s, j) < key_length(spec, kv_len, vb):
                                score(q, k, seg_start, seg_step, indices, scores, acc, pos, vb, vh, hm, vi, s, j)
                            else:
                                scores[vb, vh, pos[0] + j] = T.min_value("float32")
                        else:
                            score(q, k, seg_start, seg_step, indices, scores, acc, pos, vb, vh, hm, vi, s, j)
                    pos[0] = pos[0] + seg_count[hm, vi, s]

    return without_unused_kv_len(spec, sddmm)


def softmax_func(spec: AttentionSpec):
    """Row softmax over each row's nonzeros: ``probs[b, h, row]`` from ``scores[b, h, row]``.

    A row with no nonzeros stays empty (nothing is written), matching the convention that an
    empty row attends to nothing and produces a zero output.
    """
    B, H, N = spec.batch, spec.heads, spec.seq_len
    HM, NNZ = spec.mask_heads, spec.max_nnz

    @T.prim_func(s_tir=True)
    def softmax(
        scores: T.Buffer((B, H, NNZ), "float32"),
        row_ptr: T.Buffer((HM, N + 1), "int32"),
        probs: T.Buffer((B, H, NNZ), "float32"),
    ):
        T.func_attr({"global_symbol": "softmax", "tirx.noalias": True})
        for b, h, i in T.grid(B, H, N):
            with T.sblock(ROW_BLOCK):
                vb, vh, vi = T.axis.remap("SSS", [b, h, i])
                T.reads(scores[vb, vh, 0:NNZ], row_ptr[0:HM, vi:vi + 2])
                T.writes(probs[vb, vh, 0:NNZ])
                hm = T.floormod(vh, HM)
                lo = row_ptr[hm, vi]
                cnt = row_ptr[hm, vi + 1] - row_ptr[hm, vi]
                mx = T.alloc_buffer((1,), "float32", scope="local")
                total = T.alloc_buffer((1,), "float32", scope="local")
                mx[0] = T.min_value("float32")
                total[0] = T.float32(0)
                for j in T.serial(cnt):
                    mx[0] = T.max(mx[0], scores[vb, vh, lo + j])
                for j in T.serial(cnt):
                    total[0] = total[0] + T.exp(scores[vb, vh, lo + j] - mx[0])
                for j in T.serial(cnt):
                    probs[vb, vh, lo + j] = T.exp(scores[vb, vh, lo + j] - mx[0]) / total[0]

    return softmax


def spmm_func(spec: AttentionSpec):
    """R-SpMM: ``out[b, h, i] = sum_j probs[b, h, row_ptr[i] + j] * v[b, h // group, col(i, j)]``."""
    B, H, KVH, G, N, D = spec.batch, spec.heads, spec.kv_heads, spec.group, spec.seq_len, spec.head_dim
    HM, S, NNZ, L, dt = spec.mask_heads, spec.max_segments, spec.max_nnz, spec.index_len, spec.dtype

    @T.macro
    def accumulate(probs, v, seg_start, seg_step, indices, acc, pos, vb, vh, hm, vi, s, j):
        for d in T.serial(D):
            acc[d] = acc[d] + probs[vb, vh, pos[0] + j] * T.Cast(
                "float32",
                v[vb, vh // G, _column(spec, seg_start, seg_step, indices, hm, vi, s, j), d],
            )

    @T.prim_func(s_tir=True)
    def spmm(
        probs: T.Buffer((B, H, NNZ), "float32"),
        v: T.Buffer((B, KVH, N, D), dt),
        seg_start: T.Buffer((HM, N, S), "int32"),
        seg_step: T.Buffer((HM, N, S), "int32"),
        seg_count: T.Buffer((HM, N, S), "int32"),
        row_ptr: T.Buffer((HM, N + 1), "int32"),
        indices: T.Buffer((HM, L), "int32"),
        kv_len: T.Buffer((B,), "int32"),
        out: T.Buffer((B, H, N, D), dt),
    ):
        T.func_attr({"global_symbol": "spmm", "tirx.noalias": True})
        for b, h, i in T.grid(B, H, N):
            with T.sblock(ROW_BLOCK):
                vb, vh, vi = T.axis.remap("SSS", [b, h, i])
                T.reads(probs[vb, vh, 0:NNZ], v[vb, vh // G, 0:N, 0:D], seg_start[0:HM, vi, 0:S],
                        seg_step[0:HM, vi, 0:S], seg_count[0:HM, vi, 0:S], row_ptr[0:HM, vi],
                        indices[0:HM, 0:L])
                T.writes(out[vb, vh, vi, 0:D])
                hm = T.floormod(vh, HM)
                acc = T.alloc_buffer((D,), "float32", scope="local")
                pos = T.alloc_buffer((1,), "int32", scope="local")
                for d in T.serial(D):
                    acc[d] = T.float32(0)
                pos[0] = row_ptr[hm, vi]
                for s in T.serial(S):
                    for j in T.serial(_extent(spec, seg_start, seg_step, seg_count, kv_len, hm, vb, vi, s)):
                        if _tests_columns(spec):
                            if _column(spec, seg_start, seg_step, indices, hm, vi, s, j) < key_length(spec, kv_len, vb):
                                accumulate(probs, v, seg_start, seg_step, indices, acc, pos, vb, vh, hm, vi, s, j)
                        else:
                            accumulate(probs, v, seg_start, seg_step, indices, acc, pos, vb, vh, hm, vi, s, j)
                    pos[0] = pos[0] + seg_count[hm, vi, s]
                for d in T.serial(D):
                    out[vb, vh, vi, d] = T.Cast(dt, acc[d])

    return without_unused_kv_len(spec, spmm)


def online_softmax_row(spec: AttentionSpec):
    """``@T.macro`` for one whole mask row with online softmax, shared by the row-fused kernel
    and the tiled kernel's CSR-row fallback.

    ``out[b, h, vi] = softmax_j(scale * q[b,h,vi] . k[b,h,col(vi,j)]) @ v[b,h,col(vi,·)]``, zeros
    for an empty row (or one whose keys all lie past ``kv_len[b]``); ``acc [D]`` and ``st [5]`` are float32 scratch buffers (``st``: running max,
    running sum, rescale factor, new max, current probability). Exponentials are base 2 with
    the scale folded into ``log2(e)``.
    """
    D, S, G, dt = spec.head_dim, spec.max_segments, spec.group, spec.dtype
    scale = T.float32(spec.scale * LOG2E)

    @T.macro
    def visit(q, k, v, seg_start, seg_step, indices, acc, st, b, h, hm, vi, s, j):
        st[4] = T.float32(0)
        for d in T.serial(D):
            st[4] = st[4] + T.Cast("float32", q[b, h, vi, d]) * T.Cast(
                "float32", k[b, h // G, _column(spec, seg_start, seg_step, indices, hm, vi, s, j), d])
        st[4] = st[4] * scale
        st[3] = T.max(st[0], st[4])
        st[2] = T.exp2(st[0] - st[3])
        st[4] = T.exp2(st[4] - st[3])
        st[1] = st[1] * st[2] + st[4]
        for d in T.serial(D):
            acc[d] = acc[d] * st[2] + st[4] * T.Cast(
                "float32", v[b, h // G, _column(spec, seg_start, seg_step, indices, hm, vi, s, j), d])
        st[0] = st[3]

    @T.macro
    def row(q, k, v, seg_start, seg_step, seg_count, indices, kv_len, out, acc, st, b, h, hm, vi):
        for d in T.serial(D):
            acc[d] = T.float32(0)
        st[0] = T.float32(NEG_INIT)
        st[1] = T.float32(0)
        for s in T.serial(S):
            for j in T.serial(_extent(spec, seg_start, seg_step, seg_count, kv_len, hm, b, vi, s)):
                if _tests_columns(spec):
                    if _column(spec, seg_start, seg_step, indices, hm, vi, s, j) < key_length(spec, kv_len, b):
                        visit(q, k, v, seg_start, seg_step, indices, acc, st, b, h, hm, vi, s, j)
                else:
                    visit(q, k, v, seg_start, seg_step, indices, acc, st, b, h, hm, vi, s, j)
        for d in T.serial(D):
            out[b, h, vi, d] = T.Cast(dt, normalised(acc[d], st[1]))

    return row


def row_func(spec: AttentionSpec):
    """One-pass attention with online softmax, one mask row per program: scores never reach
    global memory.

    ``out[b, h, i] = softmax_j(scale * q[b,h,i] . k[b,h',col(i,j)]) @ v[b,h',col(i,·)]`` with
    ``h' = h // group``; a row with no nonzeros produces zeros.
    """
    B, H, KVH, N, D = spec.batch, spec.heads, spec.kv_heads, spec.seq_len, spec.head_dim
    HM, S, L, dt = spec.mask_heads, spec.max_segments, spec.index_len, spec.dtype
    row = online_softmax_row(spec)

    @T.prim_func(s_tir=True)
    def row_kernel(
        q: T.Buffer((B, H, N, D), dt),
        k: T.Buffer((B, KVH, N, D), dt),
        v: T.Buffer((B, KVH, N, D), dt),
        seg_start: T.Buffer((HM, N, S), "int32"),
        seg_step: T.Buffer((HM, N, S), "int32"),
        seg_count: T.Buffer((HM, N, S), "int32"),
        indices: T.Buffer((HM, L), "int32"),
        kv_len: T.Buffer((B,), "int32"),
        out: T.Buffer((B, H, N, D), dt),
    ):
        T.func_attr({"global_symbol": "row", "tirx.noalias": True})
        for b, h, i in T.grid(B, H, N):
            with T.sblock(ROW_BLOCK):
                vb, vh, vi = T.axis.remap("SSS", [b, h, i])
                T.reads(q[vb, vh, vi, 0:D], k[vb, vh // (H // KVH), 0:N, 0:D], v[vb, vh // (H // KVH), 0:N, 0:D],
                        seg_start[0:HM, vi, 0:S], seg_step[0:HM, vi, 0:S],
                        seg_count[0:HM, vi, 0:S], indices[0:HM, 0:L])
                T.writes(out[vb, vh, vi, 0:D])
                acc = T.alloc_buffer((D,), "float32", scope="local")
                st = T.alloc_buffer((5,), "float32", scope="local")
                row(q, k, v, seg_start, seg_step, seg_count, indices, kv_len, out, acc, st,
                    vb, vh, T.floormod(vh, HM), vi)

    return without_unused_kv_len(spec, row_kernel)
