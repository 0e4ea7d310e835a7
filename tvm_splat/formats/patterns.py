"""Sparse attention pattern descriptions: plain frozen dataclasses, no analysis.

Row ``i`` is a query, column ``j`` a key, ``0 <= i, j < n``. Every pattern offers

* ``dense_mask(n)``: bool [n, n] (``PerHead``: [H, n, n]), straight from the definition,
* ``row_segments(n)``: the columns of each row as arithmetic progressions in closed form,
  without building an n x n array (see :meth:`Pattern.row_segments`),
* ``mask_mod(n)``: the same mask as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` written
  with arithmetic and comparisons only (see :meth:`Pattern.mask_mod`),
* ``nnz(n)``, ``density(n)``, ``num_heads``, and ``a | b`` for a :class:`Union`.

``parse_pattern`` reads the short text form used by command lines and configs.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from ._checks import check_int, check_sequence_length
from .segments import decompose_sorted_columns, merge_row_segments

__all__ = [
    "Pattern",
    "Dense",
    "Window",
    "DilatedWindow",
    "Strided",
    "BlockLocal",
    "GlobalTokens",
    "Union",
    "PerHead",
    "parse_pattern",
]

RowSegments = tuple[np.ndarray, np.ndarray, np.ndarray]
# fn(b, h, q_idx, kv_idx) -> bool array/tensor, FlexAttention's mask_mod signature
MaskMod = Callable[[Any, Any, Any, Any], Any]


class Pattern:
    """Base of all patterns. Subclasses implement ``_contains`` and ``_segments``."""

    @property
    def num_heads(self) -> int:
        """Number of head masks described (1 except for :class:`PerHead`)."""
        return 1

    def dense_mask(self, n: int) -> np.ndarray:
        """bool [n, n]: ``mask[i, j]`` is True when query i attends to key j."""
        n = check_sequence_length(n)
        i = np.arange(n, dtype=np.int64)[:, None]
        j = np.arange(n, dtype=np.int64)[None, :]
        return np.broadcast_to(self._contains(i, j, n), (n, n)).copy()

    def row_segments(self, n: int) -> RowSegments:
        """Columns of every row as arithmetic progressions, in closed form.

        Returns ``(start, step, count)``, int64 arrays of shape [n, P] (``PerHead``:
        [H, n, P]): row i holds columns ``start[i, p] + step[i, p] * k`` for
        ``k < count[i, p]``, all inside [0, n); ``step >= 1``; ``count == 0`` marks an unused
        slot (with start 0, step 1). Segments of one row may overlap (unions).
        """
        n = check_sequence_length(n)
        i = np.arange(n, dtype=np.int64)
        return _canonical(*self._segments(i, n))

    def nnz(self, n: int) -> int:
        """Number of True entries of ``dense_mask(n)``, computed from the segments."""
        start, step, count = self.row_segments(n)
        return int(merge_row_segments(start, step, count).count.sum())

    def density(self, n: int) -> float:
        """``nnz(n) / (num_heads * n * n)``."""
        n = check_sequence_length(n)
        return self.nnz(n) / float(self.num_heads * n * n)

    def __or__(self, other: "Pattern") -> "Union":
        return Union((self, other))

    def mask_mod(self, n: int) -> MaskMod:
        """The mask as ``fn(b, h, q_idx, kv_idx) -> bool``, FlexAttention's ``mask_mod``.

        Built from the pattern's definition with ``+ - // %``, comparisons and ``& |`` only (no
        gather from a table), so one function serves numpy int arrays, torch tensors and
        FlexAttention's compiled kernel; the result has the broadcast shape of ``q_idx`` and
        ``kv_idx`` (and ``h`` for :class:`PerHead`). Valid for ``0 <= q_idx, kv_idx < n``: every
        constant is clamped to ``n`` where that keeps the meaning, so it fits the int32 indices
        Flex passes (a window of 2**40 is a window of n).
        """
        n = check_sequence_length(n)
        return self._mask_mod(n)

    # subclasses -------------------------------------------------------------------
    def _contains(self, i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
        raise NotImplementedError

    def _segments(self, i: np.ndarray, n: int) -> RowSegments:
        """(start, step, count) each [n, P] for rows ``i`` (int64 [n])."""
        raise NotImplementedError

    def _mask_mod(self, n: int) -> MaskMod:
        """:meth:`mask_mod` for a checked ``n``."""
        raise NotImplementedError


def _never(q_idx, kv_idx):
    """All False, in the broadcast shape of the indices."""
    return (q_idx < 0) & (kv_idx < 0)


def _in_runs(x, runs):
    """``x`` is one of the columns ``start + step * k`` (``k < count``) of some run in
    ``runs``: two or three comparisons per run, OR-ed (``runs`` non-empty)."""
    hit = None
    for start, step, count in runs:
        last = start + step * (count - 1)
        if count == 1:
            term = x == start
        else:
            term = (x >= start) & (x <= last)
            if step > 1:
                term = term & ((x - start) % step == 0)
        hit = term if hit is None else hit | term
    return hit


def _canonical(start, step, count) -> RowSegments:
    """int64, C-contiguous, unused slots as (start 0, step 1, count 0), and single columns
    with step 1 (their step means nothing; a dilation wider than n must not reach the int32
    tables of an ACSR)."""
    count = np.maximum(np.asarray(count, dtype=np.int64), 0)
    used = count > 0
    start = np.where(used, np.asarray(start, dtype=np.int64), 0)
    step = np.where(count > 1, np.asarray(step, dtype=np.int64), 1)
    return (np.ascontiguousarray(start), np.ascontiguousarray(step),
            np.ascontiguousarray(count))


def _reach(value: int, n: int) -> int:
    """``min(value, n)``: a width, dilation, stride or block of at least ``n`` means the same
    as ``n`` for ``n`` rows (every offset ``|i - j|`` is below n), and the clamped value keeps
    the int64 arithmetic of the segment formulas from overflowing (``Window(2**63)``)."""
    return min(int(value), int(n))


def _column(*arrays: np.ndarray) -> RowSegments:
    """Stack per-row vectors [n] into [n, 1] segment tables."""
    return tuple(np.asarray(a, dtype=np.int64)[:, None] for a in arrays)  # type: ignore


@dataclass(frozen=True)
class Dense(Pattern):
    """Every query attends to every key."""

    def _contains(self, i, j, n):
        return np.ones((n, n), dtype=bool)

    def _segments(self, i, n):
        return _column(np.zeros_like(i), np.ones_like(i), np.full_like(i, n))

    def _mask_mod(self, n):
        def dense(b, h, q_idx, kv_idx):
            return (q_idx >= 0) & (kv_idx >= 0)

        return dense


@dataclass(frozen=True)
class Window(Pattern):
    """Sliding window: ``i - width <= j <= i + width`` (causal: ``i - width <= j <= i``)."""

    width: int
    causal: bool = False

    def __post_init__(self):
        check_int("window width", self.width, 0)

    def _contains(self, i, j, n):
        d = j - i
        width = _reach(self.width, n)
        upper = 0 if self.causal else width
        return (d >= -width) & (d <= upper)

    def _segments(self, i, n):
        width = _reach(self.width, n)
        lo = np.maximum(i - width, 0)
        hi = i if self.causal else np.minimum(i + width, n - 1)
        return _column(lo, np.ones_like(i), hi - lo + 1)

    def _mask_mod(self, n):
        width = min(self.width, n)
        upper = 0 if self.causal else width

        def window(b, h, q_idx, kv_idx):
            d = kv_idx - q_idx
            return (d >= -width) & (d <= upper)

        return window


@dataclass(frozen=True)
class DilatedWindow(Pattern):
    """Dilated window: ``j = i + dilation * k`` for ``-width <= k <= width``
    (causal: ``-width <= k <= 0``)."""

    width: int
    dilation: int
    causal: bool = False

    def __post_init__(self):
        check_int("window width", self.width, 0)
        check_int("dilation", self.dilation, 1)

    def _contains(self, i, j, n):
        d = j - i
        width, dilation = _reach(self.width, n), _reach(self.dilation, n)
        upper = 0 if self.causal else width * dilation
        return (d % dilation == 0) & (d >= -width * dilation) & (d <= upper)

    def _segments(self, i, n):
        d, width = _reach(self.dilation, n), _reach(self.width, n)
        # j = i + d*k >= 0  <=>  k >= -(i // d);   j <= n - 1  <=>  k <= (n - 1 - i) // d
        k_lo = np.maximum(-width, -(i // d))
        k_hi = np.minimum(0 if self.causal else width, (n - 1 - i) // d)
        return _column(i + d * k_lo, np.full_like(i, d), k_hi - k_lo + 1)

    def _mask_mod(self, n):
        # |kv - q| < n: a dilation >= n leaves only the diagonal, as a dilation of n does
        dilation = min(self.dilation, n)
        reach = min(self.width * self.dilation, n)
        upper = 0 if self.causal else reach

        def dilated(b, h, q_idx, kv_idx):
            d = kv_idx - q_idx
            hit = (d >= -reach) & (d <= upper)
            return hit & (d % dilation == 0) if dilation > 1 else hit

        return dilated


@dataclass(frozen=True)
class Strided(Pattern):
    """Sparse-Transformer strided pattern: ``|i - j| < local`` or ``(i - j) % stride == 0``;
    causal keeps only ``j <= i``. ``local`` defaults to ``stride`` (normalised on creation,
    so ``Strided(64) == Strided(64, 64)``)."""

    stride: int
    local: int | None = None
    causal: bool = False

    def __post_init__(self):
        check_int("stride", self.stride, 1)
        if self.local is None:
            object.__setattr__(self, "local", int(self.stride))
        check_int("local window", self.local, 0)

    def _contains(self, i, j, n):
        d = i - j
        hit = (np.abs(d) < _reach(self.local, n)) | (d % _reach(self.stride, n) == 0)
        return hit & (j <= i) if self.causal else hit

    def _segments(self, i, n):
        s, local = _reach(self.stride, n), _reach(self.local, n)
        band_lo = np.maximum(i - local + 1, 0)
        band_hi = i if self.causal else np.minimum(i + local - 1, n - 1)
        band_count = np.maximum(band_hi - band_lo + 1, 0)  # 0 when local == 0
        residue = i % s
        if self.causal:
            res_count = i // s + 1
        else:
            res_count = (n - 1 - residue) // s + 1
        start = np.stack([band_lo, residue], axis=1)
        step = np.stack([np.ones_like(i), np.full_like(i, s)], axis=1)
        count = np.stack([band_count, res_count], axis=1)
        return start, step, count

    def _mask_mod(self, n):
        # |q - kv| < n: a stride >= n hits only the diagonal, as a stride of n does
        stride, local, causal = min(self.stride, n), min(self.local, n), self.causal

        def strided(b, h, q_idx, kv_idx):
            d = q_idx - kv_idx
            hit = (abs(d) < local) | (d % stride == 0)
            return hit & (d >= 0) if causal else hit

        return strided


@dataclass(frozen=True)
class BlockLocal(Pattern):
    """Block diagonal: ``i // block == j // block``."""

    block: int

    def __post_init__(self):
        check_int("block size", self.block, 1)

    def _contains(self, i, j, n):
        block = _reach(self.block, n)
        return (i // block) == (j // block)

    def _segments(self, i, n):
        block = _reach(self.block, n)
        lo = (i // block) * block
        hi = np.minimum(lo + block, n)
        return _column(lo, np.ones_like(i), hi - lo)

    def _mask_mod(self, n):
        block = min(self.block, n)  # indices < n all lie in block 0 of any block >= n

        def block_local(b, h, q_idx, kv_idx):
            return q_idx // block == kv_idx // block

        return block_local


def _progression_or_tuple(tokens: tuple[int, ...]) -> "range | tuple[int, ...]":
    """Sorted distinct tokens as a ``range`` when they form an arithmetic progression (no,
    one, or evenly spaced tokens), else as the tuple itself: one stored form per token set."""
    if len(tokens) <= 1:
        return range(tokens[0], tokens[0] + 1) if tokens else range(0)
    gaps = {b - a for a, b in zip(tokens, tokens[1:])}
    return range(tokens[0], tokens[-1] + 1, gaps.pop()) if len(gaps) == 1 else tokens


def _ascending_range(tokens: range) -> range:
    """A range of tokens as the canonical ascending ``range`` (empty: ``range(0)``), in O(1)."""
    if not tokens:
        return range(0)
    if tokens.step < 0:
        tokens = tokens[::-1]
    if tokens[0] < 0:
        raise ValueError(f"global tokens must be >= 0, got {tokens[0]}")
    # no len(): it overflows on ranges longer than sys.maxsize
    return range(tokens[0], tokens[-1] + 1, tokens.step if tokens[-1] != tokens[0] else 1)


@dataclass(frozen=True, repr=False)
class GlobalTokens(Pattern):
    """Global tokens: rows in ``tokens`` attend to every column and every row attends to
    the token columns.

    ``tokens`` may be given as an int ``k`` meaning tokens ``0..k-1`` (same as
    :meth:`first`), a ``range``, or an iterable of ints. They are stored as an ascending
    ``range`` when they form an arithmetic progression (any count ``k``: ``range(0, k)``)
    and as a sorted tuple without repeats otherwise, so equal token sets compare equal and
    a count costs O(1) however large. Tokens ``>= n`` are ignored for that ``n``, so one
    pattern serves several sequence lengths, and building the segments costs O(n).
    """

    tokens: "range | tuple[int, ...]"

    def __post_init__(self):
        tokens = self.tokens
        if isinstance(tokens, (int, np.integer)) and not isinstance(tokens, bool):
            tokens = range(check_int("number of global tokens", tokens, 0))
        elif isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
            raise ValueError(f"global tokens must be an int count or a sequence of ints, "
                             f"got {tokens!r}")
        if isinstance(tokens, range):
            tokens = _ascending_range(tokens)
        else:
            checked = sorted({check_int("global token", t, None) for t in tokens})
            if checked and checked[0] < 0:
                raise ValueError(f"global tokens must be >= 0, got {checked[0]}")
            tokens = _progression_or_tuple(tuple(checked))
        object.__setattr__(self, "tokens", tokens)

    def __repr__(self) -> str:
        t = self.tokens
        if isinstance(t, range) and t.start == 0 and t.step == 1:
            return f"GlobalTokens({t.stop})"
        return f"GlobalTokens({t!r})"

    @classmethod
    def first(cls, k: int) -> "GlobalTokens":
        """Tokens ``0..k-1``."""
        return cls(check_int("number of global tokens", k, 0))

    def _tokens_below(self, n: int) -> np.ndarray:
        """int64 [<= n]: the tokens below ``n``, without visiting the others."""
        t = self.tokens
        if isinstance(t, range):
            if t.start >= n:
                return np.zeros(0, dtype=np.int64)
            return np.arange(t.start, min(t.stop, n), t.step, dtype=np.int64)
        return np.asarray(t[:bisect.bisect_left(t, n)], dtype=np.int64)

    def _contains(self, i, j, n):
        t = self._tokens_below(n)
        return np.isin(i, t) | np.isin(j, t)

    def _segments(self, i, n):
        t = self._tokens_below(n)
        # token columns as arithmetic runs (tokens 0..k-1 -> one segment)
        cols = decompose_sorted_columns(n, np.zeros_like(t), t)
        p = len(cols)
        start = np.broadcast_to(cols.start, (n, p)).copy()
        step = np.broadcast_to(cols.step, (n, p)).copy()
        count = np.broadcast_to(cols.count, (n, p)).copy()
        full = np.zeros((n, 1 + p), dtype=np.int64)
        start, step, count = (np.concatenate([full[:, :1], a], axis=1)
                              for a in (start, step, count))
        # slot 0: the whole row for token rows; their token-column slots become unused
        is_token_row = np.isin(i, t)
        step[:, 0] = 1
        count[:, 0] = np.where(is_token_row, n, 0)
        count[is_token_row, 1:] = 0
        return start, step, count

    def _mask_mod(self, n):
        t = self._tokens_below(n)
        cols = decompose_sorted_columns(n, np.zeros_like(t), t)  # tokens as arithmetic runs
        runs = [(int(s), int(d), int(c)) for s, d, c in zip(cols.start, cols.step, cols.count)]

        def global_tokens(b, h, q_idx, kv_idx):
            if not runs:  # no token below n
                return _never(q_idx, kv_idx)
            return _in_runs(q_idx, runs) | _in_runs(kv_idx, runs)

        return global_tokens


def _flatten_union_parts(parts) -> tuple[Pattern, ...]:
    if isinstance(parts, Pattern):
        raise ValueError("Union takes a sequence of patterns, got a single pattern")
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Iterable):
        raise ValueError(f"Union takes a sequence of patterns, got {parts!r}")
    flat: list[Pattern] = []
    for part in parts:
        if isinstance(part, PerHead):
            raise ValueError("PerHead cannot be nested inside Union; "
                             "put the Union inside PerHead instead")
        if isinstance(part, Union):
            flat.extend(part.parts)
        elif isinstance(part, Pattern):
            flat.append(part)
        else:
            raise ValueError(f"Union parts must be patterns, got {part!r}")
    if not flat:
        raise ValueError("Union needs at least one pattern")
    return tuple(flat)


@dataclass(frozen=True)
class Union(Pattern):
    """Logical OR of ``parts`` (nested unions are flattened; ``a | b`` builds one)."""

    parts: tuple[Pattern, ...]

    def __post_init__(self):
        object.__setattr__(self, "parts", _flatten_union_parts(self.parts))

    def _contains(self, i, j, n):
        hit = np.zeros((n, n), dtype=bool)
        for part in self.parts:
            hit |= part._contains(i, j, n)
        return hit

    def _segments(self, i, n):
        tables = [part._segments(i, n) for part in self.parts]
        return tuple(np.concatenate([np.broadcast_to(t[f], (n, t[f].shape[1]))
                                     for t in tables], axis=1) for f in range(3))

    def _mask_mod(self, n):
        mods = [part._mask_mod(n) for part in self.parts]

        def union(b, h, q_idx, kv_idx):
            hit = mods[0](b, h, q_idx, kv_idx)
            for mod in mods[1:]:
                hit = hit | mod(b, h, q_idx, kv_idx)
            return hit

        return union


@dataclass(frozen=True)
class PerHead(Pattern):
    """A different pattern per attention head: ``heads[h]`` is head h's pattern."""

    heads: tuple[Pattern, ...]

    def __post_init__(self):
        heads = self.heads
        if isinstance(heads, Pattern) or isinstance(heads, (str, bytes)) \
                or not isinstance(heads, Iterable):
            raise ValueError(f"PerHead takes a sequence of patterns, got {heads!r}")
        heads = tuple(heads)
        if not heads:
            raise ValueError("PerHead needs at least one head pattern")
        for h in heads:
            if isinstance(h, PerHead):
                raise ValueError("PerHead cannot be nested inside PerHead")
            if not isinstance(h, Pattern):
                raise ValueError(f"PerHead heads must be patterns, got {h!r}")
        object.__setattr__(self, "heads", heads)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def dense_mask(self, n: int) -> np.ndarray:
        """bool [H, n, n]."""
        return np.stack([h.dense_mask(n) for h in self.heads])

    def row_segments(self, n: int) -> RowSegments:
        """(start, step, count) int64 [H, n, P]; heads padded with unused slots."""
        tables = [h.row_segments(n) for h in self.heads]
        p = max(t[0].shape[1] for t in tables)
        out = []
        for f, fill in ((0, 0), (1, 1), (2, 0)):
            padded = [np.pad(t[f], ((0, 0), (0, p - t[f].shape[1])), constant_values=fill)
                      for t in tables]
            out.append(np.ascontiguousarray(np.stack(padded)))
        return tuple(out)  # type: ignore

    def nnz(self, n: int) -> int:
        """Total over heads."""
        return sum(h.nnz(n) for h in self.heads)

    def _mask_mod(self, n):
        mods = [head._mask_mod(n) for head in self.heads]

        def per_head(b, h, q_idx, kv_idx):
            hit = (h == 0) & mods[0](b, h, q_idx, kv_idx)
            for i, mod in enumerate(mods[1:], start=1):
                hit = hit | ((h == i) & mod(b, h, q_idx, kv_idx))
            return hit

        return per_head


# ---------------------------------------------------------------------------------------
# text form
# name -> (constructor, argument names); optional trailing arguments have defaults
_PARSERS = {
    "dense": (lambda: Dense(), ()),
    "window": (lambda w: Window(w), ("width",)),
    "causal_window": (lambda w: Window(w, causal=True), ("width",)),
    "dilated": (lambda w, d: DilatedWindow(w, d), ("width", "dilation")),
    "causal_dilated": (lambda w, d: DilatedWindow(w, d, causal=True), ("width", "dilation")),
    "strided": (lambda s, local=None: Strided(s, local), ("stride", "[local]")),
    "causal_strided": (lambda s, local=None: Strided(s, local, causal=True),
                       ("stride", "[local]")),
    "block": (lambda b: BlockLocal(b), ("block",)),
    "global": (lambda k: GlobalTokens(k), ("count",)),
}


def _parse_one(text: str) -> Pattern:
    name, *raw_args = [t.strip() for t in text.strip().split(":")]
    name = name.lower()
    if name not in _PARSERS:
        raise ValueError(f"unknown pattern {name!r} in {text.strip()!r}; "
                         f"known: {', '.join(sorted(_PARSERS))}")
    build, arg_names = _PARSERS[name]
    required = sum(1 for a in arg_names if not a.startswith("["))
    if not required <= len(raw_args) <= len(arg_names):
        usage = ":".join((name,) + arg_names)
        raise ValueError(f"pattern {name!r} takes {required}"
                         f"{'' if required == len(arg_names) else f'-{len(arg_names)}'}"
                         f" argument(s) ({usage}), got {len(raw_args)} in {text.strip()!r}")
    args = []
    for arg in raw_args:
        try:
            args.append(int(arg))
        except ValueError:
            raise ValueError(f"pattern arguments must be integers, got {arg!r} "
                             f"in {text.strip()!r}") from None
    return build(*args)


def parse_pattern(text: str) -> Pattern:
    """Parse e.g. ``"window:256"``, ``"causal_window:128"``, ``"dilated:128:2"``,
    ``"strided:128"``, ``"strided:128:64"``, ``"block:64"``, ``"global:16+window:256"``.

    ``+`` joins parts into a :class:`Union`; ``global:k`` means tokens 0..k-1.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"pattern text must be a non-empty string, got {text!r}")
    pieces = text.split("+")
    if any(not p.strip() for p in pieces):
        raise ValueError(f"empty part in pattern text {text!r}")
    parts = [_parse_one(p) for p in pieces]
    return parts[0] if len(parts) == 1 else Union(tuple(parts))
