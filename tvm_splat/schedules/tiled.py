"""Schedules of the tiled fused kernel (:mod:`tvm_splat.kernels.tiled`) and its knobs.

Plain functions ``(func, target, knobs) -> PrimFunc`` driven by the frozen :class:`TiledKnobs`,
whose defaults (:func:`default_tiled_knobs`) live beside them, as dlight keeps a rule's config
beside the rule:

* CPU (llvm): one parallel task per (batch x head, tile); inner loops stay serial.
* GPU (cuda), CUDA cores (float32): ``blockIdx.x`` = tile, ``blockIdx.y`` = batch x head,
  threads (``threadIdx.z`` = warps, ``threadIdx.y`` x ``threadIdx.x`` = 4 x 8 lanes); Q/K/V/P
  tiles, masked scores and the row softmax state in shared memory, S and the O accumulator in
  registers (each thread a register micro-tile of ``S = Q K^T`` and of ``O``); global loads are
  16-byte vectors; the mask epilogue runs on the S registers; row reductions accumulate in
  registers, one row per thread. ``merge`` and ``fallback`` are simple one-row-per-thread
  kernels.
* GPU, ``use_tensor_cores=True`` (float16 / bfloat16): the warp-level form of the kernel
  (:mod:`tvm_splat.kernels.tiled_mma`, ``mma.sync`` with scores, P and O in registers). It is
  already bound to threads, so it has no schedule here; its knobs (``warps``, ``m_tiles``,
  ``stages``, ``bc``) shape the program itself.

Public API: :class:`TiledKnobs`, :func:`default_tiled_knobs`, :func:`tiled_funcs`,
:func:`apply_tiled_schedule`, :func:`schedule_tiled`, :func:`bind_flat_gpu`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import tvm
from tvm import s_tir

import dataclasses

from ..formats.tile_plan import PlanShape
from ..kernels.spec import AttentionSpec
from ..kernels.tiled import MERGE_BLOCK, TILE_BLOCK, fallback_func, merge_func, split_merge_func, tiled_func
from ..kernels.tiled_mma import (LOOP_VARIANTS, MMA_TYPES, check_fold_scale, check_head_group, check_l2_hints,
                                 check_loop_variant, check_persistent, tiled_mma_func)
from .targets import as_target, is_gpu, supports_wgmma, target_key

__all__ = ["TiledKnobs", "default_tiled_knobs", "TWO_STAGE_MIN_TILES", "WGMMA_MIN_HEAD_DIM", "TMA_HEAD_DIM_MULTIPLE",
           "WARP_SPECIALIZED_MIN_TILES",
           "tiled_funcs", "tiled_program_name", "tiled_form", "program_form", "uses_mma", "schedule_tiled", "apply_tiled_schedule", "bind_flat_gpu"]


@dataclass(frozen=True)
class TiledKnobs:
    """Knobs of the tiled kernel (the tuning search space).

    * ``br``: rows per tile (query tile), ``bc``: columns per block (key block);
      multiples of 16 when ``use_tensor_cores``.
    * ``warps``: warps per thread block on the GPU (threads = 32 * warps).
    * ``vector_bytes``: width of global loads/stores on the GPU (16 = 128-bit).
    * ``use_tensor_cores``: the warp-level ``mma.sync`` kernel (float16/bfloat16 inputs, CUDA
      only; ignored elsewhere); needs ``br == 16 * warps * m_tiles``.
    * ``m_tiles``: 16-row m-tiles per warp in the ``mma`` kernel.
    * ``stages``: K/V shared-memory stages of the ``mma`` kernel (2: ``cp.async`` one block ahead;
      4, wgmma only: the pipelined form, two blocks ahead, GEMMs overlapping the softmax).
    * ``row_pad``: extra float32 per shared score row (bank-conflict padding, CUDA cores).
    * ``split_blocks``: split-KV chunk length in column blocks (-1: the tile plan's rule,
      :func:`~tvm_splat.formats.tile_plan.split_length`; 0: never split).
    * ``wgmma``: the Hopper form of the ``mma`` kernel (sm_90a): both GEMMs as warpgroup MMAs
      (``wgmma.mma_async``), one warpgroup per 64 rows; needs ``warps`` a multiple of 4 and
      ``m_tiles == 1``.
    * ``tma``: K/V blocks by TMA into 128-byte-swizzled stages (the two-stage wgmma form;
      head_dim a multiple of 64; tile plans whose column blocks share one step, 1 or a
      dilation dividing n).
    * ``warp_specialized``: the TMA form with a producer warpgroup issuing the copies and
      consumer warpgroups that release stages through mbarriers instead of a CTA-wide barrier
      per block (``setmaxnreg`` gives the consumers the producer's registers; one thread block
      per SM at two consumer warpgroups); needs ``tma`` and ``warps`` 4 or 8.
    * ``persistent``: 0 (off), or ``P`` > 0 thread blocks of the warp-specialized form's
      persistent variant, each walking the grid's programs round after round (heads first,
      the rounds' thread blocks in snake order) with its K/V stages running on across tiles and
      the next tile's Q and segments read ahead; needs ``warp_specialized``. ``P`` is meant to
      be the number of thread blocks the device runs at once: its SM count with two consumer
      warpgroups (one block per SM; 132 on the H100 SXM and the H200, 114 on the H100 PCIe),
      twice that with one; blocks past it wait for a second wave. Not in the tuning space; the
      planner sets it where a plan has a GPU (:func:`tvm_splat.planner.persistent_default`):
      with the snake order and the read-ahead (twenty-sixth session) it beat the grid form on an
      H100 in all 12 same-process pairs, 1.0-6.3%; before them it measured on the H200 within
      0.5% of the grid form on window +-1024 and 2.2-2.5% slower on a causal window
      (:func:`~tvm_splat.kernels.tiled_mma.tiled_mma_func`).
    * ``lazy_rescale``: the warp-level kernel moves a row's running max only when a block
      raises it by more than :data:`~tvm_splat.kernels.tiled_mma.RESCALE_THRESHOLD`, and
      rescales O only in a warp where a row moved it (fewer instructions a block, but on the
      H100, one run a case, within +-1.4% of the plain loop in the warp-specialized form at
      d=128, fp16 and bf16, and within +-1.3% in the d=64 TMA form, alone or with
      ``fold_scale``: neither a default nor in the tuning space); needs
      ``use_tensor_cores``.
    * ``early_rescale``: the warp-specialized form multiplies O by a block's rescale factors
      while the next block's S runs, before issuing the block's P V, instead of after the
      previous P V; the default of that form and its program in the tuning space
      (:func:`with_measured_variants` gives the figures); needs ``warp_specialized``.
    * ``softmax_overlap``: the warp-specialized form ends each block's softmax with a branch
      that keeps ptxas from hoisting the wait for the previous P V above it, so that the
      softmax overlaps that P V as the loop is written (without it none of its exponentials
      does, by the SASS; yet on the H100, one run a case, fp16 and bf16, it was 0.4-1.4% slower
      on window +-1024 and 0.3-1.3% faster on Mistral's causal window, and with
      ``early_rescale`` 1.4-2.2% slower than the plain loop on both: neither a default nor in
      the tuning space); needs ``warp_specialized``.
    * ``head_group``: 0, the default program order of the warp-level kernel (heads first, or
      row tiles in groups on many heads: :func:`~tvm_splat.kernels.tiled_mma.program_tile`),
      or ``G`` >= 1: runs of ``G`` heads, all their row tiles
      (:func:`~tvm_splat.kernels.tiled_mma.head_group_tile`); needs ``use_tensor_cores``. Like
      ``persistent``, not in the tuning space: the planner sets it on a GPU from the tile plan
      (:func:`tvm_splat.planner.head_group_default`: runs of 4 heads on tiles of 64 blocks or
      more, 3.8-4.7% faster sustained on window +-4096 and on every key at n=32k, H100 bf16;
      runs of 1 below, which cut window +-1024's DRAM reads from 605 to 424 MB a call; either
      only where the runs keep the thread blocks' balance, which a causal plan's ramp of tile
      lengths can lose).
    * ``kv_evict_last`` / ``out_evict_first``: L2 cache hints, ``evict_last`` on the TMA forms'
      K/V tensor copies (needs ``tma``) and ``evict_first`` on the persistent form's TMA store
      of O (needs ``persistent``; :func:`~tvm_splat.kernels.tiled_mma.tiled_mma_func`). Off by
      default and not in the tuning space: on window +-1024 (n=32k, 16 heads, d=128, bf16,
      H100, ``benchmarks/results/h100_thirty_ninth_l2.json``) ``ncu`` read 605 MB from DRAM a
      call heads first; ``kv_evict_last`` 600 (within the context's default persisting L2
      limit, which read 9 MiB; with the limit raised to 31 MiB by ``cuCtxSetLimit``, 446),
      ``out_evict_first`` 583 at the same cycles a call; runs of one head
      (``head_group=1``) 424. Their 50-call pairs (bf16 and fp16, up to three cases) moved by -3.9% to
      +5.7%, a variant's second row in a process the slower in most.
    * ``fold_scale``: the warp-level kernel's forms other than the warp-specialized one (which
      always does) fold the softmax scale into the exponent's FFMA instead of one FMUL a score
      (fewer instructions a block); on the TMA form below ``WGMMA_MIN_HEAD_DIM`` the default
      and the tuning space's (:func:`with_measured_variants`); needs ``use_tensor_cores``.
    """

    br: int = 64
    bc: int = 64
    warps: int = 4
    vector_bytes: int = 16
    use_tensor_cores: bool = False
    row_pad: int = 4
    m_tiles: int = 1
    stages: int = 2
    split_blocks: int = -1
    wgmma: bool = False
    tma: bool = False
    warp_specialized: bool = False
    persistent: int = 0
    lazy_rescale: bool = False
    early_rescale: bool = False
    softmax_overlap: bool = False
    fold_scale: bool = False
    head_group: int = 0
    kv_evict_last: bool = False
    out_evict_first: bool = False

    def __post_init__(self):
        for name in ("br", "bc", "warps", "vector_bytes", "m_tiles", "stages", "row_pad", "split_blocks",
                     "persistent", "head_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        for name in ("use_tensor_cores", "wgmma", "tma", "warp_specialized", "lazy_rescale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.wgmma and (not self.use_tensor_cores or self.warps % 4 or self.m_tiles != 1
                           or self.br != 16 * self.warps):
            raise ValueError(f"wgmma needs use_tensor_cores, warps a multiple of 4, m_tiles=1 and "
                             f"br == 16 * warps (64 rows per warpgroup), got {self}")
        if self.tma and (not self.wgmma or self.stages != 2):
            raise ValueError(f"tma is a form of the two-stage wgmma kernel (wgmma=True, stages=2), got {self}")
        if self.warp_specialized and (not self.tma or self.warps not in (4, 8)):
            raise ValueError(f"warp_specialized is a form of the TMA kernel with one or two consumer warpgroups "
                             f"(tma=True, warps 4 or 8), got {self}")
        check_persistent(self.persistent, self.warp_specialized)
        check_head_group(self.head_group)
        check_l2_hints(self.kv_evict_last, self.out_evict_first, self.tma, self.persistent)
        if self.head_group and not self.use_tensor_cores:
            raise ValueError(f"head_group orders the warp-level kernel's programs (use_tensor_cores=True), got {self}")
        for name in LOOP_VARIANTS:
            check_loop_variant(name, getattr(self, name), self.warp_specialized)
        check_fold_scale(self.fold_scale, self.warp_specialized)
        for name in ("lazy_rescale", "fold_scale"):
            if getattr(self, name) and not self.use_tensor_cores:
                raise ValueError(f"{name} is a form of the warp-level kernel (use_tensor_cores=True), got {self}")
        if self.stages not in (1, 2, 4) or (self.stages == 4 and not self.wgmma):
            raise ValueError(f"stages must be 1 or 2 (4: the pipelined wgmma form), got {self.stages}")
        for name in ("br", "bc", "warps", "vector_bytes", "m_tiles"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {value}")
        if self.use_tensor_cores and (self.br % 16 or self.bc % 16):
            raise ValueError("tensor cores need br and bc multiples of 16")
        if self.row_pad < 0:
            raise ValueError(f"row_pad must be >= 0, got {self.row_pad}")
        if self.split_blocks < -1:
            raise ValueError(f"split_blocks must be -1 (auto), 0 (off) or a chunk length >= 1, got {self.split_blocks}")

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @classmethod
    def from_dict(cls, fields: dict) -> "TiledKnobs":
        """Knobs from a record, ignoring fields of forms that no longer exist (records written
        when a ``tc_kernel`` field chose between ``mma`` and a removed WMMA form)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in names})


