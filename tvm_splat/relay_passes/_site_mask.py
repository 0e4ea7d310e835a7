"""Turn the masks found at an attention site into one boolean keep-mask, or say why not.

A site's masks (:class:`~._attention_match.MaskTerm`) are evaluated to numpy and combined
(logical AND) into ``keep``: bool ``[Hm, n, n]``, ``Hm`` = 1 (shared by all heads) or the
number of heads. The rules keep the rewrite exact:

* an additive mask may only hold ``0`` (attend) and ``-inf`` or a huge negative number
  (masked); any other finite value changes the softmax weights, which a sparsity pattern
  cannot express, so the site is refused;
* a huge *finite* negative fill (HuggingFace uses ``finfo(dtype).min``) masks exactly like
  ``-inf`` unless a whole row is masked: torch then averages the row, our kernels give
  zeros, so such masks are refused;
* a mask that differs across the batch is refused (ACSR masks are per head, not per batch);
* a mask that depends on runtime inputs (a padding mask argument) is refused.

Rows with no kept column give zeros in our kernels. torch's SDPA decomposition gives zeros
as well; a hand-written ``softmax`` over an all ``-inf`` row gives NaN there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ._attention_match import AttentionMatch, MaskTerm
from ._constant_eval import Bindings, depends_only_on_constants, evaluate_constant

# A masked score s + fill must underflow exp() to exactly 0 for any realistic s - max.
# exp(x) is 0 in float32 below about -104, in float16 below about -17.
_HUGE_NEGATIVE = {"float16": -4096.0, "bfloat16": -1e30, "float32": -1e30, "float64": -1e30}


@dataclass
class SiteMask:
    """Result of the analysis: ``keep`` bool [Hm, n, n] or None (no mask: dense attention);
    ``description`` for the report; ``problem`` when the site must be skipped."""

    keep: Optional[np.ndarray]
    description: str
    problem: Optional[str] = None


def _to_batch_heads(value: np.ndarray, score_shape: Tuple[int, ...], batch: int, heads: int,
                    n: int) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """A mask that broadcasts to ``score_shape`` as ``[b', h', n, n]`` with b' in {1, batch}
    and h' in {1, heads}, without materialising the broadcast when it is shared."""
    try:
        if np.broadcast_shapes(value.shape, score_shape) != tuple(score_shape):
            raise ValueError
    except ValueError:
        return None, f"a mask of shape {value.shape} does not broadcast to the scores " \
                     f"{tuple(score_shape)}"
    value = value.reshape((1,) * (len(score_shape) - value.ndim) + value.shape)
    lead = value.shape[:-2]
    if all(d == 1 for d in lead):
        return np.broadcast_to(value.reshape((1, 1) + value.shape[-2:]), (1, 1, n, n)), None
    if int(np.prod(score_shape[:-2], dtype=np.int64)) != batch * heads:
        return None, f"cannot map the mask's leading dims {lead} to batch {batch} x heads {heads}"
    full = np.broadcast_to(value, tuple(score_shape))
    return full.reshape(batch, heads, n, n), None


def _term_keep(term: MaskTerm, value: np.ndarray,
               score_dtype: str) -> Tuple[Optional[np.ndarray], bool, Optional[str]]:
    """(keep, uses_finite_fill, problem) for one evaluated term."""
    huge = _HUGE_NEGATIVE.get(score_dtype, -1e30)
    if term.kind == "additive":
        v = value.astype(np.float64) * term.post_scale
        keep = v == 0
        masked = (v == -np.inf) | (np.isfinite(v) & (v <= huge))
        if not np.all(keep | masked):
            bad = v[~(keep | masked)].flat[0]
            return None, False, (f"the additive mask holds the value {bad:g}, not only 0 and "
                                 f"-inf: it re-weights scores, no sparsity pattern expresses it")
        return keep, bool(np.any(masked & np.isfinite(v))), None
    if term.fill is None:
        return None, False, "a where() on the scores fills with a non-constant value"
    fill = term.fill * term.post_scale
    if not (fill == -np.inf or (np.isfinite(fill) and fill <= huge)):
        return None, False, f"a where() sets masked scores to {term.fill:g}, not -inf"
    cond = value.astype(bool)
    return (cond if term.kind == "keep" else ~cond), bool(np.isfinite(fill)), None


def analyse_site_mask(site: AttentionMatch, bindings: Bindings) -> SiteMask:
    """Combine the masks of ``site`` (and its causal flag) into one keep-mask."""
    n, parts, keep, finite_fill = site.seq_len, [], None, False
    if site.causal:
        keep = np.tril(np.ones((n, n), dtype=bool))[None, None]
        parts.append("causal")
    for term in site.masks:
        if not depends_only_on_constants(term.expr, bindings):
            return SiteMask(None, "runtime", "the mask depends on runtime inputs (e.g. a "
                                             "padding mask argument); only constant masks "
                                             "can become ACSR")
        value = evaluate_constant(term.expr, bindings)
        canon, problem = _to_batch_heads(value, term.score_shape, site.batch, site.heads, n)
        if problem:
            return SiteMask(None, term.kind, problem)
        term_keep, finite, problem = _term_keep(term, canon, site.dtype)
        if problem:
            return SiteMask(None, term.kind, problem)
        finite_fill |= finite
        keep = term_keep if keep is None else keep & term_keep
        parts.append("additive" if term.kind == "additive" else "boolean")
    if keep is None:
        return SiteMask(None, "none")
    description = "+".join(parts)
    if keep.shape[0] > 1:
        if not np.all(keep == keep[:1]):
            return SiteMask(None, description, "the mask differs across the batch; ACSR "
                                               "masks are per head only")
    keep = keep[0]
    if keep.shape[0] > 1 and np.all(keep == keep[:1]):
        keep = keep[:1]
    keep = np.ascontiguousarray(keep)
    if finite_fill and not keep.any(axis=-1).all():
        return SiteMask(None, description, "a row is entirely masked by a finite fill value: "
                                           "torch averages such rows, the kernels give zeros")
    return SiteMask(keep, description)
