"""Schedules of the tiled fused kernel (:mod:`tvm_splat.kernels.tiled`), plus its runner.

Plain functions ``(func, target, knobs) -> PrimFunc`` driven by the frozen :class:`TiledKnobs`:

* CPU (llvm): one parallel task per (batch x head, tile); inner loops stay serial.
* GPU (cuda), CUDA cores: ``blockIdx.x`` = tile, ``blockIdx.y`` = batch x head, threads
  (``threadIdx.y`` = warps, ``threadIdx.x`` = 32); Q/K/V/P tiles, masked scores and the row
  softmax state in (dynamic) shared memory, S and the O accumulator in registers (each thread a
  register micro-tile of ``S = Q K^T`` and of ``O``); global loads are 16-byte vectors; the mask
  epilogue runs on the S registers; row reductions accumulate in registers, one row per thread.
  ``merge`` and ``fallback`` are simple one-row-per-thread kernels.
* GPU, ``use_tensor_cores=True`` (fp16 only), ``tc_kernel="mma"`` (the default): the
  warp-level form of the kernel (:mod:`tvm_splat.kernels.tiled_mma`): ``mma.sync`` with
  scores, P and O in registers. It is already bound to threads, so it has no schedule here;
  its knobs (``warps``, ``m_tiles``, ``bc``) shape the program itself.
* GPU, ``use_tensor_cores=True``, ``tc_kernel="wmma"``: ``S_gemm`` and ``PV_gemm`` of the
  logical kernel are cut into 16x16x16 blocks and tensorized with WMMA
  (``tvm.s_tir.tensor_intrin.cuda``), one warp per 16-row strip; operands from shared memory,
  results stored back to shared memory as float32 (the WMMA fragment layout is opaque, so the
  softmax cannot run on it).

Public API: :func:`tiled_funcs`, :func:`schedule_tiled`, :func:`build_tiled`,
:func:`tiled_attention` (runner, numpy or torch in/out like
:func:`tvm_splat.attention.sparse_attention`).
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir

from ..kernels.spec import AttentionSpec
from ..kernels.tiled import TILE_BLOCK, fallback_func, merge_func, partial_shapes, tiled_func
from ..kernels.tiled_mma import tiled_mma_func
from .targets import as_target, is_gpu
from .tile_plan import PlanShape, TilePlan, kernel_arrays, plan_tiles

__all__ = ["TiledKnobs", "tiled_funcs", "schedule_tiled", "apply_tiled_schedule", "build_tiled", "tiled_attention",
           "tiled_launch", "plan_tiles"]


@dataclass(frozen=True)
class TiledKnobs:
    """Knobs of the tiled kernel (the tuning search space).

    * ``br``: rows per tile (query tile), ``bc``: columns per block (key block);
      multiples of 16 when ``use_tensor_cores``.
    * ``warps``: warps per thread block on the GPU (threads = 32 * warps).
    * ``vector_bytes``: width of global loads/stores on the GPU (16 = 128-bit).
    * ``use_tensor_cores``: tensor cores for the two GEMMs (fp16 inputs, CUDA only; ignored
      elsewhere), through ``tc_kernel``: ``"mma"`` (warp-level kernel, registers only; needs
      ``br == 16 * warps * m_tiles``) or ``"wmma"`` (schedule of the logical kernel).
    * ``m_tiles``: 16-row m-tiles per warp in the ``mma`` kernel.
    * ``stages``: K/V shared-memory stages of the ``mma`` kernel (2: ``cp.async`` one block ahead).
    * ``row_pad``: extra float32 per shared score row (bank-conflict padding, ``wmma`` and
      CUDA cores).
    """

    br: int = 64
    bc: int = 64
    warps: int = 4
    vector_bytes: int = 16
    use_tensor_cores: bool = False
    row_pad: int = 4
    tc_kernel: str = "mma"
    m_tiles: int = 1
    stages: int = 2

    def __post_init__(self):
        if self.stages not in (1, 2):
            raise ValueError(f"stages must be 1 or 2, got {self.stages}")
        if self.tc_kernel not in ("mma", "wmma"):
            raise ValueError(f"tc_kernel must be 'mma' or 'wmma', got {self.tc_kernel!r}")
        for name in ("br", "bc", "warps", "vector_bytes", "m_tiles"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {value}")
        if self.use_tensor_cores and (self.br % 16 or self.bc % 16):
            raise ValueError("tensor cores need br and bc multiples of 16")
        if self.row_pad < 0:
            raise ValueError(f"row_pad must be >= 0, got {self.row_pad}")

    @property
    def threads(self) -> int:
        return 32 * self.warps


def uses_mma(spec: AttentionSpec, knobs: TiledKnobs, target) -> bool:
    """Whether ``tiled`` is the warp-level ``mma`` kernel for this spec, knobs and target."""
    return (knobs.use_tensor_cores and knobs.tc_kernel == "mma" and spec.dtype == "float16"
            and target is not None and is_gpu(as_target(target)))


def tiled_funcs(spec: AttentionSpec, plan_shape: PlanShape, knobs: TiledKnobs = TiledKnobs(), target=None) -> dict:
    """PrimFuncs by name: ``tiled`` always, ``merge`` when the plan has several components,
    ``fallback`` when some rows are indexed (CSR). ``tiled`` is the logical kernel (to be
    scheduled), or, for tensor cores with ``tc_kernel="mma"`` on a GPU ``target``, the
    warp-level kernel (already bound to threads)."""
    if (plan_shape.br, plan_shape.bc) != (knobs.br, knobs.bc):
        raise ValueError(f"plan tiles {plan_shape.br}x{plan_shape.bc} do not match knobs "
                         f"{knobs.br}x{knobs.bc}")
    tc = knobs.use_tensor_cores and spec.dtype == "float16"
    if uses_mma(spec, knobs, target):
        funcs = {"tiled": tiled_mma_func(spec, plan_shape, knobs.warps, knobs.m_tiles, knobs.stages)}
    else:
        funcs = {"tiled": tiled_func(spec, plan_shape, separate_pv=tc)}
    if plan_shape.num_components > 1:
        funcs["merge"] = merge_func(spec, plan_shape.num_components)
    if plan_shape.num_fallback > 0:
        funcs["fallback"] = fallback_func(spec, plan_shape.num_fallback)
    return funcs


# ----------------------------------------------------------------------------- CPU
def _apply_cpu(sch, name, knobs):
    block = sch.get_sblock(TILE_BLOCK if name == "tiled" else ("merge_row" if name == "merge" else "row"))
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


def _read_index(sch, block, name):
    for idx, region in enumerate(sch.get(block).reads):
        if region.source.name.split("_")[0] == name:
            return idx
    raise KeyError(f"block {sch.get(block).name_hint} does not read {name}")


def _scope_of(sch, block, idx, write=False):
    regions = sch.get(block).writes if write else sch.get(block).reads
    return regions[idx].source.scope()


def _wmma_gemm(sch, block, knobs, a_name, b_name, b_trans):
    """Tensorize a (i, j, k) GEMM block with 16x16x16 WMMA: warps (threadIdx.z) over 16-row
    strips, operand fragments loaded from shared memory, the float32 accumulator stored back to
    shared memory (static or dynamic: the intrinsics follow each buffer's scope)."""
    from tvm.s_tir.tensor_intrin import cuda as intrin

    def pick(static, dyn, scope):
        return dyn if scope == "shared.dyn" else static

    a_idx, b_idx = _read_index(sch, block, a_name), _read_index(sch, block, b_name)
    a_scope, b_scope = _scope_of(sch, block, a_idx), _scope_of(sch, block, b_idx)
    c_scope = _scope_of(sch, block, 0, write=True)
    i, j, k = sch.get_loops(block)[-3:]
    strips = _static_extent(sch, i) // 16
    if strips % knobs.warps:
        raise ValueError(f"tensor cores need br/16 ({strips}) to be a multiple of warps ({knobs.warps})")
    i0, i1 = sch.split(i, [None, 16])
    j0, j1 = sch.split(j, [None, 16])
    k0, k1 = sch.split(k, [None, 16])
    i0o, i0i = sch.split(i0, [None, knobs.warps])
    sch.reorder(i0i, i0o, j0, k0, i1, j1, k1)
    sch.bind(i0i, "threadIdx.z")
    a_frag = sch.cache_read(block, a_idx, "wmma.matrix_a")
    b_frag = sch.cache_read(block, b_idx, "wmma.matrix_b")
    sch.compute_at(a_frag, k0)
    sch.compute_at(b_frag, k0)
    acc = sch.cache_write(block, 0, "wmma.accumulator")
    sch.reverse_compute_at(acc, j0)
    init = sch.decompose_reduction(block, k0)
    sch.tensorize(sch.get_loops(init)[-2], intrin.WMMA_FILL_16x16x16_F32_INTRIN)
    sch.tensorize(i1, intrin.WMMA_SYNC_16x16x16_f16f16f32_TRANS_INTRIN if b_trans
                  else intrin.WMMA_SYNC_16x16x16_f16f16f32_INTRIN)
    sch.tensorize(sch.get_loops(a_frag)[-2], pick(intrin.WMMA_LOAD_16x16x16_F16_A_INTRIN,
                                                  intrin.WMMA_LOAD_16x16x16_F16_A_DYN_INTRIN, a_scope))
    if b_trans:
        b_load = pick(intrin.WMMA_LOAD_16x16x16_F16_B_TRANS_INTRIN,
                      intrin.WMMA_LOAD_16x16x16_F16_B_TRANS_DYN_INTRIN, b_scope)
    else:
        b_load = pick(intrin.WMMA_LOAD_16x16x16_F16_B_INTRIN, intrin.WMMA_LOAD_16x16x16_F16_B_DYN_INTRIN, b_scope)
    sch.tensorize(sch.get_loops(b_frag)[-2], b_load)
    sch.tensorize(sch.get_loops(acc)[-2], pick(intrin.WMMA_STORE_16x16x16_F32_SHARED_INTRIN,
                                               intrin.WMMA_STORE_16x16x16_F32_SHARED_DYN_INTRIN, c_scope))


def _apply_tiled_gpu(sch, knobs, spec):
    tc = knobs.use_tensor_cores and spec.dtype == "float16"
    # Every shared buffer is dynamic shared memory: TVM merges them into one allocation reusing
    # dead ranges (K's space holds P, S's holds PV), and above 48 KB it raises the kernel's
    # dynamic shared-memory limit at launch (static shared memory cannot exceed 48 KB).
    shared = "shared.dyn"
    elem = 2 if spec.dtype == "float16" else 4
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
    dynamic_bytes = elem * (br * d + 2 * bc * d) + 2 * br * bc + (4 * br * (bc + d) if tc else 0)
    stat = "shared"
    score = "shared" if static_bytes + dynamic_bytes <= 47 * 1024 else shared
    scopes = [("Q_load", 0, shared), ("K_load", 0, shared), ("V_load", 0, shared),
              ("init_state", 0, stat), ("init_state", 1, stat), ("row_max", 0, stat),
              ("alpha", 0, stat), ("alpha", 1, stat), ("alpha", 2, stat),
              ("row_sum", 0, stat), ("O_init", 0, "local")]
    # masked scores: read by the row passes of 4 rows x 8 lanes per warp
    scopes += [("P", 0, shared), ("S_mask", 0, score), ("S_gemm", 0, shared if tc else "local")]
    if tc:
        scopes.append(("PV_gemm", 0, shared))
    for blk, idx, scope in scopes:
        sch.set_scope(sch.get_sblock(blk), idx, scope)
    if knobs.row_pad:  # pad the score rows against bank conflicts in the row-wise passes
        sch.storage_align(sch.get_sblock("S_mask"), 0, axis=0, factor=32, offset=knobs.row_pad)
    for blk in ("Q_load", "K_load", "V_load"):
        _bind_elementwise(sch, sch.get_sblock(blk), knobs, vec)
    # S = Q K^T, then the scale/mask epilogue
    if tc:
        _wmma_gemm(sch, sch.get_sblock("S_gemm"), knobs, "Qs", "Ks", b_trans=True)
        _bind_elementwise(sch, sch.get_sblock("S_mask"), knobs)
    else:
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
    # O: every thread keeps a register tile of O across the block loop (same map everywhere)
    if tc:
        _wmma_gemm(sch, sch.get_sblock("PV_gemm"), knobs, "Ps", "Vs", b_trans=False)
        _tile_map(sch, sch.get_sblock("O_update"), knobs, br, d, reduce=True)
    else:
        # no decompose_reduction: the init (O *= alpha) reads O, which TensorIR cannot split
        # off; lowering guards it with ``k == 0`` instead.
        _tile_map(sch, sch.get_sblock("PV_gemm"), knobs, br, d, reduce=True)
    for blk in ("O_init", "O_store"):
        _tile_map(sch, sch.get_sblock(blk), knobs, br, d)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(tile)}
    if "ML_store" in names:
        _bind_rows(sch, sch.get_sblock("ML_store"), knobs)