#: program-name suffixes of the warp-level kernel's variants of a form, in name order: the
#: knobs' boolean fields that change the code but not the form (:func:`program_form` drops them)
VARIANT_SUFFIXES = (("lazy_rescale", "_lr"), ("early_rescale", "_er"), ("softmax_overlap", "_so"),
                    ("fold_scale", "_fs"))
#: the program-name suffixes of the L2 hints (the last part of :func:`tiled_program_name`)
L2_HINT_SUFFIXES = (("kv_evict_last", "_kl"), ("out_evict_first", "_of"))


def tiled_program_name(knobs: TiledKnobs, mma: bool) -> str:
    """The name of the program ``knobs`` make (one MetaSchedule task of a tuning run, a key
    of a record's ``programs_us``): the plan's tiles, and for the warp-level kernel its warps,
    m-tiles, stages and Hopper form (``_wg``, ``_wg_tma``, ``_wg_tma_ws``), ``_pP`` for the
    persistent variant of ``P`` thread blocks and the :data:`VARIANT_SUFFIXES` of the knobs
    that are on (``_lr`` for ``lazy_rescale``, ...; variants of the form: :func:`program_form`
    drops them)."""
    name = f"tiled_{knobs.br}x{knobs.bc}"
    form = f"_{tiled_form(knobs)}" if knobs.wgmma else ""
    persistent = f"_p{knobs.persistent}" if knobs.persistent else ""
    variants = "".join(suffix for field, suffix in VARIANT_SUFFIXES if getattr(knobs, field))
    order = f"_hg{knobs.head_group}" if knobs.head_group else ""
    hints = "".join(suffix for field, suffix in L2_HINT_SUFFIXES if getattr(knobs, field))
    return name + (f"_w{knobs.warps}_m{knobs.m_tiles}_s{knobs.stages}{form}{persistent}{variants}{order}{hints}"
                   if mma else "")


