"""Differentiable sparse attention as torch custom ops, so ``torch.compile`` and ``torch.export``
see one op (no graph break) and ``torch.autograd`` (and ``gradcheck``) can differentiate it.

* ``torch.ops.tvm_splat.sparse_attention(q, k, v, mask, scale) -> (out, lse)``: the forward
  kernels of a :class:`~tvm_splat.training.TrainingPlan` (out ``[batch, heads, n, head_dim]`` in
  the input dtype; lse ``[batch, heads, n]`` float32, float64 for float64 inputs, natural log,
  ``-inf`` on rows that attend to nothing);
* ``torch.ops.tvm_splat.sparse_attention_backward(q, k, v, out, lse, dout, dlse, mask, scale)
  -> (dq, dk, dv)``: the backward kernels, the op the first one's autograd formula calls (so a
  compiled backward graph holds one op too).

Both have fake (meta) implementations. The autograd formula saves q, k, v, out and lse. The mask
travels as a string: a pattern string (``"causal_window:128"``, ``"global:4+window:32"``) or a
handle from :func:`register_mask` for an ACSR or a pattern object that has no text form
(``PerHead``, a boolean mask's ACSR). :func:`sparse_attention` is the convenient front end.

Plans are made once per (mask, shapes, dtype, device, scale) and kept in a small cache.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .devices import device_of
from .formats import ACSR, Pattern
from .training import TrainingPlan, plan_training

__all__ = ["sparse_attention", "register_mask", "training_plan_for"]

#: masks registered by handle (kept alive: a handle must stay valid while a graph uses it)
_MASKS: dict = {}
_HANDLES: dict = {}  # id(mask) -> handle
HANDLE_PREFIX = "@mask"
#: training plans by (mask, q shape, k shape, dtype, device, scale), least recently used first
_PLANS: "OrderedDict[tuple, TrainingPlan]" = OrderedDict()
MAX_PLANS = 64


def register_mask(mask) -> str:
    """A handle string (``"@mask3"``) for an :class:`ACSR` or a pattern, to pass as the ops'
    ``mask`` argument. The same object always gets the same handle; the registry keeps it
    alive. Register outside a compiled region (the string is what the graph holds)."""
    if not isinstance(mask, (ACSR, Pattern)):
        raise ValueError(f"register_mask takes an ACSR or a Pattern, got {type(mask).__name__}")
    handle = _HANDLES.get(id(mask))
    if handle is None or _MASKS[handle] is not mask:
        handle = f"{HANDLE_PREFIX}{len(_MASKS)}"
        _MASKS[handle] = mask
        _HANDLES[id(mask)] = handle
    return handle


def _resolve_mask(mask: str):
    if not isinstance(mask, str):
        raise ValueError(f"the mask must be a pattern string or a register_mask handle, got {type(mask).__name__}")
    if mask.startswith(HANDLE_PREFIX):
        if mask not in _MASKS:
            raise ValueError(f"unknown mask handle {mask!r}: get one from tvm_splat.autograd.register_mask")
        return _MASKS[mask]
    return mask


def training_plan_for(q, k, mask: str, scale: Optional[float]) -> TrainingPlan:
    """The training plan the ops run for these inputs (made on first use, then looked up)."""
    key = (mask, tuple(q.shape), tuple(k.shape), q.dtype, q.device, scale)
    found = _PLANS.get(key)
    if found is not None:
        _PLANS.move_to_end(key)
        return found
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [batch, heads, seq_len, head_dim], got shapes {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    made = plan_training(_resolve_mask(mask), q.shape, k.shape, str(q.dtype), device_of(q), scale=scale)
    _PLANS[key] = made
    if len(_PLANS) > MAX_PLANS:
        _PLANS.popitem(last=False)
    return made


def _stats_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_like(q, k, v):
    """Shape and dtype checks the fake implementation can make (the plan checks the rest)."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q must be [batch, heads, n, head_dim] and k, v [batch, kv_heads, n, head_dim] of one "
                         f"shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


