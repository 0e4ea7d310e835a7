"""``sparse_attention`` on tensors sharded along the sequence across a ``torch.distributed`` group.

Per call, on every rank: one tiny all-reduce checks that the ranks agree (shapes, dtype, pattern),
the halos come from the neighbours (:func:`~tvm_splat.distributed.exchange.exchange_halos`), the
global tokens are all-gathered, our single-device kernels run on the local buffer ``[tokens outside
the region | left halo | shard | right halo]`` with the rank's ACSR
(:func:`~tvm_splat.distributed.layout.local_acsr`), and the global-token rows are combined across
ranks. Forward only: nothing here is differentiable (backward belongs to the training kernels).
"""
from __future__ import annotations

import functools
import zlib
from collections import OrderedDict

import torch
import torch.distributed as dist

from ..kernels.spec import SUPPORTED_DTYPES
from ..planner import AttentionPlan, plan
from .exchange import exchange_halos, gather_tokens, global_rows
from .layout import ShardLayout, local_acsr, shard_layouts, split_pattern

__all__ = ["sparse_attention", "shard", "clear_plans"]

#: local plans by (pattern, layout, shapes, dtype, device, options), least recently used first
_PLANS: "OrderedDict[tuple, AttentionPlan]" = OrderedDict()
MAX_PLANS = 64


def clear_plans() -> None:
    """Forget the local plans of this process (their kernels stay in the compile caches)."""
    _PLANS.clear()


