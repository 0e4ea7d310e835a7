"""Warp-level tensor-core backward of sparse attention (CUDA, fp16/bf16, ``mma.sync m16n8k16``),
FlashAttention-2 style, driven by tile plans (:mod:`tvm_splat.formats.tile_plan`).

Two PrimFuncs (``BACKWARD_MMA_KERNEL_NAMES``), one program per (batch x head, tile), both the
same sequence of named steps over a tile's column blocks, with the roles of the operands
swapped:

* ``bwd_dq`` — a tile of query rows over the column blocks of the *mask's* tile plan:
  ``delta = rowsum(dO * O) - dlse`` once per row (written out for ``bwd_dkdv``); per block
  ``S = Q K^T`` and ``dP = dO V^T`` (``mma``), ``P = 2^(S scale log2(e) - lse log2(e))``,
  ``dS = P (dP - delta)``, ``dQ += dS K`` (``ldmatrix.trans`` for K); ``dq = scale dQ``.
* ``bwd_dkdv`` — a tile of keys over the column blocks (query rows) of the *transposed* mask's
  tile plan: ``S^T = K Q^T``, ``dP^T = V dO^T``, ``P^T``, ``dS^T`` with the lse and delta of
  each block column (query row; brought into shared memory with the block, in its ``cp.async``
  group), ``dV += P^T dO``, ``dK += dS^T Q``; ``dk = scale dK``. GQA:
  the program loops over the query heads of its KV head's group and sums inside (nothing
  repeated, no atomics); all heads of a group must share one mask head (one mask head, or no
  grouping).

Layout: ``W`` warps, 16 rows each (``BR = 16 W``); lane ``l`` of warp ``w`` holds tile rows
``16 w + l / 4`` and ``16 w + l / 4 + 8`` (the ``m16n8k16`` accumulator layout). The tile's two
A operands (Q and dO, or K and V) and the block's two B operands (K and V, or Q and dO) sit in
dynamic shared memory, rows padded by ``ROW_PAD`` elements against bank conflicts, and are read
into fragments by ``ldmatrix`` at each use (persistent fragments for both tile operands and
both accumulators of ``bwd_dkdv`` would exceed 255 registers at ``head_dim`` 128). Block
operands double-buffered and fetched with ``cp.async`` one block ahead (``stages=2``, one
barrier per block, the forward's two-stage scheme) or plain 16-byte loads (``stages=1``, two
barriers); accumulation in float32; P and dS are rounded to the input dtype as the A operands
of the second products (as FlashAttention-2 does).

Hopper form (``wgmma=True``, sm_90a, :class:`~tvm_splat.schedules.backward_mma.BackwardMmaKnobs`
``.wgmma``): the four operands sit unpadded in 8x8 core matrices (the forward's wgmma layout,
:mod:`tvm_splat.kernels.tiled_mma`); ``S = X U^T`` and ``dP = Y W^T`` are warpgroup MMAs
(``wgmma.mma_async``, m64 n=BC) with both operands read K-major from shared memory through
matrix descriptors, issued as one group and waited for; ``dQ += dS K`` (``dK += dS^T Q``,
``dV += P^T dO``) are warpgroup MMAs (m64 n=head_dim) with dS (P) from registers — the
accumulator layout of a warp's 16 rows is ``mma.sync``'s, and so is the A fragment
``as_operand`` builds — and the block operand read MN-major, as the forward reads V. A
warpgroup is 4 warps = 64 tile rows, so the selection, probability and store steps are the
``mma.sync`` form's. Shared writes (plain stores and ``cp.async``) reach the async proxy through
``fence.proxy.async`` before the barriers that publish them, and 16-byte chunks are copied down
the 8 rows of a core matrix first (8 threads of a shared-memory phase fill one 128-byte core
matrix; along a row they would hit the same 4 banks: Longformer-base backward 0.815 against
0.864 ms). Registers (ptxas, sm_90a, fp16): ``bwd_dq`` 144 at head_dim 64 and 133 at 128,
``bwd_dkdv`` 225 and 228, no spills. It passes its GPU tests (``tests/gpu/test_backward.py``,
``wgmma``, 64/64 on the H200). At 64-row tiles it ran 4-8% slower than ``mma.sync``; at
head_dim 128 with 128-row tiles (two warpgroups) and ``dq_bc=64`` 8% faster (Mistral n=8192
backward 5.49 vs 5.98 ms, window +-1024 n=32k 7.01 vs 7.62;
``benchmarks/results/h200_backward_knobs.json``), the sm_90a default from head_dim 128 on plans
of one component (:func:`~tvm_splat.schedules.backward_mma.default_backward_mma_knobs`; on causal
strided, two components, these tiles were 38% slower).

Overlapped Hopper form (``wgmma=True, stages=3``): three stages of block operands, and each
block's accumulating products (``dS K``; ``dS^T Q`` and ``P^T dO``) issued after the next
block's ``S`` and ``dP``, so that they run on the tensor cores while the CUDA cores compute that
block's P and dS. Per block ``j``: the barrier that publishes block ``j`` (every warpgroup has
waited for its products of block ``j - 2``, so stage ``(j + 1) % 3`` is free for the next
block's copies); ``S_j``, ``dP_j`` issued as group A; block ``j - 1``'s accumulation issued as
group B from its P/dS fragments and stage ``(j - 1) % 3``; ``wait_group 1`` (A done); P and dS
of block ``j`` in float32; ``wait_group 0`` (B done: the fragments are free); the fragments of
block ``j``. After the loop the last block's accumulation. The exact path of a flagged block
runs where its accumulation would be issued and commits an empty group, so the waits count the
same. A step toward FlashAttention-3's backward, which also issues ``S_{j+1}`` before ``dS_j``
(that needs the score accumulators twice). It passes its GPU tests (60/60 on the H200, both
dtypes, d=64/128, split-KV, NaN) but ran **slower** than the two-stage form on every case
measured (H200, fp16, ``h200_backward_knobs.json`` form ``h27``): Mistral n=8192
backward 5.91 against 5.52 ms (bwd_dq 2.15 vs 2.01, bwd_dkdv 3.65 vs 3.41), window +-1024
n=32k 7.56 vs 7.07, Longformer-base batch 4 (64-row tiles) 0.832 vs 0.811, causal strided 0.382
vs 0.375; so it is no default. Not profiled; ptxas reports neither spills nor serialization.

Fused-dQ form (``bwd_dkdv`` with ``fused_dq``, wgmma, two stages, ``head_dim == 16 * warps``):
per step, after dK and dV's operands P^T and dS^T are in registers, dS^T is staged in core
matrices and ``dQ^T [D, BC] = K^T dS^T`` runs over the tile's BR keys as ss warpgroup MMAs with
both operands read MN-major (warpgroup ``g`` computes head-dim rows ``64 g`` to ``64 g + 63``),
issued before dK and dV's products; its float32 result is added into ``dq_accum [B, H, N, D]``
by ``red.global.add.f32``, one per element. ``bwd_delta`` (:func:`delta_func`) computes delta
before it and ``bwd_dq_cast`` (:func:`dq_cast_func`) scales and casts after; ``bwd_dq`` does
not run, so S and dP are computed once, not twice. A key tile whose K holds a NaN or inf takes
an exact dQ path on CUDA cores (zero entries of dS^T skipped), behind a wait for every wgmma
group (ptxas serializes every wgmma of the kernel otherwise). Measured slower than the two
kernels except on a long window (``BackwardMmaKnobs``), so it is no default.

Its two variants, aimed at the two losses of that measurement (compiled and CPU-tested, **not
yet run on a GPU**):

* ``fused_dq="bulk"``: instead of one atomic per element, each step's dQ^T accumulators are
  staged as dQ rows, float32 ``[BC, D + 4]`` in static shared memory (the padding puts a warp's
  32 stores in 32 banks), published by ``fence.proxy.async`` and a barrier, and thread
  ``c NTHR / BC`` (every warp a share; thread ``c mod NTHR`` when BC exceeds the thread
  count) adds row ``c`` into ``dq_accum`` with one ``cp.reduce.async.bulk.global.shared::cta
  .bulk_group.add.f32`` of ``D x 4`` bytes (FlashAttention-3's TMA reduce-add): BC
  asynchronous reductions per step instead of BC x D atomics, at one more barrier per step.
  Before the barrier that precedes the next staging each thread waits until its reductions
  have read their rows (``cp.async.bulk.wait_group.read 0``), and before the program ends
  until they have completed. ptxas (sm_90a, fp16, no spill): 255 registers at d=128 with
  64-column blocks (window), 227 at d=64.
* ``per_query_head`` (grouped KV heads): one program per (batch x query head, tile) instead of
  per KV head, so the programs running at once add dQ into the rows of fewer heads (Mistral's
  grid: 2 query heads instead of 8, about 8 MB of float32 instead of 34, against an L2 of 50
  MB); each adds its scaled dK and dV into float32 ``dk_accum``, ``dv_accum`` by
  ``red.global.add.v2.f32`` (two adjacent columns per reduction) and ``bwd_kv_cast``
  (:func:`kv_cast_func`) casts them, so no split or component sums of dk/dv run. 255 registers
  at d=128 in either dQ form, no spill.

TMA form of ``bwd_dkdv`` (``tma``, wgmma with two stages, head_dim a multiple of 64, plans whose
blocks step rows by one: :func:`~tvm_splat.kernels.tiled_mma.check_tma_plan`): each step's Q
and dO blocks arrive by two ``cp.async.bulk.tensor`` copies that thread 0 issues against the stage's mbarrier, 128-byte
swizzled as the forward's K and V (:func:`~tvm_splat.kernels.tiled_mma.swizzle128_elem`), in
place of 8 ``cp.async`` chunks per thread; the lse and delta stay 4-byte ``cp.async`` copies.
H200, fp16, with the fused bulk dQ: bwd_dkdv Mistral n=8192 3.72 -> 3.00 ms, window +-1024
n=32k 5.22 -> 4.21, 255 registers and no spill either way (``h200_backward_knobs.json``, form
``fourteenth_dkdv_tma_d128``); the default there
(:data:`~tvm_splat.schedules.backward_mma.WGMMA_DKDV_TMA`), and at head_dim 64 beside an
``mma.sync`` bwd_dq (:data:`~tvm_splat.schedules.backward_mma.WGMMA_DKDV_TMA_NARROW_HEADS`:
backward 8-10% faster, ``fifteenth_d64_default``) or, with two segments per key row, with the
fused dQ (:data:`~tvm_splat.schedules.backward_mma.WGMMA_FUSED_DQ_NARROW_HEADS`: 12-15% faster
again, ``seventeenth_prologue``).

Masked-out entries contribute exactly nothing: once per block, each row slot turns its cached
segments into ranges of block columns (:func:`~tvm_splat.kernels.common.block_range_cache`: a
segment of the block's step and residue holds the columns ``c`` between two exact quotients; a
FULL block holds all), and every score's P and dS are computed, then *selected* to exactly 0
outside the ranges (``2 S`` integer compares per score, no branch), so a NaN or inf in a
masked-out row of K, V, Q, dO, lse or delta never enters them. The products by the block
operand (``dS K``; ``P^T dO`` and ``dS^T Q``) would still multiply a zero by a non-finite
masked-out row, so, as in the forward (:mod:`tvm_splat.kernels.tiled_mma`), every PARTIAL block
checks whether those block rows are all finite (integer tests on the exponent bits of the
chunks each thread loaded) and takes an exact path on CUDA cores that skips zero entries when
one is not (uniform branch, never taken for finite inputs). FULL blocks need no check: every
row of the tile attends each of their columns, so a non-finite value there is a real input of
the result.

Measured reason for the block ranges (H200, fp16, ``benchmarks/results/h200_backward_knobs.json``):
the first form tested membership per score against the segments (a residue ``%`` by the
runtime step, in a branch per score) and read the lse and delta of ``bwd_dkdv`` from global
memory per score. Issue slots were 11-23% busy, the instruction fetch stalled on the loop's
code size, and the integer pipe was the busiest. With block ranges, staged statistics and
``bwd_dq``'s smaller shared memory (:func:`_shared_elems`) the backward of Longformer-base
(window +-256, 4 global tokens, n=4096, 12 heads, d=64, batch 4) fell from 6.70 to 1.28 ms, and
Mistral's (causal window 4096, n=8192, 32/8 heads, d=128) from 13.98 to 6.23 ms.

Buffers: q, out, dout, dq ``[B, H, N, D]``; k, v, dk, dv ``[B, KVH, N, D]``; lse, dlse, delta
``[B, H, N]`` float32; ``seg_start``, ``seg_count``, ``seg_sigma`` ``[HM, N, S]``, ``tiles [HM,
NT, 7]``, ``blocks [HM, NB, 3]`` int32 of the mask's plan (``bwd_dq``) or the transposed mask's
plan (``bwd_dkdv``, parameters prefixed ``t``). Plans have no CSR fallback rows
(:func:`check_backward_mma_plan`), so within one component each row (key) lies in exactly one
tile.

Split-KV (plans with slots, ``NS > 0``): a tile whose block list is much longer than the
typical one (the rows of global tokens in ``bwd_dq``; over the transpose, their columns in
``bwd_dkdv``) is split into chunks of consecutive blocks, each its own program (tile field 6:
its slot). P is recomputed from the global lse, so a chunk's share of a row's gradient is a
plain partial sum: the chunk writes its scaled float32 result, tile-local rows, into slot
``slot`` of ``dq_split [B H, NS, BR, D]`` (``dk_split``, ``dv_split [B KVH, NS, BR, D]``; last
parameters), and :func:`split_sum_func` adds each group's slots in slot order into the gradient
(or its component's partial slot). Every chunk of a tile computes ``delta`` for the tile's
rows in the same order and writes the same value. Without slots the kernels have no such
parameter and their code is that of the form without split-KV.

Several components (``C > 1``: a band with an aligned dilated or strided part, the forward's
row-aligned components, :mod:`tvm_splat.formats.tile_plan`): the components partition the
nonzeros and the tiles of each component partition all rows of a head. P is recomputed from the
global row lse, so there is no softmax state to merge: a component's share of a row's dq (of a
key's dk, dv over the transposed plan) is simply additive. Each program then writes its
*scaled* float32 result (``scale dQ``; ``scale dK``, ``dV``) into slot ``comp`` (tile field 3)
of a partial buffer ``dq_part [C, B, H, N, D]`` (``dk_part``, ``dv_part [C, B, KVH, N, D]``;
extra last parameters; ``dq``, ``dk``, ``dv`` stay in the signature, unwritten), and
:func:`sum_components_func` adds the ``num_comp[hm]`` slots a head writes and casts to the
input dtype (slots past ``num_comp[hm]`` are never read). Scaled in the tile, so one sum kernel
serves dq, dk and dv. ``delta`` is written by the tiles of component 0 only, which cover every
row. With ``C == 1`` the kernels write dq, dk, dv directly and have no partial parameter (the
generated code is that of the one-component form, unchanged).
"""
from __future__ import annotations

