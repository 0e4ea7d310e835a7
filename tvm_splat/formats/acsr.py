"""ACSR: affine compressed sparse rows for sparse attention masks.

Row i of head h holds up to S segments. Segment s is

* AFFINE when ``seg_step[h, i, s] > 0``: columns ``seg_start + seg_step * k``,
* INDEXED when ``seg_step[h, i, s] == 0`` (CSR fallback): columns
  ``indices[h, seg_start + k]``,

for ``k < seg_count[h, i, s]``; unused slots have count 0, start 0, step 1. Segments of a
row are disjoint and sorted by first column; an irregular row (more arithmetic runs than
``max_segments``) is one indexed segment in slot 0 with its columns sorted.

Values of row i live at ``row_ptr[h, i] .. row_ptr[h, i+1]`` in *ACSR value order*: slot
0's columns in k order, then slot 1's, and so on.

Shapes: ``Hm`` = number of head masks (1 = shared by all heads), ``n`` = sequence length.
"""
from __future__ import annotations


import numpy as np

from ._checks import INT32_MAX, check_int, check_sequence_length, int32_table
from .geometry import Geometry, analyse_geometry
from .patterns import Pattern
from .runs import RunTable, find_runs
from .segments import (SegmentList, decompose_sorted_columns, expand_segments,
                       merge_row_segments)

__all__ = ["ACSR"]


def _as_numpy_mask(mask) -> np.ndarray:
    """numpy view of a numpy or torch mask (torch is optional, so no import)."""
    if hasattr(mask, "detach") and hasattr(mask, "cpu"):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"mask must be a numpy or torch bool array, got {type(mask).__name__}")
    return mask


def _check_heads_of_tables(name: str, value, heads: int) -> None:
    if len(value) != heads:
        raise ValueError(f"{name} has {len(value)} heads but indptr has {heads}")


