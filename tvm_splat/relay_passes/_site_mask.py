"""Turn the masks found at an attention site into one boolean keep-mask, or say why not.

A site's masks (:class:`~._attention_match.MaskTerm`) are evaluated to numpy and combined
(logical AND) into ``keep``: bool ``[Hm, n, n]``, ``Hm`` = 1 (shared by all heads) or the
number of heads. The rules keep the rewrite exact:

* an additive mask may only hold ``0`` (attend) and an "effectively -inf" value (masked):
  ``-inf`` or the lowest finite number of the dtype the mask was made in (HuggingFace
  fills with ``finfo(dtype).min``: -65504 in float16, about -3.39e38 in bfloat16, -3.40e38
  in float32; a float16 mask cast to float32 still holds -65504, so the dtype is the one
  before the casts, :attr:`MaskTerm.value_dtype`). Any other finite value changes the
  softmax weights, which a sparsity pattern cannot express, so the site is refused;
* such a *finite* fill masks exactly like ``-inf`` (``exp(fill + s - max)`` is 0 in float32
  for any score below ~65000) unless a whole row is masked: torch then averages the row,
  our kernels give zeros, so such masks are refused;
* a mask that differs across the batch is refused (ACSR masks are per head, not per batch);
* a mask that depends on runtime inputs is refused, except HuggingFace's padding mask: a
  conjunction of constant factors and ``attention_mask[b, j]`` (:mod:`._padding_mask`)
  becomes the constant keep-mask plus ``kv_padding``, the ``[batch, n]`` runtime tensor the
  kernels' key lengths are computed from. With a finite fill, every row ``i`` must keep a
  key ``j <= i`` (so no query row before its sequence's length is left empty); query rows
  past a length may be empty, and give zeros where a finite-fill softmax gives the mean of
  the values (padding positions, which no real token attends).

Rows with no kept column give zeros in our kernels. torch's SDPA decomposition gives zeros
as well; a hand-written ``softmax`` over an all ``-inf`` row gives NaN there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ._attention_match import AttentionMatch, MaskTerm
from ._constant_eval import ConstantEvalError, ConstantValues
from ._padding_mask import split_key_padding

# The lowest finite number of each float dtype: HuggingFace's "masked" fill. bfloat16 has
# float32's exponent range and 8 significand bits: -(2 - 2**-7) * 2**127.
LOWEST_FINITE = {"float16": float(np.finfo(np.float16).min),
                 "bfloat16": -(2 - 2 ** -7) * 2.0 ** 127,
                 "float32": float(np.finfo(np.float32).min),
                 "float64": float(np.finfo(np.float64).min)}


def effectively_minus_inf(values: np.ndarray, dtype: str) -> np.ndarray:
    """Which ``values`` (made in ``dtype``, maybe cast wider since) mask like ``-inf``:
    ``-inf`` itself or anything at or below ``dtype``'s lowest finite number (sums of two
    such fills in a wider dtype included)."""
    lowest = LOWEST_FINITE.get(dtype, LOWEST_FINITE["float32"])
    return (values == -np.inf) | (np.isfinite(values) & (values <= lowest))


@dataclass
class SiteMask:
    """Result of the analysis: ``keep`` bool [Hm, n, n] or None (no mask: dense attention);
    ``description`` for the report; ``problem`` when the site must be skipped;
    ``kv_padding``: the ``[batch, n]`` runtime padding mask (a function parameter) the keys
    are further limited by, or None."""

    keep: Optional[np.ndarray]
    description: str
    problem: Optional[str] = None
    kv_padding: Optional[object] = None


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


def _term_keep(term: MaskTerm, value: np.ndarray) -> Tuple[Optional[np.ndarray], bool, Optional[str]]:
    """(keep, uses_finite_fill, problem) for one evaluated term. The masking values are
    judged before the scale that follows them (a positive scale of a fill that low leaves
    ``exp`` at 0)."""
    lowest = LOWEST_FINITE.get(term.value_dtype, LOWEST_FINITE["float32"])
    if term.kind == "additive":
        v = value.astype(np.float64)
        keep = v == 0
        masked = effectively_minus_inf(v, term.value_dtype)
        if not np.all(keep | masked):
            bad = v[~(keep | masked)].flat[0]
            return None, False, (f"the additive mask holds the value {bad:g}, neither 0 nor "
                                 f"effectively -inf (-inf or <= {lowest:g}, the lowest "
                                 f"{term.value_dtype}): it re-weights scores, no sparsity "
                                 f"pattern expresses it")
        return keep, bool(np.any(masked & np.isfinite(v))), None
    if term.fill is None:
        return None, False, "a where() on the scores fills with a non-constant value"
    if not effectively_minus_inf(np.float64(term.fill), term.value_dtype):
        return None, False, (f"a where() sets masked scores to {term.fill:g}, not effectively "
                             f"-inf (-inf or <= {lowest:g}, the lowest {term.value_dtype})")
    cond = value.astype(bool)
    return (cond if term.kind == "keep" else ~cond), bool(np.isfinite(term.fill)), None


def analyse_site_mask(site: AttentionMatch, constants: ConstantValues) -> SiteMask:
    """Combine the masks of ``site`` (and its causal flag) into one keep-mask; ``constants``:
    the function's :class:`ConstantValues` (a mask shared by several sites is computed once)."""
    n, parts, keep, finite_fill, padding = site.seq_len, [], None, False, None
    if site.causal:
        keep = np.tril(np.ones((n, n), dtype=bool))[None, None]
        parts.append("causal")
    for term in site.masks:
        if not constants.is_constant(term.expr):
            split = split_key_padding(term, constants, site.batch, n, effectively_minus_inf)
            if split is None:
                return SiteMask(None, "runtime", "the mask depends on runtime inputs other than "
                                                 "a recognised padding mask (attention_mask[b, j] "
                                                 "and-ed with constant factors); only constant "
                                                 "masks can become ACSR")
            if padding is not None and not split.mask.same_as(padding):
                return SiteMask(None, "padding", "two different runtime padding masks")
            padding = split.mask
            canon, problem = _to_batch_heads(np.broadcast_to(split.keep, term.score_shape),
                                             term.score_shape, site.batch, site.heads, n)
            if problem:
                return SiteMask(None, "padding", problem)
            finite_fill |= split.finite_fill
            keep = canon if keep is None else keep & canon
            parts.append("padding")
            continue
        try:
            value = constants.value(term.expr)
        except ConstantEvalError as err:
            return SiteMask(None, term.kind, f"the constant mask could not be evaluated at "
                                             f"compile time: {err}")
        canon, problem = _to_batch_heads(value, term.score_shape, site.batch, site.heads, n)
        if problem:
            return SiteMask(None, term.kind, problem)
        term_keep, finite, problem = _term_keep(term, canon)
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
    if finite_fill and padding is not None and not np.tril(keep).any(axis=-1).all():
        return SiteMask(None, description, "with a padding mask and a finite fill, a query row "
                                           "with no kept key at or before it would be empty for "
                                           "some lengths: torch averages such rows, the kernels "
                                           "give zeros")
    return SiteMask(keep, description, kv_padding=padding)