def tiled_form(knobs: TiledKnobs) -> str:
    """The Hopper form of the knobs' kernel: ``"wg_tma_ws"``, ``"wg_tma"``, ``"wg"`` or ``""``
    (any other), the last part of its :func:`tiled_program_name`."""
    if knobs.warp_specialized:
        return "wg_tma_ws"
    return "wg_tma" if knobs.tma else "wg" if knobs.wgmma else ""


def program_without_variants(name: str) -> str:
    """A program name with its :data:`VARIANT_SUFFIXES` dropped: the program a tuning run
    measured before the form took the variants it now carries
    (:func:`with_measured_variants`)."""
    return re.sub("".join(f"({suffix})?" for _, suffix in VARIANT_SUFFIXES) + "$", "", name)


def program_form(name: str) -> str:
    """:func:`tiled_form` read back from a program name (the :data:`L2_HINT_SUFFIXES`, a
    program order's ``_hgG``, a persistent program's ``_pP`` and the :data:`VARIANT_SUFFIXES`
    dropped: variants of their form)."""
    name = re.sub("".join(f"({suffix})?" for _, suffix in L2_HINT_SUFFIXES) + "$", "", name)
    name = re.sub(r"_p\d+$", "", program_without_variants(re.sub(r"_hg\d+$", "", name)))
    return next((form for form in ("wg_tma_ws", "wg_tma", "wg") if name.endswith("_" + form)), "")


