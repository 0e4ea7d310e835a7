"""Training plans: sparse attention forward (with the row log-sum-exp) and backward, planned once
per workload and run many times on torch tensors.

A :class:`TrainingPlan` holds everything that does not depend on the tensors' values: the ACSR of
the mask, the ACSR of its transpose (:mod:`tvm_splat.formats.transpose`, closed form for
patterns), the :class:`~tvm_splat.kernels.backward.BackwardSpec`, the int32 tables on the device
and the compiled kernels (``fwd_lse``, ``bwd_dq``, ``bwd_dkdv``; compiled once, cached in
memory and on disk like the forward kernels).

Two kernel families (``TrainingPlan.kernels``):

* ``"tensor-cores"`` — float16 / bfloat16 on a CUDA target: the tensor-core kernels
  (:mod:`tvm_splat.kernels.backward_mma`: warp-level ``mma.sync``; on sm_90a the forward takes
  the forward planner's wgmma / TMA forms and, from head_dim 128 on one-component plans, the
  backward its warpgroup-MMA form) over three tile plans: the forward's (with its
  ``lse`` output), the mask's for ``dq`` and the transposed mask's for ``dk``/``dv``
  (``tile_plans``, :func:`_training_tile_plan`: the forward's row-aligned components and its
  split-KV of long tiles, whose chunks' states ``fwd_split_merge`` combines with their lse, and
  whose chunks' partial gradients ``bwd_dq_split_sum`` and ``bwd_dkdv_split_sum`` add). A plan
  of several components (a band with a dilated or strided part) adds a
  combining kernel after each of the three: the forward's merge, which also writes the lse,
  and a sum of the per-component partial gradients (``fwd_merge``, ``bwd_dq_sum``,
  ``bwd_dkdv_sum``). Their float32 partial buffers — forward ``o_part [B*H, C, n, head_dim]``
  and ``ml_part [B*H, C, n, 2]``, ``dq_part [C, B, H, n, head_dim]``, ``dk_part`` and ``dv_part
  [C, B, KVH, n, head_dim]`` (``C`` the components of that plan, 2 for strided masks) — are
  allocated per call with ``torch.empty`` on the tensors' device (the caching allocator reuses
  them) and freed when the call returns; one-component plans need none. With
  ``BackwardMmaKnobs.fused_dq`` (the default in the wgmma form at head_dim 128 where each
  key row of the transposed mask is one segment: windows, causal windows; and at head_dim 64
  where it is two or more: global tokens) ``bwd_dkdv`` computes dq as well, into a float32
  ``dq_accum [B, H, n, head_dim]`` by atomics (or bulk reductions, ``fused_dq="bulk"``),
  between ``bwd_delta`` (which computes delta and zeroes the float32 sums) and ``bwd_dq_cast``,
  and ``bwd_dq`` does not run; with ``per_query_head`` too and grouped KV heads, ``bwd_dkdv``
  runs a program per query head and adds dk, dv into float32 sums (zeroed by ``bwd_delta``)
  that ``bwd_kv_cast`` casts; where bwd_dkdv's plan
  steps rows by one, its Q and dO blocks arrive by TMA (``dkdv_tma``). Workloads that kernel
  family cannot take (CSR fallback rows, per-head masks with grouped KV heads, head dims not a
  multiple of 16) run the CUDA-core kernels instead, the reason in ``fallback_reason`` and the
  plan's repr;
* ``"rows"`` — everything else (float32, float64, the CPU): one query row or key per thread or
  task (:mod:`tvm_splat.kernels.backward`). :meth:`TrainingPlan.forward` returns ``(out,
lse)``, :meth:`TrainingPlan.backward` ``(dq, dk, dv)``; the autograd op
(:mod:`tvm_splat.autograd`) calls them.

Tensors are torch (CPU or CUDA): q, out, dout ``[batch, heads, n, head_dim]``, k, v ``[batch,
kv_heads, n, head_dim]`` of one dtype — float16, bfloat16, float32, or float64 on the CPU (for
``gradcheck``; those kernels accumulate in float64). ``lse`` is float32 (float64 for float64
inputs) ``[batch, heads, n]``, natural log, ``-inf`` on rows that attend to nothing.
"""
from __future__ import annotations

