"""``sparse_attention``: the one public runner — a small cache of plans plus ``plan.run``.

Inputs travel to TVM through DLPack: torch tensors (CPU or CUDA) are shared without a copy and
the output is written straight into a fresh torch tensor; numpy arrays are copied to the CPU
device. Everything decided per workload (ACSR, knobs, tile plan, compiled kernels) lives in an
:class:`~tvm_splat.planner.AttentionPlan`; this module only finds the plan of a call.
"""
from __future__ import annotations

from collections import OrderedDict

from .devices import device_of, dtype_name
from .tensors import is_torch
from .formats import ACSR
from .planner import AttentionPlan, plan

__all__ = ["sparse_attention", "plan_for", "clear_plans"]

#: plans of this process by call signature, least recently used first (bounded)
_PLANS: "OrderedDict[tuple, AttentionPlan]" = OrderedDict()
MAX_PLANS = 256


def clear_plans() -> None:
    """Forget every cached plan (their compiled kernels stay in the compile caches)."""
    _PLANS.clear()


def _mask_key(mask):
    # patterns and strings by value (frozen, hashable); an ACSR by identity (the plan keeps it,
    # and the lookup checks ``plan.mask is mask``, so a recycled id never matches)
    return ("acsr", id(mask)) if isinstance(mask, ACSR) else mask


def plan_for(q, k, v, mask, *, target=None, variant="auto", scale=None, knobs=None,
             kv_lengths: bool = False) -> AttentionPlan:
    """The plan :func:`sparse_attention` runs for these inputs (made on the first call of a
    workload, then looked up); ``kv_lengths``: whether its kernels take key lengths."""
    try:  # torch's own dtype and device objects are cheap to hash; numpy arrays live on the CPU
        key = (_mask_key(mask), q.shape, k.shape, q.dtype, getattr(q, "device", "cpu"),
               None if target is None else str(target), variant, scale, knobs, bool(kv_lengths))
        hash(key)
    except (TypeError, AttributeError):  # unhashable mask/knobs, or not arrays: the checks below say
        key = None
    found = _PLANS.get(key) if key is not None else None
    if found is not None and (not isinstance(mask, ACSR) or found.mask is mask):
        _PLANS.move_to_end(key)
        return found  # its run checks the tensors themselves
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not (is_torch(x) or hasattr(x, "__array__")):
            raise TypeError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")
        if len(getattr(x, "shape", ())) != 4:
            raise ValueError(f"{name} must be [batch, heads, seq_len, head_dim], got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    dtypes = {dtype_name(x) for x in (q, k, v)}
    if len(dtypes) != 1:
        raise ValueError(f"q, k and v must have the same dtype, got {sorted(dtypes)}")
    made = plan(mask, q.shape, k.shape, dtype_name(q), device_of(q), target=target, scale=scale, variant=variant,
                knobs=knobs, kv_lengths=bool(kv_lengths))
    if key is not None:
        _PLANS[key] = made
        if len(_PLANS) > MAX_PLANS:
            _PLANS.popitem(last=False)
    return made


def sparse_attention(q, k, v, mask, *, target=None, variant="auto", scale=None, knobs=None, out=None,
                     kv_lengths=None):
    """Sparse attention ``softmax(scale * q kᵀ ⊙ mask) v`` over the nonzeros of ``mask``.

    q: ``[batch, heads, seq_len, head_dim]``; k, v: ``[batch, kv_heads, seq_len, head_dim]``
    (``heads % kv_heads == 0``: grouped-query attention, nothing repeated in memory); float16,
    bfloat16 (torch only) or float32; numpy arrays or torch tensors (CPU or CUDA, one device).
    mask: an :class:`ACSR`, a pattern (``Window(256)``) or a pattern string (``"window:256"``);
    its head count must be 1 or ``heads``. Rows with no nonzero give zeros; masked-out keys and
    values contribute exactly nothing (a NaN there does not leak).

    ``kv_lengths``: per-batch key lengths, ``[batch]`` integers in ``[0, seq_len]`` (numpy, a
    sequence, or a torch tensor on any device; a CUDA tensor's values are checked, which waits
    for it), a padding mask on top of ``mask``: key ``j`` of batch ``b`` exists only when
    ``j < kv_lengths[b]``. Query rows are not dropped: each row attends the valid keys the mask
    gives it, and a row with none gives zeros. This is dense attention with the boolean mask
    ``mask & (j < kv_lengths[b])`` (PyTorch's SDPA with that mask gives the same, zeros
    included; HuggingFace's eager path, whose padding fill is a finite minimum, gives a row
    without keys the mean of all values instead). Keys and values past a length are never read
    into a result: they may hold anything, NaN included.

    ``variant``: ``"auto"`` (default: the tiled kernel on the GPU, tensor cores for 16-bit
    inputs; the fastest measured kernel on the CPU), ``"tiled"``, ``"row"`` or ``"separate"``
    (see :mod:`tvm_splat.kernels`). ``knobs``: :class:`~tvm_splat.schedules.tiled.TiledKnobs`
    or :class:`~tvm_splat.schedules.row.RowKnobs` to force; default, the workload's tuning record,
    else the defaults. ``target`` defaults to the device's own. ``out``: a torch tensor to write
    into. Returns the output in the input's type, dtype and device.

    The first call of a workload plans and compiles it (cached in memory and on disk); later
    calls look the plan up and launch. For repeated calls outside this cache, hold the plan:
    ``tvm_splat.plan(...)`` then ``plan.run(q, k, v)``.
    """
    made = plan_for(q, k, v, mask, target=target, variant=variant, scale=scale, knobs=knobs,
                    kv_lengths=kv_lengths is not None)
    return made.run(q, k, v, out, kv_lengths)