from types import SimpleNamespace

import tvm
from tvm.script import tirx as T

from .common import (LOG2E, NONFINITE_CHAINS, block_range_cache, nonfinite_fma, nonfinite_joined, row_segment_cache,
                     tile_grid_rows)
from .spec import AttentionSpec
from .tiled_mma import (MMA_TYPES, ROW_PAD, SHARED_BYTES_MAX, WGMMA_PAIR_TYPES, advance_desc, chunk_position,
                        core_matrix_elem, encode_row_block_map, init_stage_barriers, issue_tma_pair, k_major_step,
                        mn_major_step, swizzle128_elem, swizzled_k_major_desc, swizzled_mn_major_desc, wgmma_op)

__all__ = ["BACKWARD_MMA_KERNEL_NAMES", "check_backward_mma_shape", "check_backward_mma_plan", "part_shape",
           "split_part_shape", "backward_dq_mma_func", "backward_dkdv_mma_func", "sum_components_func",
           "split_sum_func", "delta_func", "dq_cast_func", "kv_cast_func", "fused_dq_form", "dq_stage_bytes",
           "per_query_head_programs", "kv_sums_form", "check_kv_sums"]

BACKWARD_MMA_KERNEL_NAMES = ("bwd_dq", "bwd_dkdv")
#: the blocks of :func:`sum_components_func` and :func:`split_sum_func` (what their GPU schedule binds)
SUM_BLOCK = "sum"
SPLIT_SUM_BLOCK = "split_sum"


def _adding_form(value, knob: str) -> str | None:
    """How knob ``knob`` = ``value`` adds float32 sums: None (``False``: it does not),
    ``"atomics"`` (``True`` or ``"atomics"``) or ``"bulk"``; anything else raises ``ValueError``."""
    if value is False or value is None:
        return None
    if value is True or value == "atomics":
        return "atomics"
    if value == "bulk":
        return "bulk"
    raise ValueError(f"{knob} must be False, True (\"atomics\") or \"bulk\", got {value!r}")


def fused_dq_form(fused_dq) -> str | None:
    """The form of ``BackwardMmaKnobs.fused_dq``: None (off: ``False``), ``"atomics"`` (``True``
    or ``"atomics"``: one ``red.global.add.f32`` per element) or ``"bulk"`` (one bulk reduction
    per staged dQ row); anything else raises ``ValueError``."""
    return _adding_form(fused_dq, "fused_dq")


#: float32 words of padding per staged dQ row (:func:`dq_stage_bytes`)
DQ_STAGE_PAD = 4


def kv_sums_form(per_query_head) -> str | None:
    """The form of ``BackwardMmaKnobs.per_query_head``, how a program per query head adds its dK
    and dV into the float32 sums: None (off: ``False``), ``"atomics"`` (``True`` or
    ``"atomics"``: one ``red.global.add.v2.f32`` per pair of adjacent columns) or ``"bulk"``
    (BC rows at a time staged in the bulk fused dQ's staging, then one
    ``cp.reduce.async.bulk`` per row: FlashAttention-3's epilogue for grouped heads); anything
    else raises ``ValueError``."""
    return _adding_form(per_query_head, "per_query_head")


def check_kv_sums(fused_dq, per_query_head) -> None:
    """``ValueError`` where ``per_query_head`` cannot go with ``fused_dq``: any per-query-head
    form needs a fused dQ (without it a program per query head would need the group's dK/dV
    summed across programs), the bulk one the bulk dQ (it stages in that staging)."""
    form = kv_sums_form(per_query_head)
    if form and not fused_dq_form(fused_dq):
        raise ValueError("per_query_head is a form of the fused dQ backward (fused_dq): without it a program per "
                         "query head would need the group's dK/dV summed across programs")
    if form == "bulk" and fused_dq_form(fused_dq) != "bulk":
        raise ValueError(f"per_query_head=\"bulk\" stages dK and dV rows where fused_dq=\"bulk\" stages dQ rows; "
                         f"got fused_dq={fused_dq!r}")


def per_query_head_programs(spec: AttentionSpec, fused_dq, per_query_head) -> bool:
    """Whether ``bwd_dkdv`` runs one program per query head, adding dK and dV into float32 sums:
    ``per_query_head`` (either form of :func:`kv_sums_form`) with a fused dQ form and grouped KV
    heads (with one query head per KV head the knob changes nothing)."""
    return bool(kv_sums_form(per_query_head) and fused_dq_form(fused_dq) and spec.group > 1)


def dq_stage_bytes(bc: int, d: int, fused_dq) -> int:
    """Bytes of the bulk fused-dQ form's float32 staging of a step's dQ rows, ``[bc, d + 4]``
    (0 in the other forms): the 4 words of padding put the 32 stores of a warp (4 block columns
    x 8 head-dim rows of the accumulator layout) in 32 different banks."""
    return 4 * bc * (d + DQ_STAGE_PAD) if fused_dq_form(fused_dq) == "bulk" else 0


def check_backward_mma_shape(spec: AttentionSpec, br: int, bc: int, warps: int, stages: int = 2,
                             wgmma: bool = False, fused_dq=False, tma: bool = False) -> None:
    """Raise ``ValueError`` when the tensor-core backward cannot take this spec and tile shape
    (``wgmma``: in its Hopper form, which needs whole warpgroups and bc, head_dim <= 256;
    ``fused_dq``: bwd_dkdv adding dQ by atomics or bulk reductions (:func:`fused_dq_form`),
    wgmma with two stages and head_dim 64 per warpgroup; ``tma``: bwd_dkdv's block operands by
    TMA, a form of the two-stage wgmma kernel whose tensor maps cut head_dim into 64-element
    swizzle rows; the plan's block steps are checked apart, :func:`~tvm_splat.kernels.tiled_mma.check_tma_plan`)."""
    form = fused_dq_form(fused_dq)
    if spec.dtype not in MMA_TYPES:
        raise ValueError(f"the tensor-core backward needs float16 or bfloat16 inputs, got {spec.dtype}")
    if spec.head_dim % 16:
        raise ValueError(f"the tensor-core backward needs head_dim a multiple of 16, got {spec.head_dim}")
    if bc % 16 or bc < 16:
        raise ValueError(f"the tensor-core backward needs bc a multiple of 16, got {bc}")
    if br != 16 * warps:
        raise ValueError(f"the tensor-core backward needs br == 16 * warps ({16 * warps}), got br={br}")
    if stages not in (1, 2, 3):
        raise ValueError(f"stages must be 1, 2 or 3, got {stages}")
    if stages == 3 and not wgmma:
        raise ValueError("stages=3 is the wgmma backward's overlapped form (wgmma=True), not mma.sync's")
    if wgmma and (warps % 4 or bc > 256 or spec.head_dim > 256):
        raise ValueError(f"the wgmma backward needs whole warpgroups (warps a multiple of 4) and bc, head_dim "
                         f"<= 256, got warps={warps}, bc={bc}, head_dim={spec.head_dim}")
    if form and (not wgmma or stages != 2 or spec.head_dim != 16 * warps):
        raise ValueError(f"the fused dQ (fused_dq={fused_dq!r}: bwd_dkdv adding dQ by {form}) is a form of the "
                         f"two-stage wgmma backward with head_dim = 64 x warpgroups (each warpgroup computes 64 "
                         f"columns of dQ), got wgmma={wgmma}, stages={stages}, warps={warps}, head_dim={spec.head_dim}; "
                         f"fused_dq=False (with per_query_head=False, and dkdv_tma=False unless the form stays wgmma "
                         f"with two stages) runs the two kernels, bwd_dq and bwd_dkdv")
    if tma and (not wgmma or stages != 2 or spec.head_dim % 64):
        raise ValueError(f"the TMA form of bwd_dkdv (dkdv_tma) is a form of the two-stage wgmma backward with "
                         f"head_dim a multiple of 64 (128-byte swizzle rows), got wgmma={wgmma}, stages={stages}, "
                         f"head_dim={spec.head_dim}; dkdv_tma=False runs its cp.async form")
    if (_shared_elems(br, bc, spec.head_dim, stages, wgmma=wgmma, fused_dq=bool(form)) * 2
            + dq_stage_bytes(bc, spec.head_dim, form) > SHARED_BYTES_MAX):
        raise ValueError(f"br={br}, bc={bc}, head_dim={spec.head_dim}, stages={stages} need more than the "
                         f"{SHARED_BYTES_MAX // 1024} KB of shared memory a block may have")


def check_backward_mma_plan(plan_shape, num_comp) -> None:
    """Raise ``ValueError`` unless the training kernels can run a tile plan (its shape and
    per-head ``num_comp``): no CSR fallback rows, at least one component per head (any number:
    they are summed, see the module docstring). Split-KV chunks are taken: the forward's are
    merged with their lse, the backward's gradients summed (:func:`split_sum_func`)."""
    if plan_shape.num_fallback or min(int(c) for c in num_comp) < 1:
        raise ValueError(f"the tensor-core training kernels need a tile plan without CSR fallback rows, "
                         f"got {plan_shape.key}")


def split_part_shape(spec: AttentionSpec, plan_shape, heads: int):
    """Shape of the float32 chunk results of a split plan, ``[B x heads, NS, BR, D]`` (one
    slot per chunk, tile-local rows), or a one-element dummy without split-KV (the kernels then
    take no such parameter)."""
    if not plan_shape.num_slots:
        return (1, 1, 1, 1)
    return (spec.batch * heads, plan_shape.num_slots, plan_shape.br, spec.head_dim)


def part_shape(spec: AttentionSpec, num_components: int, heads: int):
    """Shape of a float32 partial buffer of ``heads`` heads: ``[C, B, heads, N, D]``, or a
    one-element dummy when ``C == 1`` (the kernels then take no such parameter)."""
    if num_components <= 1:
        return (1, 1, 1, 1, 1)
    return (num_components, spec.batch, heads, spec.seq_len, spec.head_dim)


def _without(func, names):
    """``func`` without the parameters ``names`` (dummies its body never touches)."""
    return tvm.tirx.PrimFunc([p for p in func.params if p.name not in names], func.body, func.ret_type, func.attrs)


def _shared_elems(br, bc, d, stages, pair=True, wgmma=False, fused_dq=False):
    """Elements of the shared buffer: two tile operands, two block operands per stage, and the
    exact path's staging of its A operands (``pair``, bwd_dkdv: P and dS; bwd_dq: dS alone).
    bwd_dq at head_dim 128, bc=32, two stages: 73 KB, three thread blocks per SM on the H200's
    228 KB (with P staged too it would be 78 KB, two). ``wgmma``: operand rows unpadded (8x8
    core matrices). ``fused_dq``: dS^T staged once more, [br, bc] in core matrices, the B of
    the dQ product."""
    dp = d if wgmma else d + ROW_PAD
    return 2 * br * dp + 2 * stages * bc * dp + (2 if pair else 1) * br * (bc + ROW_PAD) + br * bc * bool(fused_dq)


