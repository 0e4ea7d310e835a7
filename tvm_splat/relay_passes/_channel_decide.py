"""Decide, per channel group, which units every consumer can absorb (``keep`` / ``removed_units``)."""

from __future__ import annotations

import numpy as np

from ._channel_state import Group


def decide(groups, tol: float) -> None:
    """Fill ``keep``, ``removed_units``, ``status`` and ``notes`` of every group in ``groups``."""
    for g in groups:
        g.keep = np.arange(g.channels)
        if g.pins:
            g.status = "skipped"
            _note_pinned_zeros(g)
            continue
        if not g.boundaries:
            g.notes.append("no consumer layer: chain ends without a dense/conv input")
            continue
        ok, blocked = _absorbable(g, tol)
        unit_ok = ok.reshape(-1, g.unit).all(axis=1)
        if unit_ok.all():
            unit_ok[0] = False
            g.notes.append("every unit was removable; unit 0 is kept so no tensor becomes empty")
        g.removed_units = [int(u) for u in np.where(unit_ok)[0]]
        g.keep = np.array([c for c in range(g.channels) if not unit_ok[c // g.unit]], dtype=np.int64)
        g.status = "pruned" if g.removed_units else "unchanged"
        _note_blocked_zeros(g, unit_ok, blocked)


def _absorbable(g: Group, tol: float) -> tuple[np.ndarray, dict]:
    """(bool (C,): every consumer absorbs the channel, unit -> why the first blocked one is kept)."""
    ok = np.ones(g.channels, bool)
    blocked = {}
    for b in g.boundaries:
        v = b.values
        finite = np.isfinite(v)
        zero = finite & (np.abs(v) <= tol)
        absorb = (zero | (finite & (b.kind == "dense" or not b.padded))) & b.finite
        for c in np.where(~absorb)[0]:
            blocked.setdefault(c // g.unit, _why_blocked(b, c, finite[c]))
        ok &= absorb
    return ok, blocked


def _why_blocked(b, c: int, finite_value: bool) -> str:
    if not b.finite[c]:
        return f"`{b.name}` holds NaN/inf for this channel (kept so the output matches the model)"
    if finite_value:
        return f"constant {b.values[c]:.4g} would reach zero-padded conv `{b.name}` (inexact at borders)"
    return f"value at `{b.name}` depends on the input (a tied branch is not zero)"


def _note_pinned_zeros(g: Group) -> None:
    if g.zero_hint is not None:
        n = int(g.zero_hint.reshape(-1, g.unit).all(axis=1).sum())
        if n:
            g.notes.append(f"{n} unit(s) with zero weights kept because the group is pinned")


def _note_blocked_zeros(g: Group, unit_ok: np.ndarray, blocked: dict) -> None:
    if g.zero_hint is None:
        return
    hint_units = g.zero_hint.reshape(-1, g.unit).all(axis=1)
    for u in np.where(hint_units & ~unit_ok)[0]:
        if int(u) in blocked:
            g.notes.append(f"unit {int(u)} has zero weights but is kept: {blocked[int(u)]}")


def folds(g: Group, values: np.ndarray, tol: float) -> np.ndarray:
    """Constant input channels a consumer must absorb: value where removed, else 0."""
    removed = np.ones(g.channels, bool)
    removed[g.keep] = False
    return np.where(removed & np.isfinite(values) & (np.abs(values) > tol), values, 0.0)
