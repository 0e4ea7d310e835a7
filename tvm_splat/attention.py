"""``sparse_attention``: run ACSR attention on numpy arrays or torch tensors.

Inputs travel to TVM through DLPack (:func:`tvm_splat.tensors.to_tvm`): shared without a copy when
contiguous and 64-byte aligned, copied once otherwise; for torch inputs the output is written
straight into a fresh torch tensor.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tvm

from .compile import compile_attention
from .formats import ACSR
from .kernels.spec import SUPPORTED_DTYPES, AttentionSpec
from .schedules.dispatch import check_knobs
from .schedules.targets import as_target, is_gpu
from .tensors import check_acsr_tables, check_scale, is_aligned, to_tvm


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


@functools.lru_cache(maxsize=64)
def _acsr_for_pattern(pattern, n):
    return ACSR.from_pattern(pattern, n)


def as_acsr(mask, n: int) -> ACSR:
    """An ACSR for ``n`` rows from an ACSR, a pattern object, or a pattern string."""
    if isinstance(mask, ACSR):
        if mask.n != n:
            raise ValueError(f"the ACSR mask is for sequence length {mask.n}, the inputs have {n}")
        return mask
    if isinstance(mask, str):
        from .formats import parse_pattern

        mask = parse_pattern(mask)
    if hasattr(mask, "row_segments"):
        return _acsr_for_pattern(mask, n)
    raise TypeError(f"expected an ACSR, a pattern or a pattern string, got {type(mask).__name__}")


def _device_of(x):
    if _is_torch(x):
        if x.device.type == "cuda":
            return tvm.cuda(x.device.index or 0)
        if x.device.type == "cpu":
            return tvm.cpu()
        raise ValueError(f"unsupported torch device {x.device}")
    return tvm.cpu()


@functools.lru_cache(maxsize=None)
def _default_target(dev_name: str):
    """The target for a device (built once: constructing Targets is slow)."""
    if dev_name.startswith("cuda"):
        return as_target(tvm.target.Target.from_device(tvm.cuda(int(dev_name.split(":")[1]))))
    return as_target("llvm")


def _check_inputs(q, k, v):
    shapes = [tuple(x.shape) for x in (q, k, v)]
    if len(shapes[0]) != 4:
        raise ValueError(f"q must be [batch, heads, seq_len, head_dim], got shape {shapes[0]}")
    if len(set(shapes)) != 1:
        raise ValueError(f"q, k and v must have the same shape, got {shapes}")
    dtypes = [str(x.dtype).replace("torch.", "") for x in (q, k, v)]
    if len(set(dtypes)) != 1:
        raise ValueError(f"q, k and v must have the same dtype, got {dtypes}")
    if dtypes[0] not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtypes[0]}; expected one of {SUPPORTED_DTYPES}")
    if 0 in shapes[0]:
        raise ValueError(f"empty input of shape {shapes[0]}")
    return shapes[0], dtypes[0]


def device_metadata(acsr: ACSR, dev) -> list:
    """ACSR int32 buffers on ``dev``, uploaded once per (ACSR object, device)."""
    cache = acsr.__dict__.setdefault("_device_buffers", {})
    key = str(dev)
    if key not in cache:
        cache[key] = [
            tvm.runtime.tensor(np.ascontiguousarray(a, dtype=np.int32), dev)
            for a in (acsr.seg_start, acsr.seg_step, acsr.seg_count, acsr.row_ptr, acsr.indices)
        ]
    return cache[key]


def _output_like(q, dtype, dev):
    """``(torch_tensor_or_None, tvm_tensor)`` for an output shaped like ``q``: a fresh torch
    tensor shared through DLPack for torch inputs, a TVM tensor otherwise."""
    if _is_torch(q):
        import torch

        out_obj = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return out_obj, tvm.runtime.from_dlpack(out_obj)
    return None, tvm.runtime.empty(q.shape, dtype, dev)


def _to_tvm(x, dev):
    return to_tvm(x, dev)


VARIANTS = ("fused", "tiled", "row", "separate")


# Grids of at least this many row tiles get two K/V stages (cp.async one block ahead); smaller
# ones one. Untuned, on the H100: two stages were 17-18% faster at 3072-6144 tiles and 3-15%
# slower at 384-1536 (benchmarks/results/h100_stages_ab*.json: 13 quick-suite shapes the rule
# was read from, 8 held-out shapes it was checked on, within 2.1% of the better form on all).
TWO_STAGE_MIN_TILES = 2048


def default_tiled_knobs(dtype, target, spec=None):
    """The fused path's knobs when nothing is tuned: tensor cores for fp16 on the GPU; with the
    workload's :class:`AttentionSpec`, the number of K/V stages by grid size
    (``TWO_STAGE_MIN_TILES``)."""
    from .schedules.tiled import TiledKnobs

    knobs = TiledKnobs(use_tensor_cores=is_gpu(as_target(target)) and dtype == "float16")
    if spec is not None:
        tiles = spec.batch * spec.heads * -(-spec.seq_len // knobs.br)
        knobs = dataclasses.replace(knobs, stages=2 if tiles >= TWO_STAGE_MIN_TILES else 1)
    return knobs


def _fused_knobs(acsr, batch, heads, head_dim, dtype, target, scale):
    """The tuned knobs of this workload if ``tvm-splat autotune`` recorded some, else defaults."""
    from .tuning.tiled import tuned_tiled_knobs

    cache = acsr.__dict__.setdefault("_fused_knobs", {})  # off the hot path after the first call
    key = (batch, heads, head_dim, dtype, str(target), scale)
    if key not in cache:
        spec = AttentionSpec.from_acsr(acsr, batch, heads, head_dim, dtype, scale)
        cache[key] = tuned_tiled_knobs(spec, target) or default_tiled_knobs(dtype, target, spec)
    return cache[key]


def sparse_attention(q, k, v, mask, *, target=None, variant="fused", scale=None, knobs=None):
    """Sparse attention ``softmax(scale * q kᵀ ⊙ mask) v`` over the nonzeros of ``mask``.

    q, k, v: ``[batch, heads, seq_len, head_dim]`` float16/float32, numpy arrays or torch tensors
    (CPU or CUDA, same device). mask: an :class:`ACSR`, a pattern (``Window(256)``) or a pattern
    string (``"window:256"``); its head count must be 1 or ``heads``. Rows with no nonzero give
    zeros. ``variant``:

    - ``"fused"`` (default): the geometry-driven tiled kernel (online softmax, scores never
      reach memory; tensor cores for fp16 on the GPU) with its default knobs;
    - ``"tiled"``: the same kernel with your ``knobs`` (:class:`~tvm_splat.schedules.tiled.TiledKnobs`);
    - ``"row"``: the simple fused kernel, one mask row per thread;
    - ``"separate"``: SPLAT's three kernels, R-SDDMM, row softmax, R-SpMM.

    ``target`` defaults to CUDA for CUDA tensors and ``llvm`` otherwise.
    Returns the output in the input's type, dtype and device: ``[batch, heads, seq_len, head_dim]``.

    Torch calls with the default target take a fast path after the first call of a workload
    (same mask object or string, shape, dtype, device and options): the checks shrink to
    attribute comparisons and the kernels get the tensors as they are.
    """
    scale = check_scale(scale)
    check_knobs(variant, knobs)
    if target is None and variant in ("fused", "tiled") and _is_torch(q):
        runner = _FAST_PATHS.get(_fast_key(q, mask, variant, scale, knobs))
        if runner is not None and runner.accepts(q, k, v, mask):
            return runner(q, k, v)
    fast_path_ok = target is None and _is_torch(q)  # the default target only: the key omits it
    (batch, heads, n, head_dim), dtype = _check_inputs(q, k, v)
    devs = {str(_device_of(x)) for x in (q, k, v)}
    if len(devs) != 1:
        raise ValueError(f"q, k and v are on different devices: {sorted(devs)}")
    dev = _device_of(q)
    acsr = as_acsr(mask, n)
    check_acsr_tables(acsr)
    target = _default_target(str(dev)) if target is None else as_target(target)
    if is_gpu(target) != (dev.dlpack_device_type() == 2):
        raise ValueError(f"target {target.kind.name} does not match the inputs' device {dev}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; expected one of {VARIANTS}")
    # the tiled kernels: one launch, used for this call and kept for the torch fast path
    launch = _tiled_launch(q, acsr, dev, target, variant, dtype, scale, knobs) if variant in ("fused", "tiled") else None
    if _is_torch(q) and is_gpu(target):
        import tvm_ffi

        # launch on torch's current stream so work queued by torch is ordered with ours
        with tvm_ffi.use_torch_stream():
            out = _run(q, k, v, acsr, dev, target, variant, dtype, scale, knobs, launch)
    else:
        out = _run(q, k, v, acsr, dev, target, variant, dtype, scale, knobs, launch)
    if launch is not None and fast_path_ok:
        if len(_FAST_PATHS) > 256:  # a bound, not an LRU: workloads are few in practice
            _FAST_PATHS.clear()
        _FAST_PATHS[_fast_key(q, mask, variant, scale, knobs)] = _TorchRunner(mask, launch, dev, q)
    return out


# ---------------------------------------------------------------- torch fast path
_FAST_PATHS: dict = {}


def _fast_key(q, mask, variant, scale, knobs):
    # the mask by value for strings, by identity otherwise (the runner keeps it alive and
    # checks ``is``, so a recycled id never matches)
    return (mask if isinstance(mask, str) else id(mask), q.shape, q.dtype, q.device, variant, scale, knobs)


class _TorchRunner:
    """One workload's launch for torch tensors: ``runner(q, k, v) -> out``."""

    __slots__ = ("mask", "launch", "tvm_dev", "torch_dev", "shape", "dtype")

    def __init__(self, mask, launch, tvm_dev, q):
        self.mask, self.launch, self.tvm_dev = mask, launch, tvm_dev
        self.torch_dev, self.shape, self.dtype = q.device, q.shape, q.dtype

    def accepts(self, q, k, v, mask) -> bool:
        return ((mask is self.mask or isinstance(mask, str))
                and k.shape == self.shape and v.shape == self.shape
                and k.dtype == self.dtype and v.dtype == self.dtype
                and k.device == self.torch_dev and v.device == self.torch_dev
                and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
                and is_aligned(q) and is_aligned(k) and is_aligned(v))

    def __call__(self, q, k, v):
        import torch

        out = torch.empty_like(q)
        if self.torch_dev.type == "cuda":
            import tvm_ffi

            with tvm_ffi.use_raw_stream(self.tvm_dev, torch.cuda.current_stream(self.torch_dev).cuda_stream):
                self.launch(q, k, v, out)
        else:
            self.launch(q, k, v, out)
        return out


