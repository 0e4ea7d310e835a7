"""Warp-level tensor-core form of the tiled fused kernel (CUDA, fp16, ``mma.sync``).

Same plan tables, buffers and semantics as :func:`tvm_splat.kernels.tiled.tiled_func`
(one program per (batch x head, tile), a data-dependent walk over the tile's column blocks,
online softmax in base 2, direct output or per-component partial state), but written at the
level of one warp, FlashAttention-2 style, because the row softmax has to run on the
``mma`` accumulators in registers: a TensorIR schedule of the logical kernel can only
tensorize the two GEMMs with WMMA, whose fragment layout is opaque, so scores and P had to
make a round trip through shared memory on every block (see :mod:`tvm_splat.schedules.tiled`).

Layout (``W`` warps, ``MT`` m-tiles of 16 rows per warp, ``BR = 16 * W * MT``):

* thread block = (threadIdx.y = warp, threadIdx.x = lane); warp ``w`` owns tile rows
  ``16 * (w * MT + mt) + g + 8 * half`` with ``g = lane / 4``, ``t = lane % 4``
  (the ``m16n8k16`` accumulator layout: each thread holds 2 rows x 2 columns per 8-column tile);
* Q, K, V tiles in dynamic shared memory, rows padded by 8 halves so that ``ldmatrix`` reads
  8 rows without bank conflicts; Q fragments stay in registers for the whole tile;
* per column block: ``S = Q K^T`` with ``ldmatrix`` + ``mma.m16n8k16`` into registers, scale,
  mask (FULL blocks: none; PARTIAL: range + residue against the row's segments, cached in
  registers per tile), row max over the 4 lanes of a row (2 xor-shuffles), ``P = 2^(S - m)``
  converted in registers to the A operand of ``P V`` (the accumulator layout of two 8-column
  tiles is the A layout of one 16-deep k-step), ``O = O * alpha + P V`` with ``ldmatrix.trans``
  for V; the running sum ``l`` stays per thread and is reduced over the row's lanes once at
  the end.

Shapes and dtypes of the buffers are those of :func:`~tvm_splat.kernels.tiled.tiled_func`.
"""
from __future__ import annotations

from tvm.script import tirx as T

from .attention import LOG2E, NEG_INIT
from .spec import AttentionSpec
from .tiled import partial_shapes

#: extra halves per shared-memory row (16 bytes): row strides of 144/272 bytes put the 8 rows
#: one ``ldmatrix`` phase reads in 8 different 4-bank groups
ROW_PAD = 8


def mma_tile_rows(warps: int, m_tiles: int) -> int:
    """Rows of a tile: 16 per m-tile, ``m_tiles`` per warp."""
    return 16 * warps * m_tiles


def check_mma_shape(spec: AttentionSpec, br: int, bc: int, warps: int, m_tiles: int) -> None:
    """Raise ``ValueError`` when the warp-level kernel cannot run this spec and tile shape."""
    if spec.dtype != "float16":
        raise ValueError(f"the mma kernel needs float16 inputs, got {spec.dtype}")
    if spec.head_dim % 16:
        raise ValueError(f"the mma kernel needs head_dim a multiple of 16, got {spec.head_dim}")
    if bc % 16:
        raise ValueError(f"the mma kernel needs bc a multiple of 16, got {bc}")
    if br != mma_tile_rows(warps, m_tiles):
        raise ValueError(f"the mma kernel needs br == 16 * warps * m_tiles "
                         f"({mma_tile_rows(warps, m_tiles)}), got br={br}")