class ACSR:
    """Affine CSR sparse mask; see the module docstring for the layout.

    Attributes (numpy, C-contiguous, int32 unless noted):

    * ``n``, ``num_heads`` (Hm), ``max_segments`` (S >= 1, slots in use): int
    * ``seg_start``, ``seg_step``, ``seg_count``: [Hm, n, S]
    * ``row_ptr``: [Hm, n + 1], ``row_ptr[h, n]`` = nnz of head h
    * ``indices``: [Hm, L], L >= 1, columns of indexed rows (zero padded)
    * ``nnz``: int64 [Hm]; ``max_nnz``: int; ``density``: float (over all heads)
    * ``runs``: list of :class:`~tvm_splat.formats.runs.RunTable`, one per head

    Build with :meth:`from_pattern`, :meth:`from_mask` or :meth:`from_csr`.
    """

    def __init__(self, n: int, seg_start: np.ndarray, seg_step: np.ndarray,
                 seg_count: np.ndarray, indices: np.ndarray):
        """Wrap ready tables ([Hm, n, S] each, and indices [Hm, L]); derives row_ptr, nnz,
        runs. Does not check disjointness (that costs O(nnz)); see :meth:`validate`."""
        self.n = check_sequence_length(n)
        tables = [int32_table(name, t) for name, t in
                  (("seg_start", seg_start), ("seg_step", seg_step), ("seg_count", seg_count))]
        shape = tables[0].shape
        if len(shape) != 3 or shape[1] != self.n or shape[0] < 1 or shape[2] < 1 \
                or any(t.shape != shape for t in tables):
            raise ValueError(f"segment tables must share a shape [Hm, n={self.n}, S>=1], got "
                             f"{[t.shape for t in tables]}")
        self.seg_start, self.seg_step, self.seg_count = tables
        self.num_heads = int(shape[0])
        self.max_segments = int(shape[2])
        indices = int32_table("indices", indices)
        if indices.ndim != 2 or indices.shape[0] != self.num_heads or indices.shape[1] < 1:
            raise ValueError(f"indices must have shape [Hm={self.num_heads}, L>=1], "
                             f"got {indices.shape}")
        self.indices = indices

        row_nnz = self.seg_count.astype(np.int64).sum(axis=2)
        ptr = np.zeros((self.num_heads, self.n + 1), dtype=np.int64)
        np.cumsum(row_nnz, axis=1, out=ptr[:, 1:])
        if ptr[:, -1].max() > INT32_MAX:
            raise ValueError(f"a head has {int(ptr[:, -1].max())} nonzeros, more than int32 "
                             "row offsets can address")
        self.row_ptr = np.ascontiguousarray(ptr, dtype=np.int32)
        self.nnz = ptr[:, -1].copy()
        self.max_nnz = int(self.nnz.max())
        self.density = float(self.nnz.sum()) / float(self.num_heads * self.n * self.n)
        self.runs: list[RunTable] = [
            find_runs(self.seg_start[h], self.seg_step[h], self.seg_count[h], ptr[h])
            for h in range(self.num_heads)]
        self._geometry: Geometry | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_pattern(cls, pattern: Pattern, n: int, max_segments: int = 4) -> "ACSR":
        """Build from a pattern in closed form (``pattern.row_segments``); no n x n mask.

        ``PerHead`` patterns give one head mask per head, others a single shared mask.
        """
        if not isinstance(pattern, Pattern):
            raise ValueError(f"pattern must be a Pattern, got {pattern!r}")
        n = check_sequence_length(n)
        max_segments = check_int("max_segments", max_segments, 1)
        start, step, count = pattern.row_segments(n)
        if start.ndim == 2:
            start, step, count = start[None], step[None], count[None]
        heads = [merge_row_segments(start[h], step[h], count[h]) for h in range(start.shape[0])]
        return cls._from_segment_lists(n, heads, [None] * len(heads), max_segments)

    @classmethod
    def from_mask(cls, mask, max_segments: int = 4) -> "ACSR":
        """Build from a bool mask, numpy or torch, [n, n] (shared) or [H, n, n] (per head)."""
        mask = _as_numpy_mask(mask)
        max_segments = check_int("max_segments", max_segments, 1)
        if mask.dtype != np.bool_:
            raise ValueError(f"mask must be boolean, got dtype {mask.dtype}")
        if mask.ndim not in (2, 3):
            raise ValueError(f"mask must be [n, n] or [H, n, n], got {mask.ndim} dimensions "
                             f"{mask.shape}")
        if mask.ndim == 2:
            mask = mask[None]
        h, rows, cols = mask.shape
        if rows != cols:
            raise ValueError(f"mask must be square in its last two dimensions, got {rows}x{cols}")
        if rows == 0 or h == 0:
            raise ValueError(f"mask is empty: shape {mask.shape}")
        n = rows
        heads, csrs = [], []
        for m in mask:
            row_of, col = np.nonzero(m)  # row-major, so sorted by (row, col)
            row_of = row_of.astype(np.int64)
            col = col.astype(np.int64)
            heads.append(decompose_sorted_columns(n, row_of, col))
            csrs.append((row_of, col))
        return cls._from_segment_lists(n, heads, csrs, max_segments)

    @classmethod
    def from_csr(cls, indptr, indices, n: int, max_segments: int = 4) -> "ACSR":
        """Build from CSR: ``indptr`` int [n+1], ``indices`` int [nnz] (one head), or lists
        of those, one pair per head. Columns within a row may be unsorted; a repeated
        column is an error."""
        n = check_sequence_length(n)
        max_segments = check_int("max_segments", max_segments, 1)
        per_head = isinstance(indptr, (list, tuple)) and len(indptr) > 0 \
            and np.ndim(indptr[0]) == 1
        if per_head:
            if not isinstance(indices, (list, tuple)):
                raise ValueError("indptr is a list per head, so indices must be one too")
            _check_heads_of_tables("indices", indices, len(indptr))
            pairs = list(zip(indptr, indices))
        else:
            pairs = [(indptr, indices)]
        heads, csrs = [], []
        for h, (ptr, idx) in enumerate(pairs):
            row_of, col = _checked_csr(ptr, idx, n, h)
            heads.append(decompose_sorted_columns(n, row_of, col))
            csrs.append((row_of, col))
        return cls._from_segment_lists(n, heads, csrs, max_segments)

    @classmethod
    def _from_segment_lists(cls, n: int, heads: list[SegmentList],
                            csrs: list, max_segments: int) -> "ACSR":
        """Tables from per-head disjoint segment lists sorted by (row, start).

        ``csrs[h]`` is (row_of, cols) sorted, or None to enumerate irregular rows from the
        segments.
        """
        built = [_head_tables(n, seg, csr, max_segments) for seg, csr in zip(heads, csrs)]
        slots = max(b[0].shape[1] for b in built)
        length = max(1, max(b[3].shape[0] for b in built))
        tables = []
        for f, fill in ((0, 0), (1, 1), (2, 0)):
            tables.append(np.stack([np.pad(b[f], ((0, 0), (0, slots - b[f].shape[1])),
                                           constant_values=fill) for b in built]))
        indices = np.stack([np.pad(b[3], (0, length - b[3].shape[0])) for b in built])
        return cls(n, *tables, indices)

    # ------------------------------------------------------------------ conversions
    def _check_head(self, head: int) -> int:
        head = check_int("head", head, 0)
        if head >= self.num_heads:
            raise ValueError(f"head must be < {self.num_heads}, got {head}")
        return head

    def value_columns(self, head: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) of every value of ``head`` in ACSR value order, int64 [nnz]."""
        head = self._check_head(head)
        count = self.seg_count[head].reshape(-1).astype(np.int64)
        used = np.flatnonzero(count)
        seg = SegmentList(used // self.max_segments,
                          self.seg_start[head].reshape(-1)[used].astype(np.int64),
                          self.seg_step[head].reshape(-1)[used].astype(np.int64),
                          count[used])
        seg_id, k, col = expand_segments(seg)
        indexed = seg.step[seg_id] == 0
        if indexed.any():
            col[indexed] = self.indices[head, seg.start[seg_id[indexed]] + k[indexed]]
        return seg.row[seg_id], col

    def columns(self, head: int, row: int) -> np.ndarray:
        """int64 columns of one row in ACSR value order."""
        head = self._check_head(head)
        row = check_int("row", row, 0)
        if row >= self.n:
            raise ValueError(f"row must be < n={self.n}, got {row}")
        out = []
        for s in range(self.max_segments):
            start, step, count = (int(t[head, row, s]) for t in
                                  (self.seg_start, self.seg_step, self.seg_count))
            if count == 0:
                continue
            if step == 0:
                out.append(self.indices[head, start:start + count].astype(np.int64))
            else:
                out.append(start + step * np.arange(count, dtype=np.int64))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def csr_permutation(self, head: int = 0) -> np.ndarray:
        """int64 [nnz]: ``perm[p]`` = ACSR value position of the p-th CSR nonzero.

        So ``values_acsr[perm]`` are the values in CSR (row, sorted column) order, and
        ``to_csr(head)[1] == value_columns(head)[1][perm]``.
        """
        row, col = self.value_columns(head)
        return np.argsort(row * self.n + col, kind="stable")

    def to_csr(self, head: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(indptr int64 [n+1], indices int32 [nnz]) with columns sorted within rows."""
        row, col = self.value_columns(head)
        perm = np.argsort(row * self.n + col, kind="stable")
        return self.row_ptr[head].astype(np.int64), col[perm].astype(np.int32)

    def to_dense(self) -> np.ndarray:
        """bool [Hm, n, n]."""
        out = np.zeros((self.num_heads, self.n, self.n), dtype=bool)
        for h in range(self.num_heads):
            row, col = self.value_columns(h)
            out[h, row, col] = True
        return out

    # ------------------------------------------------------------------ analysis
    def geometry(self) -> Geometry:
        """Shape facts for tiling (cached)."""
        if self._geometry is None:
            self._geometry = analyse_geometry(self.n, self.seg_start, self.seg_step,
                                              self.seg_count, self.indices)
        return self._geometry

    @property
    def has_indexed(self) -> bool:
        """Whether some row fell back to INDEXED (CSR) segments (O(n·S), not cached)."""
        return bool(((self.seg_step == 0) & (self.seg_count > 0)).any())

    def irregular_columns(self) -> int:
        """Total number of column indices stored for indexed rows, over heads."""
        indexed = (self.seg_step == 0) & (self.seg_count > 0)
        return int(self.seg_count[indexed].astype(np.int64).sum())

    def metadata_bytes(self) -> int:
        """Bytes of the run-compressed metadata plus the indices of irregular rows.

        Each run is (row0, nrows, value_offset) plus (start0, dstart, step, count0,
        dcount) per segment slot, int32 words; indexed rows add 4 bytes per column.
        """
        return sum(r.nbytes() for r in self.runs) + 4 * self.irregular_columns()

    def csr_metadata_bytes(self) -> int:
        """Bytes of plain int32 CSR: ``4 * (n + 1) + 4 * nnz`` per head, summed."""
        return int(sum(4 * (self.n + 1) + 4 * int(z) for z in self.nnz))

    def compression_ratio(self) -> float:
        """``csr_metadata_bytes() / metadata_bytes()`` (> 1 means ACSR is smaller)."""
        return self.csr_metadata_bytes() / float(self.metadata_bytes())

    def check_heads(self, num_heads: int) -> None:
        """Raise ``ValueError`` unless this mask fits an input with ``num_heads`` heads."""
        num_heads = check_int("number of heads", num_heads, 1)
        if self.num_heads not in (1, num_heads):
            raise ValueError(f"ACSR has {self.num_heads} head masks but the input has "
                             f"{num_heads} heads")

    def validate(self) -> None:
        """Check every layout invariant (O(nnz log nnz)); raise ``ValueError`` if broken."""
        used = self.seg_count > 0
        if (self.seg_count < 0).any() or (self.seg_step < 0).any():
            raise ValueError("negative segment count or step")
        if ((~used) & ((self.seg_start != 0) | (self.seg_step != 1))).any():
            raise ValueError("unused segment slots must be (start 0, step 1, count 0)")
        indexed = used & (self.seg_step == 0)
        if indexed.any():
            first = self.seg_start[indexed].astype(np.int64)
            if ((first < 0) | (first + self.seg_count[indexed] > self.indices.shape[1])).any():
                raise ValueError("indexed segment points outside indices")
        for head in range(self.num_heads):
            row, col = self.value_columns(head)
            if col.size and ((col < 0) | (col >= self.n)).any():
                raise ValueError(f"head {head}: column outside [0, {self.n})")
            key = np.sort(row * self.n + col)
            if (np.diff(key) == 0).any():
                dup = key[np.flatnonzero(np.diff(key) == 0)[0]]
                raise ValueError(f"head {head}: row {dup // self.n} has column "
                                 f"{dup % self.n} twice")
            ptr = np.zeros(self.n + 1, dtype=np.int64)
            np.cumsum(np.bincount(row, minlength=self.n), out=ptr[1:])
            if not np.array_equal(ptr, self.row_ptr[head]):
                raise ValueError(f"head {head}: row_ptr does not match segment counts")

    def __repr__(self) -> str:
        g = self.geometry()
        return (f"ACSR(n={self.n}, heads={self.num_heads}, nnz={int(self.nnz.sum())}, "
                f"density={self.density:.4g}, kind={g.kind!r}, "
                f"runs={sum(len(r) for r in self.runs)})")