def _steps(spec: AttentionSpec, plan_shape, warps: int, stages: int, dkdv: bool = False, wgmma: bool = False,
           fused_dq=False, tma: bool = False):
    """The steps both kernels are made of, as a namespace of TIR helpers and ``T.macro``\\ s;
    ``dkdv`` (bwd_dkdv): a block brings its query rows' lse and delta into shared memory, and the
    exact path stages P beside dS. ``wgmma`` (Hopper, sm_90a): the products are warpgroup MMAs
    (see the module docstring). ``tma``: the block operands arrive by TMA, 128-byte swizzled (the
    TMA form of ``bwd_dkdv``, :func:`backward_dkdv_mma_func`)."""
    BR, BC, W = plan_shape.br, plan_shape.bc, warps
    check_backward_mma_shape(spec, BR, BC, W, stages, wgmma, fused_dq, tma)
    D, N, S, dt = spec.head_dim, spec.seq_len, spec.max_segments, spec.dtype
    ab = MMA_TYPES[dt]
    fma_halves = nonfinite_fma(dt)  # the check of a block's rows for NaN and inf (flag_nonfinite)
    DP = D if wgmma else D + ROW_PAD  # elements per shared row (wgmma: 8x8 core matrices, unpadded)
    PP = BC + ROW_PAD  # elements per staged P / dS row
    KD, NTL, KC, DT = D // 16, BC // 8, BC // 16, D // 8  # k-steps of S, n-tiles of S, k-steps, n-tiles of dQ
    NTHR = 32 * W
    CH = D // 8  # 16-byte chunks per row
    X_OFF, Y_OFF = 0, BR * DP  # tile operands (Q, dO | K, V)
    U_OFF = 2 * BR * DP  # block operands (K, V | Q, dO), ``stages`` of each
    W_OFF = U_OFF + stages * BC * DP
    P_OFF = W_OFF + stages * BC * DP  # staging of the exact path: P (dkdv only), then dS
    DS_OFF = P_OFF + BR * PP if dkdv else P_OFF
    DQ_OFF = DS_OFF + BR * PP  # fused_dq: dS^T in core matrices ([BR, BC]), the B of dQ^T = K^T dS^T
    SMEM = _shared_elems(BR, BC, D, stages, pair=dkdv, wgmma=wgmma, fused_dq=bool(fused_dq))
    OVERLAP = stages == 3  # the overlapped Hopper form (module docstring)
    direct = plan_shape.num_components <= 1  # one component: dq, dk, dv written directly
    has_split = plan_shape.num_slots > 0  # split-KV: chunks of long tiles write slots (split_sum)
    zero = T.Cast(dt, T.float32(0))
    full_mask = T.uint32(0xFFFFFFFF)
    # wgmma descriptors (no swizzle; fields in 16-byte units), the forward's
    # (:mod:`~tvm_splat.kernels.tiled_mma`): an operand read K-major (the rows of X and U along
    # D) steps 128 B between core matrices along D and D / 8 * 128 B between 8-row groups; a
    # block operand read MN-major (U or W as the B of dS U, P W: along its rows) steps
    # D / 8 * 128 B between 8-row groups (LBO) and 128 B along D (SBO)
    KM_LBO, KM_SBO, MN_LBO, MN_SBO = 8, D, D, 8
    # TMA form: block operands as the forward's TMA K/V (``tiled_mma.swizzle128_elem``, read
    # through ``swizzled_k_major_desc`` and ``swizzled_mn_major_desc``)
    BLOCK_BYTES = BC * D * 2  # one block operand of one stage
    WG_S, WG_D, PAIR = wgmma_op(BC, dt), wgmma_op(D, dt), WGMMA_PAIR_TYPES[dt]

    def elem(base, u, c):  # element (row u, column c) of a [*, D] operand at ``base``
        return core_matrix_elem(base, u, c, D) if wgmma else base + u * DP + c

    def block_elem(base, u, c):  # element (u, c) of a stage's block operand at ``base`` (TMA: swizzled)
        return swizzle128_elem(base, BC, u, c) if tma else elem(base, u, c)

    def tile_row(w, lane, r):  # tile-local row of the thread's row slot r (0: row g, 1: row g + 8)
        return w * 16 + lane // 4 + 8 * r

    def acc_col(nt, lane, i):  # column within an 8-column accumulator tile of element i
        return nt * 8 + lane % 4 * 2 + i % 2

    def chunk_row(it, tid):  # row of the it-th 16-byte chunk this thread copies
        return chunk_position(it * NTHR + tid, CH, wgmma)[0]

    def chunk_col(it, tid):  # its first element within the row
        return chunk_position(it * NTHR + tid, CH, wgmma)[1]

    def own_chunk(base, it, tid, landed):  # first element of the it-th chunk a thread checks
        # (``landed``: of a block that landed by TMA, in order: any order covers it)
        return base + (it * NTHR + tid) * 8 if landed else elem(base, chunk_row(it, tid), chunk_col(it, tid))

    def ldmatrix_x4(frag, offset, smem, smem_offset, trans=False):
        return T.ptx_legacy.ldmatrix(trans, 4, ".b16", frag.data, offset, smem.access_ptr("r"), smem_offset, dtype=dt)

    def mma_16x8x16(a, a_offset, b, b_offset, c, c_offset):
        return T.ptx_legacy.mma("m16n8k16", "row", "col", ab, ab, "fp32", a.data, a_offset, b.data, b_offset,
                                c.data, c_offset, False, dtype="float32")

    # per block, per row slot and segment: the block columns it holds (the mask test of a score)
    block_ranges, in_block = block_range_cache(2, S, BC)

    @T.macro
    def load_rows(smem, base, src, b, h, first, stride, count, nrows_max, tid):
        # rows first + stride * u (u < count, else zeros) of src[b, h] -> shared at base
        for it in T.serial((nrows_max * CH + NTHR - 1) // NTHR):
            if it * NTHR + tid < nrows_max * CH:
                for e in T.vectorized(8):
                    smem[elem(base, chunk_row(it, tid), chunk_col(it, tid)) + e] = T.if_then_else(
                        chunk_row(it, tid) < count,
                        src[b, h, T.min(first + stride * chunk_row(it, tid), N - 1), chunk_col(it, tid) + e], zero)

    @T.macro
    def issue_rows(smem, base, src, b, h, first, stride, count, tid):
        # cp.async of the BC rows first + stride * u of src[b, h] -> shared at base; rows
        # u >= count are zero-filled (source size 0; the address is clamped into the tensor)
        for it in T.serial((BC * CH + NTHR - 1) // NTHR):
            if it * NTHR + tid < BC * CH:
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    T.address_of(smem[elem(base, chunk_row(it, tid), chunk_col(it, tid))]),
                    src.access_ptr("r", offset=((b * src.shape[1] + h) * N + T.min(
                        first + stride * chunk_row(it, tid), N - 1)) * D + chunk_col(it, tid)),
                    16, T.Cast("uint32", T.if_then_else(chunk_row(it, tid) < count, 16, 0))))

    def block_rows(col0, sig):  # rows of the column block at col0, sig inside the sequence
        # bwd_dkdv: unit steps (every block of windows and causal windows) without the integer
        # division that all threads ran at each block's issue (``ncu``, Mistral bwd_dkdv); in
        # bwd_dq the extra branch cost more than it saved (Longformer-large batch 8 bwd_dq 0.717
        # -> 0.739 ms, bwd_dkdv 1.110 -> 1.094; ``h200_backward_knobs.json``)
        if dkdv:
            return T.if_then_else(sig == 1, T.min(BC, N - col0), T.min(BC, (N - 1 - col0) // sig + 1))
        return T.min(BC, (N - 1 - col0) // sig + 1)

    @T.macro
    def copy_stat(stats, slot, src, b, h, col0, sig, u):
        # src[b, h, col0 + sig u] (0 past the block's rows) -> stats[slot]: a plain load
        # (stages == 1, the caller's barriers order it) or a 4-byte cp.async (stages == 2)
        if stages == 1:
            stats[slot] = T.if_then_else(u < block_rows(col0, sig), src[b, h, T.min(col0 + sig * u, N - 1)],
                                         T.float32(0))
        else:
            T.evaluate(T.ptx["cp.async.ca.shared.global"](
                T.address_of(stats[slot]),
                src.access_ptr("r", offset=(b * src.shape[1] + h) * N + T.min(col0 + sig * u, N - 1)),
                4, T.Cast("uint32", T.if_then_else(u < block_rows(col0, sig), 4, 0))))

    @T.macro
    def fetch_stats(stats, lse, delta, b, h, col0, sig, st, tid):
        # bwd_dkdv: the lse and delta of the block's BC query rows -> stage st of ``stats``
        # (float32 [stages, 2, BC]; rows past the count zero), in the block's cp.async group
        # with stages == 2
        for it in T.serial((BC + NTHR - 1) // NTHR):
            if it * NTHR + tid < BC:
                copy_stat(stats, st * 2 * BC + it * NTHR + tid, lse, b, h, col0, sig, it * NTHR + tid)
                copy_stat(stats, st * 2 * BC + BC + it * NTHR + tid, delta, b, h, col0, sig, it * NTHR + tid)

    @T.macro
    def fetch_block(smem, u_src, w_src, b, h, col0, sig, st, tid, stats, lse, delta, umap, wmap, ready):
        # a column block's two operands (and with dkdv: its rows' lse and delta) -> stage st:
        # plain loads (stages == 1, the caller's barriers order them), cp.async (stages == 2,
        # committed as one group) or, in the TMA form, two tensor copies by thread 0 on the
        # stage's mbarrier (umap, wmap: the tensor maps of u_src, w_src) beside the statistics'
        # cp.async group (the block's step is 1: :func:`~tvm_splat.kernels.tiled_mma.check_tma_plan`)
        if tma:
            if tid == 0:
                issue_tma_pair(smem, ready, st, 2 * BLOCK_BYTES, umap, U_OFF + st * BC * D, wmap, W_OFF + st * BC * D,
                               col0, b * u_src.shape[1] + h, 1, False)
        elif stages == 1:
            load_rows(smem, U_OFF, u_src, b, h, col0, sig, block_rows(col0, sig), BC, tid)
            load_rows(smem, W_OFF, w_src, b, h, col0, sig, block_rows(col0, sig), BC, tid)
        else:
            issue_rows(smem, U_OFF + st * BC * DP, u_src, b, h, col0, sig, block_rows(col0, sig), tid)
            issue_rows(smem, W_OFF + st * BC * DP, w_src, b, h, col0, sig, block_rows(col0, sig), tid)
        if dkdv:
            fetch_stats(stats, lse, delta, b, h, col0, sig, st, tid)
        if stages >= 2:
            T.evaluate(T.ptx.cp.async_.commit_group())

    @T.macro
    def flag_nonfinite(smem, base, bad, slot, words, nonfinite, tag, nrows_max, tid, landed):
        # this thread's own chunks of the rows at base (its stores or cp.async copies; ``landed``:
        # a TMA block every thread has waited for, read in order, whatever its layout): if one
        # holds a NaN or inf, tag ``bad[slot]`` (one slot per stage) with ``tag`` (through PTX,
        # untracked by TVM's barrier planner, as in the forward; the barrier that follows
        # publishes the tag)
        for c in T.unroll(NONFINITE_CHAINS):
            nonfinite[c] = T.uint32(0)
        for it in T.serial((nrows_max * CH + NTHR - 1) // NTHR):
            if it * NTHR + tid < nrows_max * CH:
                T.ptx.ld.shared.v4.b32(words[0], words[1], words[2], words[3], T.address_of(
                    smem[own_chunk(base, it, tid, landed)]))
                for i in T.unroll(NONFINITE_CHAINS):  # one packed FMA a word, a chain each
                    fma_halves(nonfinite[i], words[i], T.uint32(0), nonfinite[i])
        nonfinite[0] = nonfinite_joined(nonfinite)
        if nonfinite[0] != T.uint32(0):
            T.ptx.st.shared.b32(T.address_of(bad[slot]), tag)

    # per thread row: (start, last, sigma) of every segment (sigma 0: none)
    cache_row_segments = row_segment_cache(2, S, tile_row)

    @T.macro
    def tile_by_block(acc, af, bf, smem, a_base, b_base, w, lane):
        # acc = A B^T in registers: A the warp's 16 rows of the tile operand at a_base, B the
        # block operand at b_base (both [*, D] in shared)
        for i in T.unroll(NTL * 4):
            acc[i] = T.float32(0)
        for kk in T.unroll(KD):
            T.evaluate(ldmatrix_x4(af, 0, smem, a_base + (w * 16 + lane % 16) * DP + kk * 16 + 8 * (lane // 16)))
            for np in T.unroll(KC):
                T.evaluate(ldmatrix_x4(bf, 0, smem, b_base + (np * 16 + lane % 8 + 8 * (lane // 16)) * DP
                                       + kk * 16 + 8 * (lane // 8 % 2)))
                for hn in T.unroll(2):
                    T.evaluate(mma_16x8x16(af, 0, bf, hn * 4, acc, (np * 2 + hn) * 4))

    @T.macro
    def tile_by_block_wgmma(acc, desc, smem, a_base, b_base, w):
        # acc = A B^T by warpgroup MMAs: A this warpgroup's 64 rows of the tile operand at
        # a_base, B the block operand at b_base, both read K-major from shared; the first
        # k-step overwrites acc. Descriptors encoded once, each k-step's advanced. Issued; the
        # caller fences, commits and waits
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[0]), T.address_of(smem[a_base + (w // 4) * 64 * D]),
                                              KM_LBO, KM_SBO, 0)
        if tma:
            T.evaluate(swizzled_k_major_desc(desc[1], smem, b_base, BC))
        else:
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[1]), T.address_of(smem[b_base]), KM_LBO, KM_SBO, 0)
        for kk in T.unroll(KD):
            T.ptx[WG_S](*[acc[i] for i in range(NTL * 4)], advance_desc(desc[0], k_major_step(kk, BR, False)),
                        advance_desc(desc[1], k_major_step(kk, BC, tma)), kk > 0, 1, 1, 0, 0)

    @T.macro
    def accumulate_wgmma(acc, frag, desc, smem, b_base):
        # acc += frag B by warpgroup MMAs: frag the A operand in registers (as_operand's layout
        # is wgmma's A fragment), B the block operand at b_base read MN-major from shared.
        # Issued; the caller fences, commits and waits
        if tma:
            T.evaluate(swizzled_mn_major_desc(desc[1], smem, b_base, BC))
        else:
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[1]), T.address_of(smem[b_base]), MN_LBO, MN_SBO, 0)
        for kc in T.unroll(KC):
            T.ptx[WG_D](*[acc[i] for i in range(DT * 4)],
                        *[T.reinterpret("uint32", frag.vload([kc * 8 + 2 * i], PAIR)) for i in range(4)],
                        advance_desc(desc[1], mn_major_step(kc, D, tma)), True, 1, 1, 1)

    @T.macro
    def as_operand(frag, acc):
        # float32 accumulators of a [16, BC] product -> the A operand (input dtype) of a product
        # over the block (two 8-column accumulator tiles = one 16-deep k-step)
        for kc in T.unroll(KC):
            for hn in T.unroll(2):
                for i in T.unroll(4):
                    frag[kc * 8 + hn * 4 + i] = T.Cast(dt, acc[(kc * 2 + hn) * 4 + i])

    @T.macro
    def accumulate_tc(acc, frag, bf, smem, b_base, lane):
        # acc += frag B on tensor cores: B the block operand at b_base ([BC, D], ldmatrix.trans)
        for kc in T.unroll(KC):
            for dp in T.unroll(D // 16):
                T.evaluate(ldmatrix_x4(bf, 0, smem, b_base + (kc * 16 + lane % 8 + 8 * (lane // 8 % 2)) * DP
                                       + dp * 16 + 8 * (lane // 16), trans=True))
                for hn in T.unroll(2):
                    T.evaluate(mma_16x8x16(frag, kc * 8, bf, hn * 4, acc, (dp * 2 + hn) * 4))

    @T.macro
    def stage_operand(smem, s_base, frag, w, lane):
        # the warp's rows of an A operand -> shared at s_base ([BR, PP]) for the exact path
        for kc in T.unroll(KC):
            for hn in T.unroll(2):
                for i in T.unroll(4):
                    smem[s_base + tile_row(w, lane, i // 2) * PP + kc * 16 + hn * 8 + lane % 4 * 2 + i % 2] = \
                        frag[kc * 8 + hn * 4 + i]

    @T.macro
    def accumulate_exact(acc, smem, s_base, b_base, w, lane):
        # acc += A B on CUDA cores, skipping zero entries of A (staged at s_base), B at b_base
        for c in T.serial(BC):
            for r in T.unroll(2):
                for dtl in T.unroll(DT):
                    for e in T.unroll(2):
                        acc[dtl * 4 + r * 2 + e] = acc[dtl * 4 + r * 2 + e] + T.if_then_else(
                            smem[s_base + tile_row(w, lane, r) * PP + c] == zero, T.float32(0),
                            T.Cast("float32", smem[s_base + tile_row(w, lane, r) * PP + c]) * T.Cast(
                                "float32", smem[block_elem(b_base, c, dtl * 8 + lane % 4 * 2 + e)]))

    @T.macro
    def full_row_sum(x, i):
        # the 4 lanes of a row hold disjoint parts of the sum x[i]
        x[i] = x[i] + T.tvm_warp_shuffle_xor(full_mask, x[i], 1, 32, 32)
        x[i] = x[i] + T.tvm_warp_shuffle_xor(full_mask, x[i], 2, 32, 32)

    @T.macro
    def store_tile(dst, b, h, acc, factor, rows, w, lane, nrows):
        # factor * acc -> the thread's valid rows of dst[b, h]
        for r in T.unroll(2):
            if tile_row(w, lane, r) < nrows:
                for dtl in T.unroll(DT):
                    for e in T.vectorized(2):
                        dst[b, h, rows[r], dtl * 8 + lane % 4 * 2 + e] = T.Cast(dt, acc[dtl * 4 + r * 2 + e] * factor)

    @T.macro
    def store_part(dst, comp, b, h, acc, factor, rows, w, lane, nrows):
        # factor * acc -> the thread's valid rows of slot comp of a float32 partial buffer
        for r in T.unroll(2):
            if tile_row(w, lane, r) < nrows:
                for dtl in T.unroll(DT):
                    for e in T.vectorized(2):
                        dst[comp, b, h, rows[r], dtl * 8 + lane % 4 * 2 + e] = acc[dtl * 4 + r * 2 + e] * factor

    @T.macro
    def add_tile(dst, b, h, acc, factor, rows, w, lane, nrows):
        # factor * acc added into the thread's valid rows of the float32 dst[b, h] by
        # ``red.global.add.v2.f32`` (the per-query-head dK/dV programs: every query head of a
        # group, component and chunk adds its share): a thread's two accumulators of a row are
        # adjacent columns (an even one first, so the address is 8-byte aligned), added by one
        # vector reduction: half the reduction instructions of one ``red.global.add.f32`` each,
        # whose four lanes per row filled half of every 32-byte sector they touched
        for r in T.unroll(2):
            if tile_row(w, lane, r) < nrows:
                for dtl in T.unroll(DT):
                    T.ptx["red.global.add.v2.f32"](T.address_of(dst[b, h, rows[r], dtl * 8 + lane % 4 * 2]),
                                                   acc[dtl * 4 + r * 2] * factor, acc[dtl * 4 + r * 2 + 1] * factor)

    # ---- the steps of a tile program, in the order both kernels take them. ``pair``: the
    # second accumulator (dV of bwd_dkdv, whose block operands both take part in a product and
    # are both flagged) takes part; bwd_dq has one (dQ, over K only).
    @T.macro
    def start_tile(rows, acc, acc2, pair, bad, row0, rstr, w, lane, tid):
        # the global rows of the thread's two row slots, zeroed accumulators, no block flagged
        # yet (one flag per stage; the barrier before the block loop publishes the zeros)
        for r in T.unroll(2):
            rows[r] = row0 + rstr * tile_row(w, lane, r)
        for i in T.unroll(DT * 4):
            acc[i] = T.float32(0)
            if pair:
                acc2[i] = T.float32(0)
        if tid < stages:
            T.ptx.st.shared.b32(T.address_of(bad[tid]), 0)

    @T.macro
    def load_tile(smem, x_src, y_src, b, h, row0, rstr, nrows, any_block, u_src, w_src, hb, col0, sig, tid, stats,
                  lse, delta, umap, wmap, ready):
        # the tile's two operands -> shared (plain loads); stages == 2: the first block's
        # copies go out at once (``any_block``: the tile has one; head hb, at col0, sig); the TMA
        # form's mbarriers (one a stage, one arrival: the issuing thread's) are set up first
        load_rows(smem, X_OFF, x_src, b, h, row0, rstr, nrows, BR, tid)
        load_rows(smem, Y_OFF, y_src, b, h, row0, rstr, nrows, BR, tid)
        if wgmma:  # this thread's stores, visible to the async proxy after the caller's barrier
            T.ptx["fence.proxy.async.shared::cta"]()
        if tma:
            init_stage_barriers(ready, stages, tid)
        if stages >= 2:
            if any_block:
                fetch_block(smem, u_src, w_src, b, hb, col0, sig, 0, tid, stats, lse, delta, umap, wmap, ready)

    @T.macro
    def await_block(smem, u_src, w_src, b, h, col0, sig, tid, stats, lse, delta, ready, t):
        # this thread's copies of step t's block are in: stages == 1 loads it now (after a
        # barrier: the previous block is consumed), stages == 2 waits for its cp.async group
        # (the TMA form: the statistics'; the operands: the (t // 2)-th phase of the stage's
        # mbarrier, after which every thread sees all of them)
        if stages == 1:
            T.tvm_storage_sync("shared.dyn")
            fetch_block(smem, u_src, w_src, b, h, col0, sig, 0, tid, stats, lse, delta, None, None, None)
        else:
            T.evaluate(T.ptx["cp.async.wait_group"](0))
            if tma:
                T.cuda.mbarrier_wait(T.address_of(ready[t % stages]), (t // stages) % 2)

    @T.macro
    def flag_block(smem, bad, stg, words, nonfinite, tag, full, pair, tid):
        # PARTIAL blocks: tag stage stg when a block operand the products multiply holds a NaN
        # or inf (U always; W too with ``pair``)
        if full == 0:
            flag_nonfinite(smem, U_OFF + stg * BC * DP, bad, stg, words, nonfinite, tag, BC, tid, tma)
            if pair:
                flag_nonfinite(smem, W_OFF + stg * BC * DP, bad, stg, words, nonfinite, tag, BC, tid, tma)

    @T.macro
    def publish_block(smem, u_src, w_src, b, has_next, h_next, col0_next, sig_next, stg_next, tid, stats, lse,
                      delta, umap, wmap, ready):
        # everyone's copies (and flags) of the block are in (wgmma: this thread's copies made
        # visible to the async proxy first); stages == 2: the previous block's stage is free, the
        # next block's cp.async goes out into it; stages == 3: the stage of the block before the
        # previous one (its accumulation was waited for before this barrier)
        if wgmma:
            T.ptx["fence.proxy.async.shared::cta"]()
        T.tvm_storage_sync("shared.dyn")
        if stages >= 2:
            if has_next:
                fetch_block(smem, u_src, w_src, b, h_next, col0_next, sig_next, stg_next, tid, stats, lse, delta, umap,
                            wmap, ready)

    @T.macro
    def block_products(sacc, dpacc, af, bf, desc, smem, stg, w, lane):
        # S = X U^T and dP = Y W^T of the block in stage stg (one product after the other: both
        # interleaved by k-step, twice the independent accumulator tiles, was no faster on the
        # H200, 2.55 vs 2.45 ms for bwd_dq on the Mistral shape); wgmma: both issued as one
        # group, then waited for (overlapped form: the caller waits, see previous_products)
        if wgmma:
            T.ptx.wgmma.fence.sync.aligned()
            tile_by_block_wgmma(sacc, desc, smem, X_OFF, U_OFF + stg * BC * DP, w)
            tile_by_block_wgmma(dpacc, desc, smem, Y_OFF, W_OFF + stg * BC * DP, w)
            T.ptx.wgmma.commit_group.sync.aligned()
            if not OVERLAP:
                T.ptx.wgmma.wait_group.sync.aligned(0)
        else:
            tile_by_block(sacc, af, bf, smem, X_OFF, U_OFF + stg * BC * DP, w, lane)
            tile_by_block(dpacc, af, bf, smem, Y_OFF, W_OFF + stg * BC * DP, w, lane)

    @T.macro
    def exact_accumulation(acc, dsf, acc2, pf, pair, smem, stg, w, lane):
        # acc += dS U (acc2 += P W with ``pair``) exactly on CUDA cores, for a block flag_block
        # tagged (a masked-out block row may be non-finite): the fragments staged, then summed
        # skipping zero entries
        if pair:
            stage_operand(smem, P_OFF, pf, w, lane)
        stage_operand(smem, DS_OFF, dsf, w, lane)
        T.tvm_storage_sync("shared.dyn")
        if pair:
            accumulate_exact(acc2, smem, P_OFF, W_OFF + stg * BC * DP, w, lane)
        accumulate_exact(acc, smem, DS_OFF, U_OFF + stg * BC * DP, w, lane)

    @T.macro
    def issue_accumulation(acc, dsf, acc2, pf, pair, smem, desc, stg):
        # wgmma: acc += dS U (acc2 += P W with ``pair``), issued, not committed
        T.ptx.wgmma.fence.sync.aligned()
        if pair:
            accumulate_wgmma(acc2, pf, desc, smem, W_OFF + stg * BC * DP)
        accumulate_wgmma(acc, dsf, desc, smem, U_OFF + stg * BC * DP)

    @T.macro
    def accumulate_block(acc, dsf, acc2, pf, pair, smem, bf, desc, bad, flag, stg, tag, w, lane):
        # acc += dS U (and acc2 += P W with ``pair``): on tensor cores, or exactly on CUDA cores
        # when flag_block tagged this block (a masked-out block row may be non-finite); wgmma:
        # the exact path waits for every group first (the fused dQ's is in flight here; ptxas
        # serializes every wgmma of a kernel whose accumulators other instructions write while
        # a group is pending, and needs to see the wait even where nothing is)
        T.ptx.ld.shared.b32(flag[0], T.address_of(bad[stg]))
        if flag[0] == tag:
            if wgmma:
                T.ptx.wgmma.wait_group.sync.aligned(0)
            exact_accumulation(acc, dsf, acc2, pf, pair, smem, stg, w, lane)
        elif wgmma:
            issue_accumulation(acc, dsf, acc2, pf, pair, smem, desc, stg)
            T.ptx.wgmma.commit_group.sync.aligned()
            T.ptx.wgmma.wait_group.sync.aligned(0)
        else:
            if pair:
                accumulate_tc(acc2, pf, bf, smem, W_OFF + stg * BC * DP, lane)
            accumulate_tc(acc, dsf, bf, smem, U_OFF + stg * BC * DP, lane)

    @T.macro
    def previous_exact(acc, dsf, acc2, pf, pair, smem, bad, flag, j, w, lane):
        # overlapped form, before block j's S and dP: block j - 1's accumulation by the exact
        # path when that block was tagged (with nothing in flight: ptxas serializes every wgmma
        # of a kernel where other instructions write a wgmma accumulator while one is pending)
        if j > 0:
            T.ptx.ld.shared.b32(flag[0], T.address_of(bad[(j - 1) % stages]))
            if flag[0] == j:
                T.ptx.wgmma.wait_group.sync.aligned(0)  # nothing is pending; ptxas needs to see it
                exact_accumulation(acc, dsf, acc2, pf, pair, smem, (j - 1) % stages, w, lane)

    @T.macro
    def previous_products(acc, dsf, acc2, pf, pair, smem, desc, flag, j):
        # overlapped form, after block j's S and dP were issued (group A): block j - 1's
        # accumulation on tensor cores (group B: stage (j - 1) % 3, the fragments still hold its
        # P / dS), one group in every case (empty for the first block and a tagged one), then
        # the wait that retires exactly group A; the caller computes block j's P and dS while B
        # runs and waits for it (wait_fragments) before it overwrites the fragments
        if j > 0:
            if flag[0] != j:
                issue_accumulation(acc, dsf, acc2, pf, pair, smem, desc, (j - 1) % stages)
        T.ptx.wgmma.commit_group.sync.aligned()
        T.ptx.wgmma.wait_group.sync.aligned(1)

    @T.macro
    def wait_fragments():
        # overlapped form: the previous block's accumulation is done, its fragments are free
        T.ptx.wgmma.wait_group.sync.aligned(0)

    @T.macro
    def last_accumulation(acc, dsf, acc2, pf, pair, smem, bf, desc, bad, flag, nblk, w, lane):
        # overlapped form, after the block loop (nothing in flight): the last block's accumulation
        if nblk > 0:
            accumulate_block(acc, dsf, acc2, pf, pair, smem, bf, desc, bad, flag, (nblk - 1) % stages, nblk, w,
                             lane)

    @T.macro
    def store_whole(dst, part, comp, b, h, acc, factor, rows, w, lane, nrows):
        # factor * acc -> dst (one component) or slot comp of the partial buffer part
        if direct:
            store_tile(dst, b, h, acc, factor, rows, w, lane, nrows)
        else:
            store_part(part, comp, b, h, acc, factor, rows, w, lane, nrows)

    @T.macro
    def store_chunk(split, vbx, slot, acc, factor, w, lane, nrows):
        # factor * acc -> slot ``slot`` of the chunk results (tile-local rows; split_sum adds them)
        for r in T.unroll(2):
            if tile_row(w, lane, r) < nrows:
                for dtl in T.unroll(DT):
                    for e in T.vectorized(2):
                        split[vbx, slot, tile_row(w, lane, r), dtl * 8 + lane % 4 * 2 + e] = \
                            acc[dtl * 4 + r * 2 + e] * factor

    @T.macro
    def store_result(dst, part, split, comp, slot, b, h, vbx, acc, factor, rows, w, lane, nrows):
        # a chunk of a split tile (slot >= 0) -> its slot; a whole tile -> store_whole
        if has_split:
            if slot >= 0:
                store_chunk(split, vbx, slot, acc, factor, w, lane, nrows)
            else:
                store_whole(dst, part, comp, b, h, acc, factor, rows, w, lane, nrows)
        else:
            store_whole(dst, part, comp, b, h, acc, factor, rows, w, lane, nrows)

    @T.macro
    def select_in_ranges(sacc, dpacc, rng, lane):
        # P and dS selected to exactly 0 outside the block's ranges (block_ranges): 2 S integer
        # compares per score, no branch per score; FULL blocks skip this step (measured: the
        # forward's FULL-heavy masks were 6-9% slower with it, H200, h200_forward_ab.json)
        for nt in T.unroll(NTL):
            for i in T.unroll(4):
                sacc[nt * 4 + i] = T.Select(in_block(rng, i // 2, acc_col(nt, lane, i)), sacc[nt * 4 + i],
                                            T.float32(0))
                dpacc[nt * 4 + i] = T.Select(in_block(rng, i // 2, acc_col(nt, lane, i)), dpacc[nt * 4 + i],
                                             T.float32(0))

    # ---- fused dQ (bwd_dkdv with ``fused_dq``): per step, dQ^T [D, BC] = K^T dS^T over the
    # tile's BR keys, as ss warpgroup MMAs (warpgroup g: head-dim rows 64 g .. 64 g + 63, both
    # operands read MN-major: K^T from the tile operand X, dS^T from its staging at DQ_OFF),
    # then added into the float32 ``dq_accum [B, H, N, D]`` by ``red.global.add`` (the
    # accumulators' layout: element i of a thread is head-dim row dq_row(w, lane, i), block
    # column acc_col(i // 4, lane, i))
    DQ_LBO = BC  # dS^T read MN-major: 8-key groups BC / 8 x 128 B apart, core matrices along BC 128 B

    def dq_row(w, lane, i):  # head-dim row of element i of a thread's dQ^T accumulators
        return (w // 4) * 64 + (w % 4) * 16 + lane // 4 + 8 * (i % 4 // 2)

    @T.macro
    def stage_ds_t(smem, dsf, w, lane):
        # the thread's dS^T fragment (its rows: keys; columns: block query rows) -> DQ_OFF in
        # core matrices (each warp's 4-byte pairs fill whole 128-byte core matrices: no bank
        # conflict)
        for nt in T.unroll(NTL):
            for i in T.unroll(4):
                smem[core_matrix_elem(DQ_OFF, tile_row(w, lane, i // 2), acc_col(nt, lane, i), BC)] = dsf[nt * 4 + i]

    @T.macro
    def flag_tile(smem, kbad, words, nonfinite, tid):
        # the tile operand K (X) holds a NaN or inf in this thread's chunks: tag kbad[0] (zeroed
        # by start_tile, published by the barrier before the block loop; the tag by the first
        # block's barrier)
        flag_nonfinite(smem, X_OFF, kbad, 0, words, nonfinite, 1, BR, tid, False)

    @T.macro
    def dq_products(dqacc, desc, smem, w):
        # dQ^T = K^T dS^T by warpgroup MMAs over the tile's BR keys (BR / 16 k-steps); issued and
        # committed, the caller waits
        T.ptx.wgmma.fence.sync.aligned()
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[0]), T.address_of(
            smem[core_matrix_elem(X_OFF, 0, (w // 4) * 64, D)]), MN_LBO, MN_SBO, 0)
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[1]), T.address_of(smem[DQ_OFF]), DQ_LBO, 8, 0)
        for ks in T.unroll(BR // 16):  # 16 key rows on in K^T ([*, D]) and dS^T ([*, BC])
            T.ptx[WG_S](*[dqacc[i] for i in range(NTL * 4)], advance_desc(desc[0], mn_major_step(ks, D, False)),
                        advance_desc(desc[1], mn_major_step(ks, BC, False)), ks > 0, 1, 1, 1, 1)
        T.ptx.wgmma.commit_group.sync.aligned()

    @T.macro
    def dq_exact(dqacc, smem, w, lane):
        # dQ^T = K^T dS^T on CUDA cores, skipping zero entries of dS^T: for a tile whose K holds
        # a NaN or inf (a masked-out key's 0 x NaN must not reach dQ); never for finite inputs.
        # Nothing is pending here; ptxas needs to see the wait (else it serializes every wgmma)
        T.ptx.wgmma.wait_group.sync.aligned(0)
        for i in T.unroll(NTL * 4):
            dqacc[i] = T.float32(0)
        for key in T.serial(BR):
            for i in T.unroll(NTL * 4):
                dqacc[i] = dqacc[i] + T.if_then_else(
                    smem[core_matrix_elem(DQ_OFF, key, acc_col(i // 4, lane, i), BC)] == zero, T.float32(0),
                    T.Cast("float32", smem[core_matrix_elem(DQ_OFF, key, acc_col(i // 4, lane, i), BC)]) * T.Cast(
                        "float32", smem[core_matrix_elem(X_OFF, key, dq_row(w, lane, i), D)]))

    @T.macro
    def dq_atomics(dq_accum, dqacc, b, h, col0, sig, w, lane):
        # dq_accum[b, h, col0 + sig c, d] += dQ^T[d, c] for the block's query rows inside the
        # sequence (the float32 sum of every key tile's share; scaled and cast after the kernel)
        for i in T.unroll(NTL * 4):
            if acc_col(i // 4, lane, i) < block_rows(col0, sig):
                T.ptx["red.global.add.f32"](T.address_of(
                    dq_accum[b, h, col0 + sig * acc_col(i // 4, lane, i), dq_row(w, lane, i)]), dqacc[i])

    # ``fused_dq="bulk"``: the step's dQ^T accumulators staged as dQ rows (float32 [BC, DQS] in
    # static shared memory), then one bulk reduction per row (block column), issued as
    # ``dq_bulk_add`` says: ``cp.reduce.async.bulk .add.f32`` of D x 4 bytes into ``dq_accum`` (BC
    # asynchronous reductions per step instead of BC x D atomics)
    DQS = D + DQ_STAGE_PAD

    @T.macro
    def stage_dq_rows(dqstage, dqacc, w, lane):
        # dQ^T[d, c] -> row c, column d of the staging; the writes reach the async proxy (the
        # bulk reductions read them) through the fence, the caller's barrier publishes them
        for i in T.unroll(NTL * 4):
            dqstage[acc_col(i // 4, lane, i) * DQS + dq_row(w, lane, i)] = dqacc[i]
        T.ptx["fence.proxy.async.shared::cta"]()

    # issuers of the bulk reductions: every DQ_SPREAD-th thread, so that each warp issues an
    # equal share. A bulk copy takes its operands from uniform registers, so a warp issues its
    # lanes' copies one lane at a time; thread c for row c left that serial loop to the first
    # BC / 32 warps while the others waited at the next barrier (``ncu``, Mistral n=8192
    # bwd_dkdv: 5% of the warps' stall samples in that loop and 16% at the barrier after it)
    DQ_SPREAD = max(1, NTHR // BC)
    DQ_ISSUERS = NTHR // DQ_SPREAD

    @T.macro
    def dq_bulk_add(dq_accum, dqstage, b, h, col0, sig, tid):
        # row c < the block's rows, by thread DQ_SPREAD c (mod NTHR): dq_accum[b, h, col0 + sig
        # c, :] += staged row c, one bulk reduction each, committed as one bulk group
        for it in T.serial((BC + DQ_ISSUERS - 1) // DQ_ISSUERS):
            if tid % DQ_SPREAD == 0:
                row: T.let[T.int32] = it * DQ_ISSUERS + tid // DQ_SPREAD
                if row < block_rows(col0, sig):
                    T.ptx["cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32"](
                        T.address_of(dq_accum[b, h, col0 + sig * row, 0]), T.address_of(dqstage[row * DQS]),
                        T.uint32(D * 4))
        T.ptx["cp.async.bulk.commit_group"]()

    @T.macro
    def dq_staging_free():
        # this thread's bulk reductions have read their staged rows (before the barrier that
        # precedes the next staging; nothing pending: no wait)
        T.ptx["cp.async.bulk.wait_group.read"](0)

    @T.macro
    def dq_bulk_done():
        # every bulk reduction of this thread has completed (before the program ends)
        T.ptx["cp.async.bulk.wait_group"](0)

    @T.macro
    def add_tile_bulk(dst, dqstage, b, h, acc, factor, row0, rstr, nrows, w, lane, tid):
        # per_query_head="bulk": factor * acc added into the tile's valid rows of the float32
        # dst[b, h], BC tile rows a round through the dQ staging: the warps holding rows
        # [j BC, (j + 1) BC) (a warp's 16 rows lie in one round) write them as staged rows, a
        # proxy fence and a barrier publish them, thread c adds row j BC + c by one bulk
        # reduction of D x 4 bytes, and every thread waits for its reductions to have read
        # the staging before the barrier that precedes the next round. The caller has waited
        # for the dQ reductions and passed a barrier since.
        for j in T.unroll((BR + BC - 1) // BC):
            if w * 16 // BC == j:
                for r in T.unroll(2):
                    for dtl in T.unroll(DT):
                        for e in T.vectorized(2):
                            dqstage[(tile_row(w, lane, r) - j * BC) * DQS + dtl * 8 + lane % 4 * 2 + e] = (
                                acc[dtl * 4 + r * 2 + e] * factor)
            T.ptx["fence.proxy.async.shared::cta"]()
            T.tvm_storage_sync("shared")
            if tid < BC:
                if j * BC + tid < nrows:
                    T.ptx["cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32"](
                        T.address_of(dst[b, h, row0 + rstr * (j * BC + tid), 0]),
                        T.address_of(dqstage[tid * DQS]), T.uint32(D * 4))
            T.ptx["cp.async.bulk.commit_group"]()
            T.ptx["cp.async.bulk.wait_group.read"](0)
            T.tvm_storage_sync("shared")

    return SimpleNamespace(
        BR=BR, BC=BC, W=W, D=D, DP=DP, DT=DT, NTL=NTL, SMEM=SMEM, X_OFF=X_OFF, Y_OFF=Y_OFF, U_OFF=U_OFF, W_OFF=W_OFF,
        P_OFF=P_OFF, DS_OFF=DS_OFF, tile_row=tile_row, acc_col=acc_col, in_block=in_block,
        select_in_ranges=select_in_ranges,
        block_ranges=block_ranges, load_rows=load_rows,
        fetch_block=fetch_block,
        flag_nonfinite=flag_nonfinite, cache_row_segments=cache_row_segments, tile_by_block=tile_by_block,
        as_operand=as_operand, accumulate_tc=accumulate_tc, stage_operand=stage_operand,
        accumulate_exact=accumulate_exact, full_row_sum=full_row_sum, previous_exact=previous_exact,
        previous_products=previous_products, wait_fragments=wait_fragments, last_accumulation=last_accumulation,
        store_tile=store_tile, store_part=store_part, add_tile=add_tile,
        start_tile=start_tile, load_tile=load_tile, await_block=await_block, flag_block=flag_block,
        publish_block=publish_block, block_products=block_products, accumulate_block=accumulate_block,
        store_result=store_result, stage_ds_t=stage_ds_t, flag_tile=flag_tile, dq_products=dq_products,
        dq_exact=dq_exact, dq_atomics=dq_atomics, stage_dq_rows=stage_dq_rows, dq_bulk_add=dq_bulk_add,
        dq_staging_free=dq_staging_free, dq_bulk_done=dq_bulk_done, add_tile_bulk=add_tile_bulk, DQS=DQS)


def backward_dq_mma_func(spec: AttentionSpec, plan_shape, warps: int = 4, stages: int = 2, wgmma: bool = False):
    """``bwd_dq`` on tensor cores for ``spec`` and the mask's tile plan of shape ``plan_shape``
    (``br == 16 * warps``): ``delta`` and ``dq``, or with ``C > 1`` components ``delta`` and the
    last parameter ``dq_part`` (see the module docstring). ``stages=2``: K/V blocks
    double-buffered, fetched with ``cp.async`` one block ahead (one barrier per block, as the
    forward's two-stage form); ``stages=1``: plain loads, two. ``wgmma``: the Hopper form (the
    module docstring)."""
    st = _steps(spec, plan_shape, warps, stages, wgmma=wgmma)
    tile_row, full_row_sum, select_in_ranges = st.tile_row, st.full_row_sum, st.select_in_ranges
    block_ranges = st.block_ranges
    start_tile, load_tile, cache_row_segments, await_block = (st.start_tile, st.load_tile, st.cache_row_segments,
                                                              st.await_block)
    flag_block, publish_block, block_products, as_operand = (st.flag_block, st.publish_block, st.block_products,
                                                             st.as_operand)
    accumulate_block, store_result = st.accumulate_block, st.store_result
    previous_exact, previous_products = st.previous_exact, st.previous_products
    wait_fragments, last_accumulation = st.wait_fragments, st.last_accumulation
    overlap = stages == 3
    B, H, KVH, G, N, D = spec.batch, spec.heads, spec.kv_heads, spec.group, spec.seq_len, spec.head_dim
    HM, S, dt = spec.mask_heads, spec.max_segments, spec.dtype
    NT, NB, C = plan_shape.num_tiles, plan_shape.num_blocks, plan_shape.num_components
    direct = C <= 1
    BC, W, DT, NTL, SMEM = st.BC, st.W, st.DT, st.NTL, st.SMEM
    c2, log2e, scale = T.float32(spec.scale * LOG2E), T.float32(LOG2E), T.float32(spec.scale)

    @T.macro
    def row_stats(lrow, drow, dout, out, lse, dlse, delta, rows, b, h, w, lane, nrows, owner):
        # per thread row: lse in base 2 and delta = rowsum(dO * O) - dlse (the 4 lanes of a row
        # sum D / 4 columns each, then 2 shuffles); one lane per row writes delta for bwd_dkdv,
        # in the tiles that own the row (``owner``: True, or component 0's with several)
        for r in T.unroll(2):
            drow[r] = T.float32(0)
            if tile_row(w, lane, r) < nrows:
                for dtl in T.unroll(DT):
                    for e in T.unroll(2):
                        drow[r] = drow[r] + T.Cast("float32", dout[b, h, rows[r], dtl * 8 + lane % 4 * 2 + e]) * T.Cast(
                            "float32", out[b, h, rows[r], dtl * 8 + lane % 4 * 2 + e])
            full_row_sum(drow, r)
            lrow[r] = T.float32(0)
            if tile_row(w, lane, r) < nrows:
                drow[r] = drow[r] - dlse[b, h, rows[r]]
                lrow[r] = lse[b, h, rows[r]] * log2e
                if lane % 4 == 0:
                    if owner:
                        delta[b, h, rows[r]] = drow[r]

    @T.macro
    def probabilities(sacc, dpacc, rng, full, lrow, drow, lane):
        # P = 2^(S scale log2e - lse log2e) and dS = P (dP - delta), then, unless the block is
        # FULL (a branch uniform over the block), both selected to exactly 0 where the mask is
        # off (the block's ranges, block_ranges): computed for every score and selected after,
        # so the code has no branch per score
        for nt in T.unroll(NTL):
            for i in T.unroll(4):
                sacc[nt * 4 + i] = T.exp2(sacc[nt * 4 + i] * c2 - lrow[i // 2])
                dpacc[nt * 4 + i] = sacc[nt * 4 + i] * (dpacc[nt * 4 + i] - drow[i // 2])
        if full != 1:
            select_in_ranges(sacc, dpacc, rng, lane)

    @T.prim_func(s_tir=True)
    def bwd_dq(
        q: T.Buffer((B, H, N, D), dt),
        k: T.Buffer((B, KVH, N, D), dt),
        v: T.Buffer((B, KVH, N, D), dt),
        out: T.Buffer((B, H, N, D), dt),
        dout: T.Buffer((B, H, N, D), dt),
        lse: T.Buffer((B, H, N), "float32"),
        dlse: T.Buffer((B, H, N), "float32"),
        seg_start: T.Buffer((HM, N, S), "int32"),
        seg_count: T.Buffer((HM, N, S), "int32"),
        seg_sigma: T.Buffer((HM, N, S), "int32"),
        tiles: T.Buffer((HM, NT, 7), "int32"),
        blocks: T.Buffer((HM, NB, 3), "int32"),
        dq: T.Buffer((B, H, N, D), dt),
        delta: T.Buffer((B, H, N), "float32"),
        dq_part: T.Buffer(part_shape(spec, C, H), "float32"),
        dq_split: T.Buffer(split_part_shape(spec, plan_shape, H), "float32"),
    ):
        T.func_attr({"global_symbol": "bwd_dq", "tirx.noalias": True})
        for vbh in T.thread_binding(B * H, thread="blockIdx.x"):
            for vt in T.thread_binding(tile_grid_rows(NT, "bwd_dq"), thread="blockIdx.y"):
                for w in T.thread_binding(W, thread="threadIdx.y"):
                    for lane in T.thread_binding(32, thread="threadIdx.x"):
                        with T.sblock("tile"):
                            T.reads()
                            T.writes()
                            smem = T.sblock_alloc_buffer((SMEM,), dt, scope="shared.dyn")
                            # per stage: 1 + the block index whose K holds a non-finite value
                            bad = T.sblock_alloc_buffer((stages,), "int32", scope="shared")
                            af = T.sblock_alloc_buffer((8,), dt, scope="local")
                            bf = T.sblock_alloc_buffer((8,), dt, scope="local")
                            desc = T.sblock_alloc_buffer((2,), "uint64", scope="local")  # wgmma's
                            dsf = T.sblock_alloc_buffer((BC // 2,), dt, scope="local")
                            sacc = T.sblock_alloc_buffer((NTL * 4,), "float32", scope="local")
                            dpacc = T.sblock_alloc_buffer((NTL * 4,), "float32", scope="local")
                            acc = T.sblock_alloc_buffer((DT * 4,), "float32", scope="local")
                            rows = T.sblock_alloc_buffer((2,), "int32", scope="local")
                            lrow = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            drow = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            sg = T.sblock_alloc_buffer((2 * S * 3,), "int32", scope="local")
                            rng = T.sblock_alloc_buffer((2 * S * 2,), "int32", scope="local")
                            nonfinite = T.sblock_alloc_buffer((NONFINITE_CHAINS,), "uint32", scope="local")
                            words = T.sblock_alloc_buffer((4,), "uint32", scope="local")
                            flag = T.sblock_alloc_buffer((1,), "int32", scope="local")
                            b: T.let[T.int32] = vbh // H
                            h: T.let[T.int32] = vbh % H
                            hk: T.let[T.int32] = h // G
                            hm: T.let[T.int32] = h % HM
                            row0: T.let[T.int32] = tiles[hm, vt, 0]
                            rstr: T.let[T.int32] = tiles[hm, vt, 1]
                            nrows: T.let[T.int32] = tiles[hm, vt, 2]
                            blk_lo: T.let[T.int32] = tiles[hm, vt, 4]
                            blk_hi: T.let[T.int32] = tiles[hm, vt, 5]
                            tid: T.let[T.int32] = w * 32 + lane
                            start_tile(rows, acc, None, False, bad, row0, rstr, w, lane, tid)
                            load_tile(smem, q, dout, b, h, row0, rstr, nrows, blk_hi > blk_lo, k, v, hk,
                                      blocks[hm, blk_lo, 0], blocks[hm, blk_lo, 1], tid, None, None, None, None, None,
                                      None)
                            cache_row_segments(sg, rows, seg_start, seg_count, seg_sigma, hm, w, lane, nrows)
                            row_stats(lrow, drow, dout, out, lse, dlse, delta, rows, b, h, w, lane, nrows,
                                      True if direct else tiles[hm, vt, 3] == 0)
                            T.tvm_storage_sync("shared.dyn")  # the flags' zeros come before any tag
                            for j in T.serial(blk_hi - blk_lo):
                                col0: T.let[T.int32] = blocks[hm, blk_lo + j, 0]
                                sig: T.let[T.int32] = blocks[hm, blk_lo + j, 1]
                                full: T.let[T.int32] = blocks[hm, blk_lo + j, 2]
                                stg: T.let[T.int32] = j % stages
                                await_block(smem, k, v, b, hk, col0, sig, tid, None, None, None, None, j)
                                flag_block(smem, bad, stg, words, nonfinite, j + 1, full, False, tid)  # K's block rows
                                publish_block(smem, k, v, b, j + 1 < blk_hi - blk_lo, hk, blocks[hm, blk_lo + j + 1, 0],
                                              blocks[hm, blk_lo + j + 1, 1], (j + 1) % stages, tid, None, None, None,
                                              None, None, None)
                                block_ranges(rng, sg, full, col0, sig, None)
                                if overlap:  # a tagged previous block: dQ += dS K exactly, now
                                    previous_exact(acc, dsf, None, None, False, smem, bad, flag, j, w, lane)
                                block_products(sacc, dpacc, af, bf, desc, smem, stg, w, lane)  # S = Q K^T, dP = dO V^T
                                if overlap:  # dQ += dS K of the previous block, behind S and dP
                                    previous_products(acc, dsf, None, None, False, smem, desc, flag, j)
                                probabilities(sacc, dpacc, rng, full, lrow, drow, lane)
                                if overlap:
                                    wait_fragments()
                                as_operand(dsf, dpacc)
                                if not overlap:  # dQ += dS K
                                    accumulate_block(acc, dsf, None, None, False, smem, bf, desc, bad, flag, stg, j + 1,
                                                     w, lane)
                            if overlap:
                                last_accumulation(acc, dsf, None, None, False, smem, bf, desc, bad, flag,
                                                  blk_hi - blk_lo, w, lane)
                            store_result(dq, dq_part, dq_split, tiles[hm, vt, 3], tiles[hm, vt, 6], b, h, vbh, acc,
                                         scale, rows, w, lane, nrows)

    return _without(bwd_dq, ("dq_part",) * direct + ("dq_split",) * (not plan_shape.num_slots))


def backward_dkdv_mma_func(spec: AttentionSpec, plan_shape, warps: int = 4, stages: int = 2, wgmma: bool = False,
                           fused_dq=False, per_query_head=False, tma: bool = False):
    """``bwd_dkdv`` on tensor cores for ``spec`` (the *transposed* mask's spec) and the
    transposed mask's tile plan of shape ``plan_shape``: ``dk`` and ``dv`` per key tile, summed
    over the query heads of the KV head's group, or with ``C > 1`` components the last
    parameters ``dk_part`` and ``dv_part`` (see the module docstring). The program walks (group
    head, block) pairs as one sequence, so ``stages=2`` prefetches across heads. ``wgmma``: the
    Hopper form (the module docstring). ``fused_dq``: it computes dQ too, adding each step's
    share into the float32 parameter ``dq_accum [B, H, N, D]`` (zeroed by :func:`delta_func` before; ``bwd_dq`` does
    not run, see the module docstring) by atomics (``True`` or ``"atomics"``) or by one bulk
    reduction per staged dQ row (``"bulk"``).

    ``per_query_head`` (fused dQ with grouped KV heads only, else it changes nothing): one
    program per (batch x query head, tile) instead of per KV head, FlashAttention-3's grid, so
    the programs running at once add dQ into the rows of fewer heads; each adds its scaled dK
    and dV into the float32 parameters ``dk_accum``, ``dv_accum [B, KVH, N, D]`` by
    ``red.global.add.v2.f32`` (zeroed by :func:`delta_func` before, cast by :func:`kv_cast_func` after), or with
    ``per_query_head="bulk"`` (and ``fused_dq="bulk"``) by one bulk reduction per row staged in
    the dQ staging (:func:`kv_sums_form`). Every query head's, component's and chunk's share is
    added alike, so this form has no dk/dv partial or split parameters; ``dk`` and ``dv`` stay
    in the signature, unwritten.

    ``tma`` (wgmma, two stages, head_dim a multiple of 64; plans whose blocks step rows by one,
    :func:`~tvm_splat.kernels.tiled_mma.check_tma_plan`): each step's Q and dO blocks arrive by
    TMA, as the forward's K and V do (:mod:`tvm_splat.kernels.tiled_mma`): thread 0 issues both
    tensor copies against the stage's mbarrier, every thread waits on it, and the blocks land
    128-byte swizzled, which the wgmma descriptors, the finiteness flags and the exact path
    read; the lse and delta of the
    block's rows stay 4-byte ``cp.async`` copies. The cp.async form spent its time there
    (``ncu`` by source line, Mistral n=8192: 15% of the stall samples issuing the copies' 8
    ``LDGSTS.128`` a thread, 6% on their addresses, and nearly all of the kernel's excess global
    sectors and shared wavefronts on them: a warp copies 8 rows x 64 bytes, and each of its
    8-thread phases touches half of each 32-byte sector). The shared buffer is named
    ``dkdv_smem`` (aligned to 1024 bytes here: the swizzle's atoms) apart from ``bwd_dq``'s, which
    shares a CUDA module with it (``tvm_splat.compile.check_shared_declarations``)."""
    check_kv_sums(fused_dq, per_query_head)
    form = fused_dq_form(fused_dq)
    fused_dq, bulk = form is not None, form == "bulk"
    st = _steps(spec, plan_shape, warps, stages, dkdv=True, wgmma=wgmma, fused_dq=fused_dq, tma=tma)
    stage_dq_rows, dq_bulk_add, dq_staging_free, dq_bulk_done = (st.stage_dq_rows, st.dq_bulk_add,
                                                                 st.dq_staging_free, st.dq_bulk_done)
    stage_ds_t, flag_tile, dq_products, dq_exact, dq_atomics = (st.stage_ds_t, st.flag_tile, st.dq_products,
                                                                st.dq_exact, st.dq_atomics)
    block_ranges, acc_col, select_in_ranges = st.block_ranges, st.acc_col, st.select_in_ranges
    start_tile, load_tile, cache_row_segments, await_block = (st.start_tile, st.load_tile, st.cache_row_segments,
                                                              st.await_block)
    flag_block, publish_block, block_products, as_operand = (st.flag_block, st.publish_block, st.block_products,
                                                             st.as_operand)
    accumulate_block, store_result = st.accumulate_block, st.store_result
    previous_exact, previous_products = st.previous_exact, st.previous_products
    wait_fragments, last_accumulation = st.wait_fragments, st.last_accumulation
    overlap = stages == 3
    B, H, KVH, G, N, D = spec.batch, spec.heads, spec.kv_heads, spec.group, spec.seq_len, spec.head_dim
    HM, S, dt = spec.mask_heads, spec.max_segments, spec.dtype
    if HM > 1 and G > 1:
        raise ValueError(f"the tensor-core dK/dV kernel needs the query heads of a group to share one mask head "
                         f"({HM} mask heads, groups of {G})")
    NT, NB, C = plan_shape.num_tiles, plan_shape.num_blocks, plan_shape.num_components
    direct = C <= 1
    BC, W, DT, NTL, SMEM = st.BC, st.W, st.DT, st.NTL, st.SMEM
    c2, log2e, scale = T.float32(spec.scale * LOG2E), T.float32(LOG2E), T.float32(spec.scale)
    per_head = per_query_head_programs(spec, fused_dq, per_query_head)
    kv_bulk = per_head and kv_sums_form(per_query_head) == "bulk"
    PH = H if per_head else KVH  # programs per batch entry (and tile)
    GS = 1 if per_head else G  # query heads a program walks
    add_tile, add_tile_bulk = st.add_tile, st.add_tile_bulk
    # the TMA form's swizzle is a function of the shared address: its 1024-byte atoms start the stages
    SMEM_ALIGN = 1024 if tma else 64

    def kv_head_of(vbk):  # the KV head of program vbk (of the B x PH)
        return vbk % H // G if per_head else vbk % KVH

    def first_head(vbk, hk):  # the first query head a program walks
        return vbk % H if per_head else hk * G

    # step t of a program: query head first_head + t // nblk, block t % nblk; with one head a
    # program (no grouping, or a program per query head) without the two divisions by the
    # runtime nblk, which every thread ran at each step (``ncu``, Mistral bwd_dkdv)
    def step_head(vbk, hk, t, nblk):
        return first_head(vbk, hk) if GS == 1 else first_head(vbk, hk) + t // nblk

    def step_block(t, nblk):
        return t if GS == 1 else t % nblk

    @T.macro
    def store_gradients(dk, dv, dk_part, dv_part, dk_split, dv_split, dk_accum, dv_accum, comp, slot, b, hk, vbk,
                        acc_k, acc_v, rows, w, lane, nrows, dqstage, row0, rstr, tid):
        # dK (scaled) and dV: added into the float32 sums (per query head: by vector atomics,
        # or staged rows and bulk reductions), else written (store_result: directly, per
        # component or per chunk)
        if kv_bulk:
            T.tvm_storage_sync("shared")  # every thread's dQ reductions are done with the staging
            add_tile_bulk(dk_accum, dqstage, b, hk, acc_k, scale, row0, rstr, nrows, w, lane, tid)
            add_tile_bulk(dv_accum, dqstage, b, hk, acc_v, T.float32(1), row0, rstr, nrows, w, lane, tid)
            dq_bulk_done()  # this thread's reductions complete before the program ends
        elif per_head:
            add_tile(dk_accum, b, hk, acc_k, scale, rows, w, lane, nrows)
            add_tile(dv_accum, b, hk, acc_v, T.float32(1), rows, w, lane, nrows)
        else:
            store_result(dk, dk_part, dk_split, comp, slot, b, hk, vbk, acc_k, scale, rows, w, lane, nrows)
            store_result(dv, dv_part, dv_split, comp, slot, b, hk, vbk, acc_v, T.float32(1), rows, w, lane, nrows)

    @T.macro
    def probabilities_t(sacc, dpacc, rng, full, stats, stg, lane):
        # P^T and dS^T with the lse and delta of each block column (query row, staged in stage
        # stg of ``stats``), then selected to exactly 0 where the mask is off (as bwd_dq does)
        for nt in T.unroll(NTL):
            for i in T.unroll(4):
                sacc[nt * 4 + i] = T.exp2(sacc[nt * 4 + i] * c2 - stats[stg * 2 * BC + acc_col(nt, lane, i)] * log2e)
                dpacc[nt * 4 + i] = sacc[nt * 4 + i] * (dpacc[nt * 4 + i]
                                                        - stats[stg * 2 * BC + BC + acc_col(nt, lane, i)])
        if full != 1:
            select_in_ranges(sacc, dpacc, rng, lane)

    @T.prim_func(s_tir=True)
    def bwd_dkdv(
        q: T.Buffer((B, H, N, D), dt),
        k: T.Buffer((B, KVH, N, D), dt),
        v: T.Buffer((B, KVH, N, D), dt),
        dout: T.Buffer((B, H, N, D), dt),
        lse: T.Buffer((B, H, N), "float32"),
        delta: T.Buffer((B, H, N), "float32"),
        tseg_start: T.Buffer((HM, N, S), "int32"),
        tseg_count: T.Buffer((HM, N, S), "int32"),
        tseg_sigma: T.Buffer((HM, N, S), "int32"),
        ttiles: T.Buffer((HM, NT, 7), "int32"),
        tblocks: T.Buffer((HM, NB, 3), "int32"),
        dk: T.Buffer((B, KVH, N, D), dt),
        dv: T.Buffer((B, KVH, N, D), dt),
        dk_part: T.Buffer(part_shape(spec, C, KVH), "float32"),
        dv_part: T.Buffer(part_shape(spec, C, KVH), "float32"),
        dk_split: T.Buffer(split_part_shape(spec, plan_shape, KVH), "float32"),
        dv_split: T.Buffer(split_part_shape(spec, plan_shape, KVH), "float32"),
        dq_accum: T.Buffer((B, H, N, D) if fused_dq else (1,), "float32"),
        dk_accum: T.Buffer((B, KVH, N, D) if per_head else (1,), "float32"),
        dv_accum: T.Buffer((B, KVH, N, D) if per_head else (1,), "float32"),
    ):
        T.func_attr({"global_symbol": "bwd_dkdv", "tirx.noalias": True})
        if tma:  # host side: the tensor maps of Q and dO, boxes of BC rows of one query head
            qmap: T.let[T.TensorMap()] = T.tvm_stack_alloca("tensormap", 1)
            dmap: T.let[T.TensorMap()] = T.tvm_stack_alloca("tensormap", 1)
            T.evaluate(encode_row_block_map(qmap, q.data, B * H, N, D, BC, dt))
            T.evaluate(encode_row_block_map(dmap, dout.data, B * H, N, D, BC, dt))
        for vbk in T.thread_binding(B * PH, thread="blockIdx.x"):
            for vt in T.thread_binding(tile_grid_rows(NT, "bwd_dkdv"), thread="blockIdx.y"):
                for w in T.thread_binding(W, thread="threadIdx.y"):
                    for lane in T.thread_binding(32, thread="threadIdx.x"):
                        with T.sblock("tile"):
                            T.reads()
                            T.writes()
                            dkdv_smem = T.sblock_alloc_buffer((SMEM,), dt, scope="shared.dyn", align=SMEM_ALIGN)
                            if tma:  # per stage: the mbarrier its Q and dO copies complete on
                                block_ready = T.sblock_alloc_buffer((stages,), "uint64", scope="shared", align=8)
                            # per stage: 1 + the step whose Q or dO block holds a non-finite value
                            bad = T.sblock_alloc_buffer((stages,), "int32", scope="shared")
                            af = T.sblock_alloc_buffer((8,), dt, scope="local")
                            bf = T.sblock_alloc_buffer((8,), dt, scope="local")
                            desc = T.sblock_alloc_buffer((2,), "uint64", scope="local")  # wgmma's
                            pf = T.sblock_alloc_buffer((BC // 2,), dt, scope="local")
                            dsf = T.sblock_alloc_buffer((BC // 2,), dt, scope="local")
                            sacc = T.sblock_alloc_buffer((NTL * 4,), "float32", scope="local")
                            dpacc = T.sblock_alloc_buffer((NTL * 4,), "float32", scope="local")
                            acc_k = T.sblock_alloc_buffer((DT * 4,), "float32", scope="local")
                            acc_v = T.sblock_alloc_buffer((DT * 4,), "float32", scope="local")
                            rows = T.sblock_alloc_buffer((2,), "int32", scope="local")
                            sg = T.sblock_alloc_buffer((2 * S * 3,), "int32", scope="local")
                            rng = T.sblock_alloc_buffer((2 * S * 2,), "int32", scope="local")
                            # per stage: the lse, then the delta, of the block's query rows
                            stats = T.sblock_alloc_buffer((stages * 2 * BC,), "float32", scope="shared")
                            nonfinite = T.sblock_alloc_buffer((NONFINITE_CHAINS,), "uint32", scope="local")
                            words = T.sblock_alloc_buffer((4,), "uint32", scope="local")
                            flag = T.sblock_alloc_buffer((1,), "int32", scope="local")
                            # fused_dq: 1 when the tile's K holds a NaN or inf; dQ^T accumulators
                            kbad = T.sblock_alloc_buffer((1,), "int32", scope="shared")
                            dqacc = T.sblock_alloc_buffer((NTL * 4,), "float32", scope="local")
                            # fused_dq="bulk": the step's dQ rows, staged for their bulk reductions
                            dqstage = T.sblock_alloc_buffer((BC * st.DQS if bulk else 1,), "float32", scope="shared",
                                                            align=16)
                            b: T.let[T.int32] = vbk // PH
                            hk: T.let[T.int32] = kv_head_of(vbk)
                            hm: T.let[T.int32] = hk * G % HM  # the group's one mask head
                            row0: T.let[T.int32] = ttiles[hm, vt, 0]
                            rstr: T.let[T.int32] = ttiles[hm, vt, 1]
                            nrows: T.let[T.int32] = ttiles[hm, vt, 2]
                            blk_lo: T.let[T.int32] = ttiles[hm, vt, 4]
                            blk_hi: T.let[T.int32] = ttiles[hm, vt, 5]
                            nblk: T.let[T.int32] = blk_hi - blk_lo
                            tid: T.let[T.int32] = w * 32 + lane
                            start_tile(rows, acc_k, acc_v, True, bad, row0, rstr, w, lane, tid)
                            if fused_dq:
                                if tid == 0:
                                    T.ptx.st.shared.b32(T.address_of(kbad[0]), 0)
                            load_tile(dkdv_smem, k, v, b, hk, row0, rstr, nrows, nblk > 0, q, dout, first_head(vbk, hk),
                                      tblocks[hm, blk_lo, 0], tblocks[hm, blk_lo, 1], tid, stats, lse, delta,
                                      qmap if tma else None, dmap if tma else None, block_ready if tma else None)
                            cache_row_segments(sg, rows, tseg_start, tseg_count, tseg_sigma, hm, w, lane, nrows)
                            T.tvm_storage_sync("shared.dyn")  # the flags' zeros come before any tag
                            if fused_dq:
                                flag_tile(dkdv_smem, kbad, words, nonfinite, tid)
                            # step t: query head first_head + t // nblk of the program's GS, block t % nblk
                            for t in T.serial(GS * nblk):
                                h: T.let[T.int32] = step_head(vbk, hk, t, nblk)
                                col0: T.let[T.int32] = tblocks[hm, blk_lo + step_block(t, nblk), 0]
                                sig: T.let[T.int32] = tblocks[hm, blk_lo + step_block(t, nblk), 1]
                                full: T.let[T.int32] = tblocks[hm, blk_lo + step_block(t, nblk), 2]
                                stg: T.let[T.int32] = t % stages
                                await_block(dkdv_smem, q, dout, b, h, col0, sig, tid, stats, lse, delta,
                                            block_ready if tma else None, t)
                                # Q's and dO's rows
                                flag_block(dkdv_smem, bad, stg, words, nonfinite, t + 1, full, True, tid)
                                if bulk:  # the previous step's staged dQ rows are read, before the barrier
                                    dq_staging_free()
                                nxt: T.let[T.int32] = T.min(t + 1, GS * nblk - 1)  # the next step, if any
                                publish_block(dkdv_smem, q, dout, b, t + 1 < GS * nblk, step_head(vbk, hk, nxt, nblk),
                                              tblocks[hm, blk_lo + step_block(nxt, nblk), 0],
                                              tblocks[hm, blk_lo + step_block(nxt, nblk), 1], (t + 1) % stages,
                                              tid, stats, lse, delta, qmap if tma else None, dmap if tma else None,
                                              block_ready if tma else None)
                                block_ranges(rng, sg, full, col0, sig, None)
                                if overlap:  # a tagged previous step: dK, dV exactly, now
                                    previous_exact(acc_k, dsf, acc_v, pf, True, dkdv_smem, bad, flag, t, w, lane)
                                # S^T = K Q^T, dP^T = V dO^T
                                block_products(sacc, dpacc, af, bf, desc, dkdv_smem, stg, w, lane)
                                if overlap:  # dK += dS^T Q, dV += P^T dO of the previous step, behind S and dP
                                    previous_products(acc_k, dsf, acc_v, pf, True, dkdv_smem, desc, flag, t)
                                probabilities_t(sacc, dpacc, rng, full, stats, stg, lane)
                                if overlap:
                                    wait_fragments()
                                as_operand(pf, sacc)
                                as_operand(dsf, dpacc)
                                if fused_dq:  # dQ^T = K^T dS^T, issued before dK and dV's products
                                    stage_ds_t(dkdv_smem, dsf, w, lane)
                                    T.ptx["fence.proxy.async.shared::cta"]()
                                    T.tvm_storage_sync("shared.dyn")
                                    T.ptx.ld.shared.b32(flag[0], T.address_of(kbad[0]))
                                    if flag[0] == 1:
                                        dq_exact(dqacc, dkdv_smem, w, lane)
                                    else:
                                        dq_products(dqacc, desc, dkdv_smem, w)
                                if not overlap:
                                    accumulate_block(acc_k, dsf, acc_v, pf, True, dkdv_smem, bf, desc, bad, flag, stg,
                                                     t + 1, w, lane)  # dK += dS^T Q, dV += P^T dO
                                if bulk:  # dQ rows staged, then one bulk reduction each
                                    stage_dq_rows(dqstage, dqacc, w, lane)
                                    T.tvm_storage_sync("shared")
                                    dq_bulk_add(dq_accum, dqstage, b, h, col0, sig, tid)
                                elif fused_dq:  # dQ added by atomics (accumulate_block waited for its group)
                                    dq_atomics(dq_accum, dqacc, b, h, col0, sig, w, lane)
                            if bulk:
                                dq_bulk_done()
                            if overlap:
                                last_accumulation(acc_k, dsf, acc_v, pf, True, dkdv_smem, bf, desc, bad, flag,
                                                  GS * nblk, w, lane)
                            store_gradients(dk, dv, dk_part, dv_part, dk_split, dv_split, dk_accum, dv_accum,
                                            ttiles[hm, vt, 3], ttiles[hm, vt, 6], b, hk, vbk, acc_k, acc_v, rows, w,
                                            lane, nrows, dqstage, row0, rstr, tid)

    return _without(bwd_dkdv, ("dk_part", "dv_part") * (direct or per_head)
                    + ("dk_split", "dv_split") * (not plan_shape.num_slots or per_head)
                    + ("dq_accum",) * (not fused_dq) + ("dk_accum", "dv_accum") * (not per_head))


#: head-dim elements of dout and of out one lane of ``bwd_delta`` reads (16 bytes of fp16/bf16,
#: one vector load each), and its warps per thread block
DELTA_VECTOR = 8
DELTA_WARPS = 4


def delta_func(spec: AttentionSpec, zero_kv: bool = False):
    """``bwd_delta`` (the fused-dQ backward's first kernel; ``bwd_dq`` computes delta otherwise):
    ``delta[b, h, i] = sum_d dout[b, h, i, d] out[b, h, i, d] - dlse[b, h, i]`` in float32, and
    zeros into the float32 sums the fused ``bwd_dkdv`` adds into: ``dq_accum [B, H, N, D]`` and,
    with ``zero_kv`` (its per-query-head programs), ``dk_accum`` and ``dv_accum [B, KVH, N, D]``
    (row ``(b, x, i)`` of those by the lanes of row ``(b, x, i)`` of q, for ``x < KVH``), as
    FlashAttention-3's preprocessing kernel clears its dQ accumulator. One row per
    ``head_dim / DELTA_VECTOR`` consecutive lanes, each lane reading ``DELTA_VECTOR`` elements of
    dout and of out by one vector load apiece, the lanes' partial sums added by shuffles;
    ``DELTA_WARPS`` warps per block.

    Measured on the H200 (fp16, ``h200_backward_knobs.json`` forms ``seventeenth_before_prologue``
    and ``seventeenth_prologue``), the fused backward's time outside ``bwd_dkdv`` (its backward
    minus ``bwd_dkdv`` alone), against the earlier form (one warp per row reading 2 bytes a lane,
    torch's ``zero_()`` of each float32 sum, one element per thread in the casts): Mistral n=8192
    0.26 -> 0.19 ms, window +-1024 n=32k 0.53 -> 0.26 (backward 3.31 -> 3.19 and 4.74 -> 4.46;
    0.64 and 0.94 GB move through these kernels there, 0.16 and 0.23 ms at 4 TB/s),
    Longformer-large batch 8 at head_dim 64 0.27 -> 0.12."""
    B, H, KVH, N, D, dt = spec.batch, spec.heads, spec.kv_heads, spec.seq_len, spec.head_dim, spec.dtype
    V = DELTA_VECTOR
    lanes = D // V  # lanes per row
    if D % V or lanes & (lanes - 1) or lanes > 32:
        raise ValueError(f"bwd_delta reads head_dim in {V}-element vectors, a power of two of them from 1 to 32 "
                         f"per row (head_dim {V} to {32 * V}); got head_dim {D}")
    per_warp = 32 // lanes
    per_block = DELTA_WARPS * per_warp
    shuffles = lanes.bit_length() - 1
    total = B * H * N
    full_mask = T.uint32(0xFFFFFFFF)
    zero = T.float32(0)

    @T.prim_func(s_tir=True)
    def bwd_delta(
        out: T.Buffer((B, H, N, D), dt),
        dout: T.Buffer((B, H, N, D), dt),
        dlse: T.Buffer((B, H, N), "float32"),
        delta: T.Buffer((B, H, N), "float32"),
        dq_accum: T.Buffer((B, H, N, D), "float32"),
        dk_accum: T.Buffer((B, KVH, N, D), "float32"),
        dv_accum: T.Buffer((B, KVH, N, D), "float32"),
    ):
        T.func_attr({"global_symbol": "bwd_delta", "tirx.noalias": True})
        for vr in T.thread_binding((total + per_block - 1) // per_block, thread="blockIdx.x"):
            for w in T.thread_binding(DELTA_WARPS, thread="threadIdx.y"):
                for lane in T.thread_binding(32, thread="threadIdx.x"):
                    with T.sblock("row"):
                        T.reads()
                        T.writes()
                        acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        xo = T.sblock_alloc_buffer((V,), dt, scope="local")
                        xd = T.sblock_alloc_buffer((V,), dt, scope="local")
                        r: T.let[T.int32] = vr * per_block + w * per_warp + lane // lanes
                        c0: T.let[T.int32] = lane % lanes * V
                        b: T.let[T.int32] = r // (H * N)
                        h: T.let[T.int32] = r // N % H
                        i: T.let[T.int32] = r % N
                        acc[0] = zero
                        if r < total:
                            for e in T.vectorized(V):
                                xo[e] = out[b, h, i, c0 + e]
                            for e in T.vectorized(V):
                                xd[e] = dout[b, h, i, c0 + e]
                            for e in T.serial(V):
                                acc[0] = acc[0] + T.Cast("float32", xd[e]) * T.Cast("float32", xo[e])
                            for half in T.unroll(V // 4):
                                for e in T.vectorized(4):
                                    dq_accum[b, h, i, c0 + half * 4 + e] = zero
                            if zero_kv:
                                if h < KVH:
                                    for half in T.unroll(V // 4):
                                        for e in T.vectorized(4):
                                            dk_accum[b, h, i, c0 + half * 4 + e] = zero
                                            dv_accum[b, h, i, c0 + half * 4 + e] = zero
                        for sh in T.unroll(shuffles):
                            acc[0] = acc[0] + T.tvm_warp_shuffle_xor(full_mask, acc[0], lanes >> (sh + 1), 32, 32)
                        if r < total:
                            if lane % lanes == 0:
                                delta[b, h, i] = acc[0] - dlse[b, h, i]

    return bwd_delta if zero_kv else _without(bwd_delta, ("dk_accum", "dv_accum"))


def dq_cast_func(spec: AttentionSpec):
    """``bwd_dq_cast`` (the fused-dQ backward's last kernel): ``dq = scale * dq_accum`` cast to
    the input dtype, ``dq_accum [B, H, N, D]`` float32 (the sum the key tiles added by
    atomics). One element per loop iteration (the GPU schedule gives each its thread)."""
    B, H, N, D, dt = spec.batch, spec.heads, spec.seq_len, spec.head_dim, spec.dtype
    scale = T.float32(spec.scale)

    @T.prim_func(s_tir=True)
    def bwd_dq_cast(
        dq_accum: T.Buffer((B, H, N, D), "float32"),
        dq: T.Buffer((B, H, N, D), dt),
    ):
        T.func_attr({"global_symbol": "bwd_dq_cast", "tirx.noalias": True})
        for b, h, i, d in T.grid(B, H, N, D):
            with T.sblock(SUM_BLOCK):
                vb, vh, vi, vd = T.axis.remap("SSSS", [b, h, i, d])
                dq[vb, vh, vi, vd] = T.Cast(dt, dq_accum[vb, vh, vi, vd] * scale)

    return bwd_dq_cast


def kv_cast_func(spec: AttentionSpec):
    """``bwd_kv_cast`` (after the per-query-head ``bwd_dkdv``): ``dk = dk_accum``, ``dv =
    dv_accum`` cast to the input dtype, the float32 sums ``[B, KVH, N, D]`` the programs added
    (dK already scaled). One element per loop iteration (the GPU schedule gives each its thread)."""
    B, KVH, N, D, dt = spec.batch, spec.kv_heads, spec.seq_len, spec.head_dim, spec.dtype

    @T.prim_func(s_tir=True)
    def bwd_kv_cast(
        dk_accum: T.Buffer((B, KVH, N, D), "float32"),
        dv_accum: T.Buffer((B, KVH, N, D), "float32"),
        dk: T.Buffer((B, KVH, N, D), dt),
        dv: T.Buffer((B, KVH, N, D), dt),
    ):
        T.func_attr({"global_symbol": "bwd_kv_cast", "tirx.noalias": True})
        for b, h, i, d in T.grid(B, KVH, N, D):
            with T.sblock(SUM_BLOCK):
                vb, vh, vi, vd = T.axis.remap("SSSS", [b, h, i, d])
                dk[vb, vh, vi, vd] = T.Cast(dt, dk_accum[vb, vh, vi, vd])
                dv[vb, vh, vi, vd] = T.Cast(dt, dv_accum[vb, vh, vi, vd])

    return bwd_kv_cast


def sum_components_func(spec: AttentionSpec, num_components: int, kv: bool = False):
    """``sum_components``: ``dst[b, x, i, :] = sum_{c < num_comp[hm]} part[c, b, x, i, :]``, cast
    to the input dtype, for a gradient written per component (see the module docstring):
    ``dq`` (``kv=False``: ``x`` a query head, mask head ``x % HM``) or ``dk`` / ``dv``
    (``kv=True``: ``x`` a KV head, mask head ``x * group % HM``, the group's one mask head, as
    ``bwd_dkdv`` reads it). ``part [C, B, X, N, D]`` float32, ``num_comp [HM]`` int32 of the
    plan the gradient was computed over, ``dst [B, X, N, D]``. One element per loop iteration
    (the GPU schedule gives each its thread, consecutive ``d`` on consecutive lanes), the slots
    added in order ``c = 0, 1, ..``; slots a head does not write are never read."""
    B, N, D, HM, dt = spec.batch, spec.seq_len, spec.head_dim, spec.mask_heads, spec.dtype
    X, GX = (spec.kv_heads, spec.group) if kv else (spec.heads, 1)
    C = num_components
    if C < 2:
        raise ValueError(f"sum_components is for plans of two or more components, got {C}")

    @T.prim_func(s_tir=True)
    def sum_components(
        part: T.Buffer((C, B, X, N, D), "float32"),
        num_comp: T.Buffer((HM,), "int32"),
        dst: T.Buffer((B, X, N, D), dt),
    ):
        T.func_attr({"global_symbol": "sum_components", "tirx.noalias": True})
        for b, x, i, d in T.grid(B, X, N, D):
            with T.sblock(SUM_BLOCK):
                vb, vx, vi, vd = T.axis.remap("SSSS", [b, x, i, d])
                T.reads(part[0:C, vb, vx, vi, vd], num_comp[0:HM])
                T.writes(dst[vb, vx, vi, vd])
                acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                acc[0] = T.float32(0)
                for c in T.serial(num_comp[vx * GX % HM]):
                    acc[0] = acc[0] + part[c, vb, vx, vi, vd]
                dst[vb, vx, vi, vd] = T.Cast(dt, acc[0])

    return sum_components


def split_sum_func(spec: AttentionSpec, plan_shape, kv: bool = False):
    """``split_sum``: for every split tile (group ``g`` of ``splits [HM, NG, 6]``: ``row0,
    rstride, nrows, comp, slot_lo, slot_hi``) and each of its rows, the sum of its chunks'
    float32 results ``split[b x + x, slot_lo .. slot_hi - 1, r, :]`` (already scaled), written
    as the gradient of the row: cast into ``dst [B, X, N, D]`` on a plan of one component, else
    into slot ``comp`` of the component partial buffer ``part [C, B, X, N, D]``
    (:func:`sum_components_func` runs next). Both are parameters either way; the one not
    written is a dummy (``part``: :func:`part_shape`'s one element with one component).
    ``X``: query heads (``kv=False``, dq; mask head ``x % HM``) or KV heads (``kv=True``, dk
    and dv; mask head ``x * group % HM``). Chunks are added in slot order, so the result does
    not depend on which chunk finished first."""
    B, N, D, HM, dt = spec.batch, spec.seq_len, spec.head_dim, spec.mask_heads, spec.dtype
    X, GX = (spec.kv_heads, spec.group) if kv else (spec.heads, 1)
    NS, NG, BR, C = plan_shape.num_slots, max(plan_shape.num_groups, 1), plan_shape.br, plan_shape.num_components
    if not NS:
        raise ValueError(f"split_sum is for plans with split-KV chunks, got {plan_shape.key}")
    direct = C <= 1

    @T.prim_func(s_tir=True)
    def split_sum(
        split: T.Buffer((B * X, NS, BR, D), "float32"),
        splits: T.Buffer((HM, NG, 6), "int32"),
        dst: T.Buffer((B, X, N, D), dt),
        part: T.Buffer(part_shape(spec, C, X), "float32"),
    ):
        T.func_attr({"global_symbol": "split_sum", "tirx.noalias": True})
        for bx, g, r, d in T.grid(B * X, NG, BR, D):
            with T.sblock(SPLIT_SUM_BLOCK):
                vbx, vg, vr, vd = T.axis.remap("SSSS", [bx, g, r, d])
                T.reads(split[vbx, 0:NS, vr, vd], splits[0:HM, vg, 0:6])
                T.writes(dst[vbx // X, vbx % X, 0:N, vd], part[0:C, vbx // X, vbx % X, 0:N, vd])
                acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                hm: T.let[T.int32] = (vbx % X) * GX % HM
                if vr < splits[hm, vg, 2]:
                    acc[0] = T.float32(0)
                    for s in T.serial(splits[hm, vg, 5] - splits[hm, vg, 4]):
                        acc[0] = acc[0] + split[vbx, splits[hm, vg, 4] + s, vr, vd]
                    if direct:
                        dst[vbx // X, vbx % X, splits[hm, vg, 0] + splits[hm, vg, 1] * vr, vd] = T.Cast(dt, acc[0])
                    else:
                        part[splits[hm, vg, 3], vbx // X, vbx % X, splits[hm, vg, 0] + splits[hm, vg, 1] * vr,
                             vd] = acc[0]

    return split_sum