# Grids of at least this many row tiles get two K/V stages (cp.async one block ahead); smaller
# ones one. Untuned, on the H100: two stages were 17-18% faster at 3072-6144 tiles and 3-15%
# slower at 384-1536 (benchmarks/results/h100_stages_ab*.json: 13 quick-suite shapes the rule
# was read from, 8 held-out shapes it was checked on, within 2.1% of the better form on all).
TWO_STAGE_MIN_TILES = 2048


#: head dims from which the Hopper default is the wgmma form with two warpgroups (128-row
#: tiles). H200, fp16, 50 back-to-back calls (benchmarks/results/h200_wgmma_ab.json): at d=128
#: it beat the mma form (64-row tiles, the best mma form) by 9% (window:1024, n=32k: 2.37 vs
#: 2.60 ms) and 11% (causal window 4095, n=16k, GQA: 3.83 vs 4.29 ms); at d=64 it lost on all
#: four cases (6-27%), one warpgroup (64 rows) lost everywhere (11-42%), and bc=128 lost too.
WGMMA_MIN_HEAD_DIM = 128


#: head dims the TMA form takes by default (its tensor maps cut rows into 64-element swizzle
#: rows): a multiple of this. H200, fp16, 50 back-to-back calls
#: (benchmarks/results/h200_tma_ab.json, outputs identical): window:1024, n=32k, d=128 2.40 ->
#: 1.45 ms; causal window 4095, GQA, n=16k, d=128 3.86 -> 2.28 ms; ±256 + 4 global, d=64,
#: batch 8: 0.79 ms with one warpgroup (64-row tiles) against 0.87 ms for the mma default and
#: 1.03 ms for two warpgroups, so at d=64 the TMA default is the 64-row wgmma form.
TMA_HEAD_DIM_MULTIPLE = 64


#: 128-row tiles (batch x heads x tiles of a head) from which the Hopper default at d >= 128 is
#: the warp-specialized TMA form (a producer warpgroup, two consumer warpgroups taking turns at
#: the tensor cores, 128x128 tiles, one thread block per SM) instead of the two-block-per-SM TMA
#: form (128x64). H200, 50 back-to-back calls, same process
#: (``benchmarks/results/h200_forward_ab.json`` run ``nineteenth_warp_specialized``): window
#: +-1024 n=32k (4096 tiles) fp16 1.317 -> 1.258 ms, bf16 1.284 -> 1.229; causal window 4095
#: GQA n=8k (2048 tiles) 0.912 -> 0.855; +-256 + 4 global, batch 4, 16 heads (2048 tiles)
#: 0.559 -> 0.529 (bf16 0.560 -> 0.524); dilated +-512 step 4 n=8k (512 tiles) 0.0904 ->
#: 0.0897; lost at window +-256 n=4096, 16 heads (512 tiles: four waves of one block per SM
#: where the other form runs two of two): fp16 0.0698 -> 0.0733 (bf16 0.0715 -> 0.0713). At
#: d=64 (one consumer warpgroup, or two) it lost on all nine shapes measured, by 10-84%.
WARP_SPECIALIZED_MIN_TILES = 2048