def _apply_gpu(sch, name, knobs, spec, target):
    if name == "tiled":
        if not uses_mma(spec, knobs, target):  # the mma kernel is written bound to threads
            _apply_tiled_gpu(sch, knobs, spec)
        return
    block = sch.get_sblock("merge_row" if name == "merge" else "row")
    fused = sch.fuse(*sch.get_loops(block))
    bx, tx = sch.split(fused, [None, 128])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


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


def build_module(spec: AttentionSpec, plan_shape: PlanShape, target, knobs: TiledKnobs = TiledKnobs()):
    """Scheduled IRModule with the functions of :func:`tiled_funcs`."""
    target = as_target(target)
    funcs = tiled_funcs(spec, plan_shape, knobs, target)
    return tvm.IRModule({name: schedule_tiled(name, f, target, knobs, spec).with_attr("global_symbol", name)
                         for name, f in funcs.items()})


def build_tiled(spec: AttentionSpec, plan_shape: PlanShape, target, knobs: TiledKnobs = TiledKnobs()):
    """Compiled module exposing ``tiled`` [, ``merge``] [, ``fallback``], cached in memory and
    on disk (see :func:`tvm_splat.compile.load_or_build`)."""
    from .. import __version__
    from ..compile import load_or_build
    from .targets import target_key

    target = as_target(target)
    ident = f"{__version__}|tiled|{spec.key}|{plan_shape.key}|{target_key(target)}|{knobs!r}"
    return load_or_build(
        ident, lambda: tvm.tirx.build(build_module(spec, plan_shape, target, knobs), target=target))


