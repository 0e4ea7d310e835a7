"""Warp-level tensor-core form of the tiled fused kernel (CUDA, fp16/bf16, ``mma.sync``).

Same plan tables, buffers and semantics as :func:`tvm_splat.kernels.tiled.tiled_func`
(one program per (batch x head, tile), a data-dependent walk over the tile's column blocks,
online softmax in base 2, direct output, per-component or per-slot (split-KV) partial state), but written at the
level of one warp, FlashAttention-2 style, because the row softmax has to run on the
``mma`` accumulators in registers (a TensorIR schedule of the logical kernel could only
tensorize the two GEMMs with WMMA, whose fragment layout is opaque).

Layout (``W`` warps, ``MT`` m-tiles of 16 rows per warp, ``BR = 16 * W * MT``):

* thread block = (threadIdx.y = warp, threadIdx.x = lane); warp ``w`` owns tile rows
  ``16 * (w * MT + mt) + g + 8 * half`` with ``g = lane / 4``, ``t = lane % 4``
  (the ``m16n8k16`` accumulator layout: each thread holds 2 rows x 2 columns per 8-column
  tile); the sequence rows of the thread's ``MT * 2`` tile rows are computed once per tile;
* Q, K, V tiles in dynamic shared memory, rows padded by 8 elements so that ``ldmatrix``
  reads 8 rows without bank conflicts; Q fragments stay in registers for the whole tile;
* per column block (:func:`tiled_mma_func` reads as the sequence of these steps):
  ``S = Q K^T`` (``ldmatrix`` + ``mma.m16n8k16`` into registers), scale and mask (FULL
  blocks: none; PARTIAL: range + residue against the row's segments, cached in registers),
  online softmax (row max over the 4 lanes of a row with 2 xor-shuffles, ``P = 2^(S - m)``
  converted in registers to the A operand of ``P V``), ``O = O * alpha + P V``
  (``ldmatrix.trans`` for V); the running sum stays per thread and is reduced over the row's
  lanes once at the end.

Masked-out entries contribute exactly nothing: scores are *selected* to -inf, and since a
tensor-core ``P V`` would still multiply a zero probability by a NaN or inf of a masked-out
value row, every PARTIAL block also checks whether its V rows are all finite (each thread the
16-byte chunks it copied, with integer tests on the exponent bits; the block's existing barrier
publishes the result); a block that holds a non-finite value takes an exact path for ``P V`` on
CUDA cores that skips zero probabilities (a uniform branch, never taken for finite inputs).
FULL blocks need no check: every row of the tile attends every one of their columns.

Key lengths (``spec.has_kv_len``): K and V rows at or past ``kv_len[b]`` are zero-filled by
their loads (``cp.async`` with source size 0), so a NaN stored there never reaches shared
memory, and their scores are selected to -inf in every block, FULL blocks included (a FULL
block may cross the length).

GQA: query head ``h`` reads KV head ``h // group`` (nothing is repeated in memory).
Buffers and dtypes are those of :func:`~tvm_splat.kernels.tiled.tiled_func`.
"""
from __future__ import annotations

import numpy
import tvm
from tvm.script import tirx as T

from .common import (LOG2E, NEG_INIT, NONFINITE_CHAINS, block_range_cache, key_length, launch_bounds, natural_lse,
                     nonfinite_fma, nonfinite_joined, normalised, row_segment_cache, tile_grid_rows,
                     without_unused_kv_len)
from .spec import AttentionSpec
from .tiled import partial_shapes, split_chunk, split_shapes

#: extra elements per shared-memory row (16 bytes): row strides of 144/272 bytes put the 8
#: rows one ``ldmatrix`` phase reads in 8 different 4-bank groups
ROW_PAD = 8
#: dynamic shared memory a thread block may use on sm_80-sm_90 (227 KB on sm_90, 163 KB on
#: sm_80; the larger bound, so that nothing Hopper can run is refused here)
SHARED_BYTES_MAX = 227 * 1024
#: ``mma.sync`` operand type names of the input dtypes
MMA_TYPES = {"float16": "fp16", "bfloat16": "bf16"}
#: ``wgmma.mma_async`` operand type names, and the 2-lane vector type an A fragment's 32-bit
#: register holds, of the input dtypes
WGMMA_TYPES = {"float16": "f16", "bfloat16": "bf16"}
WGMMA_PAIR_TYPES = {"float16": "float16x2", "bfloat16": "bfloat16x2"}


#: ``cvt`` to two rounded 16-bit values in one 32-bit register, per input dtype
PACKED_CVT = {"float16": "f16x2", "bfloat16": "bf16x2"}

#: ``lazy_rescale``: a row's running max moves only when a block raises it by more than this
#: (log2 units, the exponent's), so its probabilities stay at most ``2 ** 8 = 256``: far inside
#: float16's range (65504), with the same relative rounding as below 1, and the float32 row sums
#: and O accumulators gain 8 bits of magnitude out of 127. FlashAttention-4 rescales on the
#: same condition with the same bound
RESCALE_THRESHOLD = 8.0


def convert_pair(words, index, lo, hi, dtype: str):
    """``words[index]`` (a uint32 view of a ``dtype`` buffer, float16 or bfloat16) = float32
    ``lo`` and ``hi`` rounded to nearest, ``lo`` in the low half (the element at the even
    position): one ``cvt.rn.{f16x2,bf16x2}.f32``, whose first source is the high half. A TIR
    expression."""
    return T.ptx[f"cvt.rn.{PACKED_CVT[dtype]}.f32"](words[index], hi, lo)


def wgmma_op(n: int, dtype: str) -> str:
    """The PTX name of a warpgroup MMA of 64 x ``n`` x 16 with float32 accumulators on
    ``dtype`` operands (``T.ptx[...]``; ss or rs by its arguments)."""
    ab = WGMMA_TYPES[dtype]
    return f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ab}.{ab}"


def core_matrix_elem(base, u, c, d: int):
    """Element (row ``u``, column ``c``) of a ``[*, d]`` operand at ``base`` in the wgmma layout
    without swizzle: 8x8 core matrices of 128 contiguous bytes, row-major over ``(u // 8, c //
    8)`` (ints or TIR expressions)."""
    return base + ((u // 8) * (d // 8) + c // 8) * 64 + (u % 8) * 8 + c % 8


def swizzle128_elem(base, rows: int, u, c):
    """Element (row ``u``, column ``c``) of a ``[rows, d]`` block that TMA landed at ``base``
    (1024-byte aligned) with the 128-byte swizzle of :func:`encode_row_block_map`: the 64-column
    halves of the rows one after the other (``[d / 64, rows, 64]``), and 16-byte chunk ``(c % 64)
    // 8`` of row ``u`` stored at chunk ``((c % 64) // 8) ^ (u % 8)`` of its 128-byte row."""
    return base + (c // 64) * (rows * 64) + u * 64 + T.bitwise_xor((c % 64) // 8, u % 8) * 8 + c % 8


def swizzled_k_major_desc(desc, smem, base, rows: int):
    """Encode ``desc`` as the wgmma descriptor of k-step 0 (16 columns) of a ``[rows, d]`` block
    at ``base`` in the layout of :func:`swizzle128_elem`, read K-major (the B operand of ``X
    B^T``): 32 bytes along the swizzled row, a new 64-column half every 4 steps, 8-row groups
    1024 bytes apart (SBO 64 in 16-byte units; LBO unused), 128-byte swizzle (mode 3). Step
    ``kk``: :func:`advance_desc` by :func:`k_major_step`. A TIR expression."""
    return T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc), T.address_of(smem[base]), 1, 64, 3)


def k_major_step(kk, rows: int, swizzled: bool):
    """16-byte units from k-step 0 to k-step ``kk`` (16 columns each) of a ``[rows, d]`` operand
    read K-major: in the layout of :func:`swizzle128_elem` (32 bytes along the swizzled row, a
    new 64-column half, ``rows`` x 128 bytes on, every 4 steps) or of :func:`core_matrix_elem`
    (core matrices 128 bytes apart along K)."""
    return (kk // 4) * (rows * 8) + (kk % 4) * 2 if swizzled else kk * 16


def mn_major_step(kc, d: int, swizzled: bool):
    """16-byte units from row 0 to row ``16 kc`` of a ``[rows, d]`` operand read MN-major: in the
    layout of :func:`swizzle128_elem` (16 rows of 128 bytes) or of :func:`core_matrix_elem` (two
    8-row groups of ``d / 8`` core matrices of 128 bytes)."""
    return kc * 128 if swizzled else kc * 2 * d


def swizzled_mn_major_desc(desc, smem, base, rows: int):
    """Encode ``desc`` as the wgmma descriptor of rows 0 to 15 of a ``[rows, d]`` block at
    ``base`` in the layout of :func:`swizzle128_elem`, read MN-major (the B operand of ``A B``
    over the rows): 16 swizzled rows, 8-row groups 1024 bytes apart (SBO 64), the 64-column
    halves ``rows`` x 128 bytes apart (LBO), 128-byte swizzle. Rows ``16 kc`` on:
    :func:`advance_desc` by :func:`mn_major_step`. A TIR expression."""
    return T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc), T.address_of(smem[base]), rows * 8, 64, 3)


def advance_desc(desc, units):
    """The wgmma descriptor ``desc`` (uint64) of an operand ``units`` 16-byte units further on in
    shared memory: its start address (bits 0-13, in 16-byte units) plus ``units``; the other
    fields are kept. Exact while the operand stays inside the block's shared memory (under
    256 KB, so the field never carries). Encoding each k-step's descriptor from its address
    instead costs a generic-to-shared conversion, shifts and masks per operand per wgmma (about
    8 uniform-datapath instructions per wgmma in the SASS); advancing one per product: window
    +-1024 n=32k d=128 1.288 -> 1.257 ms, Mistral n=8k 0.865 -> 0.830 (H200, fp16,
    ``h200_forward_ab.json`` run ``twentieth_descriptors``)."""
    return desc + T.Cast("uint64", units)