import contextlib

import numpy as np
import tvm

from .compile import compile_backward, compile_backward_mma
from .devices import as_device, default_target, dtype_name, is_gpu_device, torch_raw_stream
from .formats import ACSR, parse_pattern
from .formats.tile_plan import plan_tiles
from .formats.transpose import transpose_acsr, transposed_acsr
from .kernels.backward import BackwardSpec
from .kernels.backward_mma import part_shape, split_part_shape
from .kernels.spec import SPEC_DTYPES, check_buffer_sizes
from .kernels.tiled import partial_shapes, split_shapes
from .kernels.tiled_mma import MMA_TYPES
from .planner import SEGMENTS, as_acsr, default_knobs
from .schedules.backward_mma import default_backward_mma_knobs, per_query_head_sums, tensor_core_training_refusal
from .schedules.targets import as_target, is_gpu, target_key
from .tensors import check_scale, kernel_readable

__all__ = ["TrainingPlan", "plan_training", "TRAINING_DTYPES"]

#: input dtypes of the training kernels (float64: CPU only, for gradcheck)
TRAINING_DTYPES = SPEC_DTYPES
_TRANSPOSED = tuple(f"t{name}" for name in (*SEGMENTS, "indices"))
#: the tensor-core kernels' plan tables: forward plan, the mask's plan (dq), the transposed one
_FWD_PLAN = ("seg_start", "seg_count", "fwd_seg_sigma", "fwd_tiles", "fwd_blocks")
_DQ_PLAN = ("seg_start", "seg_count", "seg_sigma", "tiles", "blocks")
_DKDV_PLAN = ("tseg_start", "tseg_count", "tseg_sigma", "ttiles", "tblocks")
#: one-element dummies, uploaded once, for the partial buffers a plan does not use: the
#: forward kernel's per-component states (``o_part``, ``ml_part``) and chunk states
#: (``split_o``, ``split_ml``), and the component partial ``split_sum`` takes on a plan of one
#: component (``part``, :func:`~tvm_splat.kernels.backward_mma.part_shape`'s dummy); real
#: buffers only on plans of several components or with split-KV (allocated per call then,
#: :meth:`TrainingPlan._forward_mma`, :meth:`TrainingPlan._backward_mma`)
_SCRATCH = (("o_part", (1, 1, 1, 1)), ("ml_part", (1, 1, 1, 2)), ("split_o", (1, 1, 1, 1)),
            ("split_ml", (1, 1, 1, 2)), ("part", (1, 1, 1, 1, 1)))