# ----------------------------------------------------------------------------- runner
def _plan_buffers(plan: TilePlan, acsr, dev):
    cache = plan.__dict__.setdefault("_device_buffers", {})
    key = str(dev)
    if key not in cache:
        cache[key] = {k: tvm.runtime.tensor(a, dev) for k, a in kernel_arrays(acsr, plan).items()}
    return cache[key]


def _launcher(acsr, spec, plan, target, knobs, dev):
    """``launch(q, k, v, out)`` for one workload on one device: the compiled functions, plan
    tables and partial buffers are looked up once, so a call costs only the kernel launches."""
    from .targets import target_key

    cache = plan.__dict__.setdefault("_launchers", {})
    key = (spec, target_key(target), knobs, str(dev))
    if key in cache:
        return cache[key]
    lib = build_tiled(spec, plan.shape, target, knobs)
    buf = _plan_buffers(plan, acsr, dev)
    o_shape, ml_shape = partial_shapes(spec, plan.shape.num_components)
    o_part, ml_part = tvm.runtime.empty(o_shape, "float32", dev), tvm.runtime.empty(ml_shape, "float32", dev)
    tiled = lib["tiled"]
    tables = [buf[name] for name in ("seg_start", "seg_count", "seg_sigma", "tiles", "blocks")]
    merge = lib["merge"] if plan.shape.num_components > 1 else None
    fallback = lib["fallback"] if plan.shape.num_fallback > 0 else None
    rows = [buf[name] for name in ("seg_start", "seg_step", "seg_count", "indices", "fallback_rows")]

    def launch(qt, kt, vt, out):
        tiled(qt, kt, vt, *tables, out, o_part, ml_part)
        if merge is not None:
            merge(o_part, ml_part, buf["num_comp"], out)
        if fallback is not None:
            fallback(qt, kt, vt, *rows, out)

    cache[key] = launch
    return launch