def tiled_mma_func(spec: AttentionSpec, plan_shape, warps: int = 4, m_tiles: int = 1, stages: int = 2):
    """The warp-level tiled kernel for ``spec`` and a plan of shape ``plan_shape``
    (``plan_shape.br == 16 * warps * m_tiles``); signature of
    :func:`~tvm_splat.kernels.tiled.tiled_func`.

    ``stages=2``: K/V blocks are double-buffered and fetched with ``cp.async`` one block ahead
    (one barrier per block); ``stages=1``: plain 16-byte loads, two barriers per block.
    """
    if stages not in (1, 2):
        raise ValueError(f"stages must be 1 or 2, got {stages}")
    B, H, N, D = spec.batch, spec.heads, spec.seq_len, spec.head_dim
    HM, S, dt = spec.mask_heads, spec.max_segments, spec.dtype
    NT, NB, C = plan_shape.num_tiles, plan_shape.num_blocks, plan_shape.num_components
    BR, BC, W, MT = plan_shape.br, plan_shape.bc, warps, m_tiles
    check_mma_shape(spec, BR, BC, W, MT)
    direct = C <= 1
    o_shape, ml_shape = partial_shapes(spec, C)
    DP = D + ROW_PAD
    KD, NTL, KC, DT = D // 16, BC // 8, BC // 16, D // 8  # k-steps of S, n-tiles of S, k-steps of PV, n-tiles of O
    NTHR = 32 * W
    CH = D // 8  # 16-byte chunks per row
    Q_IT = (BR * CH + NTHR - 1) // NTHR
    KV_IT = (BC * CH + NTHR - 1) // NTHR
    K_OFF = BR * DP
    V_OFF = K_OFF + stages * BC * DP
    SMEM = V_OFF + stages * BC * DP
    scale = T.float32(spec.scale * LOG2E)
    neg_init = T.float32(NEG_INIT)
    neg_inf = T.min_value("float32")
    zero = T.Cast(dt, T.float32(0))
    full_mask = T.uint32(0xFFFFFFFF)

    @T.macro
    def copy16(dst, src, valid):
        # cp.async of 16 bytes; src-size 0 zero-fills (rows past the tile or the sequence)
        T.evaluate(T.ptx["cp.async.cg.shared.global"](dst, src, 16, T.Cast("uint32", T.if_then_else(valid, 16, 0))))

    @T.macro
    def block_row_async(smem, base, src, blocks, b, h, hm, blk_lo, tid, jj, st, it):
        # one 16-byte chunk of column block ``jj`` of ``src`` (K or V) -> stage ``st`` at ``base``
        copy16(T.address_of(smem[base + (st * BC + (it * NTHR + tid) // CH) * DP + (it * NTHR + tid) % CH * 8]),
               src.access_ptr("r", offset=((b * H + h) * N + T.min(
                   blocks[hm, blk_lo + jj, 0] + blocks[hm, blk_lo + jj, 1] * ((it * NTHR + tid) // CH), N - 1)) * D
                   + (it * NTHR + tid) % CH * 8),
               blocks[hm, blk_lo + jj, 0] + blocks[hm, blk_lo + jj, 1] * ((it * NTHR + tid) // CH) < N)

    @T.macro
    def kv_async(smem, k, v, blocks, b, h, hm, blk_lo, tid, jj, st):
        # column block ``jj`` of the tile -> stage ``st`` of Ks / Vs
        for it in T.serial(KV_IT):
            if it * NTHR + tid < BC * CH:
                block_row_async(smem, K_OFF, k, blocks, b, h, hm, blk_lo, tid, jj, st, it)
                block_row_async(smem, V_OFF, v, blocks, b, h, hm, blk_lo, tid, jj, st, it)

    @T.prim_func(s_tir=True)
    def tiled(
        q: T.Buffer((B, H, N, D), dt),
        k: T.Buffer((B, H, N, D), dt),
        v: T.Buffer((B, H, N, D), dt),
        seg_start: T.Buffer((HM, N, S), "int32"),
        seg_count: T.Buffer((HM, N, S), "int32"),
        seg_sigma: T.Buffer((HM, N, S), "int32"),
        tiles: T.Buffer((HM, NT, 6), "int32"),
        blocks: T.Buffer((HM, NB, 3), "int32"),
        out: T.Buffer((B, H, N, D), dt),
        o_part: T.Buffer(o_shape, "float32"),
        ml_part: T.Buffer(ml_shape, "float32"),
    ):
        T.func_attr({"global_symbol": "tiled", "tirx.noalias": True})
        for vt in T.thread_binding(NT, thread="blockIdx.x"):
            for vbh in T.thread_binding(B * H, thread="blockIdx.y"):
                for w in T.thread_binding(W, thread="threadIdx.y"):
                    for lane in T.thread_binding(32, thread="threadIdx.x"):
                        with T.sblock("tile"):
                            T.reads()
                            T.writes()
                            # one allocation (Q | K stages | V stages): cp.async writes are invisible
                            # to TVM's shared-memory planner, which would otherwise overlap K with Q
                            smem = T.sblock_alloc_buffer((SMEM,), dt, scope="shared.dyn")
                            qf = T.sblock_alloc_buffer((MT * KD * 8,), dt, scope="local")
                            bf = T.sblock_alloc_buffer((8,), dt, scope="local")
                            pf = T.sblock_alloc_buffer((MT * KC * 8,), dt, scope="local")
                            sacc = T.sblock_alloc_buffer((MT * NTL * 4,), "float32", scope="local")
                            oacc = T.sblock_alloc_buffer((MT * DT * 4,), "float32", scope="local")
                            # per (m-tile, half): running max, running (per-thread) sum, block max,
                            # new max, alpha
                            ms = T.sblock_alloc_buffer((MT * 2,), "float32", scope="local")
                            ls = T.sblock_alloc_buffer((MT * 2,), "float32", scope="local")
                            mb = T.sblock_alloc_buffer((MT * 2,), "float32", scope="local")
                            al = T.sblock_alloc_buffer((MT * 2,), "float32", scope="local")
                            # the thread's rows' segments: start, last, sigma (0 = none)
                            sg = T.sblock_alloc_buffer((MT * 2 * S * 3,), "int32", scope="local")
                            b: T.let[T.int32] = vbh // H
                            h: T.let[T.int32] = vbh % H
                            hm: T.let[T.int32] = h % HM
                            row0: T.let[T.int32] = tiles[hm, vt, 0]
                            rstr: T.let[T.int32] = tiles[hm, vt, 1]
                            nrows: T.let[T.int32] = tiles[hm, vt, 2]
                            comp: T.let[T.int32] = tiles[hm, vt, 3]
                            blk_lo: T.let[T.int32] = tiles[hm, vt, 4]
                            blk_hi: T.let[T.int32] = tiles[hm, vt, 5]
                            tid: T.let[T.int32] = w * 32 + lane
                            g: T.let[T.int32] = lane // 4
                            tq: T.let[T.int32] = lane % 4
                            # Q tile -> shared (16-byte vectors; rows past nrows are zero)
                            if stages == 1:
                                for it in T.serial(Q_IT):
                                    if it * NTHR + tid < BR * CH:
                                        for e in T.vectorized(8):
                                            smem[(it * NTHR + tid) // CH * DP + (it * NTHR + tid) % CH * 8 + e] = T.if_then_else(
                                                (it * NTHR + tid) // CH < nrows,
                                                q[b, h, row0 + rstr * ((it * NTHR + tid) // CH), (it * NTHR + tid) % CH * 8 + e],
                                                zero)
                            else:
                                for it in T.serial(Q_IT):
                                    if it * NTHR + tid < BR * CH:
                                        copy16(T.address_of(smem[(it * NTHR + tid) // CH * DP + (it * NTHR + tid) % CH * 8]),
                                               q.access_ptr("r", offset=((b * H + h) * N + T.if_then_else(
                                                   (it * NTHR + tid) // CH < nrows, row0 + rstr * ((it * NTHR + tid) // CH), 0)) * D
                                                   + (it * NTHR + tid) % CH * 8),
                                               (it * NTHR + tid) // CH < nrows)
                                if blk_hi > blk_lo:
                                    kv_async(smem, k, v, blocks, b, h, hm, blk_lo, tid, 0, 0)
                                T.evaluate(T.ptx.cp.async_.commit_group())
                                T.evaluate(T.ptx["cp.async.wait_group"](0))
                            for i in T.unroll(MT * 2):
                                ms[i] = neg_init
                                ls[i] = T.float32(0)
                            for i in T.unroll(MT * DT * 4):
                                oacc[i] = T.float32(0)
                            for mt in T.unroll(MT):
                                for hf in T.unroll(2):
                                    for s in T.unroll(S):
                                        if (w * MT + mt) * 16 + g + 8 * hf < nrows:
                                            sg[((mt * 2 + hf) * S + s) * 3] = seg_start[hm, row0 + rstr * ((w * MT + mt) * 16 + g + 8 * hf), s]
                                            sg[((mt * 2 + hf) * S + s) * 3 + 1] = seg_start[hm, row0 + rstr * ((w * MT + mt) * 16 + g + 8 * hf), s] + seg_sigma[hm, row0 + rstr * ((w * MT + mt) * 16 + g + 8 * hf), s] * (seg_count[hm, row0 + rstr * ((w * MT + mt) * 16 + g + 8 * hf), s] - 1)
                                            sg[((mt * 2 + hf) * S + s) * 3 + 2] = T.if_then_else(
                                                seg_count[hm, row0 + rstr * ((w * MT + mt) * 16 + g + 8 * hf), s] > 0,
                                                seg_sigma[hm, row0 + rstr * ((w * MT + mt) * 16 + g + 8 * hf), s], 0)
                                        else:
                                            sg[((mt * 2 + hf) * S + s) * 3 + 2] = 0
                            T.tvm_storage_sync("shared.dyn")
                            # Q fragments (A operand) for the whole tile
                            for mt in T.unroll(MT):
                                for kk in T.unroll(KD):
                                    T.evaluate(T.ptx_legacy.ldmatrix(
                                        False, 4, ".b16", qf.data, (mt * KD + kk) * 8,
                                        smem.access_ptr("r"),
                                        ((w * MT + mt) * 16 + lane % 16) * DP + kk * 16 + 8 * (lane // 16),
                                        dtype=dt))
                            for j in T.serial(blk_hi - blk_lo):
                                col0: T.let[T.int32] = blocks[hm, blk_lo + j, 0]
                                sig: T.let[T.int32] = blocks[hm, blk_lo + j, 1]
                                full: T.let[T.int32] = blocks[hm, blk_lo + j, 2]
                                stg: T.let[T.int32] = j % stages
                                if stages == 1:
                                    T.tvm_storage_sync("shared.dyn")
                                    for it in T.serial(KV_IT):
                                        if it * NTHR + tid < BC * CH:
                                            for e in T.vectorized(8):
                                                smem[K_OFF + (it * NTHR + tid) // CH * DP + (it * NTHR + tid) % CH * 8 + e] = T.if_then_else(
                                                    col0 + sig * ((it * NTHR + tid) // CH) < N,
                                                    k[b, h, col0 + sig * ((it * NTHR + tid) // CH), (it * NTHR + tid) % CH * 8 + e],
                                                    zero)
                                            for e in T.vectorized(8):
                                                smem[V_OFF + (it * NTHR + tid) // CH * DP + (it * NTHR + tid) % CH * 8 + e] = T.if_then_else(
                                                    col0 + sig * ((it * NTHR + tid) // CH) < N,
                                                    v[b, h, col0 + sig * ((it * NTHR + tid) // CH), (it * NTHR + tid) % CH * 8 + e],
                                                    zero)
                                    T.tvm_storage_sync("shared.dyn")
                                else:
                                    # block j has landed (this thread's copies: wait; everyone's:
                                    # barrier, which also frees the other stage for block j + 1)
                                    T.evaluate(T.ptx["cp.async.wait_group"](0))
                                    T.tvm_storage_sync("shared.dyn")
                                    if j + 1 < blk_hi - blk_lo:
                                        kv_async(smem, k, v, blocks, b, h, hm, blk_lo, tid, j + 1, (j + 1) % stages)
                                    T.evaluate(T.ptx.cp.async_.commit_group())
                                # S = Q K^T in registers
                                for i in T.unroll(MT * NTL * 4):
                                    sacc[i] = T.float32(0)
                                for kk in T.unroll(KD):
                                    for np in T.unroll(KC):
                                        T.evaluate(T.ptx_legacy.ldmatrix(
                                            False, 4, ".b16", bf.data, 0, smem.access_ptr("r"),
                                            K_OFF + stg * BC * DP + (np * 16 + lane % 8 + 8 * (lane // 16)) * DP + kk * 16 + 8 * (lane // 8 % 2),
                                            dtype=dt))
                                        for mt in T.unroll(MT):
                                            for hn in T.unroll(2):
                                                T.evaluate(T.ptx_legacy.mma(
                                                    "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                                    qf.data, (mt * KD + kk) * 8, bf.data, hn * 4,
                                                    sacc.data, (mt * NTL + np * 2 + hn) * 4, False, dtype="float32"))
                                # scale + mask, block row max
                                for mt in T.unroll(MT):
                                    for nt in T.unroll(NTL):
                                        for i in T.unroll(4):
                                            sacc[(mt * NTL + nt) * 4 + i] = T.if_then_else(
                                                full == 1,
                                                sacc[(mt * NTL + nt) * 4 + i] * scale,
                                                T.if_then_else(
                                                    col0 + sig * (nt * 8 + tq * 2 + i % 2) < N
                                                    and _member(sg, mt * 2 + i // 2, col0 + sig * (nt * 8 + tq * 2 + i % 2), sig, S),
                                                    sacc[(mt * NTL + nt) * 4 + i] * scale,
                                                    neg_inf))
                                for i in T.unroll(MT * 2):
                                    mb[i] = neg_inf
                                for mt in T.unroll(MT):
                                    for nt in T.unroll(NTL):
                                        for i in T.unroll(4):
                                            mb[mt * 2 + i // 2] = T.max(mb[mt * 2 + i // 2], sacc[(mt * NTL + nt) * 4 + i])
                                for i in T.unroll(MT * 2):
                                    mb[i] = T.max(mb[i], T.tvm_warp_shuffle_xor(full_mask, mb[i], 1, 32, 32))
                                    mb[i] = T.max(mb[i], T.tvm_warp_shuffle_xor(full_mask, mb[i], 2, 32, 32))
                                    mb[i] = T.max(ms[i], mb[i])  # the new running max
                                    al[i] = T.exp2(ms[i] - mb[i])
                                    ms[i] = mb[i]
                                    ls[i] = ls[i] * al[i]
                                # P = 2^(S - m) as the A operand of P V (two 8-column accumulator
                                # tiles = one 16-deep k-step), row sums of the rounded P
                                for mt in T.unroll(MT):
                                    for kc in T.unroll(KC):
                                        for hn in T.unroll(2):
                                            for i in T.unroll(4):
                                                pf[(mt * KC + kc) * 8 + hn * 4 + i] = T.Cast(
                                                    dt, T.exp2(sacc[(mt * NTL + kc * 2 + hn) * 4 + i] - ms[mt * 2 + i // 2]))
                                for mt in T.unroll(MT):
                                    for kc in T.unroll(KC):
                                        for hn in T.unroll(2):
                                            for i in T.unroll(4):
                                                ls[mt * 2 + i // 2] = ls[mt * 2 + i // 2] + T.Cast(
                                                    "float32", pf[(mt * KC + kc) * 8 + hn * 4 + i])
                                for mt in T.unroll(MT):
                                    for dtl in T.unroll(DT):
                                        for i in T.unroll(4):
                                            oacc[(mt * DT + dtl) * 4 + i] = oacc[(mt * DT + dtl) * 4 + i] * al[mt * 2 + i // 2]
                                # O += P V
                                for kc in T.unroll(KC):
                                    for dp in T.unroll(D // 16):
                                        T.evaluate(T.ptx_legacy.ldmatrix(
                                            True, 4, ".b16", bf.data, 0, smem.access_ptr("r"),
                                            V_OFF + stg * BC * DP + (kc * 16 + lane % 8 + 8 * (lane // 8 % 2)) * DP + dp * 16 + 8 * (lane // 16),
                                            dtype=dt))
                                        for mt in T.unroll(MT):
                                            for hn in T.unroll(2):
                                                T.evaluate(T.ptx_legacy.mma(
                                                    "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                                    pf.data, (mt * KC + kc) * 8, bf.data, hn * 4,
                                                    oacc.data, (mt * DT + dp * 2 + hn) * 4, False, dtype="float32"))
                            # full row sums: the 4 lanes of a row hold disjoint columns
                            for i in T.unroll(MT * 2):
                                ls[i] = ls[i] + T.tvm_warp_shuffle_xor(full_mask, ls[i], 1, 32, 32)
                                ls[i] = ls[i] + T.tvm_warp_shuffle_xor(full_mask, ls[i], 2, 32, 32)
                            if direct:
                                for mt in T.unroll(MT):
                                    for dtl in T.unroll(DT):
                                        for hf in T.unroll(2):
                                            if (w * MT + mt) * 16 + g + 8 * hf < nrows:
                                                for e in T.vectorized(2):
                                                    out[b, h, row0 + rstr * ((w * MT + mt) * 16 + g + 8 * hf), dtl * 8 + tq * 2 + e] = T.Cast(
                                                        dt, T.if_then_else(
                                                            ls[mt * 2 + hf] > T.float32(0),
                                                            oacc[(mt * DT + dtl) * 4 + hf * 2 + e] / ls[mt * 2 + hf],
                                                            T.float32(0)))
                            else:
                                for mt in T.unroll(MT):
                                    for dtl in T.unroll(DT):
                                        for hf in T.unroll(2):
                                            if (w * MT + mt) * 16 + g + 8 * hf < nrows:
                                                for e in T.vectorized(2):
                                                    o_part[vbh, comp, row0 + rstr * ((w * MT + mt) * 16 + g + 8 * hf), dtl * 8 + tq * 2 + e] = oacc[(mt * DT + dtl) * 4 + hf * 2 + e]
                                for mt in T.unroll(MT):
                                    for hf in T.unroll(2):
                                        if (w * MT + mt) * 16 + g + 8 * hf < nrows and tq == 0:
                                            ml_part[vbh, comp, row0 + rstr * ((w * MT + mt) * 16 + g + 8 * hf), 0] = ms[mt * 2 + hf]
                                            ml_part[vbh, comp, row0 + rstr * ((w * MT + mt) * 16 + g + 8 * hf), 1] = ls[mt * 2 + hf]

    return tiled


def _member(sg, row_slot, col, sig, S):
    """Whether ``col`` lies in one of the cached segments (``sg``) of the thread's row
    ``row_slot`` whose step is the block's ``sig``."""
    cond = None
    for s in range(S):
        base = (row_slot * S + s) * 3
        c = T.And(T.And(sg[base + 2] == sig, col >= sg[base]),
                  T.And(col <= sg[base + 1], T.truncmod(col - sg[base], sig) == 0))
        cond = c if cond is None else T.Or(cond, c)
    return cond