class TrainingPlan:
    """One planned training workload; build with :func:`plan_training`.

    Attributes: ``mask`` (as given), ``acsr``, ``transposed`` (ACSR of the transposed mask),
    ``spec`` (:class:`BackwardSpec`), ``target``, ``device``, ``q_shape``, ``kv_shape``,
    ``kernels`` (``"tensor-cores"`` or ``"rows"``), ``fallback_reason`` (why a float16/bfloat16
    GPU workload runs the row kernels; else None), ``mma_knobs`` and ``tile_plans`` (forward,
    dq, dkdv; tensor cores only).
    """

    def __init__(self, mask, acsr: ACSR, transposed: ACSR, spec: BackwardSpec, target, device, mma_knobs=None,
                 tensor_cores: bool = True):
        self.mask, self.acsr, self.transposed, self.spec = mask, acsr, transposed, spec
        self.target, self.device = target, device
        self.kernels, self.fallback_reason, self.mma_knobs, self.tile_plans = "rows", None, None, None
        if is_gpu(target) and spec.rows.dtype in MMA_TYPES and not tensor_cores:
            self.fallback_reason = "tensor_cores=False"
        elif is_gpu(target) and spec.rows.dtype in MMA_TYPES:
            # the forward planner's rule: several components keep the mma form; one component of
            # unit-step blocks at a head_dim multiple of 64 on sm_90a takes the TMA form. Not on
            # dilated blocks (the inference default there since the eighteenth session): the
            # backward's default form follows the forward's wgmma, and on stepped plans its
            # wgmma form was never measured faster (the same at d=128); asked for, it runs
            forward = None if mma_knobs else default_knobs(spec.rows, target, acsr, stepped_tma=False, warp_specialized=False)
            knobs = mma_knobs or default_backward_mma_knobs(spec, target, forward)
            # the split rule sees each kernel's grid: the forward and bwd_dq run a program per
            # query head, bwd_dkdv one per KV head unless it sums per query head
            batch, heads = spec.rows.batch, spec.rows.heads
            try:
                dkdv_heads = heads if per_query_head_sums(spec, knobs) else spec.rows.kv_heads
            except ValueError:  # a knob out of range: tensor_core_training_refusal names it below
                dkdv_heads = spec.rows.kv_heads
            plans = (_training_tile_plan(acsr, br=knobs.forward.br, bc=knobs.forward.bc,
                                         split_blocks=knobs.forward.split_blocks, grid_heads=batch * heads),
                     _training_tile_plan(acsr, br=knobs.br, bc=knobs.dq_bc, split_blocks=knobs.split_blocks,
                                         grid_heads=batch * heads),
                     _training_tile_plan(transposed, br=knobs.br, bc=knobs.dkdv_bc, split_blocks=knobs.split_blocks,
                                         grid_heads=batch * dkdv_heads))
            if mma_knobs is None:  # the default's TMA form of bwd_dkdv asks its plan for unit steps
                sized = knobs
                knobs = default_backward_mma_knobs(spec, target, forward, plans[2].blocks)
                if _tile_fields(spec, knobs) != _tile_fields(spec, sized):
                    raise RuntimeError(f"the default backward knobs changed their tile shapes with the load form "
                                       f"({sized} -> {knobs}): the plans were made for the first")
            self.fallback_reason = tensor_core_training_refusal(spec, target, knobs, plans)
            if self.fallback_reason is None:
                self.kernels, self.mma_knobs, self.tile_plans = "tensor-cores", knobs, plans
        rows = spec.rows
        self.q_shape = (rows.batch, rows.heads, rows.seq_len, rows.head_dim)
        self.kv_shape = (rows.batch, rows.kv_heads, rows.seq_len, rows.head_dim)
        self.stats_shape = self.q_shape[:3]  # lse, dlse, delta
        self._scratch_shapes = self._scratch_layout() if self.kernels == "tensor-cores" else {}
        check_buffer_sizes({f"the training scratch buffer {name}": shape for name, shape in self._scratch_shapes.items()})
        self._lib = None
        self._functions, self._facts = {}, None
        self._tables = None

    def __repr__(self):
        kernels = self.kernels if self.fallback_reason is None else f"rows, not tensor cores: {self.fallback_reason}"
        return (f"TrainingPlan({self.spec.key}, kernels={kernels}, target={target_key(self.target)}, "
                f"device={self.device})")

    # ------------------------------------------------------------------ kernels
    def compiled(self) -> tvm.runtime.Module:
        """The compiled training kernels (from the in-memory or disk cache when built before)."""
        if self.kernels == "tensor-cores":
            return compile_backward_mma(self.spec, self.target, self.mma_knobs, [p.shape for p in self.tile_plans])
        return compile_backward(self.spec, self.target)

    def tables(self) -> dict:
        """The int32 tables the kernels read, by parameter name (numpy)."""
        tables = {name: getattr(self.acsr, name) for name in (*SEGMENTS, "indices")}
        tables.update({t: getattr(self.transposed, t[1:]) for t in _TRANSPOSED})
        if self.kernels == "tensor-cores":
            fwd, dq, dkdv = self.tile_plans
            tables.update(fwd_seg_sigma=fwd.seg_sigma, fwd_tiles=fwd.tiles, fwd_blocks=fwd.blocks,
                          fwd_num_comp=fwd.num_comp, fwd_splits=fwd.splits, seg_sigma=dq.seg_sigma, tiles=dq.tiles, blocks=dq.blocks,
                          num_comp=dq.num_comp, splits=dq.splits, tseg_sigma=dkdv.seg_sigma, ttiles=dkdv.tiles,
                          tblocks=dkdv.blocks, tnum_comp=dkdv.num_comp, tsplits=dkdv.splits)
        return {name: np.ascontiguousarray(a, dtype=np.int32) for name, a in tables.items()}

    def _kernels(self):
        """(library, tables on the device): compiled and uploaded once, on first use. The tables
        hold the one-element dummies of the partial buffers a plan does not use (tensor cores)
        and ``zero_dlse``, the zeros the backward reads when no lse gradient is given."""
        if self._lib is None:
            tables = self.device_tables(self.device)
            self._lib, self._tables = self.compiled(), tables
        return self._lib, self._tables

    def device_tables(self, dev) -> dict:
        """Everything the kernels read by name, as TVM tensors on ``dev``: :meth:`tables`, the
        dummies of ``_SCRATCH`` (tensor cores) and ``zero_dlse``."""
        tables = {name: tvm.runtime.tensor(a, dev) for name, a in self.tables().items()}
        if self.kernels == "tensor-cores":
            tables.update({name: tvm.runtime.empty(shape, "float32", dev) for name, shape in _SCRATCH})
        tables["zero_dlse"] = tvm.runtime.tensor(np.zeros(self.stats_shape, self.spec.rows.accum_dtype), dev)
        return tables

    def _scratch_layout(self) -> dict:
        """Name -> shape of the float32 buffers the tensor-core kernels take besides their
        outputs, only those this plan's kernels use (allocated per call: :meth:`_scratch`)."""
        rows, knobs = self.spec.rows, self.mma_knobs
        fwd, dq, dkdv = (p.shape for p in self.tile_plans)
        shapes = {}
        if fwd.num_components > 1:
            shapes["o_part"], shapes["ml_part"] = partial_shapes(rows, fwd.num_components)
        if fwd.num_slots:
            shapes["split_o"], shapes["split_ml"] = split_shapes(rows, fwd)
        if knobs.fused_dq:
            shapes["dq_accum"] = self.q_shape
        else:
            if dq.num_components > 1:
                shapes["dq_part"] = part_shape(rows, dq.num_components, rows.heads)
            if dq.num_slots:
                shapes["dq_split"] = split_part_shape(rows, dq, rows.heads)
        if per_query_head_sums(self.spec, knobs):
            shapes["dk_accum"] = shapes["dv_accum"] = self.kv_shape
        else:
            if dkdv.num_components > 1:
                shapes["dk_part"] = shapes["dv_part"] = part_shape(rows, dkdv.num_components, rows.kv_heads)
            if dkdv.num_slots:
                shapes["dk_split"] = shapes["dv_split"] = split_part_shape(rows, dkdv, rows.kv_heads)
        return shapes

    # ------------------------------------------------------------------ running
    def _torch(self) -> "_TorchFacts":
        """The plan's torch device and dtypes (looked up once: every call checks against them)."""
        if self._facts is None:
            self._facts = _TorchFacts(self)
        return self._facts

    def _inputs(self, **tensors) -> list:
        """``tensors`` as the kernels read them, in order. Each is checked against the plan (a
        torch tensor of the plan's shape, dtype and device, else an error naming it), then passed
        as it is when the kernels can read it in place (contiguous, 64-byte aligned, not
        requiring grad: tvm_ffi takes torch tensors through DLPack), else as a contiguous aligned
        copy (:func:`~tvm_splat.tensors.kernel_readable`)."""
        facts = self._torch()
        readable = []
        for name, x in tensors.items():
            shape, dtype = facts.expected[name]
            if not isinstance(x, facts.tensor_type):
                raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
            if x.shape != shape:
                raise ValueError(f"{name} has shape {tuple(x.shape)}, this plan expects {tuple(shape)}")
            if x.dtype != dtype:
                raise ValueError(f"{name} has dtype {dtype_name(x)}, this plan expects {str(dtype).removeprefix('torch.')}")
            if x.device != facts.device:
                raise ValueError(f"{name} is on {x.device}, this plan runs on {self.device}")
            readable.append(kernel_readable(x))
        return readable

    def _new(self, shape, dtype):
        """An uninitialised tensor on the plan's device (torch's allocators align to 64 bytes on
        the CPU, 512 on CUDA: the kernels read it in place)."""
        return self._facts.empty(shape, dtype=dtype, device=self._facts.device)

    def _scratch(self, name):
        """A fresh float32 scratch buffer of :meth:`_scratch_layout` (sizes checked when planned)."""
        return self._facts.empty(self._scratch_shapes[name], dtype=self._facts.float32, device=self._facts.device)

    def _launch(self, name, *args):
        """Run kernel ``name`` (inside :meth:`_on_stream`) on ``args``: table names (the plan's
        device tables), or torch tensors the kernels read in place (from :meth:`_inputs`,
        :meth:`_new`, :meth:`_scratch`), which tvm_ffi passes through DLPack. Functions are
        looked up once. Every argument is made readable before this, once a call rather than
        per launch: Longformer-base's backward (6 launches, stubbed) took 150 us of host time on
        the CPU with checks of every argument here, 50 us with the lean host path; on the H200
        machine the plan's backward went 221 -> 72 us (``h200_training_host_time.json``, forms
        ``sixteenth_*``)."""
        func = self._functions.get(name)
        if func is None:
            func = self._functions[name] = self._kernels()[0][name]
        tables = self._tables
        func(*[tables[a] if a.__class__ is str else a for a in args])

    def _on_stream(self):
        """The context the kernels of one forward or backward launch in: torch's current stream
        of the plan's device, looked up once for all of them; nothing to set on the CPU."""
        if not is_gpu_device(self.device):
            return contextlib.nullcontext()
        import tvm_ffi

        return tvm_ffi.use_raw_stream(self.device, self._facts.raw_stream())

    def forward(self, q, k, v):
        """``(out, lse)``: sparse attention and its row log-sum-exp (see the module docstring)."""
        q, k, v = self._inputs(q=q, k=k, v=v)
        facts = self._facts
        out = self._new(self.q_shape, facts.dtype)
        lse = self._new(self.stats_shape, facts.accum_dtype)
        with self._on_stream():
            if self.kernels == "tensor-cores":
                self._forward_mma(q, k, v, out, lse)
            else:
                self._launch("fwd_lse", q, k, v, *SEGMENTS, "indices", out, lse)
        return out, lse

    def _forward_mma(self, q, k, v, out, lse):
        """The tensor-core forward: whole tiles write out and lse directly on a plan of one
        component, else per-component partial states that ``fwd_merge`` combines (writing the
        lse); with split-KV the chunks of long tiles write their states to slots first, which
        ``fwd_split_merge`` combines (into out and lse, or the component's state)."""
        plan = self.tile_plans[0].shape
        several = plan.num_components > 1
        o_part, ml_part = (self._scratch("o_part"), self._scratch("ml_part")) if several else ("o_part", "ml_part")
        split_o, split_ml = (self._scratch("split_o"), self._scratch("split_ml")) if plan.num_slots \
            else ("split_o", "split_ml")
        direct_lse = [] if several else [lse]
        self._launch("fwd_lse", q, k, v, *_FWD_PLAN, out, o_part, ml_part, split_o, split_ml, *direct_lse)
        if plan.num_slots:
            self._launch("fwd_split_merge", split_o, split_ml, "fwd_splits", out, o_part, ml_part, *direct_lse)
        if several:
            self._launch("fwd_merge", o_part, ml_part, "fwd_num_comp", out, lse)

    def backward(self, q, k, v, out, lse, dout, dlse=None):
        """``(dq, dk, dv)`` for the output gradient ``dout`` (and ``dlse``, the gradient of the
        ``lse`` output; None: zeros), from the ``out`` and ``lse`` of :meth:`forward`."""
        if dlse is None:
            q, k, v, out, lse, dout = self._inputs(q=q, k=k, v=v, out=out, lse=lse, dout=dout)
            dlse = "zero_dlse"
        else:
            q, k, v, out, lse, dout, dlse = self._inputs(q=q, k=k, v=v, out=out, lse=lse, dout=dout, dlse=dlse)
        facts = self._facts
        dq = self._new(self.q_shape, facts.dtype)
        dk = self._new(self.kv_shape, facts.dtype)
        dv = self._new(self.kv_shape, facts.dtype)
        delta = self._new(self.stats_shape, facts.accum_dtype)
        with self._on_stream():
            if self.kernels == "tensor-cores":
                self._backward_mma(q, k, v, out, lse, dout, dlse, dq, dk, dv, delta)
            else:
                self._launch("bwd_dq", q, k, v, out, dout, lse, dlse, *SEGMENTS, "indices", dq, delta)
                self._launch("bwd_dkdv", q, k, v, dout, lse, delta, *_TRANSPOSED, dk, dv)
        return dq, dk, dv

    def _backward_mma(self, q, k, v, out, lse, dout, dlse, dq, dk, dv, delta):
        """The tensor-core backward: each kernel writes its gradient directly on a plan of one
        component, else per-component float32 partials that its sum kernel adds (the module
        docstring); on a plan with split-KV the chunks of long tiles write float32 slots first,
        which ``split_sum`` adds into the gradient (or its component's partial). With
        ``fused_dq`` (the knobs' docstring): ``bwd_delta``, ``bwd_dkdv`` with dQ, ``bwd_dq_cast``."""
        dq_plan, dkdv_plan = (p.shape for p in self.tile_plans[1:])
        if self.mma_knobs.fused_dq:  # bwd_dkdv adds dQ into a float32 sum that bwd_delta zeroes
            sums = [self._scratch(name) for name in ("dq_accum", "dk_accum", "dv_accum") if name in self._scratch_shapes]
            self._launch("bwd_delta", out, dout, dlse, delta, *sums)
            self._backward_dkdv(q, k, v, dout, lse, delta, dk, dv, dkdv_plan, sums)
            self._launch("bwd_dq_cast", sums[0], dq)
            return
        several, split = dq_plan.num_components > 1, dq_plan.num_slots
        dq_part = self._scratch("dq_part") if several else "part"
        dq_split = self._scratch("dq_split") if split else None
        self._launch("bwd_dq", q, k, v, out, dout, lse, dlse, *_DQ_PLAN, dq, delta,
                     *_present((dq_part, several), (dq_split, split)))
        if split:
            self._launch("bwd_dq_split_sum", dq_split, "splits", dq, dq_part)
        if several:
            self._launch("bwd_dq_sum", dq_part, "num_comp", dq)
        self._backward_dkdv(q, k, v, dout, lse, delta, dk, dv, dkdv_plan, [])

    def _backward_dkdv(self, q, k, v, dout, lse, delta, dk, dv, dkdv_plan, sums):
        """``bwd_dkdv`` (``sums``: its last parameters in the fused-dQ form, ``bwd_delta``'s
        zeroed float32 ``dq_accum``, then ``dk_accum`` and ``dv_accum`` with ``per_query_head``
        and grouped KV heads; else empty), then the split-KV and component sums of dk and dv, or
        ``bwd_kv_cast`` of the float32 sums."""
        if len(sums) == 3:  # per_query_head_sums: its programs add dk and dv into float32 sums
            self._launch("bwd_dkdv", q, k, v, dout, lse, delta, *_DKDV_PLAN, dk, dv, *sums)
            self._launch("bwd_kv_cast", *sums[1:], dk, dv)
            return
        several, split = dkdv_plan.num_components > 1, dkdv_plan.num_slots
        dk_part, dv_part = (self._scratch("dk_part"), self._scratch("dv_part")) if several else ("part", "part")
        dk_split, dv_split = (self._scratch("dk_split"), self._scratch("dv_split")) if split else (None, None)
        self._launch("bwd_dkdv", q, k, v, dout, lse, delta, *_DKDV_PLAN, dk, dv,
                     *_present((dk_part, several), (dv_part, several), (dk_split, split), (dv_split, split)), *sums)
        for grad, part, chunks in ((dk, dk_part, dk_split), (dv, dv_part, dv_split)):
            if split:
                self._launch("bwd_dkdv_split_sum", chunks, "tsplits", grad, part)
            if several:
                self._launch("bwd_dkdv_sum", part, "tnum_comp", grad)


