"""Dense references that every sparse kernel is checked against (numpy, float64 inside)."""
from __future__ import annotations

import numpy as np


def masked_attention(q, k, v, mask, scale=None):
    """Dense masked attention in float64.

    q, k, v: ``[batch, heads, n, d]``; mask: bool ``[n, n]`` or ``[heads, n, n]`` (True = attend).
    Rows with no True entry produce zeros (the convention of our kernels). Masked-out keys and
    values contribute nothing, even when they are NaN or inf (selected away, never multiplied
    by a zero probability); non-finite values that the mask keeps propagate as in dense
    attention. Returns float64 ``[batch, heads, n, d]``.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 2:
        mask = mask[None]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("bhid,bhjd->bhij", q, k) * scale
    scores = np.where(mask[None], scores, -np.inf)
    row_max = scores.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.exp(scores - row_max)
    total = p.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # inf / inf, NaN: non-finite scores give NaN, as dense softmax
        p = np.divide(p, total, out=np.zeros_like(p), where=total != 0)
    finite = np.isfinite(v)
    out = p @ np.where(finite, v, 0.0)
    cols = np.flatnonzero(~finite.all(axis=(0, 1, 3)))  # keys with a NaN or inf value
    if cols.size:  # add p * v of those entries where the mask keeps them
        kept = mask[None][:, :, :, cols, None] & ~finite[:, :, None, cols, :]
        with np.errstate(invalid="ignore"):
            products = p[:, :, :, cols, None] * v[:, :, None, cols, :]
        out = out + np.where(kept, products, 0.0).sum(axis=3)
    return out


def masked_scores(q, k, mask, scale=None):
    """Scaled scores ``[batch, heads, n, n]`` (float64) with -inf outside ``mask``."""
    q, k = (np.asarray(x, dtype=np.float64) for x in (q, k))
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 2:
        mask = mask[None]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    return np.where(mask[None], np.einsum("bhid,bhjd->bhij", q, k) * scale, -np.inf)