def with_measured_variants(knobs: TiledKnobs, head_dim: int) -> TiledKnobs:
    """``knobs`` with the loop variants that won their A/B on the form they make. The default
    knobs, the tuning space and the knobs of a tuning record
    (:func:`~tvm_splat.records.tuned_tiled_knobs`) take them: variants are not searched.

    * the warp-specialized form: ``early_rescale``. H100, fp16 and bf16, window +-1024 n=32k and
      Mistral's causal window 4095 (GQA, n=8k), d=128: faster in 19 of 24 same-process pairs,
      median 1.2% (geomean 0.8%), outputs identical
      (``benchmarks/results/h100_forward_ab.json``, runs ``twenty_fifth_*``);
      ``softmax_overlap`` (alone or with it) and ``lazy_rescale`` did not win there.
    * the TMA form below :data:`WGMMA_MIN_HEAD_DIM`: ``fold_scale``. H100, fp16, d=64's
      default (one warpgroup), +-256 + 4 global (batch 8, n=4096) and dilated +-256 step 2
      (n=8192): faster in all 8 pairs, 1.0-3.0%. At d=128 the two-block TMA form spills with
      it (:func:`~tvm_splat.kernels.tiled_mma.tiled_mma_func`), so it stays off there.
    """
    if knobs.warp_specialized:
        return dataclasses.replace(knobs, early_rescale=True)
    if knobs.tma and head_dim < WGMMA_MIN_HEAD_DIM:
        return dataclasses.replace(knobs, fold_scale=True)
    return knobs


