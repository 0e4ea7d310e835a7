"""plan → run: one sparse-attention workload, decided once and launched many times.

Like flashinfer's ``plan()`` / ``run()`` and FlexAttention's ``BlockMask``, everything that does
not depend on the tensors' values is decided once, in :func:`plan`, and held as plain data by
an :class:`AttentionPlan`:

* the ACSR of the mask and the :class:`~tvm_splat.kernels.spec.AttentionSpec` of the shapes;
* the kernel family (``variant``) and its knobs — the ones given, else the workload's tuning
  record, else the defaults: decided in one function, :func:`choose_knobs`;
* for the tiled family, the tile plan (:func:`~tvm_splat.formats.tile_plan.plan_tiles`);
* the kernels' int32 inputs (``tables``), their scratch buffers and the launch ``steps``:
  which kernel runs with which buffers, in order. The runtime launcher and the Relax rewrite of
  :class:`~tvm_splat.relay_passes.SparsifyAttention` both execute these steps, so there is one
  description of how attention is computed.

:meth:`AttentionPlan.run` checks what depends on the tensors (shapes, dtypes, device) and
launches the compiled kernels (compiled once per plan, on first use; cached on disk).

Key lengths (padding masks): ``plan(..., kv_lengths=True)`` plans kernels that take a runtime
``kv_len [batch]`` int32 buffer (the steps name it ``"kv_len"``, right before each kernel's
first output); ``run(q, k, v, kv_lengths=...)`` passes it. Key ``j`` of batch ``b`` then exists
only when ``j < kv_lengths[b]``, on top of the mask. Query rows are not dropped: every row
attends the valid keys the mask gives it, and a row left with none gives zeros. That is dense
attention with the boolean mask ``mask[h, i, j] & (j < kv_lengths[b])``: PyTorch's SDPA with
that mask gives the same, zeros in rows without a key included (torch 2.13); an additive mask
with a finite fill (HuggingFace's eager path, ``finfo.min``) instead gives such a row the mean
of all values. Plans without lengths generate exactly the code they did before lengths existed.
"""
from __future__ import annotations

import dataclasses
import functools
import weakref
from dataclasses import dataclass

import numpy as np

import tvm

from .compile import compile_attention, compile_module, row_module, tiled_module
from .devices import as_device, default_target, device_of, dtype_name, is_gpu_device, torch_raw_stream
from .formats import ACSR
from .formats.tile_plan import TilePlan, kernel_arrays, plan_tiles
from .kernels import VARIANTS
from .kernels.common import KV_LEN
from .kernels.spec import SUPPORTED_DTYPES, AttentionSpec, check_buffer_sizes
from .kernels.tiled import partial_shapes, split_shapes
from .kernels.tiled_mma import busiest_block, check_tma_step, program_group, tma_loads_step
from .records import tuned_tiled_knobs
from .schedules.row import RowKnobs
from .schedules.targets import arch_specific, as_target, is_gpu, target_key
from .schedules.tiled import TiledKnobs, default_tiled_knobs, tiled_form, tiled_program_name, uses_mma
from .tensors import check_acsr_tables, check_scale, is_aligned, is_torch, to_tvm

__all__ = ["AttentionPlan", "Step", "plan", "choose_knobs", "default_knobs", "choose_variant", "as_acsr"]


# ------------------------------------------------------------------------------ masks
@functools.lru_cache(maxsize=64)
def _acsr_for_pattern(pattern, n, max_segments):
    return ACSR.from_pattern(pattern, n, max_segments)


def as_acsr(mask, n: int, max_segments: int = 4) -> ACSR:
    """An ACSR for ``n`` rows from an ACSR, a pattern object, or a pattern string (patterns
    are built once per (pattern, n) in this process). A given ACSR's tables are bounds-checked
    (once per object) before any kernel reads them."""
    if isinstance(mask, ACSR):
        if mask.n != n:
            raise ValueError(f"the ACSR mask is for sequence length {mask.n}, the inputs have {n}")
        check_acsr_tables(mask)
        return mask
    if isinstance(mask, str):
        from .formats import parse_pattern

        mask = parse_pattern(mask)
    if hasattr(mask, "row_segments"):
        return _acsr_for_pattern(mask, n, max_segments)
    raise TypeError(f"expected an ACSR, a pattern or a pattern string as the mask, got {type(mask).__name__}")


#: tile plans by ACSR (weakly: a plan lives as long as its ACSR) and (br, bc)
_TILE_PLANS: "weakref.WeakKeyDictionary[ACSR, dict]" = weakref.WeakKeyDictionary()