class _TorchFacts:
    """What every call of a :class:`TrainingPlan` compares against or allocates with, looked up
    once per plan: torch's device, dtypes and expected input shapes, ``torch.empty``, and the
    current-stream lookup (importing torch lazily: the plan is also used without it)."""

    def __init__(self, plan: TrainingPlan):
        import torch

        self.tensor_type, self.empty, self.float32 = torch.Tensor, torch.empty, torch.float32
        self.device = torch.device(f"cuda:{plan.device.index}" if is_gpu_device(plan.device) else "cpu")
        self.dtype, self.accum_dtype = getattr(torch, plan.spec.rows.dtype), getattr(torch, plan.spec.rows.accum_dtype)
        q, kv, stats = (torch.Size(s) for s in (plan.q_shape, plan.kv_shape, plan.stats_shape))
        self.expected = {"q": (q, self.dtype), "k": (kv, self.dtype), "v": (kv, self.dtype), "out": (q, self.dtype),
                         "dout": (q, self.dtype), "lse": (stats, self.accum_dtype), "dlse": (stats, self.accum_dtype)}
        if self.device.type == "cuda":
            self.raw_stream = torch_raw_stream(self.device.index)


def _tile_fields(spec: BackwardSpec, knobs) -> tuple:
    """What the tile plans of :class:`TrainingPlan` depend on in ``knobs``: the tile shapes,
    the split rule and whether ``bwd_dkdv`` runs per query head (its grid)."""
    return knobs.br, knobs.dq_bc, knobs.dkdv_bc, knobs.split_blocks, knobs.forward, per_query_head_sums(spec, knobs)


