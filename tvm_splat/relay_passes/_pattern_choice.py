"""Which sparsity each attention site gets: the ``pattern`` argument and the final ACSR.

``pattern`` may be

* ``None``: only sites whose graph already holds a constant mask are sparsified (the mask is
  analysed into ACSR);
* one pattern for every site: a :class:`~tvm_splat.formats.Pattern` (``Window(256)``), a
  pattern string (``"window:256"``, see :func:`~tvm_splat.formats.parse_pattern`) or an
  :class:`~tvm_splat.formats.ACSR` built for the site's sequence length;
* a dict ``{site name: pattern or None}``; sites not in it behave as with ``None``;
* a callable ``f(site: SiteInfo) -> pattern or None``.

Rule when a site has a mask *and* a pattern: the site computes attention over the
**intersection** (a query attends to a key only if both allow it). The model's mask is
never widened, so e.g. ``is_causal=True`` with ``Window(w)`` gives a causal window.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union as TypingUnion

import numpy as np

from ..formats import ACSR, Pattern, PerHead, parse_pattern

SitePattern = TypingUnion[Pattern, ACSR, None]


@dataclass(frozen=True)
class SiteInfo:
    """What a pattern callable is told about a site (shapes of q/k/v ``[B, H, N, D]``)."""

    name: str
    index: int
    function: str
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str
    mask: str


def as_site_pattern(value, what: str) -> SitePattern:
    """A pattern argument as a Pattern, an ACSR or None; raises naming ``what``."""
    if value is None or isinstance(value, (Pattern, ACSR)):
        return value
    if isinstance(value, str):
        try:
            return parse_pattern(value)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
    raise TypeError(f"{what} must be a Pattern (e.g. Window(256)), a pattern string "
                    f"('window:256'), an ACSR or None; got {type(value).__name__} {value!r}")


def describe(pattern: SitePattern) -> Optional[str]:
    if pattern is None:
        return None
    if isinstance(pattern, ACSR):
        return f"ACSR(n={pattern.n}, heads={pattern.num_heads})"
    return repr(pattern)


class PatternChoice:
    """The validated ``pattern`` argument; :meth:`for_site` answers per site."""

    def __init__(self, pattern):
        self._fixed: SitePattern = None
        self._table: Optional[dict] = None
        self._fn: Optional[Callable] = None
        if isinstance(pattern, Mapping):
            table = {}
            for key, value in pattern.items():
                if not isinstance(key, str):
                    raise TypeError(f"pattern dict keys must be site names (str), got {key!r}")
                table[key] = as_site_pattern(value, f"pattern[{key!r}]")
            self._table = table
        elif callable(pattern) and not isinstance(pattern, (Pattern, ACSR)):
            self._fn = pattern
        else:
            self._fixed = as_site_pattern(pattern, "pattern")

    def check_names(self, names) -> None:
        """Dict keys must name sites of the module: a typo would silently do nothing."""
        if self._table is None:
            return
        unknown = sorted(set(self._table) - set(names))
        if unknown:
            raise ValueError(f"pattern names unknown attention site(s) {unknown}; the module "
                             f"has {sorted(names)}")

    def for_site(self, info: SiteInfo) -> SitePattern:
        if self._table is not None:
            return self._table.get(info.name)
        if self._fn is not None:
            return as_site_pattern(self._fn(info), f"pattern({info.name!r}) returned a value that")
        return self._fixed


def _pattern_mask(pattern: SitePattern, n: int) -> np.ndarray:
    """bool [Hp, n, n] of a pattern or ACSR."""
    if isinstance(pattern, ACSR):
        return pattern.to_dense().reshape(pattern.num_heads, n, n)
    mask = pattern.dense_mask(n)
    return mask if mask.ndim == 3 else mask[None]


def choose_acsr(keep: Optional[np.ndarray], pattern: SitePattern, n: int, heads: int,
                max_segments: int) -> Tuple[Optional[ACSR], Optional[str]]:
    """The ACSR a site runs with, or ``(None, reason)`` to skip it.

    ``keep``: the site's own mask, bool [Hm, n, n] (or None: no mask). ``pattern``: the
    user's pattern for the site (or None).
    """
    if pattern is None:
        if keep is None:
            return None, "dense attention and no pattern given for this site"
        if keep.all():
            return None, "the mask keeps every (query, key) pair: nothing to sparsify"
        return ACSR.from_mask(keep, max_segments=max_segments), None
    p_heads = pattern.num_heads if isinstance(pattern, (ACSR, PerHead)) else 1
    if p_heads not in (1, heads):
        return None, f"the pattern has {p_heads} head masks but the site has {heads} heads"
    if isinstance(pattern, ACSR) and pattern.n != n:
        return None, f"the ACSR is for sequence length {pattern.n}, the site has {n}"
    if keep is None:
        acsr = pattern if isinstance(pattern, ACSR) else \
            ACSR.from_pattern(pattern, n, max_segments=max_segments)
        return acsr, None
    wanted = _pattern_mask(pattern, n)
    if np.all(keep | ~wanted):
        # the pattern lies inside the model's mask: keep its closed form (better geometry)
        acsr = pattern if isinstance(pattern, ACSR) else \
            ACSR.from_pattern(pattern, n, max_segments=max_segments)
        return acsr, None
    return ACSR.from_mask(wanted & keep, max_segments=max_segments), None
