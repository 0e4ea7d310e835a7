"""Argument checks shared by the format modules: bad input raises ``ValueError`` early."""
from __future__ import annotations

import numbers

__all__ = ["check_int", "check_sequence_length"]


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
    """Validate a sequence length ``n`` (number of query rows = key columns)."""
    return check_int("sequence length", n, 1)