@torch.library.custom_op("tvm_splat::sparse_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str,
             scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_like(q, k, v)
    return training_plan_for(q, k, mask, scale).forward(q, k, v)


@_forward.register_fake
def _forward_fake(q, k, v, mask, scale=None):
    _check_like(q, k, v)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_stats_dtype(q))


@torch.library.custom_op("tvm_splat::sparse_attention_backward", mutates_args=())
def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              dout: torch.Tensor, dlse: Optional[torch.Tensor], mask: str,
              scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return training_plan_for(q, k, mask, scale).backward(q, k, v, out, lse, dout, dlse)


@_backward.register_fake
def _backward_fake(q, k, v, out, lse, dout, dlse, mask, scale=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mask, ctx.scale = mask, scale
    # an unused output's gradient arrives as None, not as zeros made for it: the lse's, where
    # only out reaches the loss (sparse_attention), is the plan's own zeros then; a compiled
    # backward graph otherwise fills a float32 [batch, heads, n] tensor every step
    ctx.set_materialize_grads(False)


def _grads(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:  # only the lse reached the loss
        dout = torch.zeros_like(out)
    dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.mask, ctx.scale)
    return dq, dk, dv, None, None


_forward.register_autograd(_grads, setup_context=_setup_context)


class _EagerSparseAttention(torch.autograd.Function):
    """The two ops' work without the dispatcher, for eager calls (:func:`_eager`): the same
    plan, kernels, saved tensors and gradients. Host time on the H200 (Longformer-base, batch 1,
    fp16, kernels 115 us forward and 243 us backward): through the custom op the forward took
    329 us of host time a call and forward + backward 1647 us, against 139 and 377 us for the
    plan's own forward and backward, so the op's machinery, not the kernels, set a training
    step's pace at this size; through this class, 142 and 884 us
    (``benchmarks/results/h200_training_host_time.json``)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        plan = training_plan_for(q, k, mask, scale)
        q, k, v = (x.detach() for x in (q, k, v))  # so the kernels read them in place
        out, lse = plan.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros for the lse's gradient: the plan has its own
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        if dout is None:  # unmaterialised: no gradient reached out
            return None, None, None, None, None
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.plan.backward(q, k, v, out, lse, dout)
        return dq, dk, dv, None, None


def _eager(*tensors) -> bool:
    """Whether a call may skip the custom op (:class:`_EagerSparseAttention`): plain tensors,
    outside ``torch.compile`` / ``torch.export`` tracing, torch dispatch modes and functorch
    transforms, all of which must see the op itself."""
    return (all(type(x) is torch.Tensor for x in tensors) and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None and not torch._C._are_functorch_transforms_active())


def sparse_attention(q, k, v, mask, scale: Optional[float] = None) -> torch.Tensor:
    """Differentiable ``softmax(scale · q kᵀ ⊙ mask) v`` over the nonzeros of ``mask``.

    q ``[batch, heads, n, head_dim]``, k and v ``[batch, kv_heads, n, head_dim]`` (``heads %
    kv_heads == 0``, nothing repeated in memory): torch tensors of one dtype and device —
    float16, bfloat16, float32 (CPU or CUDA), or float64 on the CPU. ``mask``: a pattern string,
    a :func:`register_mask` handle, or an ACSR / pattern object (registered here; inside
    ``torch.compile`` pass a string). Rows with no nonzero give zeros and zero gradients;
    masked-out entries contribute nothing to any gradient. Returns ``out`` like q.
    """
    if not isinstance(mask, str):
        mask = register_mask(mask)
    if _eager(q, k, v):
        _check_like(q, k, v)
        return _EagerSparseAttention.apply(q, k, v, mask, scale)[0]
    return torch.ops.tvm_splat.sparse_attention(q, k, v, mask, scale)[0]