def tile_plan_of(acsr: ACSR, knobs: TiledKnobs, grid_heads: int | None = None) -> TilePlan:
    """The tile plan of ``acsr`` for the knobs' ``br x bc`` tiles and split-KV rule, made once
    per ACSR; ``grid_heads`` (``batch x heads``) tells the automatic split rule how much work
    runs beside the longest tiles (:data:`~tvm_splat.formats.tile_plan.SPLIT_NEEDLESS_WORK`)."""
    plans = _TILE_PLANS.setdefault(acsr, {})
    key = (knobs.br, knobs.bc, knobs.split_blocks, grid_heads if knobs.split_blocks == -1 else None)
    if key not in plans:
        plans[key] = plan_tiles(acsr, knobs, grid_heads=grid_heads)
    return plans[key]


# ------------------------------------------------------------------------------ decisions
def choose_variant(variant: str, target, spec: AttentionSpec | None = None) -> str:
    """The kernel family for ``variant`` on ``target``: ``"auto"`` is ``tiled`` (tensor cores)
    on the GPU and ``CPU_VARIANT`` on the CPU, unless its score buffers (``[batch, heads,
    max_nnz]`` float32, twice) would pass ``CPU_SCRATCH_BYTES``: then the row kernel, which
    keeps nothing per nonzero."""
    if variant == "auto":
        if is_gpu(as_target(target)):
            return "tiled"
        if CPU_VARIANT == "separate" and spec is not None \
                and 8 * spec.batch * spec.heads * spec.max_nnz > CPU_SCRATCH_BYTES:
            return "row"
        return CPU_VARIANT
    if variant == "fused":
        raise ValueError("variant 'fused' is now called 'tiled' (or leave variant='auto')")
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; expected 'auto' or one of {VARIANTS}")
    return variant


#: the CPU default: SPLAT's three kernels were the fastest on all 6 cases of
#: ``benchmarks/cpu_variants.py`` on the 2-core machine (geomean 73.7 ms, row 84.8 ms, tiled
#: 221.3 ms; the demo's case 8.1 / 8.9 / 39.3 ms; ``benchmarks/results/cpu_variants.json``)
CPU_VARIANT = "separate"
#: the separate kernels keep every score twice (float32): above this the row kernel is the CPU
#: default instead (a memory bound, not a measured speed: row was within 15% of separate)
CPU_SCRATCH_BYTES = 1 << 30


#: the warp-specialized form runs persistent (:attr:`TiledKnobs.persistent`) where the plan has
#: a GPU to count its SMs, unless the knobs were given: H100, window +-1024 (n=32k, 16 heads) and
#: Mistral's causal window (n=8192, 32/8 heads), d=128, fp16 and bf16, three alternations, the
#: persistent form faster than the grid form in all 12 same-process pairs, by 1.0-6.3% (window
#: bf16 1.200 -> 1.163 ms, Mistral bf16 0.817 -> 0.767; outputs identical;
#: ``benchmarks/results/h100_forward_ab.json`` run ``twenty_sixth_persistent``); as the planner's
#: default on another H100 of the same lease (P = 132 from the device), window +-1024 bf16 1.147
#: -> 1.105 ms (490 TFLOP/s), fp16 1.182 -> 1.162, Mistral bf16 0.775 -> 0.733, fp16 0.797 ->
#: 0.781 (run ``twenty_sixth_persistent_default``). A plan with only a target (compile only)
#: keeps the grid form: the target does not tell the SM count.
PERSISTENT_WARP_SPECIALIZED = True