def _present(*buffers):
    """The buffers whose condition holds (the optional last parameters of a kernel)."""
    return [buf for buf, wanted in buffers if wanted]


def _training_tile_plan(acsr: ACSR, br: int, bc: int, split_blocks: int = 0, grid_heads: int | None = None):
    """The tile plan of the training kernels: the forward's (row-aligned components, so a
    band with a strided or dilated part gets dense blocks of rows sharing a residue), with
    split-KV chunks of ``split_blocks`` blocks (-1: the forward's rule,
    :func:`~tvm_splat.formats.tile_plan.split_length`; 0: none): the forward merges a split
    tile's chunks with their lse, the backward sums their partial gradients. Scores computed
    per nonzero (``nrows x BC`` per block over the mask's nonzeros, 64-row tiles): strided:64 at
    n=4096 1.34 with 64- or 32-column blocks (one contiguous component per head, as these
    kernels used before they took several: 22.7), causal_strided:64 2.01 (43.8 at 64 columns,
    33.0 at 32); the transposed masks' plans the same. ``grid_heads`` (the programs per tile
    of the kernel's grid: ``batch x heads``, or ``batch x kv_heads`` for a ``bwd_dkdv`` that
    runs per KV head): the split rule's view of the grid, as the forward planner's. Measured on
    the H200 for the backward (fp16, d=64, ±256 + 4 global, n=4096; backward ms, split against
    whole): batch 1 x 12 heads 0.22 vs 0.50 (the rule splits), batch 4 x 12 0.74 vs 0.72
    (splits: 506 longest-tile lengths of work, within the 512), batch 8 x 16 1.90 vs 1.83 and
    ±128 + 4 global, n=1024, batch 32 x 12, 1.09 vs 1.05 (the rule leaves both whole; they
    split before it saw the grid)."""
    return plan_tiles(acsr, br=br, bc=bc, split_blocks="auto" if split_blocks == -1 else split_blocks,
                      grid_heads=grid_heads)