def default_tiled_knobs(spec: AttentionSpec, target, num_components: int = 1, tma_steps: bool = False,
                        max_step: int = 1, warp_specialized: bool = False) -> TiledKnobs:
    """The knobs when nothing is tuned: the ``mma`` kernel for float16/bfloat16 on the GPU, and
    the number of K/V stages by grid size (``TWO_STAGE_MIN_TILES``). On an ``sm_90a`` target,
    for a tile plan of one component:

    * ``tma_steps`` (the plan's column blocks share one step a tensor map loads: step 1, or a
      dilated mask's dilation dividing n; the caller read it off the plan,
      :func:`tvm_splat.planner.default_knobs`) and ``head_dim`` a multiple of
      ``TMA_HEAD_DIM_MULTIPLE``: the TMA form (two stages), with two warpgroups (128-row tiles)
      from ``WGMMA_MIN_HEAD_DIM``, one below; with ``warp_specialized`` (inference; the
      training forward keeps the form its backward was measured with), two warpgroups and at
      least ``WARP_SPECIALIZED_MIN_TILES`` 128-row tiles: its warp-specialized form, 128x128
      tiles (:data:`WARP_SPECIALIZED_MIN_TILES` says what was measured); both with the loop
      variants that won their A/B (:func:`with_measured_variants`);
    * else, with blocks of step 1, from ``WGMMA_MIN_HEAD_DIM``: the wgmma form with two warpgroups.

    ``num_components`` and ``max_step`` (the largest step of a column block) of the tile plan
    the wgmma knobs give (:func:`tvm_splat.planner.default_knobs` passes them; the defaults
    stand for a plan not known): with two or more components (unions such as causal strided,
    merged after the tiles) the 128-row wgmma tiles lost to 64-row mma tiles on the H200
    (causal strided, d=128: 0.844 vs 0.699 ms, ``h200_models.json`` before and after the wgmma
    default). Column blocks of a step above 1 (dilated) keep the mma form unless the TMA form
    loads them: the cp.async wgmma form lost to mma on every shape measured at d=128, by 8-29%
    (H200, fp16, 50 back-to-back calls, ``benchmarks/results/h200_forward_ab.json`` run
    ``dilated d=128 forms``: dilated +-512 step 4, n=8192, 8 heads 0.223 -> 0.174 ms), while
    the TMA form (a 5-D tensor map steps the rows) beat mma on all four dilated shapes of the
    run ``eighteenth_dilated_tma`` (fp16 and bf16): +-512 step 4 d=128 0.168 -> 0.088 ms (128-row
    tiles; 64-row 0.101), +-256 step 2 n=8192 d=64 0.077 -> 0.056 (64-row tiles; 128-row
    0.070), n=4096 0.042 -> 0.036, +-128 step 4 0.032 -> 0.029 (bf16 0.027 -> 0.022)."""
    target = as_target(target)
    knobs = TiledKnobs(use_tensor_cores=is_gpu(target) and spec.dtype in MMA_TYPES)
    tiles = spec.batch * spec.heads * -(-spec.seq_len // 64)  # the rule was measured with 64-row tiles
    knobs = dataclasses.replace(knobs, stages=2 if tiles >= TWO_STAGE_MIN_TILES else 1)
    if not (knobs.use_tensor_cores and str(target.attrs.get("arch", "")) == "sm_90a" and num_components <= 1
            and spec.head_dim <= 256):
        return knobs
    two_warpgroups = spec.head_dim >= WGMMA_MIN_HEAD_DIM
    if tma_steps and spec.head_dim % TMA_HEAD_DIM_MULTIPLE == 0:
        if warp_specialized and two_warpgroups and \
                spec.batch * spec.heads * -(-spec.seq_len // 128) >= WARP_SPECIALIZED_MIN_TILES:
            return with_measured_variants(dataclasses.replace(knobs, br=128, bc=128, warps=8, wgmma=True, tma=True,
                                                              stages=2, warp_specialized=True), spec.head_dim)
        rows = 128 if two_warpgroups else 64
        return with_measured_variants(dataclasses.replace(knobs, br=rows, warps=rows // 16, wgmma=True, tma=True,
                                                          stages=2), spec.head_dim)
    if two_warpgroups and max_step <= 1:
        return dataclasses.replace(knobs, br=128, warps=8, wgmma=True)
    return knobs


def uses_mma(spec: AttentionSpec, knobs: TiledKnobs, target) -> bool:
    """Whether ``tiled`` is the warp-level ``mma`` kernel for this spec, knobs and target."""
    return (knobs.use_tensor_cores and spec.dtype in MMA_TYPES
            and target is not None and is_gpu(as_target(target)))


def tiled_funcs(spec: AttentionSpec, plan_shape: PlanShape, knobs: TiledKnobs = TiledKnobs(), target=None) -> dict:
    """PrimFuncs by name: ``tiled`` always, ``split_merge`` when some tiles are split (split-KV),
    ``merge`` when the plan has several components, ``fallback`` when some rows are indexed (CSR). ``tiled`` is the logical kernel (to be
    scheduled), or, for tensor cores on a GPU ``target``, the warp-level kernel (already bound
    to threads)."""
    if (plan_shape.br, plan_shape.bc) != (knobs.br, knobs.bc):
        raise ValueError(f"plan tiles {plan_shape.br}x{plan_shape.bc} do not match knobs "
                         f"{knobs.br}x{knobs.bc}")
    if uses_mma(spec, knobs, target):
        if knobs.wgmma and not supports_wgmma(as_target(target)):
            raise ValueError(f"wgmma needs a Hopper target (sm_90 / sm_90a), got {target_key(as_target(target))}")
        funcs = {"tiled": tiled_mma_func(spec, plan_shape, knobs.warps, knobs.m_tiles, knobs.stages,
                                         wgmma=knobs.wgmma, tma=knobs.tma, warp_specialized=knobs.warp_specialized,
                                         persistent=knobs.persistent, lazy_rescale=knobs.lazy_rescale,
                                         early_rescale=knobs.early_rescale, softmax_overlap=knobs.softmax_overlap,
                                         fold_scale=knobs.fold_scale, head_group=knobs.head_group,
                                         kv_evict_last=knobs.kv_evict_last,
                                         out_evict_first=knobs.out_evict_first)}
    else:
        funcs = {"tiled": tiled_func(spec, plan_shape)}
    if plan_shape.num_slots > 0:
        funcs["split_merge"] = split_merge_func(spec, plan_shape)
    if plan_shape.num_components > 1:
        funcs["merge"] = merge_func(spec, plan_shape.num_components)
    if plan_shape.num_fallback > 0:
        funcs["fallback"] = fallback_func(spec, plan_shape.num_fallback)
    return funcs


# ----------------------------------------------------------------------------- CPU
def _apply_cpu(sch, name, knobs):
    block = sch.get_sblock(TILE_BLOCK if name == "tiled" else ("row" if name == "fallback" else MERGE_BLOCK))
    loops = sch.get_loops(block)
    sch.parallel(sch.fuse(*loops))


# ----------------------------------------------------------------------------- GPU
# Every GPU thread block is (threadIdx.y = warps, threadIdx.x = 32): WMMA needs whole warps, and
# the CUDA-core schedule uses the same map so both share every helper below.


def _static_extent(sch, loop):
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tvm.tirx.IntImm) else None


#: lanes of a warp that share one row in the row reductions (threadIdx.x); a warp is
#: (threadIdx.y = 32 / ROW_LANES rows) x (threadIdx.x = ROW_LANES lanes), threadIdx.z = warp
ROW_LANES = 8
ROW_GROUPS = 32 // ROW_LANES


def _bind_threads(sch, loop, knobs):
    """Bind ``loop`` (extent == knobs.threads) to (threadIdx.z, threadIdx.y, threadIdx.x)."""
    tz, ty, tx = sch.split(loop, [knobs.warps, ROW_GROUPS, ROW_LANES])
    sch.bind(tz, "threadIdx.z")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    return tx


def _bind_elementwise(sch, block, knobs, vec=1):
    """Fuse the block's two innermost loops, split as [.., threads, vec], bind, vectorize."""
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops[-2:])
    extent = _static_extent(sch, fused)
    if vec > 1 and extent % (knobs.threads * vec) == 0:
        _, t, vv = sch.split(fused, [None, knobs.threads, vec])
        _bind_threads(sch, t, knobs)
        sch.vectorize(vv)
    else:
        _, t = sch.split(fused, [None, knobs.threads])
        _bind_threads(sch, t, knobs)


def _bind_rows(sch, block, knobs):
    """A per-row block (row loop, maybe a serial reduction loop inside it): rows -> threads."""
    loops = sch.get_loops(block)
    is_reduction = any(iv.iter_type == 2 for iv in sch.get(block).iter_vars)
    acc = None
    if is_reduction and _static_extent(sch, loops[-1]) > 1:
        # accumulate in a register, then copy the row's result to shared memory once (the copy
        # gets the same row -> thread map, so the register is the same thread's)
        acc = sch.cache_write(block, 0, "local")
        loops = sch.get_loops(block)
    row = loops[-2] if is_reduction else loops[-1]
    _, t = sch.split(row, [None, knobs.threads])
    _bind_threads(sch, t, knobs)
    if acc is not None:
        _bind_rows(sch, acc, knobs)