def _tiled_launch(q, acsr, dev, target, variant, dtype, scale, knobs):
    """``launch(q, k, v, out)`` of the tiled kernel: ``knobs`` for ``variant="tiled"``, the tuned
    (or default) knobs of the workload for ``"fused"``."""
    from .schedules.tiled import TiledKnobs, tiled_launch

    batch, heads, _, head_dim = q.shape
    if variant == "fused" or not isinstance(knobs, TiledKnobs):
        knobs = _fused_knobs(acsr, batch, heads, head_dim, dtype, target, scale)
    spec = AttentionSpec.from_acsr(acsr, batch, heads, head_dim, dtype, scale)
    return tiled_launch(acsr, spec, target, knobs, dev)


def _run(q, k, v, acsr, dev, target, variant, dtype, scale, knobs, launch=None):
    (batch, heads, _, head_dim) = q.shape
    if launch is not None:  # the tiled kernels (variant "fused" or "tiled")
        out_obj, out = _output_like(q, dtype, dev)
        launch(*(_to_tvm(x, dev) for x in (q, k, v)), out)
        return out_obj if out_obj is not None else out.numpy()
    spec = AttentionSpec.from_acsr(acsr, batch, heads, head_dim, dtype, scale)
    lib = compile_attention(spec, target, variant, knobs, geometry=None)
    meta = device_metadata(acsr, dev)
    qt, kt, vt = (_to_tvm(x, dev) for x in (q, k, v))
    out_obj, out = _output_like(q, dtype, dev)
    seg_start, seg_step, seg_count, row_ptr, indices = meta
    if variant == "row":
        lib["fused"](qt, kt, vt, seg_start, seg_step, seg_count, indices, out)
    else:
        scores = tvm.runtime.empty((batch, heads, spec.max_nnz), "float32", dev)
        probs = tvm.runtime.empty((batch, heads, spec.max_nnz), "float32", dev)
        lib["sddmm"](qt, kt, *meta, scores)
        lib["softmax"](scores, row_ptr, probs)
        lib["spmm"](probs, vt, *meta, out)
    return out_obj if out_obj is not None else out.numpy()
