"""What ranks send each other for sequence-parallel attention (``torch.distributed``; NCCL on the
GPU, gloo on the CPU).

* :func:`exchange_halos`: each rank's boundary keys and values to its two neighbours, point to
  point (``batch_isend_irecv``): the rows its neighbours' windows reach, nothing else.
* :func:`gather_tokens`: the global tokens' q, k, v, all-gathered once (each rank's part padded
  to the largest part, as ``all_gather`` needs equal sizes).
* :func:`global_rows`: the output rows of the global tokens, which attend every column: each
  rank computes the partial softmax state (row max ``m``, sum ``l``, unnormalised output ``O``,
  float32) of those rows over its own shard, an all-reduce (max) of ``m`` and one (sum) of the
  rescaled ``l`` and ``O`` combine them exactly, and every rank divides. We chose the all-reduce
  over sending every token's full key range to its owner: it moves ``G · (head_dim + 2)`` floats
  per head instead of whole shards, and needs no owner-specific schedule.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import ShardLayout

__all__ = ["exchange_halos", "gather_tokens", "global_rows", "partial_state"]

#: score elements (float32) one chunk of :func:`partial_state` holds at once: 2**24 = 64 MiB,
#: so the global rows over a 128k-key shard need not hold batch·heads·G·128k scores; a memory
#: bound, not a measured speed
CHUNK_SCORES = 1 << 24


def exchange_halos(k: torch.Tensor, v: torch.Tensor, layouts: tuple[ShardLayout, ...], rank: int, group=None):
    """``(left, right)``: the halos of ``rank`` as ``[2, batch, kv_heads, rows, head_dim]`` tensors
    (k then v), or None where its layout has no halo on that side. ``k``, ``v``: this rank's
    shard ``[batch, kv_heads, shard, head_dim]``. Every rank must call this with the same layouts."""
    me = layouts[rank]
    ops, received = [], {}

    def boundary(rows: slice) -> torch.Tensor:
        return torch.stack((k[:, :, rows], v[:, :, rows]))

    if rank > 0 and layouts[rank - 1].right:  # the left neighbour's right halo: my first rows
        ops.append(dist.P2POp(dist.isend, boundary(slice(0, layouts[rank - 1].right)), group=group,
                              group_peer=rank - 1))
    if rank + 1 < me.world and layouts[rank + 1].left:  # the right neighbour's left halo: my last rows
        ops.append(dist.P2POp(dist.isend, boundary(slice(me.shard - layouts[rank + 1].left, me.shard)),
                              group=group, group_peer=rank + 1))
    for side, rows, peer in (("left", me.left, rank - 1), ("right", me.right, rank + 1)):
        if rows:
            received[side] = k.new_empty((2, k.shape[0], k.shape[1], rows, k.shape[3]))
            ops.append(dist.P2POp(dist.irecv, received[side], group=group, group_peer=peer))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return received.get("left"), received.get("right")


def gather_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layouts: tuple[ShardLayout, ...], rank: int,
                  group=None):
    """``(q_tokens [batch, heads, G, head_dim], k_tokens, v_tokens [batch, kv_heads, G, head_dim])``
    of every global token in sorted order, on every rank (``G = len(layouts[0].tokens) > 0``)."""
    me, heads, kv_heads = layouts[rank], q.shape[1], k.shape[1]
    most = max(len(lay.own_tokens) for lay in layouts)
    mine = torch.as_tensor(me.own_tokens - me.first, device=q.device)
    packed = q.new_zeros((q.shape[0], heads + 2 * kv_heads, most, q.shape[3]))
    packed[:, :, :len(mine)] = torch.cat([x.index_select(2, mine) for x in (q, k, v)], dim=1)
    parts = [torch.empty_like(packed) for _ in layouts]
    dist.all_gather(parts, packed, group=group)
    every = torch.cat([part[:, :, :len(lay.own_tokens)] for part, lay in zip(parts, layouts)], dim=2)
    return every.split([heads, kv_heads, kv_heads], dim=1)


def partial_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Softmax state of queries ``q [batch, heads, G, head_dim]`` over all keys ``k``, ``v``
    ``[batch, kv_heads, L, head_dim]`` (grouped heads: query head h reads kv head
    ``h // (heads / kv_heads)``): ``(m, l) [batch, heads, G]`` and ``O [batch, heads, G, head_dim]``,
    float32, with ``O / l`` the attention output; keys are taken in chunks of
    :data:`CHUNK_SCORES` scores."""
    batch, heads, g, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    qf = q.float().reshape(batch, kv_heads, heads // kv_heads, g, dim)
    chunk = max(1, CHUNK_SCORES // (batch * heads * g))
    m = l = o = None
    for at in range(0, length, chunk):
        kc, vc = (x[:, :, at:at + chunk].float() for x in (k, v))
        s = torch.einsum("bkgtd,bkld->bkgtl", qf, kc) * scale
        mc = s.amax(dim=-1)
        if m is None:
            m_new = mc
        else:
            m_new = torch.maximum(m, mc)
        p = torch.exp(s - m_new[..., None])
        lc, oc = p.sum(dim=-1), torch.einsum("bkgtl,bkld->bkgtd", p, vc)
        if m is not None:
            alpha = torch.exp(m - m_new)
            lc, oc = lc + l * alpha, oc + o * alpha[..., None]
        m, l, o = m_new, lc, oc
    return (m.reshape(batch, heads, g), l.reshape(batch, heads, g), o.reshape(batch, heads, g, dim))


def global_rows(q_tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group=None) -> torch.Tensor:
    """Outputs ``[batch, heads, G, head_dim]`` (q's dtype) of the global tokens' rows, which attend
    every column: this rank's shard ``k``, ``v`` contributes its partial state, combined across
    the group by two all-reduces (see the module docstring)."""
    m, l, o = partial_state(q_tokens, k, v, scale)
    top = m.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    alpha = torch.exp(m - top)
    summed = torch.cat([(l * alpha)[..., None], o * alpha[..., None]], dim=-1)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return (summed[..., 1:] / summed[..., :1]).to(q_tokens.dtype)