def _bind_row_reduce(sch, block, knobs):
    """A row reduction ``(r, u)``: every warp owns ``br / warps`` consecutive rows, ROW_GROUPS
    rows at a time (threadIdx.y), each reduced by ROW_LANES lanes (threadIdx.x: in-thread
    partial sums over ``u``, then warp shuffles). Falls back to :func:`_bind_rows` when the
    sizes do not fit."""
    r, u = sch.get_loops(block)[-2:]
    rows, cols = _static_extent(sch, r), _static_extent(sch, u)
    if rows % (knobs.warps * ROW_GROUPS) or cols % ROW_LANES:
        _bind_rows(sch, block, knobs)
        return
    rz, rs, ry = sch.split(r, [knobs.warps, None, ROW_GROUPS])
    uo, ux = sch.split(u, [None, ROW_LANES])
    sch.reorder(rz, ry, rs, ux, uo)
    sch.bind(rz, "threadIdx.z")
    sch.bind(ry, "threadIdx.y")
    sch.bind(ux, "threadIdx.x")


def _bind_row_stat(sch, block, knobs):
    """A per-row block of the softmax state: the row map of :func:`_bind_row_reduce` (the
    ROW_LANES lanes of a row compute the same value, so no thread idles behind a predicate and
    each warp touches only its own rows). Falls back to :func:`_bind_rows`."""
    r = sch.get_loops(block)[-1]
    if _static_extent(sch, r) % (knobs.warps * ROW_GROUPS):
        _bind_rows(sch, block, knobs)
        return
    rz, _, ry = sch.split(r, [knobs.warps, None, ROW_GROUPS])
    sch.bind(rz, "threadIdx.z")
    sch.bind(ry, "threadIdx.y")


