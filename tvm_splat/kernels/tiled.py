"""Tiled, FlashAttention-style fused kernel over an ACSR tile plan (unscheduled TensorIR).

One program per (batch x head, tile) of a :class:`~tvm_splat.formats.tile_plan.TilePlan`:

1. load the tile's Q rows ``row0 + rstride * r`` (``r < nrows``; other rows are zero),
2. walk the tile's column blocks (a data-dependent loop over ``blk_lo .. blk_hi``); per block:
   load K and V rows ``col0 + sigma * u`` (out of range -> zero), ``S = Q K^T`` (block
   ``S_gemm``, static ``BR x BC x D``), scale and mask into ``Sm`` (``S_mask``: FULL blocks
   skip the test; PARTIAL blocks test range + residue against the row's segments of the
   block's step, computed from ``seg_start/seg_count/seg_sigma``), online softmax
   (``row_max``: the block's row max ``mb``; ``alpha``: ``mn = max(m, mb)``, ``alpha = 2^(m - mn)``,
   ``lsa = l * alpha``; ``P``; ``row_sum``: the block's row sum; ``l_update``: ``l = lsa + rsum``; ``m_update``;
   both reductions start from their identity, so GPU schedules can reduce them across threads), then ``O = O * alpha + P V``
   (``PV_gemm``, static ``BR x D x BC``; a probability that is exactly zero — a masked-out
   score — is *selected* away rather than multiplied, so a NaN or inf in a masked-out value
   row contributes nothing),
3. with one component: write ``O / l`` (0 for an empty row, NaN when a score was not finite,
   as dense attention); with several: write the partial state ``(O, m, l)`` of the tile's
   component, merged by :func:`merge_func`; a chunk of a split tile (``slot >= 0``, split-KV)
   writes its partial state to its slot, combined by :func:`split_merge_func` first.

Key lengths (``spec.has_kv_len``; ``kv_len [B]`` int32 before ``out``): key ``j`` of batch
``b`` exists only when ``j < kv_len[b]``. K and V rows past the length load as zeros (so a NaN
stored there never enters a product), and their scores are masked in every block, FULL ones
included (a FULL block may cross the length). The fallback rows clip their segments the same
way; ``merge`` needs nothing (a component left without keys has ``l = 0``).

Softmax runs in base 2 (``scale * log2(e)`` folded into the scores). Scores, running max/sum
and the accumulator are float32; ``P`` is stored in the input dtype (fp16 for tensor cores).
Intermediate buffers are allocated in the block ``"tile"`` in the default scope; schedules
(:mod:`tvm_splat.schedules.tiled`) move them to shared memory / registers.

Buffers of :func:`tiled_func` (``BH = batch * heads``, ``C`` components, plan tables from
:class:`~tvm_splat.formats.tile_plan.TilePlan`)::

    q                [B, H, N, D] dtype   k, v [B, KVH, N, D] dtype (KV head h // group)
    seg_start        [Hm, N, S] int32     seg_count [Hm, N, S] int32
    seg_sigma        [Hm, N, S] int32     (plan.seg_sigma)
    tiles            [Hm, T, 7] int32     blocks [Hm, NB, 3] int32
    kv_len           [B] int32            (only with ``spec.has_kv_len``)
    out              [B, H, N, D] dtype   (written when C == 1)
    o_part           [BH, C, N, D] f32    ml_part [BH, C, N, 2] f32   (C > 1; else [1,1,1,*])
    split_o          [BH, NS, BR, D] f32  split_ml [BH, NS, BR, 2] f32 (NS > 0; else [1,1,1,*])
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .common import (LOG2E, NEG_INIT, any_of, key_length, natural_lse, normalised, segment_member,
                     without_unused_kv_len)
from .row import online_softmax_row
from .spec import AttentionSpec

TILE_BLOCK = "tile"
#: names of the inner blocks the schedules address
BLOCKS = ("init_state", "O_init", "Q_load", "K_load", "V_load", "S_gemm", "S_mask", "row_max",
          "alpha", "P", "row_sum", "l_update", "m_update", "PV_gemm", "O_store", "ML_store")


def _member(seg_start, seg_count, seg_sigma, hm, row, col, sigma, S):
    """Whether ``col`` lies in a segment of ``row`` whose effective step is ``sigma``."""
    return any_of([segment_member(seg_start[hm, row, s],
                                  seg_start[hm, row, s] + sigma * (seg_count[hm, row, s] - 1),
                                  sigma, seg_sigma[hm, row, s], col) for s in range(S)])


def full_block(spec, full, col, length):
    """Whether score column ``col`` of a block needs no mask test: the block is FULL and, with
    key lengths, ``col`` is a valid key (a FULL block may cross ``kv_len[b]``)."""
    if not spec.has_kv_len:
        return full == 1
    return T.And(full == 1, col < length)


def partial_shapes(spec: AttentionSpec, num_components: int):
    """Shapes of ``o_part`` and ``ml_part`` (dummies of one element per row when C == 1)."""
    BH = spec.batch * spec.heads
    if num_components <= 1:
        return (1, 1, 1, 1), (1, 1, 1, 2)
    return (BH, num_components, spec.seq_len, spec.head_dim), (BH, num_components, spec.seq_len, 2)


def split_chunk(plan_shape, slot):
    """Whether the program with tile field ``slot`` is a chunk of a split tile: ``slot >= 0`` in a
    plan with split-KV, the constant False otherwise (the test then vanishes from the code)."""
    return slot >= 0 if plan_shape.num_slots > 0 else False


def split_shapes(spec: AttentionSpec, plan_shape):
    """Shapes of ``split_o`` and ``split_ml``: one ``BR``-row partial state per (batch x head,
    slot) of split-KV (dummies of one element when nothing is split)."""
    if not plan_shape.num_slots:
        return (1, 1, 1, 1), (1, 1, 1, 2)
    BH = spec.batch * spec.heads
    return (BH, plan_shape.num_slots, plan_shape.br, spec.head_dim), (BH, plan_shape.num_slots, plan_shape.br, 2)


def tiled_func(spec: AttentionSpec, plan_shape):
    """The tiled fused kernel for ``spec`` and a plan of shape ``plan_shape``
    (:class:`~tvm_splat.formats.tile_plan.PlanShape`), for CPUs and GPU CUDA cores.
    ``PV_gemm`` accumulates straight into ``O`` (its init rescales ``O`` by ``alpha``)."""
    B, H, KVH, G, N, D = spec.batch, spec.heads, spec.kv_heads, spec.group, spec.seq_len, spec.head_dim
    HM, S, dt = spec.mask_heads, spec.max_segments, spec.dtype
    NT, NB, C = plan_shape.num_tiles, plan_shape.num_blocks, plan_shape.num_components
    BR, BC = plan_shape.br, plan_shape.bc
    direct = C <= 1
    split = plan_shape.num_slots > 0
    o_shape, ml_shape = partial_shapes(spec, C)
    so_shape, sml_shape = split_shapes(spec, plan_shape)
    scale = T.float32(spec.scale * LOG2E)
    neg_init = T.float32(NEG_INIT)
    neg_inf = T.min_value("float32")  # -FLT_MAX: exp2(-FLT_MAX - m) == 0 for any finite m
    zero = T.Cast(dt, T.float32(0))

    @T.prim_func(s_tir=True)
    def tiled(
        q: T.Buffer((B, H, N, D), dt),
        k: T.Buffer((B, KVH, N, D), dt),
        v: T.Buffer((B, KVH, N, D), dt),
        seg_start: T.Buffer((HM, N, S), "int32"),
        seg_count: T.Buffer((HM, N, S), "int32"),
        seg_sigma: T.Buffer((HM, N, S), "int32"),
        tiles: T.Buffer((HM, NT, 7), "int32"),
        blocks: T.Buffer((HM, NB, 3), "int32"),
        kv_len: T.Buffer((B,), "int32"),
        out: T.Buffer((B, H, N, D), dt),
        o_part: T.Buffer(o_shape, "float32"),
        ml_part: T.Buffer(ml_shape, "float32"),
        split_o: T.Buffer(so_shape, "float32"),
        split_ml: T.Buffer(sml_shape, "float32"),
    ):
        T.func_attr({"global_symbol": "tiled", "tirx.noalias": True})
        for bh, t in T.grid(B * H, NT):
            with T.sblock(TILE_BLOCK):
                vbh, vt = T.axis.remap("SS", [bh, t])
                T.reads()
                T.writes()
                Qs = T.sblock_alloc_buffer((BR, D), dt)
                Ks = T.sblock_alloc_buffer((BC, D), dt)
                Vs = T.sblock_alloc_buffer((BC, D), dt)
                Sm = T.sblock_alloc_buffer((BR, BC), "float32")
                Ps = T.sblock_alloc_buffer((BR, BC), dt)
                Os = T.sblock_alloc_buffer((BR, D), "float32")
                ms = T.sblock_alloc_buffer((BR,), "float32")
                ls = T.sblock_alloc_buffer((BR,), "float32")
                mb = T.sblock_alloc_buffer((BR,), "float32")
                mn = T.sblock_alloc_buffer((BR,), "float32")
                lsa = T.sblock_alloc_buffer((BR,), "float32")
                alpha = T.sblock_alloc_buffer((BR,), "float32")
                rsum = T.sblock_alloc_buffer((BR,), "float32")
                b: T.let[T.int32] = vbh // H
                h: T.let[T.int32] = vbh % H
                hk: T.let[T.int32] = h // G
                hm: T.let[T.int32] = h % HM
                row0: T.let[T.int32] = tiles[hm, vt, 0]
                rstr: T.let[T.int32] = tiles[hm, vt, 1]
                nrows: T.let[T.int32] = tiles[hm, vt, 2]
                comp: T.let[T.int32] = tiles[hm, vt, 3]
                blk_lo: T.let[T.int32] = tiles[hm, vt, 4]
                blk_hi: T.let[T.int32] = tiles[hm, vt, 5]
                slot: T.let[T.int32] = tiles[hm, vt, 6]
                for r in T.serial(BR):
                    with T.sblock("init_state"):
                        vr = T.axis.spatial(BR, r)
                        ms[vr] = neg_init
                        ls[vr] = T.float32(0)
                for r, d in T.grid(BR, D):
                    with T.sblock("O_init"):
                        vr, vd = T.axis.remap("SS", [r, d])
                        Os[vr, vd] = T.float32(0)
                for r, d in T.grid(BR, D):
                    with T.sblock("Q_load"):
                        vr, vd = T.axis.remap("SS", [r, d])
                        Qs[vr, vd] = T.if_then_else(vr < nrows, q[b, h, row0 + rstr * vr, vd], zero)
                for j in T.serial(blk_hi - blk_lo):
                    col0: T.let[T.int32] = blocks[hm, blk_lo + j, 0]
                    sig: T.let[T.int32] = blocks[hm, blk_lo + j, 1]
                    full: T.let[T.int32] = blocks[hm, blk_lo + j, 2]
                    for u, d in T.grid(BC, D):
                        with T.sblock("K_load"):
                            vu, vd = T.axis.remap("SS", [u, d])
                            Ks[vu, vd] = T.if_then_else(col0 + sig * vu < key_length(spec, kv_len, b), k[b, hk, col0 + sig * vu, vd], zero)
                    for u, d in T.grid(BC, D):
                        with T.sblock("V_load"):
                            vu, vd = T.axis.remap("SS", [u, d])
                            Vs[vu, vd] = T.if_then_else(col0 + sig * vu < key_length(spec, kv_len, b), v[b, hk, col0 + sig * vu, vd], zero)
                    with T.sblock("S_stage"):
                        Ss = T.sblock_alloc_buffer((BR, BC), "float32")
                        for r, u, d in T.grid(BR, BC, D):
                            with T.sblock("S_gemm"):
                                vr, vu, vd = T.axis.remap("SSR", [r, u, d])
                                with T.init():
                                    Ss[vr, vu] = T.float32(0)
                                Ss[vr, vu] = Ss[vr, vu] + T.Cast("float32", Qs[vr, vd]) * T.Cast("float32", Ks[vu, vd])
                        for r, u in T.grid(BR, BC):
                            with T.sblock("S_mask"):
                                vr, vu = T.axis.remap("SS", [r, u])
                                Sm[vr, vu] = T.if_then_else(
                                    full_block(spec, full, col0 + sig * vu, key_length(spec, kv_len, b)),
                                    Ss[vr, vu] * scale,
                                    T.if_then_else(
                                        T.And(vr < nrows, col0 + sig * vu < key_length(spec, kv_len, b)),
                                        T.if_then_else(
                                            _member(seg_start, seg_count, seg_sigma, hm, row0 + rstr * vr,
                                                    col0 + sig * vu, sig, S),
                                            Ss[vr, vu] * scale,
                                            neg_inf,
                                        ),
                                        neg_inf,
                                    ),
                                )
                    for r, u in T.grid(BR, BC):
                        with T.sblock("row_max"):
                            vr, vu = T.axis.remap("SR", [r, u])
                            with T.init():
                                mb[vr] = neg_inf
                            mb[vr] = T.max(mb[vr], Sm[vr, vu])
                    for r in T.serial(BR):
                        with T.sblock("alpha"):
                            vr = T.axis.spatial(BR, r)
                            mn[vr] = T.max(ms[vr], mb[vr])
                            alpha[vr] = T.exp2(ms[vr] - T.max(ms[vr], mb[vr]))
                            lsa[vr] = ls[vr] * T.exp2(ms[vr] - T.max(ms[vr], mb[vr]))
                    for r, u in T.grid(BR, BC):
                        with T.sblock("P"):
                            vr, vu = T.axis.remap("SS", [r, u])
                            Ps[vr, vu] = T.Cast(dt, T.exp2(Sm[vr, vu] - mn[vr]))
                    for r, u in T.grid(BR, BC):
                        with T.sblock("row_sum"):
                            vr, vu = T.axis.remap("SR", [r, u])
                            with T.init():
                                rsum[vr] = T.float32(0)
                            rsum[vr] = rsum[vr] + T.Cast("float32", Ps[vr, vu])
                    for r in T.serial(BR):
                        with T.sblock("l_update"):
                            vr = T.axis.spatial(BR, r)
                            ls[vr] = lsa[vr] + rsum[vr]
                    for r in T.serial(BR):
                        with T.sblock("m_update"):
                            vr = T.axis.spatial(BR, r)
                            ms[vr] = mn[vr]
                    for r, d, u in T.grid(BR, D, BC):
                        with T.sblock("PV_gemm"):
                            vr, vd, vu = T.axis.remap("SSR", [r, d, u])
                            with T.init():
                                Os[vr, vd] = Os[vr, vd] * alpha[vr]
                            Os[vr, vd] = Os[vr, vd] + T.if_then_else(
                                Ps[vr, vu] == zero, T.float32(0),
                                T.Cast("float32", Ps[vr, vu]) * T.Cast("float32", Vs[vu, vd]))
                # a chunk of a split tile (slot >= 0) leaves its state in its slot; a whole tile
                # writes O / l (one component) or its component's state
                for r, d in T.grid(BR, D):
                    with T.sblock("O_store"):
                        vr, vd = T.axis.remap("SS", [r, d])
                        if vr < nrows:
                            if split_chunk(plan_shape, slot):
                                split_o[vbh, slot, vr, vd] = Os[vr, vd]
                            elif direct:
                                out[b, h, row0 + rstr * vr, vd] = T.Cast(dt, normalised(Os[vr, vd], ls[vr]))
                            else:
                                o_part[vbh, comp, row0 + rstr * vr, vd] = Os[vr, vd]
                if split or not direct:
                    for r in T.serial(BR):
                        with T.sblock("ML_store"):
                            vr = T.axis.spatial(BR, r)
                            if vr < nrows:
                                if split_chunk(plan_shape, slot):
                                    split_ml[vbh, slot, vr, 0] = ms[vr]
                                    split_ml[vbh, slot, vr, 1] = ls[vr]
                                elif not direct:
                                    ml_part[vbh, comp, row0 + rstr * vr, 0] = ms[vr]
                                    ml_part[vbh, comp, row0 + rstr * vr, 1] = ls[vr]

    return without_unused_kv_len(spec, tiled)


#: name of the merge kernels' block: one run of ``merge_lanes`` output elements of a row per
#: iteration
MERGE_BLOCK = "merge_element"


def merge_lanes(head_dim: int) -> int:
    """Consecutive elements of a row that one iteration of the merge kernels combines: 4 where
    ``head_dim`` allows (one 16-byte load of each partial ``O``'s float32 values, and the
    row's ``(M, L)`` and weights computed once for the 4), else 2 or 1.

    One element an iteration (the form before) reads 4 bytes of each partial ``O`` per thread:
    on the H200 the merge of causal strided 128 (two components, n=8192, 16 heads, d=128)
    took ~130 of the case's 313 us (bench kernel time, ``h200_models.json``, against 184 us
    for its ``tiled`` kernel alone in the tuner), ~1.3 TB/s for the ~170 MB it moves.
    Four lanes give each thread four times the bytes in flight: measured on the H200 (fp16,
    50 back-to-back calls, two runs of each tree alternating in one lease,
    ``h200_forward_ab.json`` run ``twenty_second_merge_lanes``) causal strided 128, n=8192,
    d=128, 16 heads 0.291 -> 0.212 ms, d=64, 12 heads 0.119 -> 0.090 ms. The split-KV merge
    keeps one element an iteration (:data:`SPLIT_MERGE_LANES`)."""
    return next(lanes for lanes in (4, 2, 1) if head_dim % lanes == 0)


#: elements of a row one iteration of :func:`split_merge_func` combines. Its rows are few (the
#: split tiles' rows only) and each reads all its slots, so the kernel wants threads more than
#: bytes per thread: with 4 lanes (:func:`merge_lanes`) the two split-KV cases of the same
#: A/B as :func:`merge_lanes` ran slower, global 64 + block 64 + window 32, n=4096, batch 4,
#: 12 heads, d=64 0.1016 -> 0.1035 ms, global 4 + window 256 batch 4 0.1606 -> 0.1616 ms.
SPLIT_MERGE_LANES = 1


@T.macro
def merge_states(st, acc, ml, o, vbh, base, count, row, d0, lanes: int):
    """The merge of ``count`` partial states ``ml[vbh, base + i, row, :] = (m, l)`` and
    ``o[vbh, base + i, row, d0:d0 + lanes]`` for ``lanes`` elements of the row:
    ``st[0] = M = max_i m_i``, ``st[1] = L = sum_i 2^(m_i - M) l_i`` (``st[2]`` is scratch),
    ``acc[e] = sum_i 2^(m_i - M) O_i[d0 + e]``; components for :func:`merge_func`, split-KV
    slots for :func:`split_merge_func`.

    Consecutive lanes of a warp take consecutive runs of a row (each thread recomputing the
    row's ``(M, L)`` from the same ``count`` pairs, one broadcast load per warp), so that a
    warp reads ``32 lanes`` consecutive floats of every partial ``O`` row. Measured on the
    H200 (forward, fp16, ``h200_forward_ab.json``): the split plan of BigBird-like 64 global +
    block 64 + ±32, n=4096, batch 4, 12 heads (its global tiles in 16 chunks, the heads-first
    grid) ran 0.185 ms with the former one-thread-per-row merge (a serial loop over ``d``, a
    warp's loads 4·D bytes apart) and 0.105 ms with one element a thread
    (:func:`merge_lanes` says what the lanes are for)."""
    st[0] = T.float32(NEG_INIT)
    st[1] = T.float32(0)
    for e in T.vectorized(lanes):
        acc[e] = T.float32(0)
    for c in T.serial(count):
        st[0] = T.max(st[0], ml[vbh, base + c, row, 0])
    for c in T.serial(count):
        st[2] = T.exp2(ml[vbh, base + c, row, 0] - st[0])
        st[1] = st[1] + st[2] * ml[vbh, base + c, row, 1]
        for e in T.vectorized(lanes):
            acc[e] = acc[e] + st[2] * o[vbh, base + c, row, d0 + e]


def split_merge_func(spec: AttentionSpec, plan_shape, with_lse: bool = False):
    """Combine the chunks of every split tile (split-KV): for each row of group ``g`` of
    ``splits [Hm, NG, 6]`` (``row0, rstride, nrows, comp, slot_lo, slot_hi``), merge the partial
    states of its slots like :func:`merge_func` merges components, then write ``O / l`` (one
    component) or the tile's component state (several; :func:`merge_func` runs next).
    ``with_lse=True`` (training) on a plan of one component: a last parameter ``lse [B, H, N]``
    float32 receives the split rows' log-sum-exp, as :func:`merge_func` writes it (on a plan of
    several, the merge of the components writes it). One iteration of block
    :data:`MERGE_BLOCK` per :data:`SPLIT_MERGE_LANES` output elements (see :func:`merge_states`)."""
    B, H, N, D, HM, dt = spec.batch, spec.heads, spec.seq_len, spec.head_dim, spec.mask_heads, spec.dtype
    NG, BR, C = max(plan_shape.num_groups, 1), plan_shape.br, plan_shape.num_components
    NS = plan_shape.num_slots
    L = SPLIT_MERGE_LANES
    direct = C <= 1
    o_shape, ml_shape = partial_shapes(spec, C)
    so_shape, sml_shape = split_shapes(spec, plan_shape)

    @T.prim_func(s_tir=True)
    def split_merge(
        split_o: T.Buffer(so_shape, "float32"),
        split_ml: T.Buffer(sml_shape, "float32"),
        splits: T.Buffer((HM, NG, 6), "int32"),
        out: T.Buffer((B, H, N, D), dt),
        o_part: T.Buffer(o_shape, "float32"),
        ml_part: T.Buffer(ml_shape, "float32"),
        lse: T.Buffer((B, H, N) if with_lse and direct else (1,), "float32"),
    ):
        T.func_attr({"global_symbol": "split_merge", "tirx.noalias": True})
        for bh, g, r, dc in T.grid(B * H, NG, BR, D // L):
            with T.sblock(MERGE_BLOCK):
                vbh, vg, vr, vdc = T.axis.remap("SSSS", [bh, g, r, dc])
                T.reads(split_o[vbh, 0:NS, vr, vdc * L:vdc * L + L], split_ml[vbh, 0:NS, vr, 0:2],
                        splits[0:HM, vg, 0:6])
                T.writes(out[vbh // H, vbh % H, 0:N, vdc * L:vdc * L + L], o_part[vbh, 0:C, 0:N, vdc * L:vdc * L + L],
                         ml_part[vbh, 0:C, 0:N, 0:2])
                st = T.sblock_alloc_buffer((3,), "float32", scope="local")
                acc = T.sblock_alloc_buffer((L,), "float32", scope="local")
                hm: T.let[T.int32] = (vbh % H) % HM
                row: T.let[T.int32] = splits[hm, vg, 0] + splits[hm, vg, 1] * vr
                slot_lo: T.let[T.int32] = splits[hm, vg, 4]
                slot_hi: T.let[T.int32] = splits[hm, vg, 5]
                if vr < splits[hm, vg, 2]:
                    merge_states(st, acc, split_ml, split_o, vbh, slot_lo, slot_hi - slot_lo, vr, vdc * L, L)
                    if direct:
                        for e in T.vectorized(L):
                            out[vbh // H, vbh % H, row, vdc * L + e] = T.Cast(dt, normalised(acc[e], st[1]))
                        if with_lse:
                            if vdc == 0:
                                lse[vbh // H, vbh % H, row] = natural_lse(st[0], st[1])
                    else:
                        for e in T.vectorized(L):
                            o_part[vbh, splits[hm, vg, 3], row, vdc * L + e] = acc[e]
                        if vdc == 0:
                            ml_part[vbh, splits[hm, vg, 3], row, 0] = st[0]
                            ml_part[vbh, splits[hm, vg, 3], row, 1] = st[1]

    if with_lse and direct:
        return split_merge
    return tvm.tirx.PrimFunc([p for p in split_merge.params if p.name != "lse"], split_merge.body,
                             split_merge.ret_type, split_merge.attrs)


def merge_func(spec: AttentionSpec, num_components: int, with_lse: bool = False):
    """Combine per-component partial states: ``out = sum_c 2^(m_c - M) O_c / sum_c 2^(m_c - M) l_c``.

    ``num_comp [Hm]`` (``plan.num_comp``) says how many slots of each head are written.
    ``with_lse=True`` (training, :mod:`tvm_splat.training`): a last parameter ``lse [B, H, N]``
    float32 receives each row's natural-log log-sum-exp ``(M + log2 L) ln 2`` (``-inf`` for a
    row that attends to nothing, ``L == 0``; NaN when a score was not finite), the value the
    warp-level forward writes itself on a one-component plan. One iteration of block
    :data:`MERGE_BLOCK` per :func:`merge_lanes` output elements (see :func:`merge_states`).
    """
    B, H, N, D, HM, dt = spec.batch, spec.heads, spec.seq_len, spec.head_dim, spec.mask_heads, spec.dtype
    C = num_components
    L = merge_lanes(D)
    o_shape, ml_shape = partial_shapes(spec, C)

    @T.prim_func(s_tir=True)
    def merge(
        o_part: T.Buffer(o_shape, "float32"),
        ml_part: T.Buffer(ml_shape, "float32"),
        num_comp: T.Buffer((HM,), "int32"),
        out: T.Buffer((B, H, N, D), dt),
        lse: T.Buffer((B, H, N) if with_lse else (1,), "float32"),
    ):
        T.func_attr({"global_symbol": "merge", "tirx.noalias": True})
        for bh, i, dc in T.grid(B * H, N, D // L):
            with T.sblock(MERGE_BLOCK):
                vbh, vi, vdc = T.axis.remap("SSS", [bh, i, dc])
                T.reads(o_part[vbh, 0:C, vi, vdc * L:vdc * L + L], ml_part[vbh, 0:C, vi, 0:2], num_comp[0:HM])
                T.writes(out[vbh // H, vbh % H, vi, vdc * L:vdc * L + L])
                st = T.sblock_alloc_buffer((3,), "float32", scope="local")
                acc = T.sblock_alloc_buffer((L,), "float32", scope="local")
                hm: T.let[T.int32] = (vbh % H) % HM
                merge_states(st, acc, ml_part, o_part, vbh, 0, num_comp[hm], vi, vdc * L, L)
                for e in T.vectorized(L):
                    out[vbh // H, vbh % H, vi, vdc * L + e] = T.Cast(dt, normalised(acc[e], st[1]))
                if with_lse:
                    if vdc == 0:
                        lse[vbh // H, vbh % H, vi] = natural_lse(st[0], st[1])

    if with_lse:
        return merge
    return tvm.tirx.PrimFunc([p for p in merge.params if p.name != "lse"], merge.body, merge.ret_type, merge.attrs)


def fallback_func(spec: AttentionSpec, num_fallback: int):
    """Whole-row online softmax for the rows listed in ``fallback_rows [Hm, F]`` (rows with an
    INDEXED segment; ``-1`` = padding), overwriting their output. Runs after the tiled kernel
    (and the merge), which leaves those rows at zero."""
    B, H, KVH, N, D = spec.batch, spec.heads, spec.kv_heads, spec.seq_len, spec.head_dim
    HM, S, L, dt = spec.mask_heads, spec.max_segments, spec.index_len, spec.dtype
    F = max(int(num_fallback), 1)
    row = online_softmax_row(spec)

    @T.prim_func(s_tir=True)
    def fallback(
        q: T.Buffer((B, H, N, D), dt),
        k: T.Buffer((B, KVH, N, D), dt),
        v: T.Buffer((B, KVH, N, D), dt),
        seg_start: T.Buffer((HM, N, S), "int32"),
        seg_step: T.Buffer((HM, N, S), "int32"),
        seg_count: T.Buffer((HM, N, S), "int32"),
        indices: T.Buffer((HM, L), "int32"),
        fallback_rows: T.Buffer((HM, F), "int32"),
        kv_len: T.Buffer((B,), "int32"),
        out: T.Buffer((B, H, N, D), dt),
    ):
        T.func_attr({"global_symbol": "fallback", "tirx.noalias": True})
        for bh, j in T.grid(B * H, F):
            with T.sblock("row"):
                vbh, vj = T.axis.remap("SS", [bh, j])
                T.reads(q[0:B, 0:H, 0:N, 0:D], k[0:B, 0:KVH, 0:N, 0:D], v[0:B, 0:KVH, 0:N, 0:D],
                        seg_start[0:HM, 0:N, 0:S], seg_step[0:HM, 0:N, 0:S],
                        seg_count[0:HM, 0:N, 0:S], indices[0:HM, 0:L], fallback_rows[0:HM, vj])
                T.writes(out[0:B, 0:H, 0:N, 0:D])
                acc = T.sblock_alloc_buffer((D,), "float32", scope="local")
                st = T.sblock_alloc_buffer((5,), "float32", scope="local")
                hm: T.let[T.int32] = (vbh % H) % HM
                vi: T.let[T.int32] = fallback_rows[hm, vj]
                if vi >= 0:
                    row(q, k, v, seg_start, seg_step, seg_count, indices, kv_len, out, acc, st,
                        vbh // H, vbh % H, hm, vi)

    return without_unused_kv_len(spec, fallback)