def tiled_launch(acsr, spec: AttentionSpec, target, knobs: TiledKnobs, dev):
    """``launch(q, k, v, out)`` for ``spec`` over ``acsr`` on ``dev``: compiled (or loaded from
    the caches) on the first call for a workload. ``q, k, v, out`` are TVM tensors or
    contiguous torch tensors (passed through DLPack)."""
    return _launcher(acsr, spec, plan_tiles(acsr, knobs), target, knobs, dev)


def tiled_attention(q, k, v, acsr, target=None, knobs: TiledKnobs = TiledKnobs(), scale=None):
    """Sparse attention over ``acsr`` with the tiled kernel.

    q, k, v: ``[batch, heads, n, head_dim]`` float16/float32 numpy arrays (CPU, returns numpy)
    or torch tensors (CPU or CUDA, shared through DLPack; returns a torch tensor on the same
    device). ``target`` defaults to ``llvm`` for numpy / CPU tensors and to the CUDA device's
    target for CUDA tensors. Rows without nonzeros give zeros.
    """
    from ..attention import _check_inputs, _default_target, _device_of, _output_like, _to_tvm

    (batch, heads, n, head_dim), dtype = _check_inputs(q, k, v)
    if acsr.n != n:
        raise ValueError(f"the ACSR mask is for sequence length {acsr.n}, the inputs have {n}")
    dev = _device_of(q)
    gpu_dev = dev.dlpack_device_type() == 2
    target = _default_target(str(dev)) if target is None else as_target(target)
    if is_gpu(target) != gpu_dev:
        raise ValueError(f"target {target.kind.name} does not match the inputs' device {dev}")
    spec = AttentionSpec.from_acsr(acsr, batch, heads, head_dim, dtype, scale)
    launch = tiled_launch(acsr, spec, target, knobs, dev)
    out_obj, out = _output_like(q, dtype, dev)
    launch(*(_to_tvm(x, dev) for x in (q, k, v)), out)
    return out_obj if out_obj is not None else out.numpy()