def _transposed(mask, acsr: ACSR, max_segments: int) -> ACSR:
    """The transposed ACSR: closed form from a pattern (or pattern string), else from ``acsr``."""
    if isinstance(mask, str):
        mask = parse_pattern(mask)
    if isinstance(mask, ACSR):
        return transpose_acsr(acsr, max_segments)
    return transposed_acsr(mask, acsr.n, max_segments)


def plan_training(mask, q_shape, kv_shape=None, dtype="float32", device="cpu", *, target=None, scale=None,
                  max_segments: int = 4, mma_knobs=None, tensor_cores: bool = True) -> TrainingPlan:
    """Plan the training kernels for q ``q_shape = [batch, heads, n, head_dim]`` and k, v
    ``kv_shape`` (default ``q_shape``) in ``dtype``. ``mask``: an ACSR, a pattern or a pattern
    string (head count 1 or ``heads``). ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
    torch/TVM device; ``target`` defaults to the device's own; ``scale`` to ``1/sqrt(head_dim)``;
    ``mma_knobs`` (a :class:`~tvm_splat.schedules.backward_mma.BackwardMmaKnobs`) replaces the
    tensor-core kernels' default knobs (float16/bfloat16 on a GPU only); ``tensor_cores=False``
    runs the row kernels there instead (A/B comparisons, triage)."""
    q_shape = tuple(int(s) for s in q_shape)
    kv_shape = q_shape if kv_shape is None else tuple(int(s) for s in kv_shape)
    if len(q_shape) != 4 or len(kv_shape) != 4 or min(q_shape + kv_shape) < 1:
        raise ValueError(f"q and k/v shapes must be 4 positive ints [batch, heads, n, head_dim], "
                         f"got {q_shape} and {kv_shape}")
    batch, heads, n, head_dim = q_shape
    if (kv_shape[0], kv_shape[2], kv_shape[3]) != (batch, n, head_dim) or heads % kv_shape[1]:
        raise ValueError(f"k and v must be [batch, kv_heads, n, head_dim] with q's batch, n and head_dim "
                         f"and heads % kv_heads == 0: q {q_shape}, k/v {kv_shape}")
    dtype = str(dtype).replace("torch.", "")
    if dtype not in TRAINING_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; expected one of {TRAINING_DTYPES}")
    dev = as_device(device)
    target = as_target(default_target(dev) if target is None else target)
    if dtype == "float64" and is_gpu(target):
        raise ValueError("float64 training kernels are for the CPU (gradcheck); use float32, "
                         "float16 or bfloat16 on the GPU")
    if is_gpu(target) != is_gpu_device(dev):
        raise ValueError(f"target {target.kind.name} does not match the device {dev}")
    acsr = as_acsr(mask, n, max_segments)
    transposed = _transposed(mask, acsr, max_segments)
    spec = BackwardSpec.from_acsrs(acsr, transposed, batch, heads, head_dim, dtype, check_scale(scale),
                                   kv_heads=kv_shape[1])
    return TrainingPlan(mask, acsr, transposed, spec, target, dev, mma_knobs, tensor_cores)