def _checked_csr(indptr, indices, n: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate one head's CSR; return (row_of, col) int64 sorted by (row, col)."""
    where = f" (head {head})" if head else ""
    ptr = np.asarray(indptr)
    idx = np.asarray(indices)
    if ptr.ndim != 1 or ptr.shape[0] != n + 1:
        raise ValueError(f"indptr must have shape [n+1={n + 1}], got {ptr.shape}{where}")
    if idx.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {idx.shape}{where}")
    for name, a in (("indptr", ptr), ("indices", idx)):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {a.dtype}{where}")
    ptr = ptr.astype(np.int64)
    idx = idx.astype(np.int64)
    if ptr[0] != 0:
        raise ValueError(f"indptr[0] must be 0, got {ptr[0]}{where}")
    if (np.diff(ptr) < 0).any():
        bad = int(np.flatnonzero(np.diff(ptr) < 0)[0])
        raise ValueError(f"indptr must be non-decreasing; it drops at row {bad}{where}")
    if ptr[-1] != idx.shape[0]:
        raise ValueError(f"indptr[-1]={ptr[-1]} but indices has {idx.shape[0]} entries{where}")
    if idx.size and ((idx < 0) | (idx >= n)).any():
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise ValueError(f"column index {bad} outside [0, {n}){where}")
    row_of = np.repeat(np.arange(n, dtype=np.int64), np.diff(ptr))
    order = np.argsort(row_of * n + idx, kind="stable")
    row_of, idx = row_of[order], idx[order]
    repeated = (row_of[1:] == row_of[:-1]) & (idx[1:] == idx[:-1])
    if repeated.any():
        p = int(np.flatnonzero(repeated)[0])
        raise ValueError(f"column {idx[p]} appears twice in row {row_of[p]}{where}")
    return row_of, idx


def _head_tables(n: int, seg: SegmentList, csr, max_segments: int):
    """One head's (start, step, count) int64 [n, S_h] and indices int64 [L_h]."""
    per_row = seg.segments_per_row(n)
    irregular = per_row > max_segments
    affine = seg.take(~irregular[seg.row])
    slots = max(1, int(per_row[~irregular].max()) if (~irregular).any() else 1)
    start = np.zeros((n, slots), dtype=np.int64)
    step = np.ones((n, slots), dtype=np.int64)
    count = np.zeros((n, slots), dtype=np.int64)
    if len(affine):
        first_of_row = np.cumsum(affine.segments_per_row(n)) - affine.segments_per_row(n)
        slot = np.arange(len(affine)) - first_of_row[affine.row]
        start[affine.row, slot] = affine.start
        step[affine.row, slot] = affine.step
        count[affine.row, slot] = affine.count

    irregular_rows = np.flatnonzero(irregular)
    if not irregular_rows.size:
        return start, step, count, np.zeros(0, dtype=np.int64)
    if csr is None:
        odd = seg.take(irregular[seg.row])
        seg_id, _, col = expand_segments(odd)
        row_of = odd.row[seg_id]
        order = np.argsort(row_of * n + col, kind="stable")
        row_of, col = row_of[order], col[order]
    else:
        row_of, col = csr
        keep = irregular[row_of]
        row_of, col = row_of[keep], col[keep]
    row_nnz = np.bincount(row_of, minlength=n)[irregular_rows]
    offsets = np.cumsum(row_nnz) - row_nnz
    if col.shape[0] > INT32_MAX:
        raise ValueError(f"{col.shape[0]} irregular column indices exceed int32 offsets")
    start[irregular_rows, 0] = offsets
    step[irregular_rows, 0] = 0
    count[irregular_rows, 0] = row_nnz
    return start, step, count, col
