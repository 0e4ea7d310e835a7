"""Knobs and kernel choice of the tensor-core training path (:mod:`tvm_splat.kernels.backward_mma`).

The warp-level kernels are written bound to threads (as the forward's ``mma`` form is), so what
is "scheduled" here is their shape: the tile sizes of the three tile plans a training workload
runs on, and whether the workload can take the tensor-core path at all.

* ``fwd_lse``: the forward's own warp-level kernel with its ``lse`` output
  (:func:`~tvm_splat.kernels.tiled_mma.tiled_mma_func`, ``with_lse=True``), under the forward
  planner's default knobs (:func:`tvm_splat.planner.default_knobs` with ``stepped_tma=False``:
  the plan's component count and block steps decide, so one component of unit-step blocks at a
  head_dim multiple of 64 takes the TMA form on sm_90a, as inference does; dilated blocks, which
  inference also loads by TMA, keep the cp.async form unless asked, since the backward's form
  below follows the forward's), split-KV included (the lse is written by the tile's one
  program, by the chunks' merge, or by the merge of its components).
* ``bwd_dq``: query tiles of ``BACKWARD_BR`` rows over column blocks of the mask's plan;
  ``bwd_dkdv``: key tiles of ``BACKWARD_BR`` over blocks of the transposed mask's plan; blocks
  of ``BACKWARD_BC`` columns, ``BACKWARD_BC_WIDE_HEADS`` above head_dim 64
  (:func:`default_backward_mma_knobs`).
* plans of several components add ``fwd_merge`` (:func:`~tvm_splat.kernels.tiled.merge_func`
  with the lse), ``bwd_dq_sum`` and ``bwd_dkdv_sum``
  (:func:`~tvm_splat.kernels.backward_mma.sum_components_func`, the latter run once for dk and
  once for dv), scheduled one thread per row or element (:func:`~tvm_splat.schedules.tiled.bind_flat_gpu`).

Public API: :class:`BackwardMmaKnobs`, :func:`default_backward_mma_knobs`,
:func:`tensor_core_training_refusal`, :func:`backward_mma_funcs`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tvm import s_tir

from ..kernels.backward import BackwardSpec
from ..kernels.backward_mma import (SPLIT_SUM_BLOCK, SUM_BLOCK, backward_dkdv_mma_func, backward_dq_mma_func,
                                    check_backward_mma_plan, check_backward_mma_shape, check_kv_sums, delta_func,
                                    dq_cast_func, kv_cast_func, per_query_head_programs, split_sum_func,
                                    sum_components_func)
from ..kernels.tiled import MERGE_BLOCK, merge_func, split_merge_func
from ..kernels.tiled_mma import (MMA_TYPES, check_mma_shape, check_tma_plan, check_tma_shape, check_tma_step,
                                 tiled_mma_func)
from .targets import as_target, is_gpu, supports_wgmma
from .tiled import TiledKnobs, bind_flat_gpu, default_tiled_knobs

__all__ = ["BackwardMmaKnobs", "default_backward_mma_knobs", "tensor_core_training_refusal", "backward_mma_funcs",
           "BACKWARD_BR", "BACKWARD_BC", "WGMMA_BACKWARD_MIN_HEAD_DIM", "WGMMA_BACKWARD_WIDE_HEADS",
           "WGMMA_DKDV_BC_ONE_SEGMENT", "WGMMA_FUSED_DQ_ONE_SEGMENT", "WGMMA_DKDV_TMA", "WGMMA_DKDV_TMA_NARROW_HEADS",
           "WGMMA_FUSED_DQ_NARROW_HEADS",
           "dq_wgmma_form"]

#: rows per tile of both backward kernels (4 warps x 16 rows). Measured on the H200 (fp16,
#: ``benchmarks/results/h200_backward_knobs.json``, the per-score membership form of the kernels):
#: 8 warps (128 rows) were 1.2-1.5x slower (Mistral backward 16.4 vs 14.0 ms, Longformer 9.9 vs
#: 6.7), 2 warps 1.3x slower (Longformer).
BACKWARD_BR = 64
#: columns per block of both backward kernels up to head_dim 64, and ``BACKWARD_BC_WIDE_HEADS``
#: above. At head_dim 128 with 64-column blocks ``bwd_dkdv`` (two float32 accumulators, dK and
#: dV, beside two score tiles) needs 255 registers and spills (ptxas for sm_90a: 8 bytes; 244 and
#: none at bc=32; d=64, bc=64: 241 and none), and ``bwd_dq`` with two K/V stages needs 111 KB of
#: shared memory, one thread block per SM on the H200's 228 KB (73 KB at bc=32: three;
#: registers, 165 per thread, allow three). Measured (H200, fp16, block-range forms): d=64,
#: bc=32 was 1-6% faster than 64 (Longformer backward 1.26 vs 1.28 ms, causal strided 0.34 vs
#: 0.37; kept at 64 until bc=32 at d=64 is checked against float64 on the GPU);
#: d=128, bc=16 1.3x slower than 32 (Mistral 8.29 vs 6.58 ms; bc=64 for bwd_dq alone, in the
#: earlier form: 2.3x slower, 8.70 vs 3.81 ms).
BACKWARD_BC = 64
BACKWARD_BC_WIDE_HEADS = 32
#: from this head_dim on, on sm_90a, the backward kernels take their wgmma form with 128-row
#: tiles (two warpgroups) and 64-column blocks in ``bwd_dq``: measured at head_dim 128 (H200,
#: fp16, ``h200_backward_knobs.json`` form ``wgmma_core_rows_tiles``), 8% faster than the
#: ``mma.sync`` form's 64 x 32 tiles: Mistral n=8192 backward 5.49 vs 5.98 ms (bwd_dq 2.04 vs
#: 2.46, bwd_dkdv 3.42 vs 3.60), window +-1024 n=32k 7.01 vs 7.62; gradients bit-identical.
#: Below, at head_dim 64, every wgmma tiling tried was slower (Longformer-base b=4: 0.815 ms at
#: 64-row tiles, 1.08 at 128, 0.925 with dq_bc 128, against 0.760-0.772). Only where the forward
#: takes its wgmma form too (one component in the tile plan): on causal strided (two components)
#: at head_dim 128 these tiles were 38% slower than mma.sync in the models suite (backward
#: kernels 1.08 vs 0.78 ms, n=8192, 16 heads; ``h200_models_backward.json`` of 2026-12-02 against
#: the one before), as the forward's 128-row tiles were on unions. Where the forward keeps its
#: mma form on column blocks of a step above 1 (dilated), the backward follows: there the two
#: forms measured the same (dilated +-256 step 2, n=8192, 12 heads, d=128: backward 0.494 ms
#: either way; form ``h27_dilated``).
WGMMA_BACKWARD_MIN_HEAD_DIM = 128
WGMMA_BACKWARD_WIDE_HEADS = {"wgmma": True, "br": 128, "warps": 8, "dq_bc": 64, "dkdv_bc": 32}
#: ``bwd_dkdv``'s column blocks in the wgmma form where every key row of the transposed mask is
#: one segment (``spec.columns.max_segments == 1``: windows, causal windows, dilated): measured at
#: head_dim 128 (H200, fp16, ``h200_backward_knobs.json`` form ``h27``), bwd_dkdv 22% and
#: 16% faster than at 32: Mistral n=8192 3.41 -> 2.65 ms (backward 5.52 -> 4.75), window +-1024
#: n=32k 4.12 -> 3.48 (backward 7.07 -> 6.42); gradients bit-identical. ptxas (sm_90a, bf16,
#: d=128) gives that kernel 248-254 registers and no spill there; with two or more segments per
#: key row (each thread caches every segment of its two rows) it takes 255 and spills 12-372
#: bytes (global+window, per-head, strided unions), so those keep 32.
WGMMA_DKDV_BC_ONE_SEGMENT = 64
#: the fused dQ form taken by default where ``bwd_dkdv`` has those 64-column blocks (wgmma form,
#: one segment per key row, head_dim 128: 64 dQ columns per warpgroup), with one program per
#: query head where KV heads are grouped. Measured on the H200 (fp16, ``h200_backward_knobs.json``
#: form ``h29_fused_dq_bulk``, ninth session's code run in the tenth), backward against the two
#: kernels: Mistral n=8192 (GQA 32/8) 4.31 vs 4.74 ms (9% faster; bulk without a program per
#: query head 4.63, atomics per query head 4.42, atomics per KV head 6.90), window +-1024 n=32k
#: 5.86 vs 6.36 (8% faster; atomics 5.96). ``ncu``: bwd_dq 2.65 ms and bwd_dkdv 3.48 ms on
#: Mistral, both at 12.5% occupancy (one 256-thread block per SM: 166 and 252 registers, 150
#: and 170 KB of shared memory), issue slots 27-28% busy. At head_dim 64 (Longformer-base b=4)
#: the fused forms were 3-4% slower than the two kernels (0.789-0.796 vs 0.766 ms) and they need
#: head_dim = 64 per warpgroup, so the default keeps them to head_dim 128. In the backward models
#: suite (fp16 and bf16 alike) the eight d=128 cases' backward went from 5.32-22.9 ms to
#: 4.74-21.0 (``h200_models_backward.json``).
WGMMA_FUSED_DQ_ONE_SEGMENT = {"fused_dq": "bulk", "per_query_head": True}
#: the default fused form's ``bwd_dkdv`` takes its Q and dO blocks by TMA (``dkdv_tma``) where every
#: block of its plan (the transposed mask's) steps rows by one. Measured on the H200 (fp16,
#: ``h200_backward_knobs.json`` form ``fourteenth_dkdv_tma_d128``, alternated twice): bwd_dkdv
#: Mistral n=8192 3.72 -> 3.00 ms, window +-1024 n=32k 5.22 -> 4.21 (backward 4.06 -> 3.32 and
#: 5.76 -> 4.74, 18% faster); ptxas: 255 registers and no spill either way. At head_dim 64 the
#: wgmma form it needs ties bwd_dq to wgmma too, 8% slower there: Longformer-base b=4 backward
#: 0.75 -> 0.715 ms, n=1024 b=32 1.07 -> 1.01 (bwd_dkdv 0.645 -> 0.557, bwd_dq 0.41 -> 0.45),
#: Longformer-base b=1 within noise (form ``fourteenth_dkdv_tma_d64``): taken there beside an
#: ``mma.sync`` bwd_dq instead (:data:`WGMMA_DKDV_TMA_NARROW_HEADS`).
WGMMA_DKDV_TMA = {"dkdv_tma": True}
#: below head_dim 128 (64: TMA cuts head_dim into 64-element rows), where the forward takes its
#: wgmma form and ``bwd_dkdv``'s plan steps rows by one: ``bwd_dkdv`` in its wgmma form with Q
#: and dO by TMA, at the mma form's 64-row tiles and 64-column blocks, beside ``bwd_dq`` in its
#: ``mma.sync`` form (``dq_wgmma=False``). The two kernels are separate launches, so each keeps
#: its faster form (H200, fp16, ``h200_backward_knobs.json`` form ``fourteenth_dkdv_tma_d64``,
#: n=1024 b=32: bwd_dkdv 0.645 ms mma -> 0.557 wgmma+TMA; bwd_dq 0.41 mma against 0.45 wgmma).
#: Measured together against the mma.sync form (form ``fifteenth_d64_default``, alternated
#: twice, gradients identical), backward: Longformer-large b=8 1.83 -> 1.70 ms (bwd_dkdv 1.10 ->
#: 0.965), n=1024 b=32 1.06 -> 0.97, Longformer-base b=4 0.752 -> 0.679, b=1 0.224 -> 0.206
#: (8-10% faster). Dilated and causal strided keep mma.sync (the forward's mma form).
WGMMA_DKDV_TMA_NARROW_HEADS = {"wgmma": True, "dkdv_tma": True, "dq_wgmma": False}
#: and there, where key rows of the transposed mask have two or more segments (global tokens),
#: ``bwd_dkdv`` computes dQ too, by bulk reductions (the head_dim 128 default's form,
#: :data:`WGMMA_FUSED_DQ_ONE_SEGMENT`, one program per KV head; no ``bwd_dq``). Measured on the
#: H200 (fp16, ``h200_backward_knobs.json`` form ``seventeenth_prologue``, alternated twice,
#: against the two kernels): backward Longformer-large b=8 1.68 -> 1.44 ms, n=1024 b=32 0.97 ->
#: 0.89, Longformer-base b=4 0.67 -> 0.59, b=1 0.20 -> 0.17. The rule is shared memory: the fused
#: form's dQ staging makes its block 91 KB, two per SM, while the two-kernel ``bwd_dkdv`` (66 KB)
#: runs three where its registers allow: 168 (ptxas, sm_90a) with one segment per key row, 220
#: with two, which allow two anyway. With one segment the fused form was 17% slower in the
#: backward models suite (window +-256 n=2048 batch 16, forward+backward kernels: 1.433 ms fused
#: in the seventeenth session's first run, 1.227 with the two kernels in its second, 1.217 in the
#: sixteenth session's run) and no faster on block-local n=8192 (0.150 against 0.146-0.147 ms);
#: grouped KV heads with one segment (causal window +-1023, 16/4 heads) measured 0.83 -> 0.79 (a
#: program per query head 0.78) but are left to the two kernels by this rule. A program per query head is not taken at head_dim 64:
#: the plans' grids would change between the default's two calls (:class:`~tvm_splat.training.TrainingPlan`).
WGMMA_FUSED_DQ_NARROW_HEADS = {"fused_dq": "bulk", "per_query_head": False, "dq_wgmma": None}


@dataclass(frozen=True)
class BackwardMmaKnobs:
    """Tile shapes of the training kernels: ``forward`` (the forward's knobs, split-KV off),
    ``dq_bc`` and ``dkdv_bc`` (column blocks of the two backward kernels), ``br`` and ``warps``
    (rows per tile of both backward kernels, ``br == 16 * warps``), ``stages`` (block operands
    of the backward kernels: 2 = double-buffered, ``cp.async`` one block ahead, as the forward's
    two-stage form; 1 = plain loads, one more barrier per block), ``split_blocks`` (split-KV of the
    backward plans' long tiles, chunk length in blocks: -1 the forward's rule,
    :func:`~tvm_splat.formats.tile_plan.split_length`; 0 off), ``wgmma`` (the backward kernels'
    Hopper form, sm_90a: their products as warpgroup MMAs). The default takes it from head_dim
    128 on sm_90a, with 128-row tiles (:data:`WGMMA_BACKWARD_WIDE_HEADS`); below, ``mma.sync``
    for both kernels unless ``bwd_dkdv`` takes TMA (:data:`WGMMA_DKDV_TMA_NARROW_HEADS`): at
    the default 64-row tiles the cp.async wgmma form ran 4-8% slower on the H200 (fp16, backward of
    both kernels, ``h200_backward_knobs.json`` form ``wgmma_core_rows``: Longformer-base batch
    4 0.815 vs 0.760 ms, Mistral n=8192 6.42 vs 5.99 ms, causal strided 0.374 vs 0.356; each
    product waits for its MMA before the next step, so nothing overlaps).
    ``stages=3`` (wgmma only) is the overlapped Hopper form: three block stages, each block's
    accumulating products issued behind the next block's S and dP so that they run while the
    CUDA cores compute that block's P and dS (:mod:`tvm_splat.kernels.backward_mma`); measured
    5-7% slower than ``stages=2`` on the H200 (Mistral n=8192 backward 5.91 vs 5.52 ms, window
    +-1024 n=32k 7.56 vs 7.07), so not a default. ``stages=2`` is the default:
    one stage was 1.06x (Longformer-base, batch 4) and 1.15x (Mistral, n=8192) slower on the
    H200 (``benchmarks/results/h200_backward_knobs.json``).
    ``fused_dq`` (wgmma, two stages, ``head_dim == 16 * warps``: 64 head-dim columns per
    warpgroup): ``bwd_dkdv`` computes dQ as well, ``K^T dS^T`` per step by warpgroup MMAs, added
    into a float32 buffer by atomics, so S and dP are computed once instead of twice and
    ``bwd_dq`` does not run (``bwd_delta`` computes delta before, ``bwd_dq_cast`` scales and
    casts after), as FlashAttention-2 and -3 do. Measured on the H200 (fp16,
    ``h200_backward_knobs.json`` form ``h28_fused_dq``), backward against each default: window
    +-1024 n=32k d=128 5.97 vs 6.39 ms (7% faster), Mistral n=8192 (GQA 32/8) 6.97 vs 4.72 (48%
    slower: bwd_dkdv with dQ 6.60 ms against 2.64 + 2.01 for the two kernels), Longformer-base
    b=4 d=64 0.798 vs 0.768; so the atomics are no default. Its ``red.global.add`` per element
    adds one float32 atomic per score (about 1e9 for either d=128 case); where the CTAs running at once
    touch more dQ rows than the L2 holds (Mistral: 8 query heads, 34 MB of float32 dQ, against
    9.7 MB for the window) they run at half the rate (an inference from the figures, not
    profiled). ``fused_dq="bulk"``: the same dQ products, each step's dQ rows staged as float32
    in shared memory and added by one ``cp.reduce.async.bulk`` per row (FlashAttention-3's
    TMA reduce-add, 64 asynchronous reductions per step in place of 8192 atomics): window
    +-1024 5.86 ms, Mistral 4.63 (4.31 with ``per_query_head``), the default at head_dim 128
    where ``bwd_dkdv``'s blocks are 64 wide (:data:`WGMMA_FUSED_DQ_ONE_SEGMENT`).
    ``per_query_head`` (fused dQ with grouped KV heads): one ``bwd_dkdv`` program per query head
    instead of per KV head (FlashAttention-3's grid), so the programs running at once add dQ
    into the rows of 2 query heads instead of 8 on Mistral's grid (about 8 MB of float32
    instead of 34); dK and dV are added by atomics into float32 buffers (about 67 M on Mistral
    against 1e9 for dQ) and cast by ``bwd_kv_cast``: Mistral's backward 4.42 ms with the
    atomics (from 6.97), 4.31 with the bulk form. ``per_query_head="bulk"`` (with
    ``fused_dq="bulk"``): dK and dV added by one bulk reduction per staged row instead, as
    FlashAttention-3's epilogue for grouped heads does; built and checked by ptxas, not yet
    measured, so no default. ``dkdv_tma`` (wgmma, two stages, head_dim a multiple of 64, plans
    whose ``bwd_dkdv`` blocks all step rows by one): ``bwd_dkdv``'s Q and dO blocks arrive by TMA,
    128-byte swizzled, one thread issuing both copies a step, as the forward's K and V do
    (:func:`~tvm_splat.kernels.backward_mma.backward_dkdv_mma_func`): 18% faster backward at
    head_dim 128, the default with the fused dQ there (:data:`WGMMA_DKDV_TMA`); knobs derived
    from that default for a form it does not go with (``stages`` other than 2, ``wgmma=False``)
    must add ``dkdv_tma=False``, as they add ``fused_dq=False``. ``dq_wgmma``: ``bwd_dq``'s form
    where it differs from ``bwd_dkdv``'s (``None``: ``wgmma``, both kernels alike; ``False``:
    ``mma.sync`` beside a wgmma ``bwd_dkdv``, whose TMA form needs wgmma, at head_dim 64 where
    the wgmma ``bwd_dq`` measured slower: n=1024 b=32 0.45 against 0.41 ms,
    ``h200_backward_knobs.json`` form ``fourteenth_dkdv_tma_d64``): the default at head_dim 64
    where ``bwd_dkdv`` takes TMA with one segment per key row (:data:`WGMMA_DKDV_TMA_NARROW_HEADS`,
    8-10% faster backward; with two, the fused dQ: :data:`WGMMA_FUSED_DQ_NARROW_HEADS`)."""

    forward: TiledKnobs
    br: int = BACKWARD_BR
    dq_bc: int = BACKWARD_BC
    dkdv_bc: int = BACKWARD_BC
    warps: int = BACKWARD_BR // 16
    stages: int = 2
    split_blocks: int = -1
    wgmma: bool = False
    fused_dq: bool | str = False
    per_query_head: bool | str = False
    dkdv_tma: bool = False
    dq_wgmma: bool | None = None


def dq_wgmma_form(knobs: BackwardMmaKnobs) -> bool:
    """Whether ``bwd_dq`` takes its wgmma form: ``knobs.dq_wgmma``, or ``knobs.wgmma`` when that
    is None."""
    return knobs.wgmma if knobs.dq_wgmma is None else knobs.dq_wgmma


def default_backward_mma_knobs(spec: BackwardSpec, target, forward: TiledKnobs | None = None,
                               dkdv_blocks=None) -> BackwardMmaKnobs:
    """The knobs when nothing is tuned (see the module docstring); ``forward``: the forward's
    untuned knobs as the planner chose them from the tile plan
    (:func:`tvm_splat.planner.default_knobs`, which :mod:`tvm_splat.training` passes; default:
    :func:`~tvm_splat.schedules.tiled.default_tiled_knobs` of the spec alone), their split-KV
    rule included (the lse of split rows comes from ``fwd_split_merge``). The backward takes its
    wgmma form (:data:`WGMMA_BACKWARD_WIDE_HEADS`) from :data:`WGMMA_BACKWARD_MIN_HEAD_DIM` where
    the forward took its own: on sm_90a, for a plan of one component; ``bwd_dkdv``'s blocks are
    :data:`WGMMA_DKDV_BC_ONE_SEGMENT` wide there when every key row is one segment, and there,
    at head_dim 128, ``bwd_dkdv`` computes dQ too (:data:`WGMMA_FUSED_DQ_ONE_SEGMENT`), its Q and
    dO blocks by TMA (:data:`WGMMA_DKDV_TMA`) when ``dkdv_blocks`` (the blocks ``[HM, NB, 3]`` of
    bwd_dkdv's tile plan under the knobs returned without them: the TMA forms keep their tile
    shapes and grids, which the training plans check) all step rows by one; without them, the cp.async form. Below head_dim 128, where the forward takes its wgmma
    form and ``dkdv_blocks`` all step rows by one, ``bwd_dkdv`` takes its wgmma form with TMA:
    where key rows of the transposed mask have two or more segments computing dQ too
    (:data:`WGMMA_FUSED_DQ_NARROW_HEADS`), else beside an ``mma.sync`` ``bwd_dq``
    (:data:`WGMMA_DKDV_TMA_NARROW_HEADS`); otherwise, and without ``dkdv_blocks``, both kernels
    keep ``mma.sync``."""
    forward = forward or default_tiled_knobs(spec.rows, target)
    bc = BACKWARD_BC if spec.rows.head_dim <= 64 else BACKWARD_BC_WIDE_HEADS
    mma = BackwardMmaKnobs(forward, dq_bc=bc, dkdv_bc=bc)
    if not forward.wgmma or not supports_wgmma(as_target(target)):
        return mma
    if spec.rows.head_dim < WGMMA_BACKWARD_MIN_HEAD_DIM:
        narrow = dataclasses.replace(mma, **WGMMA_DKDV_TMA_NARROW_HEADS)
        fused = dataclasses.replace(narrow, **WGMMA_FUSED_DQ_NARROW_HEADS)
        if spec.columns.max_segments > 1 and _with_dkdv_tma(spec, fused, dkdv_blocks):
            return fused
        return _with_dkdv_tma(spec, narrow, dkdv_blocks) or mma
    hopper = dataclasses.replace(mma, **WGMMA_BACKWARD_WIDE_HEADS)
    if spec.columns.max_segments == 1:
        hopper = dataclasses.replace(hopper, dkdv_bc=WGMMA_DKDV_BC_ONE_SEGMENT)
    try:
        check_backward_mma_shape(spec.rows, hopper.br, hopper.dq_bc, hopper.warps, hopper.stages, True)
        check_backward_mma_shape(spec.columns, hopper.br, hopper.dkdv_bc, hopper.warps, hopper.stages, True)
    except ValueError:  # e.g. past the shared memory of a block at head_dim 256: the mma form
        return mma
    if spec.columns.max_segments == 1 and spec.rows.head_dim == 16 * hopper.warps:
        fused = dataclasses.replace(hopper, **WGMMA_FUSED_DQ_ONE_SEGMENT)
        try:
            check_backward_mma_shape(spec.columns, fused.br, fused.dkdv_bc, fused.warps, fused.stages, True,
                                     fused.fused_dq)
        except ValueError:  # its staging of dQ rows past the shared memory: the two kernels
            return hopper
        return _with_dkdv_tma(spec, dataclasses.replace(fused, **WGMMA_DKDV_TMA), dkdv_blocks) or fused
    return hopper


def _with_dkdv_tma(spec: BackwardSpec, knobs: BackwardMmaKnobs, dkdv_blocks) -> BackwardMmaKnobs | None:
    """``knobs`` (a ``dkdv_tma`` form) where ``bwd_dkdv`` can take its Q and dO blocks by TMA:
    ``dkdv_blocks`` given, all stepping rows by one, and a head_dim TMA can cut; else None."""
    if dkdv_blocks is None:
        return None
    try:
        check_backward_mma_shape(spec.columns, knobs.br, knobs.dkdv_bc, knobs.warps, knobs.stages, knobs.wgmma,
                                 knobs.fused_dq, tma=True)
        check_tma_plan(dkdv_blocks, "bwd_dkdv's plan", "dkdv_tma=False")
    except ValueError:  # a head_dim TMA cannot cut, or blocks of a step above one: cp.async
        return None
    return knobs


def tensor_core_training_refusal(spec: BackwardSpec, target, knobs: BackwardMmaKnobs, plans) -> str | None:
    """Why this workload cannot take the tensor-core training path (``None``: it can).
    ``plans``: the tile plans ``(forward, dq, dkdv)`` (the last of the transposed mask).
    float32 and float64, and CPU targets, are not refused here: they never ask (they have the
    CUDA-core and CPU kernels by design)."""
    rows = spec.rows
    if not is_gpu(as_target(target)) or rows.dtype not in MMA_TYPES:
        return f"{rows.dtype} on {as_target(target).kind.name} has no tensor-core path"
    if rows.mask_heads > 1 and rows.group > 1:
        return (f"per-head masks ({rows.mask_heads} mask heads) with grouped KV heads (groups of "
                f"{rows.group}): a dK/dV program sums over a group that must share one mask head")
    try:
        f = knobs.forward
        check_mma_shape(rows, f.br, f.bc, f.warps, f.m_tiles)
        if f.warp_specialized:
            raise ValueError("the training forward (fwd_lse) has no warp-specialized form (measured for "
                             "inference only): forward knobs with warp_specialized=False")
        if f.tma:
            check_tma_shape(rows, f.wgmma, f.stages)
            check_tma_step(plans[0].shape.step, rows.seq_len, "the forward's plan", "tma=False")
        if (knobs.wgmma or dq_wgmma_form(knobs)) and not supports_wgmma(as_target(target)):
            raise ValueError(f"the wgmma backward needs a Hopper target (sm_90), got {as_target(target)}")
        check_backward_mma_shape(rows, knobs.br, knobs.dq_bc, knobs.warps, knobs.stages, dq_wgmma_form(knobs))
        check_backward_mma_shape(spec.columns, knobs.br, knobs.dkdv_bc, knobs.warps, knobs.stages, knobs.wgmma,
                                 knobs.fused_dq, knobs.dkdv_tma)
        if knobs.dkdv_tma:
            check_tma_plan(plans[2].blocks, "bwd_dkdv's plan (the transposed mask's)", "dkdv_tma=False")
        check_kv_sums(knobs.fused_dq, knobs.per_query_head)
        for plan in plans:
            check_backward_mma_plan(plan.shape, plan.num_comp)
    except ValueError as err:
        return str(err)
    return None


#: elements per thread of the elementwise casts (``bwd_dq_cast``, ``bwd_kv_cast``): one 16-byte
#: float32 load and one 8-byte fp16/bf16 store each, where one element per thread moved 4 and 2
#: bytes (measured with ``bwd_delta``'s docstring)
CAST_VECTOR = 4


def _flat(func, block, vector: int = 1):
    sch = s_tir.Schedule(func)
    bind_flat_gpu(sch, block, vector=vector)
    return sch.mod["main"]


def per_query_head_sums(spec: BackwardSpec, knobs: BackwardMmaKnobs) -> bool:
    """Whether ``bwd_dkdv`` runs one program per query head and adds dK, dV into float32 sums
    (``per_query_head`` with the fused dQ and grouped KV heads; with one query head per KV head
    the knob changes nothing)."""
    return per_query_head_programs(spec.columns, knobs.fused_dq, knobs.per_query_head)


def backward_mma_funcs(spec: BackwardSpec, knobs: BackwardMmaKnobs, plan_shapes) -> dict:
    """The training PrimFuncs by name for the tile plan shapes ``(forward, dq, dkdv)``, all
    bound to threads: ``fwd_lse``, ``bwd_dq``, ``bwd_dkdv``; for each plan with split-KV the
    combination of its chunks: ``fwd_split_merge`` (forward, with the lse), ``bwd_dq_split_sum``
    (dq), ``bwd_dkdv_split_sum`` (dk and dv); for each
    plan of several components its combining kernel: ``fwd_merge`` (forward), ``bwd_dq_sum``
    (dq), ``bwd_dkdv_sum`` (dk and dv)."""
    fwd, dq, dkdv = plan_shapes
    f = knobs.forward
    funcs = {"fwd_lse": tiled_mma_func(spec.rows, fwd, f.warps, f.m_tiles, f.stages, wgmma=f.wgmma, tma=f.tma,
                                       with_lse=True, lazy_rescale=f.lazy_rescale, fold_scale=f.fold_scale),
             "bwd_dkdv": backward_dkdv_mma_func(spec.columns, dkdv, knobs.warps, knobs.stages, knobs.wgmma,
                                                knobs.fused_dq, knobs.per_query_head, knobs.dkdv_tma)}
    kv_sums = per_query_head_sums(spec, knobs)
    if kv_sums:  # dK, dV added into float32 sums by the per-query-head programs: the cast after
        funcs["bwd_kv_cast"] = _flat(kv_cast_func(spec.columns), SUM_BLOCK, CAST_VECTOR)
    if knobs.fused_dq:  # dQ by bwd_dkdv: delta (and the zeroed sums) before it, the cast after
        funcs["bwd_delta"] = delta_func(spec.rows, zero_kv=kv_sums)
        funcs["bwd_dq_cast"] = _flat(dq_cast_func(spec.rows), SUM_BLOCK, CAST_VECTOR)
    else:
        funcs["bwd_dq"] = backward_dq_mma_func(spec.rows, dq, knobs.warps, knobs.stages, dq_wgmma_form(knobs))
    if fwd.num_slots:
        funcs["fwd_split_merge"] = _flat(split_merge_func(spec.rows, fwd, with_lse=True), MERGE_BLOCK)
    if dq.num_slots and not knobs.fused_dq:
        funcs["bwd_dq_split_sum"] = _flat(split_sum_func(spec.rows, dq), SPLIT_SUM_BLOCK)
    if dkdv.num_slots and not kv_sums:
        funcs["bwd_dkdv_split_sum"] = _flat(split_sum_func(spec.columns, dkdv, kv=True), SPLIT_SUM_BLOCK)
    if fwd.num_components > 1:
        funcs["fwd_merge"] = _flat(merge_func(spec.rows, fwd.num_components, with_lse=True), MERGE_BLOCK)
    if dq.num_components > 1 and not knobs.fused_dq:
        funcs["bwd_dq_sum"] = _flat(sum_components_func(spec.rows, dq.num_components), SUM_BLOCK)
    if dkdv.num_components > 1 and not kv_sums:
        funcs["bwd_dkdv_sum"] = _flat(sum_components_func(spec.columns, dkdv.num_components, kv=True), SUM_BLOCK)
    return funcs