def _gemm_micro(knobs, rows, cols):
    """Register micro-tile (tr, tc) with (rows/tr) * (cols/tc) == threads, most square first."""
    best = None
    for tr in (1, 2, 4, 8, 16):
        for tc in (1, 2, 4, 8, 16):
            if rows % tr or cols % tc or (rows // tr) * (cols // tc) != knobs.threads:
                continue
            score = (tr * tc, -abs(tr - tc))
            if best is None or score > best[0]:
                best = (score, tr, tc)
    if best is None:
        raise ValueError(f"no register tiling of {rows}x{cols} over {knobs.threads} threads; "
                         "choose br, bc, head_dim and warps so that it exists")
    return best[1], best[2]


def _tile_map(sch, block, knobs, rows, cols, reduce=False):
    """Each thread owns a tr x tc register tile of a (rows x cols) block; a reduction loop
    (if any) goes outside the register tile. Returns the threadIdx.x loop."""
    tr, tc = _gemm_micro(knobs, rows, cols)
    loops = sch.get_loops(block)
    i, j = loops[-3:-1] if reduce else loops[-2:]
    io, ii = sch.split(i, [None, tr])
    jo, ji = sch.split(j, [None, tc])
    if reduce:
        sch.reorder(io, jo, loops[-1], ii, ji)
    else:
        sch.reorder(io, jo, ii, ji)
    tx = _bind_threads(sch, sch.fuse(io, jo), knobs)
    sch.unroll(ii)
    sch.unroll(ji)
    return tx


def _apply_tiled_gpu(sch, knobs, spec):
    # Every shared buffer is dynamic shared memory: TVM merges them into one allocation reusing
    # dead ranges (K's space holds P), and above 48 KB it raises the kernel's dynamic
    # shared-memory limit at launch (static shared memory cannot exceed 48 KB).
    shared = "shared.dyn"
    elem = 4 if spec.dtype == "float32" else 2
    vec = max(1, knobs.vector_bytes // elem)
    br, bc, d = knobs.br, knobs.bc, spec.head_dim
    tile = sch.get_sblock(TILE_BLOCK)
    bh, t = sch.get_loops(tile)
    sch.reorder(t, bh)
    sch.bind(t, "blockIdx.x")
    sch.bind(bh, "blockIdx.y")
    # The row statistics and the masked scores live in static shared memory (small: 17 KB at
    # 64x64): TVM's barrier planner sees all of shared.dyn as one buffer (it is merged into one
    # allocation later), so keeping producer/consumer pairs in different scopes stops it from
    # putting a __syncthreads into every iteration of the elementwise loops.
    # (static shared memory is capped at 48 KB: larger score tiles fall back to shared.dyn)
    # CUDA raises a kernel's shared-memory limit above 48 KB only through the *dynamic* part
    # (TVM does it when that part alone exceeds 48 KB); static + dynamic above 48 KB with a
    # smaller dynamic part fails at launch (CUDA_ERROR_INVALID_VALUE, seen on the H100 at d=64).
    # So the score tile is static only when everything fits in 48 KB even without TVM's reuse
    # of dead ranges; otherwise it joins the dynamic part, which then exceeds 48 KB.
    static_bytes = 4 * br * (bc + knobs.row_pad) + 4 * 8 * br
    dynamic_bytes = elem * (br * d + 2 * bc * d) + 2 * br * bc
    stat = "shared"
    score = "shared" if static_bytes + dynamic_bytes <= 47 * 1024 else shared
    scopes = [("Q_load", 0, shared), ("K_load", 0, shared), ("V_load", 0, shared),
              ("init_state", 0, stat), ("init_state", 1, stat), ("row_max", 0, stat),
              ("alpha", 0, stat), ("alpha", 1, stat), ("alpha", 2, stat),
              ("row_sum", 0, stat), ("O_init", 0, "local")]
    # masked scores: read by the row passes of 4 rows x 8 lanes per warp
    scopes += [("P", 0, shared), ("S_mask", 0, score), ("S_gemm", 0, "local")]
    for blk, idx, scope in scopes:
        sch.set_scope(sch.get_sblock(blk), idx, scope)
    if knobs.row_pad:  # pad the score rows against bank conflicts in the row-wise passes
        sch.storage_align(sch.get_sblock("S_mask"), 0, axis=0, factor=32, offset=knobs.row_pad)
    for blk in ("Q_load", "K_load", "V_load"):
        _bind_elementwise(sch, sch.get_sblock(blk), knobs, vec)
    # S = Q K^T, then the scale/mask epilogue on the S registers
    gemm = sch.get_sblock("S_gemm")
    t_s = _tile_map(sch, gemm, knobs, br, bc, reduce=True)
    sch.decompose_reduction(gemm, sch.get_loops(gemm)[-3])
    sch.reverse_compute_at(sch.get_sblock("S_mask"), t_s)
    # online softmax: rows -> threads, P elementwise
    _bind_elementwise(sch, sch.get_sblock("P"), knobs)
    for blk in ("row_max", "row_sum"):
        _bind_row_reduce(sch, sch.get_sblock(blk), knobs)
    for blk in ("init_state", "alpha", "l_update", "m_update"):
        _bind_row_stat(sch, sch.get_sblock(blk), knobs)
    # O: every thread keeps a register tile of O across the block loop (same map everywhere);
    # no decompose_reduction: the init (O *= alpha) reads O, which TensorIR cannot split off;
    # lowering guards it with ``k == 0`` instead.
    _tile_map(sch, sch.get_sblock("PV_gemm"), knobs, br, d, reduce=True)
    for blk in ("O_init", "O_store"):
        _tile_map(sch, sch.get_sblock(blk), knobs, br, d)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(tile)}
    if "ML_store" in names:
        _bind_rows(sch, sch.get_sblock("ML_store"), knobs)


#: threads per block of the one-thread-per-iteration kernels (merge, fallback, sums)
FLAT_THREADS = 128


def bind_flat_gpu(sch, block_name: str, threads: int = FLAT_THREADS, vector: int = 1) -> None:
    """GPU schedule of a kernel whose block ``block_name`` does one independent piece of work
    per iteration of its loops (a row of ``merge`` or ``fallback``, an element of a sum): the
    loops fused, ``threads`` iterations per thread block, one per thread; with ``vector`` > 1
    (elementwise kernels whose iteration count it divides: the last loop is head_dim),
    ``vector`` consecutive iterations per thread as one vector load and store."""
    fused = sch.fuse(*sch.get_loops(sch.get_sblock(block_name)))
    if vector > 1:  # exact split first, so the bound check of the thread split leaves the lanes alone
        fused, lanes = sch.split(fused, [None, vector])
        sch.vectorize(lanes)
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _apply_gpu(sch, name, knobs, spec, target):
    if name == "tiled":
        if not uses_mma(spec, knobs, target):  # the mma kernel is written bound to threads
            _apply_tiled_gpu(sch, knobs, spec)
        return
    bind_flat_gpu(sch, "row" if name == "fallback" else MERGE_BLOCK)


def apply_tiled_schedule(sch: s_tir.Schedule, name: str, target, knobs: TiledKnobs = TiledKnobs(),
                         spec: AttentionSpec = None) -> None:
    """Schedule kernel ``name`` (``tiled``/``merge``/``fallback``) in place on ``sch`` (a
    Schedule of the unscheduled PrimFunc from :func:`tiled_funcs`)."""
    target = as_target(target)
    if is_gpu(target):
        _apply_gpu(sch, name, knobs, spec, target)
    else:
        _apply_cpu(sch, name, knobs)


def schedule_tiled(name: str, func, target, knobs: TiledKnobs = TiledKnobs(), spec: AttentionSpec = None):
    """Schedule kernel ``name`` (``tiled``/``merge``/``fallback``) of the tiled family."""
    sch = s_tir.Schedule(func)
    apply_tiled_schedule(sch, name, target, knobs, spec)
    return sch.mod["main"]