def _group_size_rank(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tvm_splat.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return dist.get_world_size(group), dist.get_rank(group)


def shard(x: torch.Tensor, group=None, dim: int = 2) -> torch.Tensor:
    """This rank's equal part of the full-sequence tensor ``x`` along ``dim`` (contiguous copy);
    ``ValueError`` when the length is not a multiple of the group's size."""
    world, rank = _group_size_rank(group)
    n = x.shape[dim]
    if n % world:
        raise ValueError(f"sequence length {n} is not divisible by the {world} ranks: every rank must hold an "
                         f"equal shard (pad the sequence to a multiple of {world})")
    return x.narrow(dim, rank * (n // world), n // world).contiguous()


def _check_inputs(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor (one shard of the sequence), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, shard_len, head_dim], got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must share batch, shard length and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a multiple of the number of "
                         f"key/value heads ({k.shape[1]})")
    if len({x.dtype for x in (q, k, v)}) != 1 or str(q.dtype).replace("torch.", "") not in SUPPORTED_DTYPES:
        raise ValueError(f"q, k and v must share one dtype of {SUPPORTED_DTYPES}, got "
                         f"{sorted({str(x.dtype) for x in (q, k, v)})}")
    if len({x.device for x in (q, k, v)}) != 1:
        raise ValueError(f"q, k and v must be on one device, got {sorted({str(x.device) for x in (q, k, v)})}")


def _check_agreement(q, k, pattern, scale, group) -> None:
    """One all-reduce (max of each value and of its negation) that every rank passes or fails
    alike: shard shapes, dtype, pattern and scale must be the same on every rank, or the
    exchanges that follow would wait for messages of the wrong size forever."""
    facts = [*q.shape, k.shape[1], zlib.crc32(str(q.dtype).encode()), zlib.crc32(repr(pattern).encode()),
             zlib.crc32(repr(scale).encode())]
    both = torch.tensor(facts + [-f for f in facts], dtype=torch.int64, device=q.device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[:len(facts)].tolist(), [-x for x in both[len(facts):].tolist()]
    names = ("batch", "heads", "shard length", "head_dim", "kv_heads", "dtype", "pattern", "scale")
    differ = [name for name, hi, lo in zip(names, high, low) if hi != lo]
    if differ:
        raise ValueError(f"the ranks disagree on {', '.join(differ)}: every rank must pass shards of the same "
                         f"shapes and dtype, the same pattern and the same scale")


@functools.lru_cache(maxsize=16)
def _layouts(pattern, n: int, world: int) -> tuple[ShardLayout, ...]:
    return shard_layouts(pattern, n, world)


def _local_plan(pattern, layout: ShardLayout, q, k, scale, variant, knobs) -> AttentionPlan:
    q_shape = (q.shape[0], q.shape[1], layout.length, q.shape[3])
    kv_shape = (k.shape[0], k.shape[1], layout.length, k.shape[3])
    key = (pattern, layout.n, layout.world, layout.rank, q_shape, kv_shape, q.dtype, q.device, scale, variant, knobs)
    found = _PLANS.get(key)
    if found is None:
        found = plan(local_acsr(pattern, layout), q_shape, kv_shape, str(q.dtype).replace("torch.", ""), q.device,
                     scale=scale, variant=variant, knobs=knobs)
        _PLANS[key] = found
        if len(_PLANS) > MAX_PLANS:
            _PLANS.popitem(last=False)
    _PLANS.move_to_end(key)
    return found


def sparse_attention(q, k, v, pattern, group=None, *, scale=None, variant="auto", knobs=None) -> torch.Tensor:
    """Sparse attention over a sequence split in equal consecutive shards across ``group``.

    Rank ``r`` of ``world`` passes its shard: q ``[batch, heads, L, head_dim]``, k and v
    ``[batch, kv_heads, L, head_dim]`` holding rows ``[r·L, (r+1)·L)`` of the full sequence of
    ``n = world·L`` (:func:`shard` cuts one); float16, bfloat16 or float32 torch tensors on the
    rank's device (CUDA with NCCL, CPU with gloo). ``pattern``: a pattern or its text over the
    full sequence: windows, causal windows, dilated windows, blocks, global tokens and unions of
    them, whose reach fits in the neighbouring shards (``ValueError`` otherwise, and for an ACSR or
    boolean mask). Returns this rank's output rows ``[batch, heads, L, head_dim]``, equal to rows
    ``[r·L, (r+1)·L)`` of :func:`tvm_splat.sparse_attention` on the full tensors. Every rank of
    the group must call it together. Each call starts with one small all-reduce that checks the
    ranks agree (its result is read on the host: one device synchronisation per call), so a
    mismatch raises the same ``ValueError`` on every rank instead of hanging the exchanges. ``scale``, ``variant``, ``knobs``: as
    :func:`tvm_splat.sparse_attention`. Forward only.
    """
    world, rank = _group_size_rank(group)
    _check_inputs(q, k, v)
    split_pattern(pattern)  # an irregular mask fails here, before anything is sent
    _check_agreement(q, k, pattern, scale, group)
    layouts = _layouts(pattern, q.shape[2] * world, world)
    me = layouts[rank]
    local_plan = _local_plan(pattern, me, q, k, scale, variant, knobs)
    left, right = exchange_halos(k, v, layouts, rank, group)
    tokens = gather_tokens(q, k, v, layouts, rank, group) if len(me.tokens) else None
    keys, values = [], []
    if len(me.outside):
        slots = torch.as_tensor(me.tokens.searchsorted(me.outside), device=q.device)
        keys.append(tokens[1].index_select(2, slots))
        values.append(tokens[2].index_select(2, slots))
    for part in (left, (k, v), right):
        if part is not None:
            keys.append(part[0])
            values.append(part[1])
    k_local, v_local = (torch.cat(x, dim=2) if len(x) > 1 else x[0] for x in (keys, values))
    q_local = q.new_zeros(local_plan.q_shape)
    q_local[:, :, me.query_offset:me.query_offset + me.shard] = q
    # contiguous like the single-device output (one copy of the shard's rows)
    out = local_plan.run(q_local, k_local, v_local)[:, :, me.query_offset:me.query_offset + me.shard].contiguous()
    if tokens is not None:
        rows = global_rows(tokens[0], k, v, local_plan.spec.scale, group)
        mine = me.tokens.searchsorted(me.own_tokens)
        if len(mine):
            out[:, :, torch.as_tensor(me.own_tokens - me.first, device=q.device)] = \
                rows[:, :, torch.as_tensor(mine, device=q.device)]
    return out