def persistent_default(knobs: TiledKnobs, sm_count: int | None) -> TiledKnobs:
    """``knobs`` of the warp-specialized form made persistent over the thread blocks a device of
    ``sm_count`` SMs runs at once (one a SM with two consumer warpgroups, two with one;
    :data:`PERSISTENT_WARP_SPECIALIZED`); other knobs, knobs already persistent, or no SM count:
    unchanged."""
    if not (PERSISTENT_WARP_SPECIALIZED and knobs.warp_specialized and knobs.persistent == 0 and sm_count):
        return knobs
    return dataclasses.replace(knobs, persistent=int(sm_count) * (8 // knobs.warps))


#: the persistent form takes its programs in runs of this many heads (:attr:`TiledKnobs.head_group`)
#: where the plan's longest row tile has :data:`HEAD_GROUP_MIN_BLOCKS` or more, and in runs of
#: :data:`HEAD_GROUP_SHORT` below, where the runs keep the thread blocks' balance
#: (:func:`head_group_default`). Why: heads first, each round of the persistent form holds
#: tile t of every head, whose K and V rows leave L2 before the next tiles of the same head
#: reuse them. Measured on an H100, 16 heads at n=32k, d=128, knobs otherwise the default,
#: outputs identical to the bit. Runs of 4 (``benchmarks/results/h100_thirty_eighth_ab.json``),
#: bf16, 3-second loops at the same 690-695 W: window +-4096 (65 blocks a tile) 552.3 and 554.1
#: -> 573.1 and 576.9 TFLOP/s, SM clock 1470 -> 1530-1545 MHz; window +-32767 (every key, 256
#: blocks) 580.7 and 580.2 -> 606.6 and 607.4, 1470 -> 1522-1545 (50-call pairs, bf16, bf16,
#: fp16, fp16: +-4096 -4.7%, -2.7%, -6.0%, +3.7%; +-32767 -3.5%, -3.9%, -4.1%, -4.4%; runs of 1:
#: -0.9%, -4.4%, of 2: -3.1%, -1.4%, -3.4%, -4.0%). ``ncu`` of heads first on +-32767
#: (thirty-third session) read 9.1 GB from DRAM a call at a 77% L2 hit rate where cuDNN's dense
#: kernel read 0.9 GB at 98%: DRAM traffic takes part of the 700 W cap, and with less of it
#: the SMs clock higher. Runs of 1 on window +-1024 (17 blocks,
#: ``h100_thirty_ninth_l2.json``, bf16): ``ncu`` read 605 MB from DRAM a call heads first at an
#: 80.4% L2 hit rate, 424 MB at 87.8% in runs of one head, 426 at 87.2% in runs of two (the
#: minimum, Q, K and V once: 384); sustained 3 s, bf16 +1.2%, +2.0%, fp16 +0.1%, +0.9% (runs of
#: 4 there: 50-call pairs 1.4-7.7% slower, thirty-eighth session); 50-call pairs in one process
#: (fortieth session, ``h100_fortieth_head_group.json``, bf16) faster in all 6, by 1.8-12.1%. Window
#: +-2048 (33 blocks, fortieth session), runs of 1, sustained 3 s, bf16: 534.6 and 534.9 -> 551.9
#: and 551.3 TFLOP/s, SM clock 1522-1590 -> 1695 MHz at 676-678 W against 685-692
HEAD_GROUP = 4
#: heads a run below :data:`HEAD_GROUP_MIN_BLOCKS` (window +-1024 and +-2048, above)
HEAD_GROUP_SHORT = 1
#: the longest row tile, in column blocks, from which runs of :data:`HEAD_GROUP` heads are
#: taken (window +-4096: 65 blocks gained with them; +-1024: 17 lost with them, gained with 1)
HEAD_GROUP_MIN_BLOCKS = 64
#: the most a run order may raise the busiest thread block's column blocks
#: (:func:`~tvm_splat.kernels.tiled_mma.busiest_block`) over heads first's. Runs of
#: heads restart the plan's longest-first order in every run, and where the tiles differ in
#: length that unbalances the thread blocks. Measured points (H100, 132 thread blocks): window
#: +-4096 in runs of 4, 1.0% over heads first's busiest block, ran 3.8-4.1% faster, and +-2048 in
#: runs of 1, 1.5% over, 3.2% faster (sustained); Mistral's causal window at n=8192 (tiles of 1
#: to 33 blocks), 3.1% over in runs of 1 and 29% in runs of 4, ran 8.3% and 18-20% slower
#: (50-call pairs, thirty-eighth session), and at n=32768, 3.1% over in runs of 1, 3.0% and 3.1%
#: slower sustained at the same 1590 MHz (fortieth session: the loss the balance predicts)
HEAD_GROUP_MAX_IMBALANCE = 0.02


def head_group_default(knobs: TiledKnobs, tile_plan: TilePlan, grid_heads: int) -> TiledKnobs:
    """``knobs`` of the persistent form with runs of heads (:attr:`TiledKnobs.head_group`:
    :data:`HEAD_GROUP` where ``tile_plan``'s longest row tile has :data:`HEAD_GROUP_MIN_BLOCKS`
    or more, :data:`HEAD_GROUP_SHORT` below) where the default order is heads first
    (:func:`~tvm_splat.kernels.tiled_mma.program_group` of ``grid_heads``, batch x heads, is 1),
    the grid has more heads than a run, and the busiest thread block walks at most
    :data:`HEAD_GROUP_MAX_IMBALANCE` more column blocks in runs than heads first (a sliding
    window's equal tiles keep the balance; a causal plan's growing ones lose it where the
    ramp is a large share of the tiles); otherwise, or with a ``head_group`` already set,
    unchanged."""
    if not knobs.persistent or knobs.head_group or program_group(grid_heads) != 1:
        return knobs
    lengths = tile_plan.tile_blocks
    if not lengths.size:
        return knobs
    run = HEAD_GROUP if int(lengths.max()) >= HEAD_GROUP_MIN_BLOCKS else HEAD_GROUP_SHORT
    if run >= grid_heads:
        return knobs
    heads_first, in_runs = (busiest_block(lengths, grid_heads, group, knobs.persistent) for group in (0, run))
    if in_runs > heads_first * (1 + HEAD_GROUP_MAX_IMBALANCE):
        return knobs
    return dataclasses.replace(knobs, head_group=run)


def knobs_on_sms(knobs: TiledKnobs, sm_count: int | None, acsr: ACSR | None = None,
                 grid_heads: int | None = None) -> TiledKnobs:
    """The tiled ``knobs`` as a GPU of ``sm_count`` SMs runs them: :func:`persistent_default`,
    then, given the ``acsr`` and the grid's ``grid_heads`` (batch x heads),
    :func:`head_group_default` on the persistent form's tile plan. What :func:`knobs_on_device`
    does on a GPU, and what a CPU machine compiling for one (``benchmarks/precompile_cases.py``)
    must do to build the same kernels."""
    knobs = persistent_default(knobs, sm_count)
    if acsr is None or grid_heads is None or not knobs.persistent:
        return knobs
    return head_group_default(knobs, tile_plan_of(acsr, knobs, grid_heads), grid_heads)


def knobs_on_device(knobs, variant: str, device, acsr: ACSR | None = None, grid_heads: int | None = None):
    """The tiled ``knobs`` as a plan runs them on ``device`` (a TVM device, or None to compile
    only): on a GPU, :func:`knobs_on_sms` over its SMs; otherwise as they are."""
    if variant != "tiled" or device is None or not is_gpu_device(device):
        return knobs
    return knobs_on_sms(knobs, device.multi_processor_count, acsr, grid_heads)


def untuned_knobs(workload: "AttentionPlan"):
    """The knobs :func:`plan` gives ``workload`` when no tuning record is read: the defaults
    (:func:`default_knobs`), as its device runs them (:func:`knobs_on_device`). The bench's
    ``splat_fused_untuned`` runs these, so that tuned and untuned differ only by the record."""
    if workload.variant != "tiled":
        raise ValueError(f"only the tiled variant has default knobs, not {workload.variant!r}")
    knobs = default_knobs(workload.spec, workload.target, workload.acsr)
    return knobs_on_device(knobs, workload.variant, workload.device, workload.acsr,
                           workload.spec.batch * workload.spec.heads)


def default_knobs(spec: AttentionSpec, target, acsr: ACSR | None = None, tma: bool = True,
                  stepped_tma: bool = True, warp_specialized: bool = True) -> TiledKnobs:
    """The untuned tiled knobs of a workload: :func:`default_tiled_knobs`, told what the tile
    plan of its Hopper form looks like (when the ACSR is known): how many components it has
    (multi-component plans keep the mma form), the largest step of its column blocks, and
    whether a tensor map loads them (the TMA form's condition: one step for all blocks, 1 or a
    dilation dividing n, :func:`~tvm_splat.kernels.tiled_mma.tma_loads_step`; ``tma=False``
    never takes that form, ``stepped_tma=False`` only with blocks of step 1;
    ``warp_specialized=False`` never takes the TMA form's warp-specialized variant). Without
    the ACSR: the spec alone, never TMA."""
    knobs = default_tiled_knobs(spec, target)
    if acsr is None:
        return knobs
    hopper = default_tiled_knobs(spec, target, tma_steps=tma)
    if not hopper.wgmma:
        return knobs
    tile_plan = tile_plan_of(acsr, hopper, spec.batch * spec.heads)
    components = tile_plan.shape.num_components
    max_step = int(tile_plan.blocks[..., 1].max(initial=1))
    step = tile_plan.shape.step
    tma_steps = tma and tma_loads_step(step, spec.seq_len) and (stepped_tma or step == 1)
    return default_tiled_knobs(spec, target, components, tma_steps, max_step, warp_specialized)


def choose_knobs(spec: AttentionSpec, target, variant: str, knobs=None, acsr: ACSR | None = None):
    """``(knobs, source)`` of a workload, the one place this is decided: the ``knobs`` given
    (``source="given"``), else the tuning record of the workload (``"tuned"``; not a stale one,
    nor one whose winner beat the default program by less than
    :data:`~tvm_splat.records.TUNED_MIN_GAIN`: :func:`~tvm_splat.records.tuned_tiled_knobs`), else the
    defaults (``"default"``, :func:`default_knobs` of ``acsr``). Tiled: :class:`TiledKnobs`;
    row variants: :class:`RowKnobs`, or None when the compiler applies a MetaSchedule record or
    the default schedule itself."""
    expected = TiledKnobs if variant == "tiled" else RowKnobs
    if knobs is not None:
        if not isinstance(knobs, expected):
            raise ValueError(f"knobs of the {variant!r} variant must be {expected.__name__} or None, "
                             f"got {type(knobs).__name__}: {knobs!r}")
        return knobs, "given"
    if variant != "tiled":
        return None, "records"
    # key lengths change a few comparisons, not the work: the record of the same shapes serves;
    # a record whose search measured no program of the default's form is stale (records.py)
    default = default_knobs(spec, target, acsr)
    tuned = tuned_tiled_knobs(dataclasses.replace(spec, has_kv_len=False), target, default_form=tiled_form(default),
                              default_program=tiled_program_name(default, uses_mma(spec, default, as_target(target))))
    if tuned is not None:
        return tuned, "tuned"
    return default, "default"


# ------------------------------------------------------------------------------ steps
@dataclass(frozen=True)
class Step:
    """One kernel launch ``kernel(*(buffers[a] for a in args))``: ``outputs`` are the args it
    writes; with ``inplace`` they are also read (updated in place)."""

    kernel: str
    args: tuple
    outputs: tuple
    inplace: bool = False

    @property
    def inputs(self) -> tuple:
        return self.args if self.inplace else tuple(a for a in self.args if a not in self.outputs)


SEGMENTS = ("seg_start", "seg_step", "seg_count")
#: the buffers a call brings, by their position in ``launch(q, k, v, out[, kv_len])``
_CALL_ARGS = {"q": 0, "k": 1, "v": 2, "out": 3, KV_LEN: 4}
#: kernels that read keys, which take ``kv_len`` in a plan with key lengths
KV_LEN_KERNELS = ("tiled", "fallback", "row", "sddmm", "spmm")


def with_kv_len(steps: tuple) -> tuple:
    """The steps of a plan with key lengths: ``kv_len`` goes into the arguments of every kernel
    in ``KV_LEN_KERNELS``, right before its first output (where the kernels declare it)."""
    def add(step):
        if step.kernel not in KV_LEN_KERNELS:
            return step
        at = step.args.index(step.outputs[0])
        return dataclasses.replace(step, args=step.args[:at] + (KV_LEN,) + step.args[at:])
    return tuple(add(step) for step in steps)


def _tiled_steps(plan: TilePlan) -> tuple:
    steps = [Step("tiled", ("q", "k", "v", "seg_start", "seg_count", "seg_sigma", "tiles", "blocks",
                            "out", "o_part", "ml_part", "split_o", "split_ml"),
                  ("out", "o_part", "ml_part", "split_o", "split_ml"))]
    if plan.shape.num_slots > 0:  # split-KV: the chunks' states -> the split tiles' rows
        steps.append(Step("split_merge", ("split_o", "split_ml", "splits", "out", "o_part", "ml_part"),
                          ("out", "o_part", "ml_part"), inplace=True))
    if plan.shape.num_components > 1:
        steps.append(Step("merge", ("o_part", "ml_part", "num_comp", "out"), ("out",)))
    if plan.shape.num_fallback > 0:
        steps.append(Step("fallback", ("q", "k", "v", *SEGMENTS, "indices", "fallback_rows", "out"),
                          ("out",), inplace=True))
    return tuple(steps)


ROW_STEPS = {
    "row": (Step("row", ("q", "k", "v", *SEGMENTS, "indices", "out"), ("out",)),),
    "separate": (Step("sddmm", ("q", "k", *SEGMENTS, "row_ptr", "indices", "scores"), ("scores",)),
                 Step("softmax", ("scores", "row_ptr", "probs"), ("probs",)),
                 Step("spmm", ("probs", "v", *SEGMENTS, "row_ptr", "indices", "out"), ("out",))),
}


# ------------------------------------------------------------------------------ the plan
class AttentionPlan:
    """One planned workload (see the module docstring). Build with :func:`plan`.

    Attributes: ``mask`` (as given), ``acsr``, ``spec``, ``variant`` (``tiled``/``row``/
    ``separate``), ``knobs`` and ``knobs_source`` (``given``/``tuned``/``default``/``records``),
    ``target``, ``device`` (None: compile only), ``tile_plan`` (tiled only), ``tables`` (name ->
    int32 array), ``scratch`` (name -> (shape, dtype)), ``steps``.
    Shapes: q and out ``[batch, heads, n, head_dim]``, k and v ``[batch, kv_heads, n, head_dim]``.
    """

    def __init__(self, mask, acsr: ACSR, spec: AttentionSpec, variant: str, knobs, knobs_source: str,
                 target, device):
        self.mask, self.acsr, self.spec = mask, acsr, spec
        self.variant, self.knobs, self.knobs_source = variant, knobs, knobs_source
        self.target, self.device = target, device
        if variant == "tiled":
            self.tile_plan = tile_plan_of(acsr, knobs, spec.batch * spec.heads)
            if knobs.tma and uses_mma(spec, knobs, target):
                check_tma_step(self.tile_plan.shape.step, spec.seq_len, "this mask", "tma=False")
            o_shape, ml_shape = partial_shapes(spec, self.tile_plan.shape.num_components)
            so_shape, sml_shape = split_shapes(spec, self.tile_plan.shape)
            self.scratch = {"o_part": (o_shape, "float32"), "ml_part": (ml_shape, "float32"),
                            "split_o": (so_shape, "float32"), "split_ml": (sml_shape, "float32")}
            self.steps = _tiled_steps(self.tile_plan)
        else:
            self.tile_plan = None
            nnz = (spec.batch, spec.heads, spec.max_nnz)
            self.scratch = {"scores": (nnz, "float32"), "probs": (nnz, "float32")} if variant == "separate" else {}
            self.steps = ROW_STEPS[variant]
        check_buffer_sizes({f"the scratch buffer {name}": shape for name, (shape, _) in self.scratch.items()})
        if spec.has_kv_len:
            self.steps = with_kv_len(self.steps)
        arrays = kernel_arrays(acsr, self.tile_plan)
        used = {a for step in self.steps for a in step.args}
        self.tables = {name: arrays[name] for name in arrays if name in used}
        self.q_shape = (spec.batch, spec.heads, spec.seq_len, spec.head_dim)
        self.kv_shape = (spec.batch, spec.kv_heads, spec.seq_len, spec.head_dim)
        self._launch = None  # the compiled launcher (self.device), made on first use
        self._torch_kind = None  # (torch dtype, torch device) once a torch call passed the checks
        self._raw_stream = None  # () -> torch's current stream on that device (CUDA; devices.torch_raw_stream)

    def __repr__(self):
        return (f"AttentionPlan({self.variant}, {self.spec.key}, knobs={self.knobs_source}, "
                f"target={target_key(self.target)}, device={self.device})")

    # ------------------------------------------------------------------ kernels
    def module(self) -> tvm.IRModule:
        """The scheduled kernels (PrimFuncs named by the steps' ``kernel``)."""
        if self.variant == "tiled":
            return tiled_module(self.spec, self.tile_plan.shape, self.target, self.knobs)
        return row_module(self.spec, self.target, self.variant, self.knobs)

    def compiled(self) -> tvm.runtime.Module:
        """The compiled kernels (from the in-memory or disk cache when built before)."""
        if self.variant != "tiled":
            return compile_attention(self.spec, self.target, self.variant, self.knobs)
        ident = f"tiled|{self.spec.key}|{self.tile_plan.shape.key}|{self.knobs!r}"
        target = arch_specific(self.target) if self.knobs.wgmma else self.target
        return compile_module(ident, self.module, target)

    # ------------------------------------------------------------------ running
    def _launcher(self):
        """``launch(q, k, v, out[, kv_len])`` on ``self.device``: tables uploaded and scratch allocated
        once, functions looked up once, so a call costs only the kernel launches."""
        if self._launch is None:
            dev = self.device
            lib = self.compiled()
            fixed = {name: tvm.runtime.tensor(a, dev) for name, a in self.tables.items()}
            fixed.update({name: tvm.runtime.empty(shape, dtype, dev) for name, (shape, dtype) in self.scratch.items()})
            # per step: the function and, per argument, its tensor or the position of q, k, v, out
            calls = [(lib[step.kernel], tuple(fixed.get(a, _CALL_ARGS.get(a)) for a in step.args))
                     for step in self.steps]

            def launch(*io):  # q, k, v, out[, kv_len]
                for func, args in calls:
                    func(*(io[a] if isinstance(a, int) else a for a in args))

            self._launch = launch
        return self._launch

    def _check(self, q, k, v):
        for name, x, shape in (("q", q, self.q_shape), ("k", k, self.kv_shape), ("v", v, self.kv_shape)):
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(x.shape)}, this plan expects {shape}")
            if dtype_name(x) != self.spec.dtype:
                raise ValueError(f"{name} has dtype {dtype_name(x)}, this plan expects {self.spec.dtype}")
        kinds = {is_torch(x) for x in (q, k, v)}
        if len(kinds) != 1:
            raise TypeError("q, k and v must all be torch tensors or all numpy arrays")
        devs = {str(device_of(x)) for x in (q, k, v)}
        if devs != {str(self.device)}:
            raise ValueError(f"q, k and v must be on this plan's device {self.device}, got {sorted(devs)}")

    def run(self, q, k, v, out=None, kv_lengths=None):
        """``softmax(scale · q kᵀ ⊙ mask) v`` for this plan's workload.

        q ``[batch, heads, n, head_dim]``, k and v ``[batch, kv_heads, n, head_dim]``: numpy arrays
        (CPU; returns numpy) or torch tensors on the plan's device (returns a torch tensor,
        written into ``out`` when given). Rows without nonzeros give zeros.

        ``kv_lengths`` (plans made with ``kv_lengths=True``, required there and refused
        elsewhere): ``[batch]`` integers in ``[0, n]``, a numpy array, a sequence or a torch tensor
        (any integer dtype, any device: converted to int32 on the plan's device; its values are
        checked, which waits for a CUDA tensor). Key ``j`` of batch ``b`` exists only when
        ``j < kv_lengths[b]`` (see the module docstring for what rows past a length get).
        """
        lengths = self._kv_len(kv_lengths)
        if self._torch_kind is not None and out is None and self._ready(q, self.q_shape) \
                and self._ready(k, self.kv_shape) and self._ready(v, self.kv_shape):
            return self._run_torch(q, k, v, None, lengths)  # the checks below, as attribute comparisons
        if self.device is None:
            raise ValueError("this plan was made without a device (compile only); "
                             "plan again with device='cpu' or 'cuda'")
        self._check(q, k, v)
        launch = self._launcher()
        if not is_torch(q):
            dev = self.device
            out_t = tvm.runtime.empty(self.q_shape, self.spec.dtype, dev)
            launch(*(to_tvm(x, dev) for x in (q, k, v)), out_t, *lengths)
            return out_t.numpy()
        if out is not None and (tuple(out.shape) != self.q_shape or out.dtype != q.dtype or out.device != q.device):
            raise ValueError(f"out must be a {self.q_shape} {q.dtype} tensor on {q.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        self._torch_kind = (q.dtype, q.device)
        self._raw_stream = torch_raw_stream(q.device.index) if q.device.type == "cuda" else None
        return self._run_torch(*(x if self._ready(x, tuple(x.shape)) else to_tvm(x, self.device) for x in (q, k, v)),
                               out, lengths)

    def _kv_len(self, kv_lengths) -> tuple:
        """``()`` for a plan without key lengths, else ``(kv_len,)``: ``kv_lengths`` checked and
        as an int32 TVM tensor on the plan's device."""
        if not self.spec.has_kv_len:
            if kv_lengths is not None:
                raise ValueError("kv_lengths were given to a plan made without them; "
                                 "plan with kv_lengths=True")
            return ()
        if kv_lengths is None:
            raise ValueError("this plan was made with kv_lengths=True: pass kv_lengths ([batch] ints in [0, n])")
        if self.device is None:
            raise ValueError("this plan was made without a device (compile only); "
                             "plan again with device='cpu' or 'cuda'")
        return (check_kv_lengths(kv_lengths, self.spec.batch, self.spec.seq_len, self.device),)

    def _ready(self, x, shape) -> bool:
        """Whether torch tensor ``x`` can go to the kernels as it is: the plan's shape, dtype and
        device, contiguous and 64-byte aligned (what DLPack import asks)."""
        return (is_torch(x) and x.shape == shape and (x.dtype, x.device) == self._torch_kind
                and x.is_contiguous() and is_aligned(x))

    def _run_torch(self, q, k, v, out, lengths=()):
        """Launch on torch's current stream; ``q, k, v`` are ready tensors (torch or TVM),
        ``lengths`` ``()`` or ``(kv_len,)``."""
        import torch

        dtype, device = self._torch_kind
        if out is None:
            out = torch.empty(self.q_shape, dtype=dtype, device=device)
        # the kernels write a contiguous, aligned tensor: ``out`` itself when it is one
        target = out if out.is_contiguous() and is_aligned(out) else torch.empty(self.q_shape, dtype=dtype, device=device)
        launch = self._launcher()
        if device.type == "cuda":
            import tvm_ffi

            with tvm_ffi.use_raw_stream(self.device, self._raw_stream()):
                launch(q, k, v, target, *lengths)
        else:
            launch(q, k, v, target, *lengths)
        if target is not out:
            out.copy_(target)
        return out


def plan(mask, q_shape, kv_shape=None, dtype="float32", device="cpu", *, target=None, scale=None,
         variant="auto", knobs=None, max_segments: int = 4, kv_lengths: bool = False) -> AttentionPlan:
    """Plan sparse attention for q of ``q_shape = [batch, heads, n, head_dim]`` and k, v of
    ``kv_shape = [batch, kv_heads, n, head_dim]`` (default: ``q_shape``) in ``dtype``.

    ``mask``: an ACSR, a pattern (``Window(256)``) or a pattern string (``"window:256"``); its
    head count must be 1 or ``heads``. ``device``: where :meth:`AttentionPlan.run` runs
    (``"cpu"``, ``"cuda"``, ``"cuda:N"``, a torch or TVM device), or None to compile only.
    ``target``: default, the device's own (CUDA ``sm_XX`` or ``llvm``). ``variant``: ``"auto"``
    (tiled on the GPU, the fastest measured on the CPU), ``"tiled"``, ``"row"`` or
    ``"separate"``. ``knobs``: :class:`TiledKnobs` / :class:`RowKnobs` to force; default, the
    workload's tuning record, else the defaults. ``scale`` defaults to ``1/sqrt(head_dim)``.
    ``kv_lengths=True``: the kernels take per-batch key lengths at run time (a padding mask on
    top of ``mask``; see the module docstring), passed to :meth:`AttentionPlan.run`. With a GPU
    device, the warp-specialized form's default or tuned knobs run its persistent form over
    the device's SMs (:func:`persistent_default`); with only a target, the grid form.
    """
    if not isinstance(kv_lengths, (bool, np.bool_)):
        raise ValueError(f"plan's kv_lengths says whether the kernels take key lengths (True/False), "
                         f"got {type(kv_lengths).__name__}; pass the lengths themselves to run()")
    q_shape = _check_shape("q_shape", q_shape)
    kv_shape = q_shape if kv_shape is None else _check_shape("kv_shape", kv_shape)
    batch, heads, n, head_dim = q_shape
    if (kv_shape[0], kv_shape[2], kv_shape[3]) != (batch, n, head_dim):
        raise ValueError(f"k and v must be [batch, kv_heads, n, head_dim] with q's batch, n and head_dim: "
                         f"q {q_shape}, k/v {kv_shape}")
    if heads % kv_shape[1]:
        raise ValueError(f"the number of query heads ({heads}) must be a multiple of the number of "
                         f"key/value heads ({kv_shape[1]})")
    dtype = str(dtype).replace("torch.", "")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; expected one of {SUPPORTED_DTYPES}")
    scale = check_scale(scale)
    dev = None if device is None else as_device(device)
    if target is None:
        if dev is None:
            raise ValueError("plan needs a device or a target")
        target = default_target(dev)
    target = as_target(target)
    if dev is not None and is_gpu(target) != is_gpu_device(dev):
        raise ValueError(f"target {target.kind.name} does not match the device {dev}")
    choose_variant(variant, target)  # a bad name fails before the ACSR is built
    acsr = as_acsr(mask, n, max_segments)
    spec = AttentionSpec.from_acsr(acsr, batch, heads, head_dim, dtype, scale, kv_heads=kv_shape[1],
                                   has_kv_len=bool(kv_lengths))
    variant = choose_variant(variant, target, spec)
    knobs, source = choose_knobs(spec, target, variant, knobs, acsr)
    if source != "given":
        knobs = knobs_on_device(knobs, variant, dev, acsr, batch * heads)
    return AttentionPlan(mask, acsr, spec, variant, knobs, source, target, dev)


def _check_shape(name, shape) -> tuple:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of 4 ints, got {shape!r}") from None
    if len(shape) != 4:
        raise ValueError(f"{name} must be [batch, heads, seq_len, head_dim], got {shape}")
    if min(shape) < 1:
        raise ValueError(f"{name} has an empty dimension: {shape}")
    return shape


def check_kv_lengths(kv_lengths, batch: int, n: int, device):
    """``kv_lengths`` as an int32 ``[batch]`` TVM tensor on ``device``, or ``ValueError`` naming
    what is wrong: not ``[batch]``, not integers (bools and floats are refused: a float length
    is a mistake, not a rounding), or a value outside ``[0, n]``. A torch tensor is checked with
    torch on its own device (on CUDA that waits for it) and moved to ``device``."""
    if is_torch(kv_lengths):
        import torch

        x = kv_lengths.detach()
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise ValueError(f"kv_lengths must be integers, got a {x.dtype} tensor")
        shape = tuple(x.shape)
        if shape == (batch,):
            bad = (x < 0) | (x > n)
            if bool(bad.any()):
                b = int(bad.nonzero()[0, 0])
                raise ValueError(f"kv_lengths[{b}] = {int(x[b])} is outside [0, n={n}]")
            where = f"cuda:{device.index}" if is_gpu_device(device) else "cpu"
            return to_tvm(x.to(device=where, dtype=torch.int32).contiguous(), device)
    else:
        try:
            x = np.asarray(kv_lengths)
        except (TypeError, ValueError):
            raise ValueError(f"kv_lengths must be [batch] integers, got {type(kv_lengths).__name__}") from None
        if x.dtype.kind not in "iu":
            raise ValueError(f"kv_lengths must be integers, got dtype {x.dtype}")
        shape = x.shape
        if shape == (batch,):
            bad = (x < 0) | (x > n)
            if bad.any():
                b = int(np.argmax(bad))
                raise ValueError(f"kv_lengths[{b}] = {int(x[b])} is outside [0, n={n}]")
            return tvm.runtime.tensor(x.astype(np.int32), device)
    raise ValueError(f"kv_lengths must have shape [batch] = ({batch},), got {shape}")
