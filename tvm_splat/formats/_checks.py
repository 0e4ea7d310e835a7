"""Argument checks shared by the format modules: bad input raises ``ValueError`` early."""
from __future__ import annotations

import numbers

import numpy as np

__all__ = ["INT32_MAX", "check_int", "check_sequence_length", "int32_table"]

# ACSR tables, row offsets and kernel indices are int32: every value stored in them must fit.
INT32_MAX = int(np.iinfo(np.int32).max)


def check_int(what: str, value, minimum: int | None = None) -> int:
    """Return ``value`` as a Python int, or raise ``ValueError`` naming ``what``.

    Booleans are refused although they are ``numbers.Integral``: ``Window(True)`` is
    almost certainly a mistake.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def check_sequence_length(n) -> int:
    """Validate a sequence length ``n`` (number of query rows = key columns): an int in
    ``[1, INT32_MAX]``, since rows and columns are int32 in every table."""
    n = check_int("sequence length", n, 1)
    if n > INT32_MAX:
        raise ValueError(f"sequence length must be <= {INT32_MAX} (int32 tables), got {n}")
    return n


def int32_table(what: str, values) -> np.ndarray:
    """``values`` as a C-contiguous int32 array, or ``ValueError`` naming ``what`` when they
    are not integers or some value lies outside the int32 range (an unchecked cast would
    wrap: a step of 2**32 would become 0, which means a CSR segment)."""
    array = np.asarray(values)
    if array.dtype == object or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{what} must be an integer array within int32, got dtype {array.dtype}")
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < -INT32_MAX - 1 or high > INT32_MAX:
            bad = low if low < -INT32_MAX - 1 else high
            raise ValueError(f"{what} holds {bad}, outside the int32 range of ACSR tables")
    return np.ascontiguousarray(array, dtype=np.int32)
