"""Run compression of ACSR row tables.

A *run* is a block of consecutive rows in which every segment slot s has a constant step
and a start and count affine in the row index::

    start[row0 + r, s] = start0[s] + dstart[s] * r
    count[row0 + r, s] = count0[s] + dcount[s] * r          for 0 <= r < nrows
    step [row0 + r, s] = step[s]

A sliding window clamped at both borders is 3 runs, whatever n is. Runs are found
greedily (longest run from the first row, then the next, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .segments import greedy_run_starts

__all__ = ["Run", "RunTable", "find_runs"]

# int32 words per run in the metadata count: row0, nrows, value_offset + 5 per segment slot
RUN_HEADER_WORDS = 3
RUN_WORDS_PER_SEGMENT = 5


@dataclass(frozen=True)
class Run:
    """One run; per-segment fields are tuples of length S (segment slots)."""

    row0: int
    nrows: int
    value_offset: int  # row_ptr[row0]: where the run's values start
    start0: tuple[int, ...]
    dstart: tuple[int, ...]
    step: tuple[int, ...]
    count0: tuple[int, ...]
    dcount: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class RunTable:
    """The runs of one head as arrays (R runs, S segment slots).

    ``row0``, ``nrows``, ``value_offset``: int64 [R]; ``start0``, ``dstart``, ``step``,
    ``count0``, ``dcount``: int64 [R, S]. Runs are in row order and cover rows 0..n-1.
    """

    row0: np.ndarray
    nrows: np.ndarray
    value_offset: np.ndarray
    start0: np.ndarray
    dstart: np.ndarray
    step: np.ndarray
    count0: np.ndarray
    dcount: np.ndarray

    def __len__(self) -> int:
        return int(self.row0.shape[0])

    def __getitem__(self, r: int) -> Run:
        return Run(int(self.row0[r]), int(self.nrows[r]), int(self.value_offset[r]),
                   *(tuple(int(v) for v in a[r])
                     for a in (self.start0, self.dstart, self.step, self.count0, self.dcount)))

    def __iter__(self):
        return (self[r] for r in range(len(self)))

    @property
    def num_segments(self) -> int:
        return int(self.start0.shape[1])

    def nbytes(self) -> int:
        """Bytes of the runs stored as int32 words."""
        return 4 * len(self) * (RUN_HEADER_WORDS + RUN_WORDS_PER_SEGMENT * self.num_segments)

    def expand(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-row tables rebuilt from the runs.

        Returns (seg_start, seg_step, seg_count) int64 [n, S] and row_ptr int64 [n+1].
        """
        run_of_row = np.repeat(np.arange(len(self)), self.nrows)
        r = (np.arange(run_of_row.shape[0]) - self.row0[run_of_row])[:, None]
        start = self.start0[run_of_row] + self.dstart[run_of_row] * r
        count = self.count0[run_of_row] + self.dcount[run_of_row] * r
        step = self.step[run_of_row]
        # within a run the row sizes are affine, so offsets are a closed-form sum; here we
        # simply accumulate from each run's value_offset
        row_nnz = count.sum(axis=1)
        within = np.cumsum(row_nnz) - row_nnz
        run_base = within[self.row0] if len(self) else within
        row_ptr = np.empty(run_of_row.shape[0] + 1, dtype=np.int64)
        row_ptr[:-1] = self.value_offset[run_of_row] + within - run_base[run_of_row]
        row_ptr[-1] = (row_ptr[-2] + row_nnz[-1]) if row_nnz.size else 0
        return start, step, count, row_ptr


def find_runs(seg_start: np.ndarray, seg_step: np.ndarray, seg_count: np.ndarray,
              row_ptr: np.ndarray) -> RunTable:
    """Greedy maximal runs of one head's tables.

    ``seg_start``, ``seg_step``, ``seg_count``: int [n, S]; ``row_ptr``: int [n+1].
    """
    start = np.asarray(seg_start, dtype=np.int64)
    step = np.asarray(seg_step, dtype=np.int64)
    count = np.asarray(seg_count, dtype=np.int64)
    n = int(start.shape[0])
    pair_ok = (step[1:] == step[:-1]).all(axis=1)
    key = np.concatenate([start[1:] - start[:-1], count[1:] - count[:-1]], axis=1)
    same_key = (key[1:] == key[:-1]).all(axis=1)
    is_start = greedy_run_starts(pair_ok, same_key, np.array([0]), np.array([n]))
    row0 = np.flatnonzero(is_start).astype(np.int64)
    nrows = np.diff(np.concatenate((row0, [n])))
    nxt = np.minimum(row0 + 1, n - 1)
    multi = (nrows > 1)[:, None]
    return RunTable(
        row0=row0,
        nrows=nrows,
        value_offset=np.asarray(row_ptr, dtype=np.int64)[row0],
        start0=start[row0],
        dstart=np.where(multi, start[nxt] - start[row0], 0),
        step=step[row0],
        count0=count[row0],
        dcount=np.where(multi, count[nxt] - count[row0], 0),
    )