def encode_row_block_map(tmap, data, heads: int, n: int, d: int, rows: int, dtype: str, step: int = 1):
    """Host side: encode ``tmap`` as the tensor map of a ``[heads, n, d]`` tensor (``heads``:
    batch x heads, flattened) whose boxes are ``rows`` sequence rows of one head, ``step`` apart,
    landing as :func:`swizzle128_elem` reads them. Dimensions innermost first: 64 elements (128
    bytes: one swizzle row), sequence rows, 64-column halves, heads; rows past ``n`` arrive as
    zeros. With ``step > 1`` (``n`` a multiple of it: the rows of a dilated mask's column
    blocks, ``r, r + step, ...``) the rows are two dimensions, the residue ``r`` (box 1) and
    the row within the residue class (stride ``step`` rows, box ``rows``): the box lands in
    the same layout."""
    if step == 1:
        return T.tensormap_encode_tiled(tmap, data, 64, n, d // 64, heads, d * 2, 128, n * d * 2,
                                        64, rows, d // 64, 1, 1, 1, 1, 1, descriptor_dtype=dtype, rank=4, swizzle=3)
    if not tma_loads_step(step, n):
        raise ValueError(f"a tensor map of rows {step} apart needs n a multiple of the step, got n={n}")
    return T.tensormap_encode_tiled(tmap, data, 64, step, n // step, d // 64, heads,
                                    d * 2, step * d * 2, 128, n * d * 2,
                                    64, 1, rows, d // 64, 1, 1, 1, 1, 1, 1, descriptor_dtype=dtype, rank=5, swizzle=3)


def tma_copy_rows(smem, offset, tmap, row0, head, ready, st, step: int = 1, policy=None):
    """One TMA copy: the box of :func:`encode_row_block_map`'s ``tmap`` (of the same ``step``)
    whose first row is sequence row ``row0`` of flattened head ``head`` -> ``smem[offset]``,
    completing its bytes on mbarrier ``ready[st]`` (a TIR expression; one thread issues it,
    after the barrier's ``expect_tx``). A row before 0 or past n arrives as zeros. ``policy``
    (a uint64 from :func:`create_l2_policy`): the copy's L2 cache hint."""
    coords = (0, row0, 0, head) if step == 1 else (0, T.floormod(row0, step), T.floordiv(row0, step), 0, head)
    dst = T.cuda.cvta_generic_to_shared(T.address_of(smem[offset]))
    tmap_ptr = T.reinterpret(T.handle().ty, T.address_of(tmap))
    bar = T.cuda.cvta_generic_to_shared(T.address_of(ready[st]))
    if policy is not None:
        return T.ptx[f"cp.async.bulk.tensor.{len(coords)}d.shared::cluster.global.mbarrier::complete_tx::bytes"
                     ".L2::cache_hint"](dst, tmap_ptr, *coords, bar, policy)
    return T.ptx.cp(dst, tmap_ptr, *coords, bar, "async", "bulk", "tensor", f"{len(coords)}d", "shared::cluster",
                    "global", "", "mbarrier::complete_tx::bytes", "", "", "", "")


def tma_store_rows(tmap, row0, head, smem, offset, policy=None):
    """One TMA store: the box of ``tmap`` (a ``[heads, n, d]`` tensor map, step 1) whose first
    row is sequence row ``row0`` of flattened head ``head`` <- ``smem[offset]`` (its layout),
    in a bulk group the issuing thread commits. ``policy`` (a uint64 from
    :func:`create_l2_policy`): the store's L2 cache hint. A TIR expression."""
    tmap_ptr = T.reinterpret(T.handle().ty, T.address_of(tmap))
    src = T.cuda.cvta_generic_to_shared(T.address_of(smem[offset]))
    if policy is not None:
        return T.ptx["cp.async.bulk.tensor.4d.global.shared::cta.bulk_group.L2::cache_hint"](
            tmap_ptr, 0, row0, 0, head, src, policy)
    return T.ptx.cp(tmap_ptr, 0, row0, 0, head, src, "async", "bulk", "tensor", "4d", "global", "shared::cta", "",
                    "bulk_group", "")


#: the L2 eviction priorities a kernel's copies can hint (:func:`create_l2_policy`)
L2_PRIORITIES = ("evict_first", "evict_last")


def create_l2_policy(policy, priority: str):
    """``createpolicy.fractional`` (fraction 1: every access the policy covers) of L2
    ``priority`` (:data:`L2_PRIORITIES`) into ``policy`` (a uint64 register: a local buffer's
    element), for the ``.L2::cache_hint`` operand of a copy. A TIR expression."""
    if priority not in L2_PRIORITIES:
        raise ValueError(f"an L2 priority is one of {L2_PRIORITIES}, got {priority!r}")
    return T.ptx[f"createpolicy.fractional.L2::{priority}.b64"](policy)


def check_l2_hints(kv_evict_last: bool, out_evict_first: bool, tma: bool, persistent: int) -> None:
    """Raise ``ValueError`` unless the L2 hints (:func:`tiled_mma_func`'s ``kv_evict_last`` and
    ``out_evict_first``) are bools, on only for the forms with the copies they hint: the TMA
    forms' K/V tensor copies, the persistent form's TMA store of O."""
    for name, value in (("kv_evict_last", kv_evict_last), ("out_evict_first", out_evict_first)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    if kv_evict_last and not tma:
        raise ValueError("kv_evict_last is an L2 hint of the TMA forms' K/V copies: it needs tma=True")
    if out_evict_first and not persistent:
        raise ValueError("out_evict_first is an L2 hint of the persistent form's TMA store of O: it needs "
                         "persistent > 0")


@T.macro
def init_stage_barriers(ready, stages: int, tid):
    # thread 0: one mbarrier per stage, one arrival (the issuing thread's) per use
    if tid == 0:
        for st in T.unroll(stages):
            T.ptx.mbarrier.init.shared.b64(T.cuda.cvta_generic_to_shared(T.address_of(ready[st])), T.uint32(1))
        T.ptx.fence("mbarrier_init", "release", "cluster", "")


@T.macro
def issue_tma_pair(smem, ready, st, nbytes, first_map, first_offset, second_map, second_offset, row0, head,
                   step: int, evict_last: bool):
    # one thread: stage st's mbarrier expects the ``nbytes`` of both copies, then the two tensor
    # copies (rows row0, row0 + step, ... of flattened head ``head``; rows past n arrive as
    # zeros) land at the two offsets, with L2's evict_last hint if ``evict_last``. The fence
    # orders the generic-proxy accesses of the stage's previous block before the copies' writes
    T.ptx["fence.proxy.async.shared::cta"]()
    T.ptx.mbarrier(T.cuda.cvta_generic_to_shared(T.address_of(ready[st])), T.uint32(nbytes),
                   "arrive", "expect_tx", "", "", "shared", "b64", "")
    if evict_last:
        policy = T.alloc_local((1,), "uint64")
        T.evaluate(create_l2_policy(policy[0], "evict_last"))
        T.evaluate(tma_copy_rows(smem, first_offset, first_map, row0, head, ready, st, step, policy[0]))
        T.evaluate(tma_copy_rows(smem, second_offset, second_map, row0, head, ready, st, step, policy[0]))
    else:
        T.evaluate(tma_copy_rows(smem, first_offset, first_map, row0, head, ready, st, step))
        T.evaluate(tma_copy_rows(smem, second_offset, second_map, row0, head, ready, st, step))


def chunk_position(i, chunks_per_row: int, core_rows_first: bool):
    """``(row, first column)`` of the ``i``-th 16-byte chunk (8 elements) of a ``[rows, 8 *
    chunks_per_row]`` operand copied into shared memory (``i``: an int or a TIR expression).
    Along the row by default (chunk ``i`` of a padded row-major layout). ``core_rows_first``
    (the layout of :func:`core_matrix_elem`): down the 8 rows of a core matrix first, so that
    the 8 threads of one shared-memory phase fill one core matrix; along a row their chunks
    would sit 128 B apart, in the same 4 banks (an 8-way conflict). ``rows`` must be a multiple
    of 8 there."""
    if core_rows_first:
        return i // (8 * chunks_per_row) * 8 + i % 8, i // 8 % chunks_per_row * 8
    return i // chunks_per_row, i % chunks_per_row * 8


def mma_tile_rows(warps: int, m_tiles: int) -> int:
    """Rows of a tile: 16 per m-tile, ``m_tiles`` per warp."""
    return 16 * warps * m_tiles


def check_mma_shape(spec: AttentionSpec, br: int, bc: int, warps: int, m_tiles: int) -> None:
    """Raise ``ValueError`` when the warp-level kernel cannot run this spec and tile shape."""
    if spec.dtype not in MMA_TYPES:
        raise ValueError(f"the mma kernel needs float16 or bfloat16 inputs, got {spec.dtype}")
    if spec.head_dim % 16:
        raise ValueError(f"the mma kernel needs head_dim a multiple of 16, got {spec.head_dim}")
    if bc % 16:
        raise ValueError(f"the mma kernel needs bc a multiple of 16, got {bc}")
    if br != mma_tile_rows(warps, m_tiles):
        raise ValueError(f"the mma kernel needs br == 16 * warps * m_tiles "
                         f"({mma_tile_rows(warps, m_tiles)}), got br={br}")


def check_wgmma_shape(spec: AttentionSpec, br: int, bc: int, warps: int, m_tiles: int) -> None:
    """Raise ``ValueError`` when the warpgroup form cannot run this spec and tile shape: one
    warpgroup (4 warps) per 64 rows, one 16-row m-tile per warp, ``bc`` and ``head_dim``
    multiples of 16 up to 256 (wgmma's N)."""
    check_mma_shape(spec, br, bc, warps, m_tiles)
    if warps % 4 or m_tiles != 1:
        raise ValueError(f"the wgmma kernel needs whole warpgroups (warps a multiple of 4) and m_tiles=1, "
                         f"got warps={warps}, m_tiles={m_tiles}")
    if bc > 256 or spec.head_dim > 256:
        raise ValueError(f"the wgmma kernel needs bc and head_dim <= 256, got bc={bc}, head_dim={spec.head_dim}")


def check_tma_shape(spec: AttentionSpec, wgmma: bool, stages: int) -> None:
    """Raise ``ValueError`` when the TMA form cannot run: it is a form of the two-stage wgmma
    kernel, and its K/V tensor maps cut head_dim into 64-element (128-byte) swizzle rows."""
    if not wgmma or stages != 2:
        raise ValueError(f"the TMA form is a form of the two-stage wgmma kernel, got wgmma={wgmma}, stages={stages}")
    if spec.head_dim % 64:
        raise ValueError(f"the TMA form needs head_dim a multiple of 64, got {spec.head_dim}")


#: registers a producer warpgroup keeps in the warp-specialized form (``setmaxnreg.dec``; 24 is
#: the least the instruction takes: the producer holds a loop counter, addresses and the
#: tensor maps' pointers), and the most its consumers ask for (``setmaxnreg.inc``)
WS_PRODUCER_REGS = 24
WS_CONSUMER_REGS_MAX = 240


def consumer_registers(consumer_threads: int, blocks_per_sm: int, producer_regs: int) -> int:
    """The registers a consumer thread of the warp-specialized form asks for (``setmaxnreg.inc``)
    beside a producer warpgroup that keeps ``producer_regs`` (``setmaxnreg.dec``), with
    ``blocks_per_sm`` thread blocks of ``consumer_threads + 128`` threads a SM: the launch gives
    each thread ``65536 / (blocks x threads)`` rounded down to 8, and the consumers may take only
    what the producer gave back to the thread block (asked for more, their ``setmaxnreg.inc``
    waits forever), rounded down to 8 and at most :data:`WS_CONSUMER_REGS_MAX`. Two consumer
    warpgroups: launch 168, producer 24 -> 240, producer 32 -> 232 (the formula before this one,
    ``(65536 / blocks - 128 producer) / consumer threads``, said 240 there, most likely why a draft
    with it hung on an H100, forty-fifth session); one: launch 128, 24 -> 232, 32 -> 224."""
    launch = 65536 // blocks_per_sm // (consumer_threads + 128) // 8 * 8
    given_back = 128 * (launch - producer_regs)
    return min(WS_CONSUMER_REGS_MAX, (launch + given_back // consumer_threads) // 8 * 8)


def check_warp_specialized_shape(tma: bool, warps: int) -> None:
    """Raise ``ValueError`` unless the warp-specialized form can run: a form of the TMA kernel
    (its producer issues the TMA copies) with one or two consumer warpgroups."""
    if not tma:
        raise ValueError("the warp-specialized form is a form of the TMA kernel (its producer warp issues "
                         "the TMA copies): it needs tma=True")
    if warps not in (4, 8):
        raise ValueError(f"the warp-specialized form needs one or two consumer warpgroups (warps 4 or 8), got {warps}")


def check_persistent(persistent: int, warp_specialized: bool) -> None:
    """Raise ``ValueError`` unless ``persistent`` (thread blocks of the persistent form; 0: off)
    is an int >= 0, and > 0 only for the warp-specialized form (the form it is a variant of)."""
    if isinstance(persistent, bool) or not isinstance(persistent, int) or persistent < 0:
        raise ValueError(f"persistent is a number of thread blocks (0: off), got {persistent!r}")
    if persistent and not warp_specialized:
        raise ValueError(f"the persistent form is a form of the warp-specialized kernel: persistent={persistent} "
                         f"needs warp_specialized=True")


def int_select(cond, a, b):
    """``T.if_then_else`` on Python ints: the ``select`` that evaluates :func:`persistent_program`
    and :func:`program_tile` on the host."""
    return a if cond else b


def persistent_program(it, cta, blocks: int, select=T.if_then_else):
    """The program (index into the grid's ``B H x tiles`` programs, heads first) that thread
    block ``cta`` of the persistent form's ``blocks`` runs in round ``it``: ``it blocks + cta``
    in even rounds and ``it blocks + blocks - 1 - cta`` in odd ones (snake order); a TIR
    expression, or ints with ``select=int_select`` (numpy arrays with ``numpy.where``). The plan's
    programs come longest first, so the block that takes a round's longest program takes the
    next round's shortest (:func:`persistent_block_loads`)."""
    return it * blocks + select(it % 2 == 0, cta, blocks - 1 - cta)


#: row tiles of one head that the warp-level kernel's programs keep together where the grid
#: has GROUPED_MIN_HEADS (batch x heads) or more (:func:`program_tile`). H100, bf16, against
#: heads first (``benchmarks/results/h100_program_order_ab.json``, outputs equal): dense n=2048
#: b=16 (16 heads, d=128) 1.56 -> 1.04 ms (groups of 4: 1.10, a head's tiles all together:
#: 1.14); dense n=8192 b=4 4.22 -> 3.82; window +-256 n=2048 b=16 d=64 0.293 -> 0.243 (0.253,
#: 0.232); Longformer-like n=1024 b=32 0.200 -> 0.166. Below 64 it lost: Mistral's causal
#: window (n=8192, 32 heads) 0.75 -> 0.79 and window +-1024 (n=32k, 16 heads) 1.13 -> 1.14,
#: where heads first already keeps few heads' K and V in L2 at once
PROGRAM_ROW_GROUP = 16
GROUPED_MIN_HEADS = 64


def program_group(grid_heads: int) -> int:
    """The row tiles a head's programs take together in a grid of ``grid_heads`` (batch x
    heads): :data:`PROGRAM_ROW_GROUP` from :data:`GROUPED_MIN_HEADS` on, else 1 (heads first)."""
    return PROGRAM_ROW_GROUP if grid_heads >= GROUPED_MIN_HEADS else 1


def program_tile(program, grid_heads: int, grid_rows: int, group: int, select=T.if_then_else):
    """``(vbh, vt)``, the (batch x head, row tile) of a program of the warp-level kernel's
    ``grid_heads x grid_rows`` programs: the row tiles (the plan's order, longest first) go in
    groups of ``group``, each group over all heads, one head's tiles of the group after another
    (the last group holds what is left). ``group=1`` is heads first: every head's tile t before
    any head's tile t + 1. Heads first, the thread blocks running at once on a short sequence
    and a large batch hold as many heads, whose K and V then pass through L2 once each. Every
    division is by a constant (a group's rows: ``group``, or the last group's ``grid_rows %
    group``), and the program's place in its group is a remainder: written ``program - first
    grid_heads``, TVM's FlattenBuffer built a literal of 2**31, past int32, from it (causal
    strided 128 at n=8192, d=128, batch 4). A TIR expression, or ints with
    ``select=int_select`` (numpy arrays with ``numpy.where``)."""
    if group == 1:
        return program % grid_heads, program // grid_heads
    last = grid_rows % group or group  # the last group's row tiles
    first = program // (grid_heads * group) * group  # the group's first row tile
    within = program % (grid_heads * group)  # (not program - first heads: see above)
    whole = program < grid_rows // group * group * grid_heads  # a group of ``group`` row tiles
    return select(whole, within // group, within // last), first + select(whole, within % group, within % last)


def head_group_tile(program, grid_heads: int, grid_rows: int, head_group: int, select=T.if_then_else):
    """``(vbh, vt)`` of a program in runs of ``head_group`` heads: every row tile of heads 0 ..
    ``head_group - 1`` (heads first within the run: each of its heads' tile t before any of
    their tiles t + 1), then the next run of heads (the last run holds the heads left).
    ``head_group >= grid_heads`` is heads first (:func:`program_tile` with ``group=1``). The
    thread blocks running at once then hold few heads' K and V and move along the sequence
    round after round, so a window's K/V blocks, each wanted by the row tiles about it, stay
    in L2 between rounds, where heads first spreads one round over every head. Divisions by
    constants only, as in :func:`program_tile`. A TIR expression, or ints with
    ``select=int_select`` (numpy arrays with ``numpy.where``)."""
    if head_group >= grid_heads:
        return program % grid_heads, program // grid_heads
    per_run = head_group * grid_rows
    last = grid_heads % head_group or head_group  # the last run's heads
    first = program // per_run * head_group  # the run's first head
    within = program % per_run
    whole = program < grid_heads // head_group * per_run  # a run of ``head_group`` heads
    return first + select(whole, within % head_group, within % last), select(whole, within // head_group, within // last)


def check_head_group(head_group: int) -> None:
    """Raise ``ValueError`` unless ``head_group`` (heads a run of the program order takes,
    :func:`head_group_tile`; 0: the default order, :func:`program_group`) is an int >= 0."""
    if isinstance(head_group, bool) or not isinstance(head_group, int) or head_group < 0:
        raise ValueError(f"head_group is a number of heads (0: the default program order), got {head_group!r}")


def persistent_block_loads(program_blocks, blocks: int) -> list[int]:
    """The column blocks each of the persistent form's ``blocks`` thread blocks walks, given
    each program's (``program_blocks[p]``, in program order: :func:`program_block_counts`): the
    largest of them bounds the kernel's time. On the tile plan of Mistral's causal window
    (n=8192, 32 heads, 128 x 128 tiles) over 132 thread blocks the snake order gives the
    busiest 384, the mean; the round robin of the twenty-second session (``it blocks + cta``)
    gave it 400."""
    program_blocks = numpy.asarray(program_blocks, dtype=numpy.int64)
    rounds = numpy.arange(-(-len(program_blocks) // blocks))[:, None]
    programs = persistent_program(rounds, numpy.arange(blocks)[None, :], blocks, numpy.where)
    taken = programs < len(program_blocks)
    return numpy.where(taken, program_blocks[numpy.where(taken, programs, 0)], 0).sum(axis=0).tolist()


def program_block_counts(tile_lengths, grid_heads: int, head_group: int) -> numpy.ndarray:
    """The column blocks of each of the grid's ``grid_heads x T`` programs, in program order
    (:func:`head_group_tile` with ``head_group``, else :func:`program_tile`, as the kernel takes
    them), from ``tile_lengths [mask_heads, T]`` (a tile plan's ``blk_hi - blk_lo``; mask head
    ``vbh % mask_heads``, exact as ``mask_heads`` is 1 or the heads). int64 ``[grid_heads x T]``:
    what :func:`persistent_block_loads` takes."""
    tile_lengths = numpy.asarray(tile_lengths)
    rows = tile_lengths.shape[1]
    programs = numpy.arange(grid_heads * rows)
    if head_group:
        vbh, vt = head_group_tile(programs, grid_heads, rows, head_group, numpy.where)
    else:
        vbh, vt = program_tile(programs, grid_heads, rows, program_group(grid_heads), numpy.where)
    return tile_lengths[vbh % tile_lengths.shape[0], vt].astype(numpy.int64)


def busiest_block(tile_lengths, grid_heads: int, head_group: int, blocks: int) -> int:
    """The column blocks the busiest of the persistent form's ``blocks`` thread blocks walks,
    the programs in the order of ``head_group`` (0: the default order): what bounds the kernel's
    time (:func:`program_block_counts`, :func:`persistent_block_loads`)."""
    return max(persistent_block_loads(program_block_counts(tile_lengths, grid_heads, head_group), blocks))


#: the variants of the warp-specialized form's block loop (:func:`tiled_mma_func`): the only
#: loop that issues S before the previous P V and runs its softmax beside that P V
LOOP_VARIANTS = ("early_rescale", "softmax_overlap")


def check_loop_variant(name: str, value: bool, warp_specialized: bool) -> None:
    """Raise ``ValueError`` unless the loop variant ``name`` (:data:`LOOP_VARIANTS`) is a bool,
    True only for the warp-specialized form."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    if value and not warp_specialized:
        raise ValueError(f"{name} is a form of the warp-specialized kernel: it needs warp_specialized=True")


def check_fold_scale(fold_scale: bool, warp_specialized: bool) -> None:
    """Raise ``ValueError`` unless ``fold_scale`` is a bool, False for the warp-specialized
    form (which always folds the scale into the exponent)."""
    if not isinstance(fold_scale, bool):
        raise ValueError(f"fold_scale must be a bool, got {fold_scale!r}")
    if fold_scale and warp_specialized:
        raise ValueError("fold_scale is for the forms other than the warp-specialized one, which always folds the "
                         "scale into the exponent")


def named_barrier(barrier, threads: int):
    """``bar.sync barrier, threads``: wait until ``threads`` threads (a multiple of 32) reached
    named barrier ``barrier`` (1-15; 0 is ``__syncthreads``'s); orders their shared-memory
    accesses like ``__syncthreads``. A TIR expression."""
    return T.ptx["bar.sync"](T.Cast("uint32", barrier), T.uint32(threads))


def check_tma_plan(blocks, which: str, knob: str) -> None:
    """Raise ``ValueError`` unless every column block of a plan (``blocks [HM, NB, 3]``: first
    row, step, FULL; ``which`` names the plan, ``knob`` the setting that avoids TMA) steps rows
    by one, as the TMA forms' tensor maps do (a box is consecutive rows)."""
    if (blocks[..., 1] > 1).any():
        raise ValueError(f"the TMA form loads column blocks of step 1 only; {which} has blocks of step "
                         f"{int(blocks[..., 1].max())} (dilated or strided): use {knob}")


def tma_loads_step(step: int, n: int) -> bool:
    """Whether the TMA form's tensor map loads the column blocks of a plan whose blocks share the
    step ``step`` (``PlanShape.step``; 0: steps differ) for sequences of ``n``: one step, and
    ``n`` a multiple of it (:func:`encode_row_block_map`)."""
    return step >= 1 and n % step == 0


def check_tma_step(step: int, n: int, which: str, knob: str) -> None:
    """Raise ``ValueError``, saying which condition fails, unless :func:`tma_loads_step`."""
    if step < 1:
        raise ValueError(f"the TMA form loads column blocks of one step; {which} mixes steps "
                         f"(a union such as causal strided): use {knob}")
    if n % step:
        raise ValueError(f"the TMA form loads column blocks of step {step} only where the sequence "
                         f"length is a multiple of it; {which} has n={n}: use {knob}")


def columns_below(x, lane, ntl: int):
    """How many of a thread's columns of a block row lie left of block column ``x`` (int32).

    The thread's ``2 ntl`` columns of a row, ``k = 0 .. 2 ntl - 1``, are ``c_k = 8 (k // 2) +
    2 (lane % 4) + k % 2``: the accumulator layout of ``mma.sync`` m16n8 and of ``wgmma``
    alike, ``ntl`` tiles of 8 columns. They increase with ``k``, so the ones left of ``x`` are
    the first ``columns_below`` of them: the even ``k`` with ``8 (k // 2) + 2 (lane % 4) < x``
    and the odd with one more (an arithmetic shift floors a negative difference)."""
    return (T.min(T.max(T.shift_right(x - lane % 4 * 2 + 7, 3), 0), ntl)
            + T.min(T.max(T.shift_right(x - lane % 4 * 2 + 6, 3), 0), ntl))


def low_bits(m):
    """The uint32 word of the ``m`` lowest bits, ``0 <= m <= 32`` (a shift by 32 is undefined in
    CUDA C, so 32 is its own case)."""
    return T.if_then_else(m >= 32, T.bitwise_not(T.uint32(0)),
                          T.shift_left(T.uint32(1), T.Cast("uint32", m)) - T.uint32(1))


def row_column_bits(rng, r, lane, segments: int, ntl: int):
    """The uint32 word of a thread's columns of row slot ``r`` that lie in one of its block
    ranges, bit ``k`` for column ``c_k`` (:func:`columns_below`; ``2 ntl <= 32``): ``rng`` as
    ``block_range_cache``'s ``block_ranges`` leaves it, ``rng[2 (r segments + s)] ..
    rng[2 (r segments + s) + 1]`` the block columns of segment ``s`` (empty: ``1 .. 0``). A
    range ``[lo, hi]`` holds bits ``columns_below(lo)`` up to ``columns_below(hi + 1) - 1``.
    The masked scores then take one bit test each where the ranges took ``2 segments``
    integer compares (window +-1024 d=128 on an H100, sustained: bf16 +1.2%, fp16 +2.2%;
    ``benchmarks/results/h100_window1024_sustained.json``)."""
    word = T.uint32(0)
    for s in range(segments):
        word = T.bitwise_or(word, T.bitwise_and(
            low_bits(columns_below(rng[(r * segments + s) * 2 + 1] + 1, lane, ntl)),
            T.bitwise_not(low_bits(columns_below(rng[(r * segments + s) * 2], lane, ntl)))))
    return word


def tiled_mma_func(spec: AttentionSpec, plan_shape, warps: int = 4, m_tiles: int = 1, stages: int = 2,
                   wgmma: bool = False, tma: bool = False, with_lse: bool = False, warp_specialized: bool = False,
                   persistent: int = 0, lazy_rescale: bool = False, early_rescale: bool = False,
                   softmax_overlap: bool = False, fold_scale: bool = False, head_group: int = 0,
                   kv_evict_last: bool = False, out_evict_first: bool = False):
    """The warp-level tiled kernel for ``spec`` and a plan of shape ``plan_shape``
    (``plan_shape.br == 16 * warps * m_tiles``); signature of
    :func:`~tvm_splat.kernels.tiled.tiled_func`.

    ``stages=2``: K/V blocks are double-buffered and fetched with ``cp.async`` one block ahead
    (one barrier per block); ``stages=1``: plain 16-byte loads, two barriers per block.
    ``wgmma=True`` (Hopper, sm_90a): the two GEMMs are warpgroup MMAs (see :func:`check_wgmma_shape`);
    with ``stages=4`` they are also *pipelined*: ``S`` of block ``j + 1`` is issued (into a
    second accumulator set) before the softmax of block ``j`` and ``P V`` of block ``j`` is
    left running into the next block, so the tensor cores work while the CUDA cores do the
    softmax; K/V are fetched two blocks ahead (four stages: the stage a load overwrites was
    last read two blocks before, which one barrier per block proves finished). Correct (GPU
    tests) but slower than ``stages=2`` on every case measured on the H200 (window:1024 n=32k
    d=128: 3.20 vs 2.38 ms with two warpgroups; 1.3-1.9x slower at d=64;
    ``benchmarks/results/h200_wgmma_pipelined_ab.json``): its 176 KB of shared memory leave one
    thread block per SM where the two-stage form runs two, whose softmax and MMAs already
    overlap each other. Kept as an opt-in knob, outside the tuning space, as the base for a
    warp-specialized form with fewer stages.

    ``tma=True`` (with ``wgmma`` and two stages): K and V blocks arrive by TMA
    (``cp.async.bulk.tensor``), one thread issuing both copies of a block against an mbarrier
    of its stage that every thread then waits on, instead of 128-256 threads each issuing
    ``cp.async`` chunks; the blocks land 128-byte swizzled (:func:`check_tma_shape`), which the
    wgmma descriptors and every shared read of K/V follow. For plans whose column blocks share
    one step (``plan_shape.step``: 1, or a dilated mask's dilation, with n a multiple of it,
    :func:`check_tma_step`): the tensor map steps rows by it (:func:`encode_row_block_map`);
    key rows past a length are not zero-filled (their scores are selected away and every
    block crossing the length at its last row checks its V, as PARTIAL blocks do).

    ``warp_specialized=True`` (with ``tma``; warps 4 or 8): FlashAttention-3's arrangement. A
    producer warpgroup beside the ``W`` consumer warps, its first thread issuing every K and V
    copy of the tile (each on an mbarrier of its own) as soon as the consumers released the
    stage (one mbarrier arrival per consumer warp; a K stage once its S is computed, a V stage
    once its P V is); ``setmaxnreg`` moves the producer's registers to the consumers (one
    thread block per SM with two consumer warpgroups, two with one). Each consumer warpgroup
    walks the tile's blocks at its own pace with no CTA-wide barrier: S of block j and P V of
    block j - 1 are issued together and the softmax of block j runs while that P V does, and
    two consumer warpgroups take turns issuing their GEMMs (named barriers), so that one's
    softmax overlaps the other's tensor-core work. A warpgroup checks the V of its own blocks
    for non-finite values and runs the exact path by PTX shared loads and stores (TVM's barrier
    planner would need a barrier inside the consumers' branch). H200: 3-6% faster than the
    two-block TMA form at d=128 on large grids, slower at d=64 and on small grids
    (:data:`~tvm_splat.schedules.tiled.WARP_SPECIALIZED_MIN_TILES`); ``ncu`` of window +-1024
    n=32k put the tensor pipe at 51% (two-block form) and 48% (this form before the turns) of
    its peak.

    ``persistent=P`` (P > 0, with ``warp_specialized``): the persistent form of the
    warp-specialized kernel. ``P`` thread blocks (grid ``(P, 1)``) walk the grid's ``B H x
    tiles`` programs in rounds, program ``it P + cta`` in round ``it`` (``it P + P - 1 - cta``
    in odd rounds: snake order, since the twenty-sixth session), heads first (program ``p``:
    ``vbh = p % (B H)``, ``vt = p // (B H)``, so the first round takes every head's first
    (heaviest) row tile, as the grid's dispatch order does). The snake order balances the
    plan's programs of unequal length (longest first) as the GPU's dispatch of a grid does: on
    Mistral's causal window (n=8192, 32 heads, P = 132) the busiest thread block walks 384 column
    blocks, the mean, where the round robin before it walked 400 (4% longer; it measured 2.2-2.5%
    slower than the grid form, below). The mbarriers are set up once; the
    producer thread and the consumer warpgroups each loop over the rounds on their own, stage,
    phase and V tag of a block taken from a running count of the blocks walked so far, so that
    the producer's copies run on into the next tile while the consumers finish this one. The
    consumers reset their state per tile. Since the twenty-sixth session each consumer
    warpgroup runs on its own across tiles: it loads its own 64 Q rows and waits on its own
    named barrier (none over both groups), and with two groups their turns at the tensor cores
    alternate across tiles as within one (warpgroup 1 passes a turn before the rounds and
    every turn it takes, warpgroup 0 takes one after them), so that one group's last P V, O
    stores and next tile's start run beside the other group's GEMMs, as FlashAttention-3's
    persistent kernel does. And each reads the next tile's start ahead: its Q rows land by
    ``cp.async`` in its half of the other of two Q slots while this tile runs, and its rows'
    segments are loaded once this tile's last softmax is done, while its last P V runs and O
    is stored. The ``ncu`` profile of the grid form (window +-1024, H100,
    ``benchmarks/README.md``) put about a fifth of the consumers' samples in a tile's fixed
    costs (7.6% in its setup and Q load), the tensor cores idle there (one block per SM, its
    two groups meeting at a barrier at each tile's start). The second Q slot costs ``br d`` elements of shared memory (224 KB at d=128, bc=128,
    two consumer warpgroups; 227 KB is the limit). SASS (``benchmarks/sass_block_path.py``,
    window +-1024 d=128 fp16): 502 instructions a FULL block (the grid form 511, the persistent
    form before these changes 522) and no spill (16 and 8 bytes). H100 (``h100_forward_ab.json``
    run ``twenty_sixth_persistent``, trees before and after, three alternations, both forms in
    each process): faster than the grid form in all 12 pairs, window +-1024 by 1.0-2.2% (fp16)
    and 2.7-3.7% (bf16), Mistral's causal window by 1.0-6.3% (fp16) and 3.8-6.2% (bf16), outputs
    identical; 130 GPU ids pass. So the planner's default where a plan has a GPU
    (:func:`tvm_splat.planner.persistent_default`). Before these changes, H200 (``h200_forward_ab.json`` run
    ``twenty_second_persistent``, P = 132, both forms in one process, 50 back-to-back calls):
    window +-1024, n=32k, 16 heads, d=128 1.238 -> 1.232 ms fp16, 1.200 -> 1.193 bf16 (0.5%,
    within run-to-run noise), Mistral's causal window 4096, n=8192, 32/8 heads 0.834 -> 0.853
    fp16, 0.806 -> 0.826 bf16 (2.2-2.5% slower): the per-tile start and end it hides are small
    beside a tile's 17 blocks, and its fixed round-robin order balances the causal plan's
    tiles of unequal length worse than the GPU's own dispatch of a grid's thread blocks. So it
    was an opt-in knob then; 110 GPU ids passed before these changes (``tests/gpu -k
    persistent``).

    ``lazy_rescale=True`` (any form): a row's running max is raised only when a block's max
    exceeds it by more than :data:`RESCALE_THRESHOLD` (else the block's probabilities are
    taken against the old max, at most ``2 ** RESCALE_THRESHOLD``), and a warp multiplies its O
    accumulators by the rescale factors only when one of its rows moved its max (a warp vote,
    one branch uniform over the warp). The row sums and O stay in the same units, so the
    output, the log-sum-exp and the split-KV states are those of the exact running max up to
    rounding. Once a row's max has settled (after its first blocks, on typical scores) a block
    skips the ``MT * DT * 4`` multiplies of O: SASS of window +-1024 d=128, warp-specialized
    (fp16 and bf16, by cuobjdump), 511 instructions a thread a FULL block without the knob; with
    it 462 where the warp keeps its maxima and 526 where a row moves one (the vote, the selects).
    Not faster on the H100 (``benchmarks/results/h100_forward_ab.json``, runs
    ``twenty_fifth_*``, one run a case): within +-1.4% of the plain loop in the warp-specialized
    form (window +-1024 and Mistral's causal window, d=128, fp16 and bf16) and +-1.3% in the
    d=64 TMA form, so an opt-in knob, neither a default nor in the tuning space.

    ``early_rescale=True`` (with ``warp_specialized``): a consumer warpgroup multiplies O by a
    block's rescale factors after issuing the next block's S, while that GEMM runs and before
    it issues the block's P V (FlashAttention's ``RescaleOBeforeGemm``), instead of after the
    previous P V completed, where the multiplies sit between the softmax and the group's next
    turn at the tensor cores: the same instructions (the path stays 511 a FULL block), moved
    out of the window in which one group's softmax must fit the other group's GEMMs. H100, the
    same two cases, fp16 and bf16, same-process pairs against the plain loop: faster in 19 of
    24, median 1.2%, outputs identical; so the warp-specialized form's default and its program
    in the tuning space (:func:`~tvm_splat.schedules.tiled.with_measured_variants`).

    ``softmax_overlap=True`` (with ``warp_specialized``): the softmax of block j runs while P V
    of block j - 1 is on the tensor cores, as the loop is written. Without it ptxas hoists the
    wait for that P V (``WARPGROUP.DEPBAR.LE gsb0, 0x0``) above the whole softmax, to the first
    instructions after S's wait, so that none of the block's 66 exponentials (MUFU) overlaps
    the P V: it schedules within a basic block and a wait looks cheap to it. This form ends the
    softmax with a warp-uniform branch on the row sums (a vote on a negative sum, which a sum
    of exponentials never is, around a 0 ns sleep) that the wait cannot move above. SASS of
    window +-1024 d=128 fp16 (``benchmarks/sass_block_path.py``): the wait at instruction 126
    of 511, all 66 MUFU after it; with the branch, 516 instructions, the 66 MUFU at 213-395
    and the wait at 410, with the same 168 registers and 16-byte spill and no wgmma
    serialization (a ``trap`` in the branch instead made ptxas fall back to 168 registers in
    the consumers, spill 332 bytes and serialize the wgmma). The H100's own compiler (NVRTC of
    CUDA 13, as TVM's loader calls it: ``sass_block_path.py --compiler runtime``) hoists the
    wait the same way (508 instructions, 0 of 66 MUFU between the waits). Yet the branch did not
    pay on the H100, one run a case, fp16 and bf16: 0.4-1.4% slower on window +-1024, 0.3-1.3%
    faster on Mistral's causal window, 1.4-2.2% slower than the plain loop on both with
    ``early_rescale``. An opt-in knob, neither a default nor in the tuning space.

    ``fold_scale=True`` (the forms other than the warp-specialized one, which always folds): the
    softmax scale goes into the exponent's FFMA, ``2^(s scale - m)``, instead of one FMUL a score
    first and an FADD in the exponent. SASS (``benchmarks/sass_block_path.py``, fp16): the d=64
    TMA form of Longformer-base, of window ±256 b=16 and of dilated ±256 step 2 317 -> 286
    instructions a thread a FULL block; ptxas spills nothing with it on the d=64 TMA, cp.async
    wgmma and mma forms nor on the d=128 mma and cp.async wgmma forms, and 24 bytes on the d=128
    two-block TMA form (128 registers). H100, fp16, d=64 TMA form (+-256 + 4 global, batch 8,
    n=4096; dilated +-256 step 2, n=8192): faster in all 8 same-process pairs, 1.0-3.0%; the
    TMA form's default below d=128 (one warpgroup at d=64) and its TMA programs in the tuning
    space there (:func:`~tvm_splat.schedules.tiled.with_measured_variants`), not of the d=128
    forms (unmeasured there, and the two-block TMA form spills with it).

    ``head_group=G`` (G >= 1): the programs run in runs of G heads, all of their row tiles
    (:func:`head_group_tile`), instead of the default order (heads first below
    :data:`GROUPED_MIN_HEADS` heads, row tiles in groups of :data:`PROGRAM_ROW_GROUP` above:
    :func:`program_tile`). It changes which programs run at once, not a program's code.

    ``kv_evict_last=True`` (with ``tma``) and ``out_evict_first=True`` (with ``persistent``):
    L2 cache hints (``.L2::cache_hint`` with a ``createpolicy`` policy,
    :func:`create_l2_policy`). The first marks the K/V tensor copies ``evict_last``: the tiles of
    one head's window read the same K/V rows, and a row's next reader runs a round or two later.
    The second marks the persistent form's TMA store of O ``evict_first``: nothing reads it
    again. They change only the copies' hints, not what they copy. Q's ``cp.async`` chunks take
    no hint: built by ptxas 13.0 with an ``evict_first`` policy on them, the persistent kernel
    stopped on an illegal instruction, and with the same policy on the O store alone it ran
    (H100, window +-1024, thirty-ninth session), as ptxas 13 before 13.4.59 is reported to
    miscompile ``cp.async`` with a fractional policy (Triton disabled those policies for it).
    Neither hint is a default: see :class:`~tvm_splat.schedules.tiled.TiledKnobs`.

    ``with_lse=True`` (training, :mod:`tvm_splat.kernels.backward_mma`): on a plan of one
    component, a last parameter ``lse [B, H, N]`` float32 receives the natural-log log-sum-exp
    of each row of a whole tile (``-inf`` for a row that attends to nothing); the rows of split
    tiles get theirs from :func:`~tvm_splat.kernels.tiled.split_merge_func` (``with_lse=True``),
    which merges the chunks' states; on a plan of several components the kernel is the one
    without ``with_lse`` (it writes per-component partial states, and the merge,
    :func:`~tvm_splat.kernels.tiled.merge_func` with ``with_lse=True``, writes the lse).
    """
    if stages not in (1, 2, 4) or (stages == 4 and not wgmma):
        raise ValueError(f"stages must be 1 or 2 (or 4 for the pipelined wgmma form), got {stages}")
    if wgmma:
        check_wgmma_shape(spec, plan_shape.br, plan_shape.bc, warps, m_tiles)
    if tma:
        check_tma_shape(spec, wgmma, stages)
        check_tma_step(plan_shape.step, spec.seq_len, "this plan", "tma=False")
    if warp_specialized:
        check_warp_specialized_shape(tma, warps)
    check_persistent(persistent, warp_specialized)
    check_head_group(head_group)
    check_l2_hints(kv_evict_last, out_evict_first, tma, persistent)
    check_loop_variant("early_rescale", early_rescale, warp_specialized)
    check_loop_variant("softmax_overlap", softmax_overlap, warp_specialized)
    check_fold_scale(fold_scale, warp_specialized)
    B, H, KVH, G, N, D = spec.batch, spec.heads, spec.kv_heads, spec.group, spec.seq_len, spec.head_dim
    STEP = plan_shape.step if tma else 1  # rows between a TMA block's rows
    HM, S, dt = spec.mask_heads, spec.max_segments, spec.dtype
    NT, NB, C = plan_shape.num_tiles, plan_shape.num_blocks, plan_shape.num_components
    BR, BC, W, MT = plan_shape.br, plan_shape.bc, warps, m_tiles
    check_mma_shape(spec, BR, BC, W, MT)
    ab = MMA_TYPES[dt]
    direct = C <= 1
    o_shape, ml_shape = partial_shapes(spec, C)
    so_shape, sml_shape = split_shapes(spec, plan_shape)
    DP = D if wgmma else D + ROW_PAD  # elements per shared row (wgmma: 8x8 core matrices, unpadded)
    KD, NTL, KC, DT = D // 16, BC // 8, BC // 16, D // 8  # k-steps of S, n-tiles of S, k-steps of PV, n-tiles of O
    RS = MT * 2  # tile rows per thread
    # P columns staged at a time by the exact P V path: in the Q region for mma (dead once the Q
    # fragments are in registers), in a region of its own for wgmma (which reads Q from shared)
    PW = BC if wgmma or BC <= D + ROW_PAD else 16 * ((D + ROW_PAD) // 16)
    P_CHUNKS = BC // PW
    NTHR = 32 * W
    # the TMA form's registers are capped at 128 a thread (launch bounds: 65536 / (128 NTHR)
    # thread blocks per SM), so that two blocks of 8 warps (d=128) or four of 4 warps (d=64)
    # fit an SM, as their shared memory allows: uncapped, the block-range mask took 129-152
    # registers and one (three) blocks per SM ran; capped, on the H200, window +-1024 n=32k
    # d=128 ran 1.55 -> 1.41 ms and Longformer-base batch 8 0.79 -> 0.48 ms
    # (``benchmarks/results/h200_forward_ab.json``). Only where ptxas meets the cap without
    # spilling, S D <= 128 (one segment at d=128, two at d=64); two segments at d=128 spilled
    # 184 bytes, and the two-component causal_strided form (not TMA) 24 bytes.
    MIN_BLOCKS = 512 // NTHR if tma and S * D <= 128 else 0
    # warp-specialized form: a producer warpgroup (its first thread issues the TMA copies) beside
    # the W consumer warps; one thread block per SM with two consumer warpgroups, two with one.
    # setmaxnreg moves registers from the producer (WS_PRODUCER_REGS) to the consumers: the launch
    # gives every thread 65536 / (blocks x threads) rounded down to 8 (168 at two consumer
    # warpgroups, 128 at one), and the consumers take what the producer gave back: 240 (232 at one)
    PRODUCER_WARPS = 4 if warp_specialized else 0
    FLAG_GROUPS = W // 4 if warp_specialized else 1  # groups whose threads tag a block's V apart
    if warp_specialized:
        MIN_BLOCKS = 8 // W
        CONSUMER_REGS = consumer_registers(NTHR, MIN_BLOCKS, WS_PRODUCER_REGS)
    # persistent form: P thread blocks walk the B H x NT programs, TILE_ROUNDS rounds each
    PERSISTENT = persistent > 0
    GRID_ROWS = tile_grid_rows(NT, "tiled")
    PROGRAMS = B * H * GRID_ROWS
    TILE_ROUNDS = -(-PROGRAMS // persistent) if PERSISTENT else 1
    CH = D // 8  # 16-byte chunks per row
    Q_IT = (BR * CH + NTHR - 1) // NTHR
    KV_IT = (BC * CH + NTHR - 1) // NTHR
    # Q slots: one, or two in the persistent form (the next tile's Q lands in the other while
    # this tile runs; q_slot(it): the slot of the tile of round it)
    Q_SLOTS = 2 if PERSISTENT else 1
    K_OFF = Q_SLOTS * BR * DP
    V_OFF = K_OFF + stages * BC * DP
    P_OFF = V_OFF + stages * BC * DP
    SMEM = P_OFF + (BR * PW if wgmma else 0)
    if SMEM * 2 > SHARED_BYTES_MAX:
        raise ValueError(f"this form needs {SMEM * 2 // 1024} KB of shared memory per block, more than the "
                         f"{SHARED_BYTES_MAX // 1024} KB a block may have (fewer stages, smaller bc or br)")
    # TMA form: K/V rows of 64 elements (128 bytes) per swizzle row, the d-halves one after the
    # other (:func:`swizzle128_elem`; descriptors: :func:`swizzled_k_major_desc`, :func:`swizzled_mn_major_desc`)
    KV_BYTES = BC * D * 2  # one K or V block
    # the swizzle is a function of the shared address: its 1024-byte atoms must start the stages
    SMEM_ALIGN = 1024 if tma else 64
    # wgmma descriptors (no swizzle; fields in 16-byte units): K-major Q and K tiles step 128 B
    # between core matrices along K and D / 8 * 128 B between 8-row groups; V, read transposed
    # (MN-major), steps D / 8 * 128 B between 8-key groups (LBO) and 128 B along d (SBO).
    # Checked on the H200 against numpy (S and O within 1e-6, D = 64 and 128).
    QK_LBO, QK_SBO, V_LBO, V_SBO = 8, D, D, 8
    WG_S, WG_O, PAIR = wgmma_op(BC, dt), wgmma_op(D, dt), WGMMA_PAIR_TYPES[dt]
    scale = T.float32(spec.scale * LOG2E)
    # the warp-specialized form keeps scores unscaled until the exponent, 2^(s scale - m) one
    # FFMA per score (the running max m stays scaled: the block max times the scale, once per
    # row): window +-1024 n=32k d=128 1.259 -> 1.235 ms, Mistral n=8k 0.847 -> 0.818 (H200, fp16,
    # run ``twentieth_descriptors``). The other forms scale each score first (FMUL, then FADD in
    # the exponent) unless fold_scale: at 128 registers (two blocks per SM, TMA, d=128) the fold
    # spilled 48 bytes (24 with TVM's ptxas options); the d=64 forms and the others fold without
    # a spill (fold_scale's docstring)
    SCALE_IN_EXP = warp_specialized or fold_scale
    neg_init = T.float32(NEG_INIT)
    neg_inf = T.min_value("float32")
    zero = T.Cast(dt, T.float32(0))
    full_mask = T.uint32(0xFFFFFFFF)

    # -- index helpers (TIR expressions) --------------------------------------------------
    # the cp.async wgmma form copies 16-byte chunks down the 8 rows of a core matrix first (along
    # a row, a shared-memory phase's 8 chunks sit 128 B apart in the same 4 banks; the backward's
    # wgmma form measured 0.864 -> 0.815 ms for the same change; this form 0.226 -> 0.220 ms,
    # dilated +-512 step 4, n=8192, 8 heads, d=128, H200, benchmarks/results/h200_forward_ab.json
    # form h27_core_rows_first). The mma form's padded rows and the TMA form (K/V by TMA; its Q
    # load and flag checks as before, under the 128-register cap) keep the along-the-row order
    core_rows_first = wgmma and not tma

    def chunk_row(it, tid):  # row of the it-th 16-byte chunk this thread copies
        return chunk_position(it * NTHR + tid, CH, core_rows_first)[0]

    def chunk_col(it, tid):  # first element of that chunk within its row
        return chunk_position(it * NTHR + tid, CH, core_rows_first)[1]

    def tile_row(w, lane, r):  # tile-local row of the thread's row slot r = mt * 2 + half
        return (w * MT + r // 2) * 16 + lane // 4 + 8 * (r % 2)

    def tile_elem(base, u, c):  # element (row u, column c) of a [*, D] tile at ``base``
        return core_matrix_elem(base, u, c, D) if wgmma else base + u * DP + c

    def kv_elem(base, st, u, c):  # element (u, c) of stage st of the K or V ring
        if tma:
            return swizzle128_elem(base + st * BC * D, BC, u, c)
        return tile_elem(base + st * BC * DP, u, c)

    def p_elem(row, c):  # element (row, c) of P staged for the exact P V path
        return (P_OFF + row * PW + c) if wgmma else (row * DP + c)

    def kv_stage(base, st, u):  # offset of row u of stage st of the K or V ring (mma layout)
        return base + (st * BC + u) * DP

    def ldmatrix_x4(frag, offset, smem, smem_offset, trans=False):  # 4 8x8 tiles of shared -> registers
        return T.ptx_legacy.ldmatrix(trans, 4, ".b16", frag.data, offset, smem.access_ptr("r"), smem_offset, dtype=dt)

    def mma_16x8x16(a, a_offset, b, b_offset, c, c_offset):  # c += a b, float32 accumulators
        return T.ptx_legacy.mma("m16n8k16", "row", "col", ab, ab, "fp32", a.data, a_offset, b.data, b_offset,
                                c.data, c_offset, False, dtype="float32")

    # -- steps ---------------------------------------------------------------------------
    @T.macro
    def copy16(dst, src, valid):
        # cp.async of 16 bytes; src-size 0 zero-fills (rows past the tile or the sequence)
        T.evaluate(T.ptx["cp.async.cg.shared.global"](dst, src, 16, T.Cast("uint32", T.if_then_else(valid, 16, 0))))

    @T.macro
    def load_q_tile(smem, q, b, h, row0, rstr, nrows, tid):
        # the tile's Q rows -> shared (16-byte vectors; rows past nrows are zero)
        for it in T.serial(Q_IT):
            if it * NTHR + tid < BR * CH:
                if stages == 1:
                    for e in T.vectorized(8):
                        smem[tile_elem(0, chunk_row(it, tid), chunk_col(it, tid)) + e] = T.if_then_else(
                            chunk_row(it, tid) < nrows,
                            q[b, h, row0 + rstr * chunk_row(it, tid), chunk_col(it, tid) + e], zero)
                else:
                    copy16(T.address_of(smem[tile_elem(0, chunk_row(it, tid), chunk_col(it, tid))]),
                           q.access_ptr("r", offset=((b * H + h) * N + T.if_then_else(
                               chunk_row(it, tid) < nrows, row0 + rstr * chunk_row(it, tid), 0)) * D
                               + chunk_col(it, tid)),
                           chunk_row(it, tid) < nrows)

    @T.macro
    def copy_rows_async(smem, base, src, col0, sig, b, hk, tid, st, it, klen):
        # one 16-byte chunk of the rows col0 + sig * u of ``src`` (K or V) -> stage st at ``base``
        # (rows at or past the key length ``klen`` are zero-filled)
        copy16(T.address_of(smem[kv_elem(base, st, chunk_row(it, tid), chunk_col(it, tid))]),
               src.access_ptr("r", offset=((b * KVH + hk) * N + T.min(
                   col0 + sig * chunk_row(it, tid), N - 1)) * D + chunk_col(it, tid)),
               col0 + sig * chunk_row(it, tid) < klen)

    @T.macro
    def copy_rows(smem, base, src, col0, sig, b, hk, tid, it, klen):
        # the same chunk with a plain 16-byte load (out-of-range rows are zero) -> stage 0
        for e in T.vectorized(8):
            smem[kv_elem(base, 0, chunk_row(it, tid), chunk_col(it, tid)) + e] = T.if_then_else(
                col0 + sig * chunk_row(it, tid) < klen,
                src[b, hk, col0 + sig * chunk_row(it, tid), chunk_col(it, tid) + e], zero)

    @T.macro
    def issue_kv_block(smem, k, v, col0, sig, b, hk, tid, st, klen):
        # cp.async of the K and V rows of a column block -> stage st
        for it in T.serial(KV_IT):
            if it * NTHR + tid < BC * CH:
                copy_rows_async(smem, K_OFF, k, col0, sig, b, hk, tid, st, it, klen)
                copy_rows_async(smem, V_OFF, v, col0, sig, b, hk, tid, st, it, klen)

    @T.macro
    def load_kv_block(smem, k, v, col0, sig, b, hk, tid, klen):
        # plain loads of a column block's K and V rows -> stage 0 (stages == 1)
        for it in T.serial(KV_IT):
            if it * NTHR + tid < BC * CH:
                copy_rows(smem, K_OFF, k, col0, sig, b, hk, tid, it, klen)
                copy_rows(smem, V_OFF, v, col0, sig, b, hk, tid, it, klen)

    @T.macro
    def issue_kv_tma(smem, ready, kmap, vmap, col0, bhk, st):
        # one thread: the K and V blocks at rows col0.. of KV head bhk -> stage st
        issue_tma_pair(smem, ready, st, 2 * KV_BYTES, kmap, K_OFF + st * BC * D, vmap, V_OFF + st * BC * D, col0, bhk,
                       STEP, kv_evict_last)

    # the V check by packed FMAs (every form; common.nonfinite_fma), one chain a word of a
    # thread's 16-byte chunks
    fma_halves = nonfinite_fma(dt)

    @T.macro
    def flag_nonfinite_chunks(smem, vbad, words, nonfinite, st, j, tid, threads, flag):
        # thread ``tid`` of ``threads``: its 16-byte chunks of V's stage st (in the order the
        # copies take them); if an element is NaN or inf, set ``vbad[flag]`` to block j + 1.
        # One packed FMA a word into one of 4 independent chains (the sign bits dropped at the
        # end), where the integer test took 3 operations a word. SASS of window +-1024 d=128, a
        # PARTIAL block's path with the check (sass_block_path.py --require FSEL>=64 --require
        # LDS>=16): 887 -> 793 instructions a thread in bf16, 895 -> 801 in fp16 (HFMA2 64, where
        # LOP3 went 123 -> 29). Held 3 s on an H100, ABBA: the warp-specialized form bf16 +0.7%
        # and fp16 +0.4% (forty-fourth session, benchmarks/results/h100_forty_fourth_ab.json,
        # v_check_fma); the d=64 TMA form +0.4-0.5% (window +-256 and global + window, bf16 and
        # fp16), the mma.sync form level (-0.2%, causal strided d=64) (forty-sixth session,
        # h100_forty_sixth_ab.json); the same registers and no spill in every form (ptxas).
        # Reads and the tag go through PTX on raw shared addresses, which TVM's barrier planner
        # does not track: tracked, it would add a barrier per block (the caller's barrier
        # publishes the tag and orders everything else).
        for c in T.unroll(NONFINITE_CHAINS):
            nonfinite[c] = T.uint32(0)
        for it in T.serial((BC * CH + threads - 1) // threads):
            if it * threads + tid < BC * CH:
                T.ptx.ld.shared.v4.b32(words[0], words[1], words[2], words[3], T.address_of(smem[kv_elem(
                    V_OFF, st, chunk_position(it * threads + tid, CH, core_rows_first)[0],
                    chunk_position(it * threads + tid, CH, core_rows_first)[1])]))
                for i in T.unroll(NONFINITE_CHAINS):
                    fma_halves(nonfinite[i], words[i], T.uint32(0), nonfinite[i])
        nonfinite[0] = nonfinite_joined(nonfinite)
        if nonfinite[0] != T.uint32(0):
            T.ptx.st.shared.b32(T.address_of(vbad[flag]), j + 1)

    @T.macro
    def flag_nonfinite_v(smem, vbad, words, nonfinite, st, j, tid):
        # this thread's own chunks of V's stage st (its cp.async copies, or its stores), the
        # stage's flag tagged with block j; the loop's barrier then publishes the tag
        flag_nonfinite_chunks(smem, vbad, words, nonfinite, st, j, tid, NTHR, st)

    # per thread row: (start, last, sigma) of every segment (sigma 0: none)
    cache_row_segments = row_segment_cache(RS, S, tile_row)
    # the capped TMA form at d=128 (128 registers a thread, no producer warpgroup) keeps the
    # ranges' compares and one path of block_ranges: with the column bits and the unit-step
    # branch ptxas spilled 24 bytes there (12 with the branch alone), none before
    TIGHT_REGISTERS = bool(MIN_BLOCKS) and not warp_specialized and D >= 128
    block_ranges, in_block = block_range_cache(RS, S, BC, unit_step_branch=not TIGHT_REGISTERS)

    def v_checked(full, col0, sig, klen):
        # whether a block's V is checked for non-finite values: a PARTIAL block, and with TMA
        # copies (which zero no row past a length) a block crossing the key length at its last row
        if not (tma and spec.has_kv_len):
            return full == 0
        return T.Or(full == 0, col0 + sig * (BC - 1) >= klen)

    def whole_block(full, col0, sig, klen):
        # a FULL block whose every column is a key (it may cross kv_len[b])
        if not spec.has_kv_len:
            return full == 1
        return T.And(full == 1, col0 + sig * (BC - 1) < klen)

    @T.macro
    def load_q_fragments(qf, smem, w, lane):
        # Q fragments (A operand) for the whole tile
        for mt in T.unroll(MT):
            for kk in T.unroll(KD):
                T.evaluate(ldmatrix_x4(qf, (mt * KD + kk) * 8, smem,
                                       ((w * MT + mt) * 16 + lane % 16) * DP + kk * 16 + 8 * (lane // 16)))

    @T.macro
    def qk_tile(sacc, qf, bf, smem, stg, lane):
        # S = Q K^T in registers
        for i in T.unroll(MT * NTL * 4):
            sacc[i] = T.float32(0)
        for kk in T.unroll(KD):
            for np in T.unroll(KC):
                T.evaluate(ldmatrix_x4(bf, 0, smem, kv_stage(K_OFF, stg, np * 16 + lane % 8 + 8 * (lane // 16))
                                       + kk * 16 + 8 * (lane // 8 % 2)))
                for mt in T.unroll(MT):
                    for hn in T.unroll(2):
                        T.evaluate(mma_16x8x16(qf, (mt * KD + kk) * 8, bf, hn * 4, sacc, (mt * NTL + np * 2 + hn) * 4))

    def scaled(x):  # a score as mask_scores leaves it (see SCALE_IN_EXP)
        return x if SCALE_IN_EXP else x * scale

    def scaled_max(x):  # a block max of scores as mask_scores left them, in the running max's units
        return x * scale if SCALE_IN_EXP else x

    def exponent(x, m):  # log2 of a score's exponential, x as mask_scores left it, m the running max
        return x * scale - m if SCALE_IN_EXP else x - m

    # the mask by column bits where a thread's columns of a block row fit one word
    COLUMN_BITS = 2 * NTL <= 32 and not TIGHT_REGISTERS

    def kept_column(rng, r, k, lane):
        # whether the thread's k-th column of row slot r (block column 8 (k // 2) + 2 (lane % 4)
        # + k % 2) lies in the slot's ranges: bit k of its word (COLUMN_BITS), or the compares
        if COLUMN_BITS:
            return T.bitwise_and(T.shift_right(T.reinterpret("uint32", rng[r * S * 2]), T.uint32(k)),
                                 T.uint32(1)) != T.uint32(0)
        return in_block(rng, r, k // 2 * 8 + lane % 4 * 2 + k % 2)

    @T.macro
    def scale_scores(sacc):
        # a FULL block's scores scaled (unless SCALE_IN_EXP: the exponent scales them)
        if not SCALE_IN_EXP:
            for i in T.unroll(MT * NTL * 4):
                sacc[i] = sacc[i] * scale

    @T.macro
    def partial_block_ranges(rng, sg, full, col0, sig, lane, klen):
        # a PARTIAL block's column ranges of the thread's row slots (block_ranges, capped at the
        # key length, so a FULL block crossing it is masked past it), with COLUMN_BITS as one
        # word a slot (row_column_bits, kept in the slot's first range)
        block_ranges(rng, sg, full, col0, sig, T.floordiv(klen - 1 - col0, sig) if spec.has_kv_len else None)
        if COLUMN_BITS:
            for r in T.unroll(RS):
                rng[r * S * 2] = T.reinterpret("int32", row_column_bits(rng, r, lane, S, NTL))

    def kept_score(sacc, rng, mt, nt, i, lane):  # score i of 8-column tile nt of sacc, scaled, or -inf if masked out
        return T.Select(kept_column(rng, mt * 2 + i // 2, nt * 2 + i % 2, lane), scaled(sacc[(mt * NTL + nt) * 4 + i]),
                        neg_inf)

    @T.macro
    def mask_scores(sacc, sg, rng, full, col0, sig, lane, klen):
        # scale (unless SCALE_IN_EXP); then, unless the block is FULL inside the key length (a
        # branch uniform over the block), select to -inf the scores outside the block's ranges
        # (partial_block_ranges, once per block): with COLUMN_BITS one bit test per score, which
        # ptxas turns into R2P moves of bits into predicates (a window's PARTIAL block 772 ->
        # 685 instructions with the unit-step ranges, SASS of the persistent default), else 2 S
        # integer compares per score; no branch per score. Testing FULL blocks too cost the
        # FULL-heavy masks 14% at d=128 (H200, window +-1024 n=32k: 1.55 -> 1.79 ms).
        if whole_block(full, col0, sig, klen):
            scale_scores(sacc)
        else:
            partial_block_ranges(rng, sg, full, col0, sig, lane, klen)
            for mt in T.unroll(MT):
                for nt in T.unroll(NTL):
                    for i in T.unroll(4):
                        sacc[(mt * NTL + nt) * 4 + i] = kept_score(sacc, rng, mt, nt, i, lane)

    @T.macro
    def block_maxima(sacc, mb, al, rng, lane, masked: bool):
        # each row slot's max over the thread's scores of the block, in two independent chains
        # (mb: the even 8-column tiles, al: the odd ones; as the row sums of block_exponentials:
        # within noise in the A/B, window +-1024 1.257 -> 1.259 ms, Mistral n=8k 0.830 -> 0.847,
        # the 11 other cases within 4%, run twentieth_descriptors). masked (a python bool): each
        # score is first selected to -inf outside the ranges of partial_block_ranges and scaled,
        # in place, its select followed by its max rather than all 64 selects before the first
        # max: the warp-specialized window +-1024 n=32k d=128 held 3 s on an H100, one process a
        # row, ABBA, went bf16 508.7, 507.7 -> 514.9, 515.1 TFLOP/s and fp16 488.7, 489.7 ->
        # 499.7, 500.9 (forty-fourth session, benchmarks/results/h100_forty_fourth_ab.json,
        # interleave; a PARTIAL block's mask path 696 -> 681 SASS instructions a thread in bf16)
        for i in T.unroll(RS):
            mb[i] = neg_inf
            al[i] = neg_inf  # free until the rescale factor
        for mt in T.unroll(MT):
            for nt2 in T.unroll(NTL // 2):
                for i in T.unroll(4):
                    if masked:
                        for hn in T.unroll(2):
                            sacc[(mt * NTL + nt2 * 2 + hn) * 4 + i] = kept_score(sacc, rng, mt, nt2 * 2 + hn, i, lane)
                    mb[mt * 2 + i // 2] = T.max(mb[mt * 2 + i // 2], sacc[(mt * NTL + nt2 * 2) * 4 + i])
                    al[mt * 2 + i // 2] = T.max(al[mt * 2 + i // 2], sacc[(mt * NTL + nt2 * 2 + 1) * 4 + i])

    @T.macro
    def update_running_max(ms, ls, mb, al):
        # from the thread's block maxima (block_maxima): each row's block max (over its 4 lanes),
        # the new running max, the rescale factor of the old one (al), and the running sum rescaled
        for i in T.unroll(RS):
            mb[i] = T.max(mb[i], al[i])
            mb[i] = T.max(mb[i], T.tvm_warp_shuffle_xor(full_mask, mb[i], 1, 32, 32))
            mb[i] = T.max(mb[i], T.tvm_warp_shuffle_xor(full_mask, mb[i], 2, 32, 32))
            mb[i] = T.max(ms[i], scaled_max(mb[i]))  # the new running max
            if lazy_rescale:  # kept unless raised by more than RESCALE_THRESHOLD, al exactly 1 then
                mb[i] = T.Select(mb[i] > ms[i] + T.float32(RESCALE_THRESHOLD), mb[i], ms[i])
                al[i] = T.Select(mb[i] == ms[i], T.float32(1), T.exp2(ms[i] - mb[i]))
            else:
                al[i] = T.exp2(ms[i] - mb[i])
            ms[i] = mb[i]
            ls[i] = ls[i] * al[i]

    @T.macro
    def running_max(sacc, ms, ls, mb, al):
        # each row's block max, the new running max, the rescale factor of the old one and the
        # running sum rescaled, of scores mask_scores left
        block_maxima(sacc, mb, al, None, None, False)
        update_running_max(ms, ls, mb, al)

    @T.macro
    def multiply_o(oacc, al):
        # O of each row times its rescale factor
        for mt in T.unroll(MT):
            for dtl in T.unroll(DT):
                for i in T.unroll(4):
                    oacc[(mt * DT + dtl) * 4 + i] = oacc[(mt * DT + dtl) * 4 + i] * al[mt * 2 + i // 2]

    def any_row_of_warp(holds):  # whether holds(i) for some row slot i of some thread of the warp (a vote)
        held = holds(0)
        for i in range(1, RS):
            held = T.Or(held, holds(i))
        return T.cuda.any_sync(full_mask, held) != 0

    @T.macro
    def rescale_o(oacc, al):
        # O of each row times its rescale factor; with lazy_rescale only in a warp where a row
        # moved its max (a branch uniform over the warp)
        if lazy_rescale:
            if any_row_of_warp(lambda i: al[i] != T.float32(1)):  # a row moved its max
                multiply_o(oacc, al)
        else:
            multiply_o(oacc, al)

    @T.macro
    def online_softmax(sacc, pf, pw, oacc, ms, ls, mb, al):
        # running max (4 lanes per row), rescale factor, P = 2^(S - m) as the A operand of
        # P V (two 8-column accumulator tiles = one 16-deep k-step), row sums of the float32 P.
        # Each pair of a row's columns is rounded by one packed cvt: ptxas merged element-wise
        # float16 casts into packed F2FP instructions, but half of the bfloat16 ones became
        # single F2F.BF16.F32 (SASS of window +-1024 d=128 on the H200: 32 F2FP + 32 F2F for
        # 64 F2FP at float16). Summing the float32 P, as FlashAttention does, also drops the
        # widening of each rounded P back to float32 (160 HADD2.F32 at float16). Both: window
        # +-1024 n=32k d=128 bf16 1.431 -> 1.287 ms, fp16 1.395 -> 1.320; causal window 4095
        # n=8k bf16 0.996 -> 0.892, fp16 0.964 -> 0.918; Longformer-base b=8 bf16 0.445 -> 0.398
        # (``benchmarks/results/h200_forward_ab.json`` run ``eighteenth_packed_cvt``)
        running_max(sacc, ms, ls, mb, al)
        for mt in T.unroll(MT):
            for kc in T.unroll(KC):
                for hn in T.unroll(2):
                    for r2 in T.unroll(2):  # columns 2 r2, 2 r2 + 1 (one row): one packed cvt
                        lo: T.let[T.float32] = T.exp2(exponent(sacc[(mt * NTL + kc * 2 + hn) * 4 + r2 * 2],
                                                               ms[mt * 2 + r2]))
                        hi: T.let[T.float32] = T.exp2(exponent(sacc[(mt * NTL + kc * 2 + hn) * 4 + r2 * 2 + 1],
                                                               ms[mt * 2 + r2]))
                        T.evaluate(convert_pair(pw, (mt * KC + kc) * 4 + hn * 2 + r2, lo, hi, dt))
                        ls[mt * 2 + r2] = ls[mt * 2 + r2] + (lo + hi)
        rescale_o(oacc, al)

    @T.macro
    def block_exponentials(sacc, ms, ls, mb):
        # the softmax's first half past the running max (update_running_max), for the overlapped
        # loop: the block's exponentials 2^(S - m) in place in sacc (float32), summed into ls
        for i in T.unroll(RS):
            mb[i] = T.float32(0)  # free now (ms holds the new max): the odd 8-column tiles' sum
        for mt in T.unroll(MT):
            for nt2 in T.unroll(NTL // 2):  # two independent sum chains per row
                for i in T.unroll(4):
                    sacc[(mt * NTL + nt2 * 2) * 4 + i] = T.exp2(exponent(sacc[(mt * NTL + nt2 * 2) * 4 + i],
                                                                         ms[mt * 2 + i // 2]))
                    sacc[(mt * NTL + nt2 * 2 + 1) * 4 + i] = T.exp2(exponent(sacc[(mt * NTL + nt2 * 2 + 1) * 4 + i],
                                                                             ms[mt * 2 + i // 2]))
                    ls[mt * 2 + i // 2] = ls[mt * 2 + i // 2] + sacc[(mt * NTL + nt2 * 2) * 4 + i]
                    mb[mt * 2 + i // 2] = mb[mt * 2 + i // 2] + sacc[(mt * NTL + nt2 * 2 + 1) * 4 + i]
        for i in T.unroll(RS):
            ls[i] = ls[i] + mb[i]

    @T.macro
    def probabilities(sacc, pw, oacc, al):
        # online_softmax's second half: O rescaled (unless early_rescale: consumer_loop does it
        # later), and the exponentials rounded in pairs into P (the A operand of P V); only once
        # the previous P V completed
        if not early_rescale:
            rescale_o(oacc, al)
        for mt in T.unroll(MT):
            for kc in T.unroll(KC):
                for hn in T.unroll(2):
                    for r2 in T.unroll(2):
                        T.evaluate(convert_pair(pw, (mt * KC + kc) * 4 + hn * 2 + r2,
                                                sacc[(mt * NTL + kc * 2 + hn) * 4 + r2 * 2],
                                                sacc[(mt * NTL + kc * 2 + hn) * 4 + r2 * 2 + 1], dt))

    @T.macro
    def pv_tile(oacc, pf, bf, smem, stg, lane):
        # O += P V on tensor cores (V through ldmatrix.trans: the B operand)
        for kc in T.unroll(KC):
            for dp in T.unroll(D // 16):
                T.evaluate(ldmatrix_x4(bf, 0, smem, kv_stage(V_OFF, stg, kc * 16 + lane % 8 + 8 * (lane // 8 % 2))
                                       + dp * 16 + 8 * (lane // 16), trans=True))
                for mt in T.unroll(MT):
                    for hn in T.unroll(2):
                        T.evaluate(mma_16x8x16(pf, (mt * KC + kc) * 8, bf, hn * 4, oacc, (mt * DT + dp * 2 + hn) * 4))

    def warpgroup_index(w):  # warp w's consumer warpgroup, as lane 0 holds it (ptxas knows it warp-uniform)
        return T.tvm_warp_shuffle(full_mask, w // 4, 0, 32, 32)

    def q_rows_of(w, q_off):
        # the offset of warp w's consumer warpgroup's 64 Q rows in the Q slot at q_off, from what
        # lane 0 holds (ptxas then knows it warp-uniform): the warpgroup index, or with the
        # persistent form's two slots the whole offset (its slot from the tile's round; the
        # warpgroup alone shuffled: 512 instructions a FULL block instead of 502, SASS of window
        # +-1024 d=128 fp16, benchmarks/sass_block_path.py)
        if not isinstance(q_off, int):
            return T.tvm_warp_shuffle(full_mask, q_off + (w // 4) * 64 * D, 0, 32, 32)
        if W > 4:
            return q_off + warpgroup_index(w) * 64 * D
        return q_off

    @T.macro
    def qk_wgmma_issue(sacc, desc, smem, stg, w, q_off):
        # S = Q K^T: one warpgroup MMA per 16-deep k-step, both operands from shared memory
        # (this warpgroup's 64 Q rows); the first step overwrites the accumulators. Issued and
        # committed; the caller waits. Descriptors encoded once, each step's advanced. The
        # warpgroup index comes from lane 0 (a shuffle) so that ptxas knows it warp-uniform and
        # keeps Q's descriptor in uniform registers: from threadIdx.y, which it cannot prove
        # uniform, each k-step cost two R2UR moves and a 64-bit add ahead of its wgmma (SASS of
        # window +-1024 d=128, warp-specialized, fp16: 537 -> 511 instructions a FULL block, the
        # eight QK wgmmas issued back to back)
        T.ptx.wgmma.fence.sync.aligned()
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[0]),
                                              T.address_of(smem[q_rows_of(w, q_off)]), QK_LBO, QK_SBO, 0)
        if tma:
            T.evaluate(swizzled_k_major_desc(desc[1], smem, K_OFF + stg * BC * D, BC))
        else:
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[1]), T.address_of(
                smem[kv_elem(K_OFF, stg, 0, 0)]), QK_LBO, QK_SBO, 0)
        for kk in T.unroll(KD):
            T.ptx[WG_S](*[sacc[i] for i in range(NTL * 4)], advance_desc(desc[0], k_major_step(kk, BR, False)),
                        advance_desc(desc[1], k_major_step(kk, BC, tma)), kk > 0, 1, 1, 0, 0)
        T.ptx.wgmma.commit_group.sync.aligned()

    @T.macro
    def pv_wgmma_issue(oacc, pf, desc, smem, stg):
        # O += P V: P from registers (the accumulator layout of S is wgmma's A fragment), V from
        # shared memory read transposed. Issued and committed; the caller waits
        T.ptx.wgmma.fence.sync.aligned()
        if tma:
            T.evaluate(swizzled_mn_major_desc(desc[1], smem, V_OFF + stg * BC * D, BC))
        else:
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[1]), T.address_of(
                smem[kv_elem(V_OFF, stg, 0, 0)]), V_LBO, V_SBO, 0)
        for kc in T.unroll(KC):
            T.ptx[WG_O](*[oacc[i] for i in range(DT * 4)],
                        *[T.reinterpret("uint32", pf.vload([kc * 8 + 2 * i], PAIR)) for i in range(4)],
                        advance_desc(desc[1], mn_major_step(kc, D, tma)), True, 1, 1, 1)
        T.ptx.wgmma.commit_group.sync.aligned()

    @T.macro
    def qk_wgmma(sacc, desc, smem, stg, w):
        # S = Q K^T, waited for
        qk_wgmma_issue(sacc, desc, smem, stg, w, 0)
        T.ptx.wgmma.wait_group.sync.aligned(0)

    @T.macro
    def pv_wgmma(oacc, pf, desc, smem, stg):
        # O += P V, waited for
        pv_wgmma_issue(oacc, pf, desc, smem, stg)
        T.ptx.wgmma.wait_group.sync.aligned(0)

    def group_barrier(w):  # warp-specialized: consumer warpgroup w // 4's own named barrier
        return named_barrier(2 + w // 4, 128)

    @T.macro
    def exact_path_sync(w):
        # the barrier of pv_exact: CTA-wide, or the consumer warpgroup's named barrier
        if warp_specialized:
            T.evaluate(group_barrier(w))
        else:
            T.tvm_storage_sync("shared.dyn")

    @T.macro
    def pv_exact(oacc, pf, smem, stg, w, lane):
        # O += P V on CUDA cores, skipping zero probabilities (a block with a non-finite V).
        # Each warp stages its own rows of P in its own rows of the Q region (dead once the Q
        # fragments are in registers), PW columns at a time. The barriers are CTA-wide although
        # a warp reads only its own rows: TVM's barrier planner knows no warp-private shared
        # memory, and the branch is uniform and rare (warp-specialized: the warpgroup's named
        # barrier; the producer warps never reach a CTA-wide one).
        exact_path_sync(w)
        for chunk in T.unroll(P_CHUNKS):
            for mt in T.unroll(MT):
                for kc in T.unroll(KC):
                    for hn in T.unroll(2):
                        if chunk * PW <= kc * 16 + hn * 8 and kc * 16 + hn * 8 < chunk * PW + PW:
                            for i in T.unroll(4):
                                smem[p_elem(tile_row(w, lane, mt * 2 + i // 2), kc * 16 + hn * 8 + lane % 4 * 2 + i % 2 - chunk * PW)] = pf[(mt * KC + kc) * 8 + hn * 4 + i]
            exact_path_sync(w)
            for c in T.serial(PW):
                for r in T.unroll(RS):
                    for dtl in T.unroll(DT):
                        for e in T.unroll(2):
                            oacc[((r // 2) * DT + dtl) * 4 + (r % 2) * 2 + e] = oacc[((r // 2) * DT + dtl) * 4 + (r % 2) * 2 + e] + T.if_then_else(
                                smem[p_elem(tile_row(w, lane, r), c)] == zero, T.float32(0),
                                T.Cast("float32", smem[p_elem(tile_row(w, lane, r), c)]) * T.Cast(
                                    "float32", smem[kv_elem(V_OFF, stg, chunk * PW + c, dtl * 8 + lane % 4 * 2 + e)]))
            exact_path_sync(w)

    @T.macro
    def pipelined_block(j, nblk, s_cur, s_next, smem, k, v, blocks, hm, blk_lo, b, hk, tid, w, lane, sg, rng,
                        pf, pw, oacc, ms, ls, mb, al, desc, vbad, vflag, words, nonfinite, klen):
        # block j of the pipelined form: S_j is in flight in s_cur (issued one block before)
        if j + 1 < nblk:  # block j + 1 has landed (own copies), its V checked, then the barrier
            T.evaluate(T.ptx["cp.async.wait_group"](0))
            if blocks[hm, blk_lo + j + 1, 2] == 0:
                flag_nonfinite_v(smem, vbad, words, nonfinite, (j + 1) % stages, j + 1, tid)
            T.ptx["fence.proxy.async.shared::cta"]()
        # every thread is past block j - 1's waits: block j - 2's stage is free for block j + 2
        T.tvm_storage_sync("shared.dyn")
        if j + 2 < nblk:
            issue_kv_block(smem, k, v, blocks[hm, blk_lo + j + 2, 0], blocks[hm, blk_lo + j + 2, 1], b, hk,
                           tid, (j + 2) % stages, klen)
        T.evaluate(T.ptx.cp.async_.commit_group())
        if j + 1 < nblk:
            qk_wgmma_issue(s_next, desc, smem, (j + 1) % stages, w, 0)
            T.ptx.wgmma.wait_group.sync.aligned(1)  # S_j and P V of block j - 1 are done
        else:
            T.ptx.wgmma.wait_group.sync.aligned(0)
        col0: T.let[T.int32] = blocks[hm, blk_lo + j, 0]
        sig: T.let[T.int32] = blocks[hm, blk_lo + j, 1]
        full: T.let[T.int32] = blocks[hm, blk_lo + j, 2]
        mask_scores(s_cur, sg, rng, full, col0, sig, lane, klen)
        online_softmax(s_cur, pf, pw, oacc, ms, ls, mb, al)
        T.ptx.ld.shared.b32(vflag[0], T.address_of(vbad[j % stages]))
        if vflag[0] == j + 1:
            T.ptx.wgmma.wait_group.sync.aligned(0)  # nothing of ours in flight across the exact path
            pv_exact(oacc, pf, smem, j % stages, w, lane)
        else:
            pv_wgmma_issue(oacc, pf, desc, smem, j % stages)

    @T.macro
    def full_row_sums(ls):
        # the 4 lanes of a row hold the sums of disjoint columns
        for i in T.unroll(RS):
            ls[i] = ls[i] + T.tvm_warp_shuffle_xor(full_mask, ls[i], 1, 32, 32)
            ls[i] = ls[i] + T.tvm_warp_shuffle_xor(full_mask, ls[i], 2, 32, 32)

    @T.macro
    def store_rows(out, o_part, ml_part, lse, oacc, ms, ls, rows, b, h, vbh, comp, w, lane, nrows):
        # full row sums, then O / l or the component's partial state (and the row's lse)
        full_row_sums(ls)
        for r in T.unroll(RS):
            if tile_row(w, lane, r) < nrows:
                if with_lse and direct:
                    if lane % 4 == 0:
                        lse[b, h, rows[r]] = natural_lse(ms[r], ls[r])
                for dtl in T.unroll(DT):
                    for e in T.vectorized(2):
                        if direct:
                            out[b, h, rows[r], dtl * 8 + lane % 4 * 2 + e] = T.Cast(
                                dt, normalised(oacc[((r // 2) * DT + dtl) * 4 + (r % 2) * 2 + e], ls[r]))
                        else:
                            o_part[vbh, comp, rows[r], dtl * 8 + lane % 4 * 2 + e] = oacc[((r // 2) * DT + dtl) * 4 + (r % 2) * 2 + e]
                if not direct:
                    if lane % 4 == 0:
                        ml_part[vbh, comp, rows[r], 0] = ms[r]
                        ml_part[vbh, comp, rows[r], 1] = ls[r]

    @T.macro
    def store_slot(split_o, split_ml, oacc, ms, ls, vbh, slot, w, lane, nrows):
        # a chunk of a split tile: its partial state (O, m, l) by tile row, for split_merge
        full_row_sums(ls)
        for r in T.unroll(RS):
            if tile_row(w, lane, r) < nrows:
                for dtl in T.unroll(DT):
                    for e in T.vectorized(2):
                        split_o[vbh, slot, tile_row(w, lane, r), dtl * 8 + lane % 4 * 2 + e] = oacc[((r // 2) * DT + dtl) * 4 + (r % 2) * 2 + e]
                if lane % 4 == 0:
                    split_ml[vbh, slot, tile_row(w, lane, r), 0] = ms[r]
                    split_ml[vbh, slot, tile_row(w, lane, r), 1] = ls[r]

    # -- the warp-specialized form -------------------------------------------------------
    # mbarriers (one buffer, ``4 stages`` of them): a stage's K bytes, its V bytes (one arrival:
    # the producer's expect_tx), the release of its K, of its V (one arrival per consumer warp)
    K_READY, V_READY, K_FREE, V_FREE = 0, stages, 2 * stages, 3 * stages
    # named barriers: 1 the consumers' Q (the grid form), 2 + g consumer warpgroup g's own (V
    # checks, the exact path; the persistent form's Q of each tile), TURN_BARRIER + g group g's
    # turn at the tensor cores (two consumer warpgroups)
    TURN_BARRIER = 4
    PINGPONG = warp_specialized and W == 8
    # the persistent form's direct output through the tile's Q slot (store_rows_staged)
    STAGED_STORE = PERSISTENT and direct and wgmma
    if out_evict_first and not STAGED_STORE:
        raise ValueError("out_evict_first hints the persistent form's TMA store of O, which a plan of several "
                         "components does not make (it stores partial states)")

    def group_thread(w, lane):  # a consumer thread's index within its warpgroup
        return (w % 4) * 32 + lane

    def bar_addr(bars, i):  # shared address of mbarrier i
        return T.cuda.cvta_generic_to_shared(T.address_of(bars[i]))


    @T.macro
    def flag_nonfinite_v_group(smem, vbad, words, nonfinite, st, j, w, lane):
        # flag_nonfinite_v over the 128 threads of one consumer warpgroup, tagging the group's
        # own flag of stage st: each group checks the whole block, so that the groups never wait
        # for each other (the group's named barrier publishes the tag)
        flag_nonfinite_chunks(smem, vbad, words, nonfinite, st, j, group_thread(w, lane), 128, (w // 4) * stages + st)

    @T.macro
    def pv_exact_shared_ptx(oacc, pw, px, pxw, vx, vxw, smem, stg, w, lane):
        # pv_exact of the warp-specialized form: the same sums, with P staged and P, V read by PTX
        # on shared addresses (pairs of adjacent columns, 32 bits at a time), which TVM's barrier
        # planner does not track: tracked, it would have to place a barrier inside the consumers'
        # branch (it refuses to), and a CTA-wide one there would wait for the producer forever.
        # The warpgroup's named barrier orders the staging
        for chunk in T.unroll(P_CHUNKS):
            exact_path_sync(w)
            for kc in T.unroll(KC):
                for hn in T.unroll(2):
                    if chunk * PW <= kc * 16 + hn * 8 and kc * 16 + hn * 8 < chunk * PW + PW:
                        for r2 in T.unroll(2):
                            T.ptx.st.shared.b32(T.address_of(smem[p_elem(
                                tile_row(w, lane, r2), kc * 16 + hn * 8 + lane % 4 * 2 - chunk * PW)]), pw[kc * 4 + hn * 2 + r2])
            exact_path_sync(w)
            for c2 in T.serial(PW // 2):
                for r in T.unroll(RS):
                    T.ptx.ld.shared.b32(pxw[r], T.address_of(smem[p_elem(tile_row(w, lane, r), 2 * c2)]))
                for e2 in T.unroll(2):
                    for dtl in T.unroll(DT):
                        T.ptx.ld.shared.b32(vxw[0], T.address_of(smem[kv_elem(
                            V_OFF, stg, chunk * PW + 2 * c2 + e2, dtl * 8 + lane % 4 * 2)]))
                        for r in T.unroll(RS):
                            for e in T.unroll(2):
                                oacc[((r // 2) * DT + dtl) * 4 + (r % 2) * 2 + e] = oacc[((r // 2) * DT + dtl) * 4 + (r % 2) * 2 + e] + T.if_then_else(
                                    px[r * 2 + e2] == zero, T.float32(0),
                                    T.Cast("float32", px[r * 2 + e2]) * T.Cast("float32", vx[e]))
        exact_path_sync(w)

    @T.macro
    def issue_tma_one(smem, bars, ready, nbytes, tmap, offset, row0, bhk):
        # one thread: mbarrier ``ready`` expects ``nbytes``, then one tensor copy lands at offset
        T.ptx["fence.proxy.async.shared::cta"]()
        T.ptx.mbarrier(bar_addr(bars, ready), T.uint32(nbytes), "arrive", "expect_tx", "", "", "shared", "b64", "")
        if kv_evict_last:
            policy = T.alloc_local((1,), "uint64")
            T.evaluate(create_l2_policy(policy[0], "evict_last"))
            T.evaluate(tma_copy_rows(smem, offset, tmap, row0, bhk, bars, ready, STEP, policy[0]))
        else:
            T.evaluate(tma_copy_rows(smem, offset, tmap, row0, bhk, bars, ready, STEP))

    def running(base, j):
        # the running index of block j of a tile whose first block is the base-th the role walks
        # (the persistent form counts on across tiles; a single tile starts at 0). Stage, phase
        # and V tag of a block are those of its running index
        return j if isinstance(base, int) and base == 0 else base + j

    def stage_of(r):  # the K/V stage of the block of running index r
        return r % stages

    def phase_of(r):  # the parity of the block's use of its stage (its (r // stages)-th)
        return (r // stages) % 2

    @T.macro
    def producer_loop(smem, blocks, bars, kmap, vmap, hm, blk_lo, blk_hi, bhk, base):
        # one thread: K then V of block j (running index r) into stage r % stages, each once the
        # consumers released what the stage held (block r - stages: its (r / stages - 1)-th
        # release). K and V have barriers of their own: a K stage is free once S is computed, a V
        # stage only after P V, which the consumers issue one block later
        for j in T.serial(blk_hi - blk_lo):
            if running(base, j) >= stages:
                T.cuda.mbarrier_wait(T.address_of(bars[K_FREE + stage_of(running(base, j))]),
                                     (running(base, j) // stages + 1) % 2)
            issue_tma_one(smem, bars, K_READY + stage_of(running(base, j)), KV_BYTES, kmap,
                          K_OFF + stage_of(running(base, j)) * BC * D, blocks[hm, blk_lo + j, 0], bhk)
            if running(base, j) >= stages:
                T.cuda.mbarrier_wait(T.address_of(bars[V_FREE + stage_of(running(base, j))]),
                                     (running(base, j) // stages + 1) % 2)
            issue_tma_one(smem, bars, V_READY + stage_of(running(base, j)), KV_BYTES, vmap,
                          V_OFF + stage_of(running(base, j)) * BC * D, blocks[hm, blk_lo + j, 0], bhk)

    @T.macro
    def after_row_sums(ls):
        # softmax_overlap: a warp-uniform branch on the row sums, never taken (a sum of
        # exponentials is not negative; its body a 0 ns sleep), that ends the softmax's basic
        # block, so that ptxas cannot hoist the next wait (P V's) above the softmax
        if any_row_of_warp(lambda i: ls[i] < T.float32(0)):
            T.cuda.nano_sleep(T.uint64(0))

    @T.macro
    def release(bars, i, lane):
        # every lane of the warp is past its reads of the stage; one arrival per warp
        T.evaluate(T.ptx["bar.warp.sync"](full_mask))
        if lane == 0:
            T.ptx.mbarrier.arrive.shared.b64(bar_addr(bars, i), T.uint32(1))

    @T.macro
    def scores_of_block(j, r, smem, blocks, bars, sg, rng, desc, sacc, ms, ls, mb, al, hm, blk_lo, w, lane, klen):
        # S of block j (running index r) is complete in sacc: release its K stage, mask, and turn
        # it into the block's exponentials in place (block_maxima, update_running_max,
        # block_exponentials)
        release(bars, K_FREE + stage_of(r), lane)
        if whole_block(blocks[hm, blk_lo + j, 2], blocks[hm, blk_lo + j, 0], blocks[hm, blk_lo + j, 1], klen):
            scale_scores(sacc)
            block_maxima(sacc, mb, al, rng, lane, False)
        else:  # each score's select followed by its max (block_maxima)
            partial_block_ranges(rng, sg, blocks[hm, blk_lo + j, 2], blocks[hm, blk_lo + j, 0],
                                 blocks[hm, blk_lo + j, 1], lane, klen)
            block_maxima(sacc, mb, al, rng, lane, True)
        update_running_max(ms, ls, mb, al)
        block_exponentials(sacc, ms, ls, mb)

    @T.macro
    def issue_pv_of_block(j, r, smem, blocks, bars, vbad, desc, pf, pw, oacc, words, nonfinite, vflag, px, pxw, vx,
                          vxw, hm, blk_lo, w, lane, klen):
        # O += P V of block j (running index r), P in pf: wait for its V, check it where a row
        # may skip a column (PARTIAL, or crossing the key length; the group's named barrier
        # publishes the tag, r + 1), then either the exact path (any wgmma in flight waited for
        # first) or the wgmma, issued and committed
        T.cuda.mbarrier_wait(T.address_of(bars[V_READY + stage_of(r)]), phase_of(r))
        vflag[0] = 0
        if v_checked(blocks[hm, blk_lo + j, 2], blocks[hm, blk_lo + j, 0], blocks[hm, blk_lo + j, 1], klen):
            flag_nonfinite_v_group(smem, vbad, words, nonfinite, stage_of(r), r, w, lane)
            T.evaluate(group_barrier(w))
            T.ptx.ld.shared.b32(vflag[0], T.address_of(vbad[(w // 4) * stages + stage_of(r)]))
        if vflag[0] == r + 1:
            # nothing in flight while the CUDA cores write O (ptxas serializes every wgmma of a
            # kernel whose accumulators other instructions may define while one is in flight)
            T.ptx.wgmma.wait_group.sync.aligned(0)
            pv_exact_shared_ptx(oacc, pw, px, pxw, vx, vxw, smem, stage_of(r), w, lane)
        else:
            pv_wgmma_issue(oacc, pf, desc, smem, stage_of(r))

    def take_turn(w):  # wait for this consumer warpgroup's turn at the tensor cores
        return named_barrier(TURN_BARRIER + w // 4, 256)

    def pass_turn(w):  # give the other consumer warpgroup its turn
        return T.ptx["bar.arrive"](T.Cast("uint32", TURN_BARRIER + 1 - w // 4), T.uint32(256))

    @T.macro
    def turn_begin(w):
        if PINGPONG:
            T.evaluate(take_turn(w))

    @T.macro
    def turn_end(w, last):
        # warpgroup 1 passes every turn but its last, so that each group's syncs meet as many
        # arrivals of the other's (warpgroup 1 passed one before the tile, warpgroup 0 every turn).
        # Per tile of n >= 1 blocks each group syncs n + 1 times and is passed n + 1 turns, in
        # alternation (group 1: pass, then sync and pass, ..., sync; group 0: sync and pass, ...):
        # an empty tile takes and passes no turn. The persistent form passes every turn of
        # warpgroup 1 (last=False) and balances the counts once per thread block instead
        # (persistent_consumers), so that the turns alternate across tiles as within one
        if PINGPONG:
            if T.Or(w // 4 == 0, T.Not(last)):
                T.evaluate(pass_turn(w))

    @T.macro
    def consumer_blocks(smem, blocks, bars, vbad, sg, rng, desc, sacc, pf, pw, oacc, ms, ls, mb, al, words, nonfinite,
                        vflag, px, pxw, vx, vxw, hm, blk_lo, blk_hi, w, lane, klen, base, q_off, tile_turns):
        # a consumer warpgroup's walk over the tile's blocks (Q in the slot at q_off) up to the
        # last block's softmax (consumer_last_pv issues its P V), FlashAttention-3's intra-warpgroup
        # overlap: S of block j is issued, then P V of block j - 1, and the softmax of block j
        # runs while that P V is on the tensor cores (the wgmma reads P_{j-1} from registers and
        # accumulates into O, so O is rescaled and P_j written only once it completed). With two
        # consumer warpgroups (PINGPONG) they take turns issuing their GEMMs (named barriers):
        # one group's S and P V run while the other group's softmax does. Block j's stage, phase
        # and V tag are those of its running index running(base, j). With early_rescale, O is
        # brought to block j's max (al, from block j's softmax) after S of block j + 1 is issued.
        # As written the softmax overlaps the P V in flight; ptxas hoists the wait for that P V
        # above the softmax unless softmax_overlap ends the softmax with a branch. tile_turns (a
        # python bool): the turns balance within the tile (group 1 passes one first and none at
        # its last, consumer_last_pv); False in the persistent form, which balances them once
        if PINGPONG and tile_turns:
            if w // 4 == 1 and blk_hi > blk_lo:
                T.evaluate(pass_turn(w))  # group 0 goes first
        if blk_hi > blk_lo:
            T.cuda.mbarrier_wait(T.address_of(bars[K_READY + stage_of(running(base, 0))]), phase_of(running(base, 0)))
            turn_begin(w)
            qk_wgmma_issue(sacc, desc, smem, stage_of(running(base, 0)), w, q_off)
            turn_end(w, False)
            T.ptx.wgmma.wait_group.sync.aligned(0)
            scores_of_block(0, running(base, 0), smem, blocks, bars, sg, rng, desc, sacc, ms, ls, mb, al, hm, blk_lo,
                            w, lane, klen)
            probabilities(sacc, pw, oacc, al)
        for jj in T.serial(blk_hi - blk_lo - 1):
            T.cuda.mbarrier_wait(T.address_of(bars[K_READY + stage_of(running(base, jj + 1))]),
                                 phase_of(running(base, jj + 1)))
            turn_begin(w)
            qk_wgmma_issue(sacc, desc, smem, stage_of(running(base, jj + 1)), w, q_off)
            if early_rescale:  # O to block jj's max while S of block jj + 1 runs
                rescale_o(oacc, al)
            issue_pv_of_block(jj, running(base, jj), smem, blocks, bars, vbad, desc, pf, pw, oacc, words, nonfinite,
                              vflag, px, pxw, vx, vxw, hm, blk_lo, w, lane, klen)
            turn_end(w, False)
            T.ptx.wgmma.wait_group.sync.aligned(1)  # S of block jj + 1
            scores_of_block(jj + 1, running(base, jj + 1), smem, blocks, bars, sg, rng, desc, sacc, ms, ls, mb, al,
                            hm, blk_lo, w, lane, klen)
            if softmax_overlap:
                after_row_sums(ls)
            T.ptx.wgmma.wait_group.sync.aligned(0)  # P V of block jj
            release(bars, V_FREE + stage_of(running(base, jj)), lane)
            probabilities(sacc, pw, oacc, al)

    @T.macro
    def issue_last_pv(smem, blocks, bars, vbad, desc, pf, pw, oacc, al, words, nonfinite, vflag, px, pxw, vx, vxw,
                      hm, blk_lo, blk_hi, w, lane, klen, base, tile_turns):
        # the end of consumer_blocks' walk over a tile of blocks (blk_hi > blk_lo): P V of its
        # last block, issued in the group's turn (finish_last_pv waits for it)
        turn_begin(w)
        if early_rescale:
            rescale_o(oacc, al)
        issue_pv_of_block(blk_hi - blk_lo - 1, running(base, blk_hi - blk_lo - 1), smem, blocks, bars, vbad, desc,
                          pf, pw, oacc, words, nonfinite, vflag, px, pxw, vx, vxw, hm, blk_lo, w, lane, klen)
        turn_end(w, tile_turns)

    @T.macro
    def finish_last_pv(bars, blk_lo, blk_hi, lane, base):
        # the last P V of a tile of blocks waited for, and its V stage released
        T.ptx.wgmma.wait_group.sync.aligned(0)
        release(bars, V_FREE + stage_of(running(base, blk_hi - blk_lo - 1)), lane)

    @T.macro
    def consumer_last_pv(smem, blocks, bars, vbad, desc, pf, pw, oacc, al, words, nonfinite, vflag, px, pxw, vx, vxw,
                         hm, blk_lo, blk_hi, w, lane, klen, base, tile_turns):
        # P V of the tile's last block, issued in the group's turn, waited for, its V released
        if blk_hi > blk_lo:
            issue_last_pv(smem, blocks, bars, vbad, desc, pf, pw, oacc, al, words, nonfinite, vflag, px, pxw, vx,
                          vxw, hm, blk_lo, blk_hi, w, lane, klen, base, tile_turns)
            finish_last_pv(bars, blk_lo, blk_hi, lane, base)

    @T.macro
    def consumer_loop(smem, blocks, bars, vbad, sg, rng, desc, sacc, pf, pw, oacc, ms, ls, mb, al, words, nonfinite,
                      vflag, px, pxw, vx, vxw, hm, blk_lo, blk_hi, w, lane, klen, base):
        # a consumer warpgroup's whole walk over the tile's blocks, Q in slot 0
        consumer_blocks(smem, blocks, bars, vbad, sg, rng, desc, sacc, pf, pw, oacc, ms, ls, mb, al, words, nonfinite,
                        vflag, px, pxw, vx, vxw, hm, blk_lo, blk_hi, w, lane, klen, base, 0, True)
        consumer_last_pv(smem, blocks, bars, vbad, desc, pf, pw, oacc, al, words, nonfinite, vflag, px, pxw, vx, vxw,
                         hm, blk_lo, blk_hi, w, lane, klen, base, True)

    @T.macro
    def start_tile_state(rows, ms, ls, oacc, row0, rstr, w, lane):
        # a tile's per-thread state: the sequence rows of the thread's row slots, running max
        # and sum, the O accumulators
        for r in T.unroll(RS):
            rows[r] = row0 + rstr * tile_row(w, lane, r)
            ms[r] = neg_init
            ls[r] = T.float32(0)
        for i in T.unroll(MT * DT * 4):
            oacc[i] = T.float32(0)

    @T.macro
    def ws_setup(bars, vbad, tid):
        # warp-specialized form, once per thread block: thread 0 sets up the mbarriers, the V
        # tags start at 0, and the one CTA-wide barrier publishes both (past it, the producer
        # never reaches a CTA-wide barrier)
        if tid == 0:
            for i in T.unroll(4 * stages):
                T.ptx.mbarrier.init.shared.b64(bar_addr(bars, i), T.uint32(1 if i < K_FREE else W))
            T.ptx.fence("mbarrier_init", "release", "cluster", "")
        if tid < stages * FLAG_GROUPS:
            T.ptx.st.shared.b32(T.address_of(vbad[tid]), 0)
        T.tvm_storage_sync("shared")

    @T.macro
    def consumer_q_tile(smem, q, seg_start, seg_count, seg_sigma, sg, rows, b, h, hm, row0, rstr, nrows, tid, w, lane):
        # the consumers: the tile's Q rows -> shared, the rows' segments -> registers; the named
        # barrier: every consumer's Q rows have landed
        load_q_tile(smem, q, b, h, row0, rstr, nrows, tid)
        T.evaluate(T.ptx.cp.async_.commit_group())
        T.evaluate(T.ptx["cp.async.wait_group"](0))
        cache_row_segments(sg, rows, seg_start, seg_count, seg_sigma, hm, w, lane, nrows)
        T.ptx["fence.proxy.async.shared::cta"]()  # Q, written by this thread, for wgmma
        T.evaluate(named_barrier(1, NTHR))  # every consumer's Q rows have landed

    @T.macro
    def store_tile(out, o_part, ml_part, split_o, split_ml, lse, oacc, ms, ls, rows, b, h, vbh, comp, slot, w, lane,
                   nrows):
        # a walked tile's rows: a split chunk's partial state, or the output (a component's state)
        if split_chunk(plan_shape, slot):
            store_slot(split_o, split_ml, oacc, ms, ls, vbh, slot, w, lane, nrows)
        else:
            store_rows(out, o_part, ml_part, lse, oacc, ms, ls, rows, b, h, vbh, comp, w, lane, nrows)

    @T.macro
    def consumer_tile(smem, blocks, out, o_part, ml_part, split_o, split_ml, lse, bars, vbad, sg, rng, desc, sacc, pf,
                      pw, oacc, ms, ls, mb, al, rows, words, nonfinite, vflag, px, pxw, vx, vxw, b, h, hm, vbh, comp,
                      blk_lo, blk_hi, slot, nrows, w, lane, klen, base):
        # a consumer warpgroup's tile once Q is in: the walk over its blocks (the first the
        # base-th block of the role), then the rows' state or output stored
        consumer_loop(smem, blocks, bars, vbad, sg, rng, desc, sacc, pf, pw, oacc, ms, ls, mb, al, words,
                      nonfinite, vflag, px, pxw, vx, vxw, hm, blk_lo, blk_hi, w, lane, klen, base)
        store_tile(out, o_part, ml_part, split_o, split_ml, lse, oacc, ms, ls, rows, b, h, vbh, comp, slot, w, lane,
                   nrows)

    @T.macro
    def ws_tile(smem, q, k, v, blocks, kv_len, out, o_part, ml_part, split_o, split_ml, lse, bars, vbad,
                kmap, vmap, seg_start, seg_count, seg_sigma, sg, rng, desc, sacc, pf, pw, oacc, ms, ls, mb, al, rows,
                words, nonfinite, vflag, px, pxw, vx, vxw, b, h, hk, hm, vbh, row0, rstr, nrows, comp, blk_lo, blk_hi,
                slot, tid, w, lane):
        # the tile in the warp-specialized form: the setup (mbarriers, one CTA-wide barrier),
        # then the producer warpgroup (warps W..W+3) streams the tile's blocks through the stages
        # while each consumer warpgroup runs its 64 rows through them at its own pace (no barrier
        # between the groups in the loop)
        ws_setup(bars, vbad, tid)
        if w >= W:
            T.evaluate(T.ptx["setmaxnreg.dec.sync.aligned.u32"](WS_PRODUCER_REGS))
            if w == W and lane == 0:
                producer_loop(smem, blocks, bars, kmap, vmap, hm, blk_lo, blk_hi, b * KVH + hk, 0)
        else:
            T.evaluate(T.ptx["setmaxnreg.inc.sync.aligned.u32"](CONSUMER_REGS))
            consumer_q_tile(smem, q, seg_start, seg_count, seg_sigma, sg, rows, b, h, hm, row0, rstr, nrows, tid, w,
                            lane)
            consumer_tile(smem, blocks, out, o_part, ml_part, split_o, split_ml, lse, bars, vbad, sg, rng, desc, sacc,
                          pf, pw, oacc, ms, ls, mb, al, rows, words, nonfinite, vflag, px, pxw, vx, vxw, b, h, hm, vbh,
                          comp, blk_lo, blk_hi, slot, nrows, w, lane, key_length(spec, kv_len, b), 0)

    def program_of(it, cta):  # persistent form: the program thread block cta runs in round it
        return persistent_program(it, cta, persistent)

    def tile_of(program):  # (batch x head, row tile) of a program (program_tile, head_group_tile)
        if head_group:
            return head_group_tile(program, B * H, GRID_ROWS, head_group)
        return program_tile(program, B * H, GRID_ROWS, program_group(B * H))

    def q_slot(it):  # persistent form: the offset of the Q slot of the tile of round it
        return (it % 2) * BR * DP

    # the persistent form's Q chunks go down the core matrices' rows (chunk_position's
    # core_rows_first): its read-ahead runs beside the tile's GEMMs, whose operands keep the
    # shared pipe the SM's busiest (58%, ncu of the grid form, window +-1024 d=128, H100), and
    # along a row a phase's 8 chunks share 4 banks (the grid form's Q cp.async: 2x the ideal in
    # that profile). SASS of window +-1024 d=128: the same 502 instructions a FULL block and no
    # spill either way; the grid warp-specialized form took 517 and 48 bytes of spill with it
    # (511 and 16 without), so keeps the row order
    def group_q_row(it, w, lane):  # row (of the group's 64) of its it-th Q chunk this thread copies
        return chunk_position(it * 128 + group_thread(w, lane), CH, True)[0]

    def group_q_col(it, w, lane):  # first element of that chunk within its row
        return chunk_position(it * 128 + group_thread(w, lane), CH, True)[1]

    @T.macro
    def persistent_producer(smem, tiles, blocks, bars, kmap, vmap, count, cta):
        # persistent form, the producer thread: the blocks of every tile of thread block cta,
        # round after round, the running count carried across the tiles
        count[0] = 0
        for it in T.serial(TILE_ROUNDS):
            if program_of(it, cta) < PROGRAMS:
                pvbh: T.let[T.int32] = tile_of(program_of(it, cta))[0]
                pvt: T.let[T.int32] = tile_of(program_of(it, cta))[1]
                ph: T.let[T.int32] = pvbh % H
                phm: T.let[T.int32] = ph % HM
                plo: T.let[T.int32] = tiles[phm, pvt, 4]
                phi: T.let[T.int32] = tiles[phm, pvt, 5]
                producer_loop(smem, blocks, bars, kmap, vmap, phm, plo, phi, (pvbh // H) * KVH + ph // G, count[0])
                count[0] = count[0] + (phi - plo)

    @T.macro
    def load_group_q_rows(smem, q, b, h, row0, rstr, nrows, w, lane, q_off):
        # persistent form: the 64 Q rows of warp w's consumer warpgroup (tile rows 64 g.., g =
        # w // 4), by its 128 threads, into the group's half of the Q slot at q_off (the core
        # matrices of a [64, D] block; rows past nrows are zero): the rows its wgmmas alone read
        for it in T.serial(64 * CH // 128):
            copy16(T.address_of(smem[tile_elem(q_off + (w // 4) * 64 * D, group_q_row(it, w, lane),
                                               group_q_col(it, w, lane))]),
                   q.access_ptr("r", offset=((b * H + h) * N + T.if_then_else(
                       (w // 4) * 64 + group_q_row(it, w, lane) < nrows,
                       row0 + rstr * ((w // 4) * 64 + group_q_row(it, w, lane)), 0)) * D + group_q_col(it, w, lane)),
                   (w // 4) * 64 + group_q_row(it, w, lane) < nrows)

    @T.macro
    def load_tile_fields(fields, tiles, it, cta, count: int):
        # persistent form: the first ``count`` of the 7 ``tiles`` fields of the tile of round it
        # (row0, row stride, rows, component, first and end block, split slot) -> fields, the
        # rows 0 past the last program (a round of no tile: its Q read-ahead copies nothing)
        nprog: T.let[T.int32] = T.min(program_of(it, cta), PROGRAMS - 1)
        nvbh: T.let[T.int32] = tile_of(nprog)[0]
        nvt: T.let[T.int32] = tile_of(nprog)[1]
        for i in T.unroll(count):
            fields[i] = T.if_then_else(T.And(i == 2, program_of(it, cta) >= PROGRAMS), 0, tiles[nvbh % H % HM, nvt, i])

    @T.macro
    def next_q_rows(smem, q, q_fields, it, cta, w, lane):
        # persistent form: the warpgroup's Q rows of the tile of round it (program_of(it, cta))
        # -> its slot, cp.async chunks that the caller commits; q_fields: that tile's first 3
        # fields (load_tile_fields), loaded a tile before
        nvbh: T.let[T.int32] = tile_of(T.min(program_of(it, cta), PROGRAMS - 1))[0]
        load_group_q_rows(smem, q, nvbh // H, nvbh % H, q_fields[0], q_fields[1], q_fields[2], w, lane, q_slot(it))

    @T.macro
    def next_row_segments(sg, next_rows, seg_start, seg_count, seg_sigma, q_fields, it, cta, w, lane):
        # persistent form: the segments of this thread's rows of the tile of round it -> sg;
        # q_fields: that tile's first 3 fields (load_tile_fields)
        nhm: T.let[T.int32] = tile_of(program_of(it, cta))[0] % H % HM
        for r in T.unroll(RS):
            next_rows[r] = q_fields[0] + q_fields[1] * tile_row(w, lane, r)
        cache_row_segments(sg, next_rows, seg_start, seg_count, seg_sigma, nhm, w, lane, q_fields[2])

    @T.macro
    def store_rows_staged(out, lse, oacc, ms, ls, rows, smem, omap, q_off, b, h, row0, rstr, w, lane, words, nrows):
        # persistent form, the direct output: O / l of the warpgroup's 64 rows staged in its half
        # of the tile's Q slot (free once the tile's last S completed; the next tile's Q is in
        # the other slot, and this one takes Q again only a tile later, after the group's
        # barrier), in the 128-byte swizzle of omap (conflict-free: a warp's pairs of one
        # 8-column tile land in 8 distinct 16-byte chunks), then one thread stores the group's
        # 64 rows by TMA (cp.async.bulk.tensor, a bulk group that the next use of the slot waits
        # for: wait_for_staged_store) where the box is the group's rows (unit row stride, and
        # none of its rows past the tile but past the sequence, which TMA leaves out); elsewhere
        # each thread reads 16-byte chunks back along the rows and stores them. Shared memory is
        # written and read by PTX on raw addresses (the group's named barrier orders them), which
        # TVM's barrier planner does not track (tracked, it would want a barrier inside the
        # consumers' branch). Each row slot's pairs are written only for rows inside the tile,
        # as store_rows stores them: written for every slot, ptxas serialized the wgmmas (C7514).
        # On an H100 (thirty-fourth session, h100_thirty_fourth_ab.json), against store_rows'
        # 32 four-byte stores a thread, one process a tree, alternating: faster in all 8 pairs
        # (window +-1024 n=32k d=128 bf16 1.2-3.2%, Mistral's causal window 3.6-5.3%, dense
        # n=2048 b=16 4.1-7.2%, n=8192 b=4 2.5-3.3%), and faster than the 16-byte path alone in
        # all 8; sustained 4 s under the power cap, window +-1024 2.8-4.0% (bf16) and 3.7-4.4% (fp16)
        full_row_sums(ls)
        for r in T.unroll(RS):
            if tile_row(w, lane, r) < nrows:
                if with_lse:
                    if lane % 4 == 0:
                        lse[b, h, rows[r]] = natural_lse(ms[r], ls[r])
                for dtl in T.unroll(DT):
                    T.evaluate(convert_pair(words, 0, normalised(oacc[((r // 2) * DT + dtl) * 4 + (r % 2) * 2], ls[r]),
                                            normalised(oacc[((r // 2) * DT + dtl) * 4 + (r % 2) * 2 + 1], ls[r]), dt))
                    T.ptx.st.shared.b32(T.address_of(smem[swizzle128_elem(q_off + (w // 4) * 64 * D, 64,
                                                                          tile_row(w, lane, r) - (w // 4) * 64,
                                                                          dtl * 8 + lane % 4 * 2)]), words[0])
        T.ptx["fence.proxy.async.shared::cta"]()  # the staged rows, for the TMA store
        T.evaluate(group_barrier(w))
        if T.And(rstr == 1, T.Or((w // 4) * 64 + 64 <= nrows, row0 + nrows >= N)):
            if group_thread(w, lane) == 0:
                if (w // 4) * 64 < nrows:
                    if out_evict_first:
                        policy = T.alloc_local((1,), "uint64")
                        T.evaluate(create_l2_policy(policy[0], "evict_first"))
                        T.evaluate(tma_store_rows(omap, row0 + (w // 4) * 64, b * H + h, smem,
                                                  q_off + (w // 4) * 64 * D, policy[0]))
                    else:
                        T.evaluate(tma_store_rows(omap, row0 + (w // 4) * 64, b * H + h, smem, q_off + (w // 4) * 64 * D))
                    T.evaluate(T.ptx.cp.async_.bulk.commit_group())
        else:
            for it in T.unroll(64 * CH // 128):
                T.ptx.ld.shared.v4.b32(words[0], words[1], words[2], words[3], T.address_of(smem[swizzle128_elem(
                    q_off + (w // 4) * 64 * D, 64, group_q_row(it, w, lane), group_q_col(it, w, lane))]))
                if (w // 4) * 64 + group_q_row(it, w, lane) < nrows:
                    T.ptx.st.global_.v4.b32(T.address_of(out[b, h, row0 + rstr * ((w // 4) * 64 + group_q_row(it, w, lane)),
                                                                group_q_col(it, w, lane)]),
                                            words[0], words[1], words[2], words[3])

    @T.macro
    def wait_for_staged_store():
        # the TMA store of the group's staged rows has read them (its thread; no-op elsewhere)
        if STAGED_STORE:
            T.evaluate(T.ptx.cp.async_.bulk.wait_group.read(0))

    @T.macro
    def persistent_consumers(smem, q, tiles, blocks, kv_len, out, o_part, ml_part, split_o, split_ml, lse, bars, vbad,
                             omap, seg_start, seg_count, seg_sigma, sg, rng, desc, sacc, pf, pw, oacc, ms, ls, mb, al, rows,
                             next_rows, tile_ahead, q_ahead, words, nonfinite, vflag, px, pxw, vx, vxw, count, cta, w,
                             lane):
        # persistent form, the consumer warpgroups: every tile of thread block cta, round after
        # round, each from a fresh state, the running count carried across the tiles (the same
        # count as the producer's: both walk the same tiles' blocks). Each warpgroup works on its
        # own: its 64 rows of Q (its half of a Q slot, read by its wgmmas alone), its segments,
        # its flags and exact path; nothing waits for the other group but the producer's stages
        # and, with two groups, the turns at the tensor cores, which alternate across tiles as
        # within one (so one group's last P V, O stores and next tile's start run beside the
        # other group's GEMMs). The next tile's start is read ahead: the group's Q rows
        # (cp.async into its half of the other slot, once its warps are past the previous tile,
        # which read it) land while this tile runs, and its rows' segments are loaded into sg
        # once this tile's last softmax no longer needs them, while its last P V runs and O is
        # stored. Only the first tile loads both at its start, its Q before the round loop. The
        # tile's seven fields (tile_ahead) and the next tile's first three (q_ahead, for its Q
        # and segments) are read a tile ahead into registers, and the next rows' segments are
        # loaded after the last P V is issued, before it is waited for: on an H100, A/B pairs
        # (one process a tree, alternating), window +-1024 n=32k d=128 0.4-0.7% faster in bf16
        # (4 of 4 pairs) and 1.1-1.6% in fp16, dense n=2048 b=16 (16 blocks a tile) 2.1-2.8% and
        # n=8192 b=4 0.6-1.3% faster, Mistral's causal window within +-2.3% either way, window
        # +-4096 0-1.3% slower
        # (benchmarks/results/h100_thirty_first_ab.json tree pf, h100_thirty_third_ab.json). As
        # ptxas compiles it (window +-1024 d=128 fp16, SASS): 168 registers and no spill (the
        # grid form: 16 bytes), 502 instructions a FULL block (the grid form 511). Each
        # read-ahead is issued every round, past the last tile too (zero rows of the last
        # program into the free slot): behind a branch, ptxas kept the block loop's descriptors
        # in vector registers (562 instructions); and the first tile's Q loaded in the round
        # loop kept its thread offsets live through it (76-96 bytes spilled)
        count[0] = 0
        load_tile_fields(q_ahead, tiles, 0, cta, 3)
        next_q_rows(smem, q, q_ahead, 0, cta, w, lane)  # the first tile's, into slot 0
        T.evaluate(T.ptx.cp.async_.commit_group())
        load_tile_fields(tile_ahead, tiles, 0, cta, 7)
        load_tile_fields(q_ahead, tiles, 1, cta, 3)
        # group 0 goes first; group 1 passes every turn it takes, the last included. The
        # group's index from lane 0 (a shuffle), so that ptxas knows the branch warp-uniform:
        # on threadIdx.y, it made the block loop's descriptors vector registers (560
        # instructions a FULL block instead of 502)
        if PINGPONG:
            if warpgroup_index(w) == 1:
                T.evaluate(pass_turn(w))
        for it in T.serial(TILE_ROUNDS):
            if program_of(it, cta) < PROGRAMS:
                pvbh: T.let[T.int32] = tile_of(program_of(it, cta))[0]
                pb: T.let[T.int32] = pvbh // H
                ph: T.let[T.int32] = pvbh % H
                phm: T.let[T.int32] = ph % HM
                prow0: T.let[T.int32] = tile_ahead[0]
                prstr: T.let[T.int32] = tile_ahead[1]
                pnrows: T.let[T.int32] = tile_ahead[2]
                pcomp: T.let[T.int32] = tile_ahead[3]
                plo: T.let[T.int32] = tile_ahead[4]
                phi: T.let[T.int32] = tile_ahead[5]
                pslot: T.let[T.int32] = tile_ahead[6]
                start_tile_state(rows, ms, ls, oacc, prow0, prstr, w, lane)
                if it == 0:
                    cache_row_segments(sg, rows, seg_start, seg_count, seg_sigma, phm, w, lane, pnrows)
                T.evaluate(T.ptx["cp.async.wait_group"](0))  # this thread's chunks of this tile's Q
                wait_for_staged_store()  # the previous tile's O left the slot the read-ahead takes
                T.ptx["fence.proxy.async.shared::cta"]()  # Q, written by this thread, for wgmma
                # the group's Q rows of this tile have landed, and each of its warps is past the
                # previous tile (its wgmmas read the group's half of the other slot, which the
                # next tile's rows take); the other group is not waited for
                T.evaluate(group_barrier(w))
                next_q_rows(smem, q, q_ahead, it + 1, cta, w, lane)
                T.evaluate(T.ptx.cp.async_.commit_group())
                consumer_blocks(smem, blocks, bars, vbad, sg, rng, desc, sacc, pf, pw, oacc, ms, ls, mb, al, words,
                                nonfinite, vflag, px, pxw, vx, vxw, phm, plo, phi, w, lane,
                                key_length(spec, kv_len, pb), count[0], q_slot(it), False)
                load_tile_fields(tile_ahead, tiles, it + 1, cta, 7)
                if phi > plo:
                    issue_last_pv(smem, blocks, bars, vbad, desc, pf, pw, oacc, al, words, nonfinite, vflag, px, pxw,
                                  vx, vxw, phm, plo, phi, w, lane, key_length(spec, kv_len, pb), count[0], False)
                if program_of(it + 1, cta) < PROGRAMS:
                    next_row_segments(sg, next_rows, seg_start, seg_count, seg_sigma, q_ahead, it + 1, cta, w, lane)
                load_tile_fields(q_ahead, tiles, it + 2, cta, 3)
                if phi > plo:
                    finish_last_pv(bars, plo, phi, lane, count[0])
                if STAGED_STORE:
                    if split_chunk(plan_shape, pslot):
                        store_slot(split_o, split_ml, oacc, ms, ls, pvbh, pslot, w, lane, pnrows)
                    else:
                        store_rows_staged(out, lse, oacc, ms, ls, rows, smem, omap, q_slot(it), pb, ph, prow0, prstr,
                                          w, lane, words, pnrows)
                else:
                    store_tile(out, o_part, ml_part, split_o, split_ml, lse, oacc, ms, ls, rows, pb, ph, pvbh, pcomp,
                               pslot, w, lane, pnrows)
                count[0] = count[0] + (phi - plo)
        T.evaluate(T.ptx["cp.async.wait_group"](0))  # the last read-ahead (of no tile) lands before the exit
        wait_for_staged_store()  # and the last tile's O store has read its rows
        if PINGPONG:  # group 1's first pass and last pass meet one sync each: the counts balance
            if warpgroup_index(w) == 0:
                T.evaluate(take_turn(w))

    @T.macro
    def persistent_ws(smem, q, tiles, blocks, kv_len, out, o_part, ml_part, split_o, split_ml, lse, bars, vbad, kmap,
                      vmap, omap, seg_start, seg_count, seg_sigma, sg, rng, desc, sacc, pf, pw, oacc, ms, ls, mb, al, rows,
                      next_rows, tile_ahead, q_ahead, words, nonfinite, vflag, px, pxw, vx, vxw, count, cta, tid, w,
                      lane):
        # the persistent warp-specialized form: the setup once, then each role its own loop over
        # the rounds (one loop holding both roles made ptxas keep a 216-byte stack)
        ws_setup(bars, vbad, tid)
        if w >= W:
            T.evaluate(T.ptx["setmaxnreg.dec.sync.aligned.u32"](WS_PRODUCER_REGS))
            if w == W and lane == 0:
                persistent_producer(smem, tiles, blocks, bars, kmap, vmap, count, cta)
        else:
            T.evaluate(T.ptx["setmaxnreg.inc.sync.aligned.u32"](CONSUMER_REGS))
            persistent_consumers(smem, q, tiles, blocks, kv_len, out, o_part, ml_part, split_o, split_ml, lse, bars,
                                 vbad, omap, seg_start, seg_count, seg_sigma, sg, rng, desc, sacc, pf, pw, oacc, ms, ls, mb,
                                 al, rows, next_rows, tile_ahead, q_ahead, words, nonfinite, vflag, px, pxw, vx, vxw, count,
                                 cta, w, lane)

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
        lse: T.Buffer((B, H, N) if with_lse else (1,), "float32"),
    ):
        T.func_attr({"global_symbol": "tiled", "tirx.noalias": True})
        if tma:  # host side: the K and V tensor maps (dims innermost first: 64 elements of a
            # row, rows, d-halves, batch x KV head), boxes of BC rows, 128-byte swizzle
            kmap: T.let[T.TensorMap()] = T.tvm_stack_alloca("tensormap", 1)
            vmap: T.let[T.TensorMap()] = T.tvm_stack_alloca("tensormap", 1)
            T.evaluate(encode_row_block_map(kmap, k.data, B * KVH, N, D, BC, dt, STEP))
            T.evaluate(encode_row_block_map(vmap, v.data, B * KVH, N, D, BC, dt, STEP))
            if STAGED_STORE:  # the output's, boxes of one consumer warpgroup's 64 rows
                omap: T.let[T.TensorMap()] = T.tvm_stack_alloca("tensormap", 1)
                T.evaluate(encode_row_block_map(omap, out.data, B * H, N, D, 64, dt, 1))
        # the grid form: program gy B H + gx (the order the GPU dispatches thread blocks in) is
        # the tile program_tile says (tile_of); the persistent form: gx is the thread block,
        # which walks programs of its own (gy: 1)
        for gx in T.thread_binding(persistent if PERSISTENT else B * H, thread="blockIdx.x"):
            for gy in T.thread_binding(1 if PERSISTENT else GRID_ROWS, thread="blockIdx.y"):
                with launch_bounds(MIN_BLOCKS):
                    for w in T.thread_binding(W + PRODUCER_WARPS, thread="threadIdx.y"):
                        for lane in T.thread_binding(32, thread="threadIdx.x"):
                            with T.sblock("tile"):
                                T.reads()
                                T.writes()
                                # one allocation (Q | K stages | V stages): cp.async writes are invisible
                                # to TVM's shared-memory planner, which would otherwise overlap K with Q.
                                # Named apart from the backward kernels' "smem": in one CUDA module an
                                # extern shared array is one symbol with one alignment, and the TMA
                                # stages need 1024 bytes (compile.check_shared_declarations)
                                qkv_smem = T.sblock_alloc_buffer((SMEM,), dt, scope="shared.dyn", align=SMEM_ALIGN)
                                # per stage: 1 + the block index whose V holds a non-finite value
                                # (warp-specialized: per consumer warpgroup and stage)
                                vbad = T.sblock_alloc_buffer((stages * FLAG_GROUPS,), "int32", scope="shared")
                                qf = T.sblock_alloc_buffer((MT * KD * 8,), dt, scope="local")
                                bf = T.sblock_alloc_buffer((8,), dt, scope="local")
                                pf = T.sblock_alloc_buffer((MT * KC * 8,), dt, scope="local")
                                pw = T.decl_buffer((MT * KC * 4,), "uint32", data=pf.data, scope="local")  # pf's pairs
                                sacc = T.sblock_alloc_buffer((MT * NTL * 4,), "float32", scope="local")
                                sacc2 = T.sblock_alloc_buffer((MT * NTL * 4,), "float32", scope="local")
                                oacc = T.sblock_alloc_buffer((MT * DT * 4,), "float32", scope="local")
                                nonfinite = T.sblock_alloc_buffer((NONFINITE_CHAINS,), "uint32", scope="local")
                                words = T.sblock_alloc_buffer((4,), "uint32", scope="local")
                                vflag = T.sblock_alloc_buffer((1,), "int32", scope="local")
                                if warp_specialized:  # its exact path's pairs of P (one per row slot) and of V
                                    px = T.sblock_alloc_buffer((RS * 2,), dt, scope="local")
                                    pxw = T.decl_buffer((RS,), "uint32", data=px.data, scope="local")
                                    vx = T.sblock_alloc_buffer((2,), dt, scope="local")
                                    vxw = T.decl_buffer((1,), "uint32", data=vx.data, scope="local")
                                # per thread row: sequence row, running max, running (per-thread) sum,
                                # block max / new max, rescale factor, cached segments
                                rows = T.sblock_alloc_buffer((RS,), "int32", scope="local")
                                ms = T.sblock_alloc_buffer((RS,), "float32", scope="local")
                                ls = T.sblock_alloc_buffer((RS,), "float32", scope="local")
                                mb = T.sblock_alloc_buffer((RS,), "float32", scope="local")
                                al = T.sblock_alloc_buffer((RS,), "float32", scope="local")
                                sg = T.sblock_alloc_buffer((RS * S * 3,), "int32", scope="local")
                                rng = T.sblock_alloc_buffer((RS * S * 2,), "int32", scope="local")
                                desc = T.sblock_alloc_buffer((2,), "uint64", scope="local")
                                if tma:  # per stage: the mbarrier its TMA copies complete on
                                    kv_ready = T.sblock_alloc_buffer((stages,), "uint64", scope="shared", align=8)
                                if warp_specialized:  # per stage: K and V landed, K and V released
                                    ws_bars = T.sblock_alloc_buffer((4 * stages,), "uint64", scope="shared", align=8)
                                if PERSISTENT:
                                    # blocks a role has walked in the tiles before this one
                                    count = T.sblock_alloc_buffer((1,), "int32", scope="local")
                                    # the sequence rows of the next tile's row slots (its segments' loads)
                                    next_rows = T.sblock_alloc_buffer((RS,), "int32", scope="local")
                                    # the tiles fields of the next tile, and the first 3 of the one
                                    # after it (its Q read-ahead), loaded a tile ahead
                                    tile_ahead = T.sblock_alloc_buffer((7,), "int32", scope="local")
                                    q_ahead = T.sblock_alloc_buffer((3,), "int32", scope="local")
                                    tid: T.let[T.int32] = w * 32 + lane
                                    persistent_ws(qkv_smem, q, tiles, blocks, kv_len, out, o_part, ml_part, split_o,
                                                  split_ml, lse, ws_bars, vbad, kmap, vmap, omap, seg_start, seg_count,
                                                  seg_sigma, sg, rng, desc, sacc, pf, pw, oacc, ms, ls, mb, al, rows,
                                                  next_rows, tile_ahead, q_ahead, words, nonfinite, vflag, px, pxw,
                                                  vx, vxw, count, gx, tid, w, lane)
                                else:  # one program: (batch x head vbh, row tile vt)
                                    vbh: T.let[T.int32] = tile_of(gy * (B * H) + gx)[0]
                                    vt: T.let[T.int32] = tile_of(gy * (B * H) + gx)[1]
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
                                    tid: T.let[T.int32] = w * 32 + lane
                                    start_tile_state(rows, ms, ls, oacc, row0, rstr, w, lane)
                                    if warp_specialized:
                                        ws_tile(qkv_smem, q, k, v, blocks, kv_len, out, o_part, ml_part, split_o, split_ml, lse, ws_bars, vbad,
                                                kmap, vmap, seg_start, seg_count, seg_sigma, sg, rng, desc, sacc, pf, pw, oacc, ms, ls, mb, al, rows,
                                                words, nonfinite, vflag, px, pxw, vx, vxw, b, h, hk, hm, vbh, row0, rstr, nrows, comp,
                                                blk_lo, blk_hi, slot, tid, w, lane)
                                    else:
                                        if tid < stages:
                                            T.ptx.st.shared.b32(T.address_of(vbad[tid]), 0)
                                        load_q_tile(qkv_smem, q, b, h, row0, rstr, nrows, tid)
                                        if stages == 4:
                                            # blocks 0 and 1 in flight; block 0 (and Q) landed and checked;
                                            # S_0 issued
                                            if blk_hi > blk_lo:
                                                issue_kv_block(qkv_smem, k, v, blocks[hm, blk_lo, 0], blocks[hm, blk_lo, 1], b, hk, tid, 0,
                                                               key_length(spec, kv_len, b))
                                            T.evaluate(T.ptx.cp.async_.commit_group())
                                            if blk_hi - blk_lo > 1:
                                                issue_kv_block(qkv_smem, k, v, blocks[hm, blk_lo + 1, 0], blocks[hm, blk_lo + 1, 1], b, hk, tid, 1,
                                                               key_length(spec, kv_len, b))
                                            T.evaluate(T.ptx.cp.async_.commit_group())
                                            T.evaluate(T.ptx["cp.async.wait_group"](1))
                                            # the flags' initial zeros are written before anyone tags block 0
                                            T.tvm_storage_sync("shared.dyn")
                                            if blk_hi > blk_lo:
                                                if blocks[hm, blk_lo, 2] == 0:
                                                    flag_nonfinite_v(qkv_smem, vbad, words, nonfinite, 0, 0, tid)
                                        if tma:
                                            init_stage_barriers(kv_ready, stages, tid)
                                            if tid == 0 and blk_hi > blk_lo:
                                                issue_kv_tma(qkv_smem, kv_ready, kmap, vmap, blocks[hm, blk_lo, 0], b * KVH + hk, 0)
                                            T.evaluate(T.ptx.cp.async_.commit_group())  # Q
                                            T.evaluate(T.ptx["cp.async.wait_group"](0))
                                        elif stages == 2:
                                            if blk_hi > blk_lo:
                                                issue_kv_block(qkv_smem, k, v, blocks[hm, blk_lo, 0], blocks[hm, blk_lo, 1], b, hk, tid, 0,
                                                               key_length(spec, kv_len, b))
                                            T.evaluate(T.ptx.cp.async_.commit_group())
                                            T.evaluate(T.ptx["cp.async.wait_group"](0))
                                        cache_row_segments(sg, rows, seg_start, seg_count, seg_sigma, hm, w, lane, nrows)
                                        if wgmma:  # make this thread's shared writes visible to the async proxy
                                            T.ptx["fence.proxy.async.shared::cta"]()
                                        T.tvm_storage_sync("shared.dyn")
                                        if not wgmma:
                                            load_q_fragments(qf, qkv_smem, w, lane)
                                        if stages == 4:
                                            if blk_hi > blk_lo:
                                                qk_wgmma_issue(sacc, desc, qkv_smem, 0, w, 0)
                                            # two blocks per iteration, so that S_j and S_j+1 live in two
                                            # register sets named statically
                                            for jj in T.serial((blk_hi - blk_lo + 1) // 2):
                                                pipelined_block(2 * jj, blk_hi - blk_lo, sacc, sacc2, qkv_smem, k, v, blocks, hm, blk_lo,
                                                                b, hk, tid, w, lane, sg, rng, pf, pw, oacc, ms, ls, mb, al, desc, vbad,
                                                                vflag, words, nonfinite, key_length(spec, kv_len, b))
                                                if 2 * jj + 1 < blk_hi - blk_lo:
                                                    pipelined_block(2 * jj + 1, blk_hi - blk_lo, sacc2, sacc, qkv_smem, k, v, blocks, hm,
                                                                    blk_lo, b, hk, tid, w, lane, sg, rng, pf, pw, oacc, ms, ls, mb, al,
                                                                    desc, vbad, vflag, words, nonfinite, key_length(spec, kv_len, b))
                                            T.ptx.wgmma.wait_group.sync.aligned(0)
                                        if stages != 4:
                                            for j in T.serial(blk_hi - blk_lo):
                                                col0: T.let[T.int32] = blocks[hm, blk_lo + j, 0]
                                                sig: T.let[T.int32] = blocks[hm, blk_lo + j, 1]
                                                full: T.let[T.int32] = blocks[hm, blk_lo + j, 2]
                                                stg: T.let[T.int32] = j % stages
                                                if stages == 1:
                                                    T.tvm_storage_sync("shared.dyn")
                                                    load_kv_block(qkv_smem, k, v, col0, sig, b, hk, tid, key_length(spec, kv_len, b))
                                                elif tma:  # block j's bytes have landed (its stage's (j // 2)-th phase)
                                                    T.cuda.mbarrier_wait(T.address_of(kv_ready[stg]), (j // stages) % 2)
                                                else:
                                                    # block j has landed (this thread's copies: wait; everyone's:
                                                    # the barrier, which also frees the other stage for block j + 1)
                                                    T.evaluate(T.ptx["cp.async.wait_group"](0))
                                                if v_checked(full, col0, sig, key_length(spec, kv_len, b)):
                                                    flag_nonfinite_v(qkv_smem, vbad, words, nonfinite, stg, j, tid)
                                                # the cp.async wgmma form: K/V are generic writes that wgmma reads
                                                # (the async proxy). The TMA form's K/V come by the async proxy
                                                # and its generic shared writes (V flags, the exact path's P) are
                                                # read by CUDA cores only; its thread 0 fences before each copy
                                                # (issue_tma_pair), after the barrier, which orders the other
                                                # threads' reads of the stage before the copy that overwrites it.
                                                # Dropped for TMA: H100, d=64 with fold_scale, three alternations
                                                # (h100_forward_ab.json run twenty_sixth_fence): dilated +-256
                                                # step 2 -1.6 to -1.8%, +-256 + 4 global b=8 -1.2, -1.3, +0.2%
                                                if wgmma and not tma:
                                                    T.ptx["fence.proxy.async.shared::cta"]()
                                                T.tvm_storage_sync("shared.dyn")
                                                if tma:
                                                    if tid == 0 and j + 1 < blk_hi - blk_lo:
                                                        issue_kv_tma(qkv_smem, kv_ready, kmap, vmap, blocks[hm, blk_lo + j + 1, 0],
                                                                     b * KVH + hk, (j + 1) % stages)
                                                elif stages == 2:
                                                    if j + 1 < blk_hi - blk_lo:
                                                        issue_kv_block(qkv_smem, k, v, blocks[hm, blk_lo + j + 1, 0],
                                                                       blocks[hm, blk_lo + j + 1, 1], b, hk, tid, (j + 1) % stages,
                                                                       key_length(spec, kv_len, b))
                                                    T.evaluate(T.ptx.cp.async_.commit_group())
                                                if wgmma:
                                                    qk_wgmma(sacc, desc, qkv_smem, stg, w)
                                                else:
                                                    qk_tile(sacc, qf, bf, qkv_smem, stg, lane)
                                                mask_scores(sacc, sg, rng, full, col0, sig, lane, key_length(spec, kv_len, b))
                                                online_softmax(sacc, pf, pw, oacc, ms, ls, mb, al)
                                                T.ptx.ld.shared.b32(vflag[0], T.address_of(vbad[stg]))
                                                if vflag[0] == j + 1:
                                                    pv_exact(oacc, pf, qkv_smem, stg, w, lane)
                                                elif wgmma:
                                                    pv_wgmma(oacc, pf, desc, qkv_smem, stg)
                                                else:
                                                    pv_tile(oacc, pf, bf, qkv_smem, stg, lane)
                                        if split_chunk(plan_shape, slot):
                                            store_slot(split_o, split_ml, oacc, ms, ls, vbh, slot, w, lane, nrows)
                                        else:
                                            store_rows(out, o_part, ml_part, lse, oacc, ms, ls, rows, b, h, vbh, comp, w, lane, nrows)

    tiled = without_unused_kv_len(spec, tiled)
    if with_lse and direct:
        return tiled
    return tvm.tirx.PrimFunc([p for p in tiled.params if p.name != "lse"], tiled.body, tiled.ret_type, tiled.attrs)
