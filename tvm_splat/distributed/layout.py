"""Where each rank's rows and columns live when the sequence is split across ranks (numpy only).

The sequence of ``n`` tokens is cut into ``world`` equal shards of ``shard = n / world`` rows;
rank ``r`` holds queries, keys and values of rows ``[r·shard, (r+1)·shard)``. A pattern is read
as two parts (:func:`split_pattern`):

* **local parts** (windows, causal windows, dilated windows, blocks, and anything else whose
  columns lie near the row): the columns rank ``r``'s rows reach form one interval, the *span*;
  what lies left of the shard comes from rank ``r-1`` (the left halo), what lies right from rank
  ``r+1`` (the right halo). A span that passes a neighbour's shard is refused: a halo comes only
  from the adjacent ranks.
* **global tokens** (a :class:`~tvm_splat.formats.GlobalTokens` part): every row attends their
  columns, so their keys and values are all-gathered once; their *rows* attend every column and
  are computed apart (partial softmax states over each shard, combined across ranks).

The local key/value buffer of rank ``r`` (:class:`ShardLayout`) is ``[tokens outside the region |
left halo | shard | right halo]``; the region is the part after the tokens. The local mask is a
square ACSR over that buffer, built in closed form from the pattern's row segments shifted by a
column offset (:func:`local_acsr`). The kernels are square (``n`` query rows by ``n`` key
columns), so the shard's queries are placed at their own keys' positions in a buffer of the same
length and the other rows stay empty: a padding of ``tokens + halos`` rows, at most
``2·reach + tokens`` against a shard of thousands, instead of a rectangular form of every kernel.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..formats import ACSR, GlobalTokens, Pattern, PerHead, Union, parse_pattern
from ..formats._checks import check_int
from ..formats.segments import decompose_sorted_columns

__all__ = ["ShardLayout", "split_pattern", "shard_layouts", "local_acsr", "ExchangeVolume", "halo_bytes"]

#: bytes of one element of each dtype the kernels take
ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

_SUPPORTED = ("window, causal window, dilated window, block-local and global-token patterns and their "
              "unions (any closed-form pattern whose reach fits in the neighbouring shards)")


def split_pattern(pattern) -> tuple[Pattern | None, tuple[int, ...]]:
    """``(local, tokens)``: the union of the pattern's non-global parts (None if there is none)
    and the sorted global tokens (all ``GlobalTokens`` parts together, unclipped).

    ``pattern``: a :class:`~tvm_splat.formats.Pattern` or its text form. An ACSR, a boolean
    mask or a :class:`PerHead` pattern raises ``ValueError``: only a closed-form pattern shared by
    all heads tells each rank what its neighbours need without seeing their rows."""
    if isinstance(pattern, str):
        pattern = parse_pattern(pattern)
    if isinstance(pattern, ACSR) or hasattr(pattern, "shape"):
        raise ValueError(f"sequence-parallel attention needs a closed-form pattern, got {type(pattern).__name__}: "
                         f"an irregular mask (an ACSR or a boolean array) does not say which columns a rank's "
                         f"rows reach without building them all; supported: {_SUPPORTED}")
    if isinstance(pattern, PerHead):
        raise ValueError("sequence-parallel attention does not take PerHead patterns yet (one pattern for "
                         f"all heads); supported: {_SUPPORTED}")
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern must be a Pattern or a pattern string, got {pattern!r}")
    parts = pattern.parts if isinstance(pattern, Union) else (pattern,)
    local = tuple(p for p in parts if not isinstance(p, GlobalTokens))
    tokens = sorted({int(t) for p in parts if isinstance(p, GlobalTokens) for t in _token_list(p)})
    merged = None if not local else local[0] if len(local) == 1 else Union(local)
    return merged, tuple(tokens)


def _token_list(part: GlobalTokens):
    t = part.tokens
    if isinstance(t, range) and len(t) > 1 << 24:  # a range, so len() is exact and O(1)
        raise ValueError(f"{len(t)} global tokens: sequence parallelism all-gathers them, so they must be few")
    return t


@dataclass(frozen=True)
class ShardLayout:
    """Rank ``rank``'s view of an ``n``-token sequence split in ``world`` shards.

    ``first``: the shard's first row (``rank · shard``); ``left`` / ``right``: halo rows received
    from rank ``rank-1`` / ``rank+1``; ``tokens``: every global token below ``n`` (int64, sorted);
    ``outside``: the tokens outside the region ``[first - left, first + shard + right)``, stored at
    the front of the local buffer in this order.
    Local buffer length ``length = len(outside) + left + shard + right``; the shard's rows sit at
    ``query_offset = len(outside) + left``.
    """

    n: int
    world: int
    rank: int
    shard: int
    left: int
    right: int
    tokens: np.ndarray
    outside: np.ndarray

    @property
    def first(self) -> int:
        return self.rank * self.shard

    @property
    def region_start(self) -> int:
        return self.first - self.left

    @property
    def region_stop(self) -> int:
        return self.first + self.shard + self.right

    @property
    def query_offset(self) -> int:
        return len(self.outside) + self.left

    @property
    def length(self) -> int:
        return len(self.outside) + self.left + self.shard + self.right

    @property
    def own_tokens(self) -> np.ndarray:
        """The global tokens among this shard's rows (int64, sorted)."""
        return self.tokens[(self.tokens >= self.first) & (self.tokens < self.first + self.shard)]


