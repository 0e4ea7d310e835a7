"""Dense references that every sparse kernel is checked against (numpy, float64 inside)."""
from __future__ import annotations

import numpy as np


def masked_attention(q, k, v, mask, scale=None):
    """Dense masked attention in float64.

    q: ``[batch, heads, n, d]``; k, v: ``[batch, kv_heads, n, d]`` (``heads % kv_heads == 0``:
    query head h uses KV head ``h // (heads // kv_heads)``); mask: bool ``[n, n]`` or
    ``[heads, n, n]`` (True = attend). Rows with no True entry produce zeros (the convention of
    our kernels); only attended entries contribute, so a NaN or inf in a masked-out key or
    value changes nothing. Returns float64 ``[batch, heads, n, d]``.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = (np.repeat(x, group, axis=1) for x in (k, v))
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 2:
        mask = mask[None]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    with np.errstate(invalid="ignore", over="ignore"):
        scores = np.einsum("bhid,bhjd->bhij", q, np.where(np.isfinite(k), k, 0.0)) * scale
        bad_k = ~np.isfinite(k).all(-1)  # [b, h, n]: keys whose score is not q . k as computed
        if bad_k.any():
            exact = np.einsum("bhid,bhjd->bhij", q, k) * scale
            scores = np.where(bad_k[:, :, None, :], exact, scores)
        scores = np.where(mask[None], scores, -np.inf)
        row_max = scores.max(-1, keepdims=True)
        row_max = np.where(np.isneginf(row_max), 0.0, row_max)
        p = np.exp(scores - row_max)
        total = p.sum(-1, keepdims=True)
        p = np.where(total == 0, 0.0, p / np.where(total == 0, 1.0, total))
        out = p @ np.where(np.isfinite(v), v, 0.0)
        # non-finite values reach only the rows that attend them (p > 0: masked-out is p == 0)
        for b, h, j, d in zip(*np.nonzero(~np.isfinite(v))):
            attends = p[b, h, :, j] != 0
            out[b, h, attends, d] += p[b, h, attends, j] * v[b, h, j, d]
    return out


def masked_scores(q, k, mask, scale=None):
    """Scaled scores ``[batch, heads, n, n]`` (float64) with -inf outside ``mask``."""
    q, k = (np.asarray(x, dtype=np.float64) for x in (q, k))
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 2:
        mask = mask[None]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    return np.where(mask[None], np.einsum("bhid,bhjd->bhij", q, k) * scale, -np.inf)


def masked_attention_grads(q, k, v, mask, dout, scale=None):
    """Gradients of :func:`masked_attention` in float64, for finite inputs: ``(dq, dk, dv)``
    for the output gradient ``dout`` ``[batch, heads, n, d]``. dq is ``[batch, heads, n, d]``; dk
    and dv ``[batch, kv_heads, n, d]``, summed over the query heads of each KV head's group.
    Dense: ``dV = Pᵀ dO``, ``dP = dO Vᵀ``, ``dS = P ∘ (dP − rowsum(dO ∘ O))``,
    ``dQ = scale · dS K``, ``dK = scale · dSᵀ Q``; empty rows have P = 0 and give nothing."""
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    batch, heads, n, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    kr, vr = (np.repeat(x, group, axis=1) for x in (k, v))
    mask = np.asarray(mask, dtype=bool)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    scores = np.where(mask if mask.ndim == 3 else mask[None], np.einsum("bhid,bhjd->bhij", q, kr) * scale, -np.inf)
    row_max = scores.max(-1, keepdims=True)
    p = np.exp(scores - np.where(np.isneginf(row_max), 0.0, row_max))
    total = p.sum(-1, keepdims=True)
    p = p / np.where(total == 0, 1.0, total)
    out = p @ vr
    dp = dout @ np.swapaxes(vr, -1, -2)
    ds = p * (dp - (dout * out).sum(-1, keepdims=True))
    dq = ds @ kr * scale
    dk = np.swapaxes(ds, -1, -2) @ q * scale
    dv = np.swapaxes(p, -1, -2) @ dout
    return dq, dk.reshape(batch, kv_heads, group, n, d).sum(2), dv.reshape(batch, kv_heads, group, n, d).sum(2)