@functools.lru_cache(maxsize=16)
def _local_segments(local: Pattern, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The local parts' row segments for all ``n`` rows (closed form, O(n · parts))."""
    return local.row_segments(n)


def _spans(local: Pattern | None, n: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 [world] first and last column the rows of each shard reach through the local parts
    (an empty reach gives the shard's own first and last row)."""
    shard = n // world
    lo = np.arange(world, dtype=np.int64) * shard
    hi = lo + shard - 1
    if local is None:
        return lo, hi
    start, step, count = _local_segments(local, n)
    used = count > 0
    first_col = np.where(used, start, n).min(axis=1).reshape(world, shard).min(axis=1)
    last_col = np.where(used, start + step * (count - 1), -1).max(axis=1).reshape(world, shard).max(axis=1)
    return np.minimum(lo, first_col), np.maximum(hi, last_col)


def shard_layouts(pattern, n: int, world: int) -> tuple[ShardLayout, ...]:
    """The :class:`ShardLayout` of every rank (every rank computes all of them, so a pattern too
    wide for some rank fails on every rank alike instead of leaving the others waiting).

    Raises ``ValueError`` when ``n`` is not a multiple of ``world``, or when a shard's rows reach
    past the neighbouring shards (the message names the reach, the rank and the shard length)."""
    n, world = check_int("sequence length", n, 1), check_int("world size", world, 1)
    if n % world:
        raise ValueError(f"sequence length {n} is not divisible by the {world} ranks: every rank must hold "
                         f"an equal shard (pad the sequence to a multiple of {world})")
    local, token_list = split_pattern(pattern)
    shard = n // world
    lo, hi = _spans(local, n, world)
    first = np.arange(world, dtype=np.int64) * shard
    left, right = first - lo, hi - (first + shard - 1)
    for rank in range(world):
        if left[rank] > shard or right[rank] > shard:
            side, rows = ("left", left[rank]) if left[rank] > shard else ("right", right[rank])
            raise ValueError(f"pattern {pattern!r} is too wide for {world} shards of {shard} rows: rank {rank}'s rows "
                             f"reach {rows} rows to the {side} of its shard, past its neighbour's {shard} rows "
                             f"(use fewer ranks, a longer sequence, or a narrower pattern)")
    tokens = np.asarray([t for t in token_list if t < n], dtype=np.int64)
    layouts = []
    for rank in range(world):
        inside = (tokens >= lo[rank]) & (tokens <= hi[rank])
        layouts.append(ShardLayout(n, world, rank, shard, int(left[rank]), int(right[rank]), tokens,
                                   tokens[~inside]))
    return tuple(layouts)


class _ShardPattern(Pattern):
    """A rank's local mask as a pattern over its ``length``-row buffer: ready segment tables,
    so :meth:`ACSR.from_pattern` merges overlaps (a token inside a window) in closed form."""

    def __init__(self, start, step, count):
        self._tables = (start, step, count)

    def _segments(self, i, n):
        return self._tables


def local_acsr(pattern, layout: ShardLayout) -> ACSR:
    """The ACSR of ``layout``'s rank over its local buffer (``layout.length`` square).

    Row ``query_offset + t`` (shard row ``first + t`` that is not a global token) holds the local
    parts' columns of row ``first + t``, shifted by ``query_offset - first`` into the buffer,
    and the global tokens' columns (in the region: the same shift; outside: their slot at the
    front). Every other row is empty: halo and token rows are keys only, and global-token rows
    are computed by :func:`tvm_splat.distributed.attention.global_rows`."""
    local, _ = split_pattern(pattern)
    n, shard, offset = layout.n, layout.shard, layout.query_offset
    shift = offset - layout.first
    rows = slice(layout.first, layout.first + shard)
    parts = []
    if local is not None:
        start, step, count = (a[rows] for a in _local_segments(local, n))
        parts.append((start + shift, step, count))
    if len(layout.tokens):
        inside = layout.tokens[(layout.tokens >= layout.region_start) & (layout.tokens < layout.region_stop)]
        columns = np.concatenate([np.arange(len(layout.outside), dtype=np.int64), inside + shift])
        runs = decompose_sorted_columns(layout.length, np.zeros_like(columns), columns)
        parts.append(tuple(np.broadcast_to(a, (shard, len(runs))) for a in (runs.start, runs.step, runs.count)))
    width = max(1, sum(p[0].shape[1] for p in parts))
    start = np.zeros((layout.length, width), dtype=np.int64)
    step = np.ones_like(start)
    count = np.zeros_like(start)
    at = 0
    for s, d, c in parts:
        cols = slice(at, at + s.shape[1])
        start[offset:offset + shard, cols], step[offset:offset + shard, cols] = s, d
        count[offset:offset + shard, cols] = c
        at += s.shape[1]
    count[layout.own_tokens - shift] = 0  # global-token rows: computed apart
    return ACSR.from_pattern(_ShardPattern(start, step, count), layout.length)


@dataclass(frozen=True)
class ExchangeVolume:
    """Bytes one forward step moves into each rank (tuples over ranks) and what a ring moves.

    ``halo``: the left and right halos' keys and values; ``tokens``: the all-gather of the global
    tokens' q, k, v (each rank's part padded to the largest, as sent); ``global_rows``: the
    payload of the all-reduces of the global rows' partial states (m, then l and O, float32; a
    ring all-reduce moves about twice its payload); ``ring``: what ring
    attention moves into a rank (every other shard's keys and values). ``halo_rows``: (left, right)
    per rank."""

    halo_rows: tuple[tuple[int, int], ...]
    halo: tuple[int, ...]
    tokens: tuple[int, ...]
    global_rows: tuple[int, ...]
    ring: tuple[int, ...]

    @property
    def total(self) -> tuple[int, ...]:
        return tuple(map(sum, zip(self.halo, self.tokens, self.global_rows)))

    @property
    def ratio_to_ring(self) -> float:
        """The largest rank's total over a ring's per-rank bytes (0 with one rank: nothing moves)."""
        return max(self.total) / self.ring[0] if self.ring[0] else 0.0


def halo_bytes(pattern, q_shape, kv_shape=None, dtype="bfloat16", world_size: int = 2) -> ExchangeVolume:
    """What :func:`tvm_splat.distributed.sparse_attention` moves per call, by rank.

    ``q_shape = [batch, heads, shard, head_dim]`` and ``kv_shape = [batch, kv_heads, shard,
    head_dim]`` are one rank's shard shapes (``n = shard · world_size``); ``dtype`` one of
    ``float16``, ``bfloat16``, ``float32``."""
    batch, heads, shard, head_dim = (check_int("q_shape entry", s, 1) for s in q_shape)
    kv_heads = heads if kv_shape is None else check_int("kv heads", kv_shape[1], 1)
    if str(dtype).replace("torch.", "") not in ELEMENT_BYTES:
        raise ValueError(f"dtype must be one of {sorted(ELEMENT_BYTES)}, got {dtype!r}")
    elem = ELEMENT_BYTES[str(dtype).replace("torch.", "")]
    world = check_int("world size", world_size, 1)
    layouts = shard_layouts(pattern, shard * world, world)
    kv_row = 2 * batch * kv_heads * head_dim * elem  # one row of k and v
    most_tokens = max(len(lay.own_tokens) for lay in layouts)
    gathered = (world - 1) * most_tokens * batch * (heads + 2 * kv_heads) * head_dim * elem
    g = len(layouts[0].tokens)
    reduced = 0 if not g or world == 1 else batch * heads * g * (1 + 1 + head_dim) * 4
    return ExchangeVolume(
        halo_rows=tuple((lay.left, lay.right) for lay in layouts),
        halo=tuple((lay.left + lay.right) * kv_row for lay in layouts),
        tokens=tuple(gathered if g else 0 for _ in layouts),
        global_rows=tuple(reduced for _ in layouts),
        ring=tuple((world - 1) * shard * kv_row for _ in layouts))
