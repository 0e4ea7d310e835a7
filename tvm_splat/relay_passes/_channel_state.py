"""What the channel analysis records: tracked tensor states, groups, per-op plans.

How a tracked tensor is described (``TState``)
----------------------------------------------
``layout`` has one entry per tensor axis; each entry is the tuple of *factors* the axis is
made of, outermost first (an empty tuple is an axis of extent 1).  Factor kinds:

- ``G`` the group's channel axis at channel granularity (size C);
- ``U`` the group's unit index once C was split as (C/unit, unit) (the head axis);
- ``W`` the within-unit index (head_dim) of that split; ``U`` followed by ``W`` in one
  axis merges back to ``G``;
- ``A`` anything else (batch, tokens, spatial): never resized.

Exactly one ``G`` or ``U`` factor is present.  ``values`` (float64, shape (C,)) holds the
value every element of channel c takes for every input, NaN when input-dependent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import tvm


class Unsupported(Exception):
    """An op the chain cannot go through: the groups it touches are pinned (kept)."""


@dataclass(frozen=True)
class Factor:
    kind: str  # "G" | "U" | "W" | "A"
    size: int


Layout = tuple  # tuple[tuple[Factor, ...], ...]


@dataclass
class TState:
    """A tensor that carries channel group ``gid`` (see module docstring)."""

    gid: int
    layout: Layout
    values: np.ndarray

    @property
    def axis(self) -> int:
        return group_axis(self.layout)


@dataclass
class TupleState:
    items: list  # list[TState | None]


@dataclass
class WeightRef:
    """A constant weight as the op sees it: ``base`` then ``chain`` of layout steps.

    ``chain`` entries: ``("permute", axes)`` or ``("broadcast", leading_dims)`` (prepending
    batch dims, as the frontend does for batched linear layers).  ``array`` is the operand's
    value (None when ``base`` is a parameter without a value).
    """

    base: object
    chain: list
    name: str
    shape: tuple
    base_array: np.ndarray | None
    array: np.ndarray | None


@dataclass
class Boundary:
    """A consumer (dense/conv) of a group: the channel values it sees.

    ``finite`` (bool, (C,)) is False for channels whose slice of the consumer's weight holds
    a NaN/inf (removing such a channel would turn torch's ``0 * nan`` into a number).
    """

    name: str
    kind: str  # "dense" | "conv"
    padded: bool
    values: np.ndarray
    finite: np.ndarray


@dataclass
class Group:
    gid: int
    channels: int
    unit: int = 1
    members: list = field(default_factory=list)
    pins: list = field(default_factory=list)
    boundaries: list = field(default_factory=list)
    zero_hint: np.ndarray | None = None  # channels whose producer weights are zero
    # decision (filled by ``_channel_decide.decide``)
    keep: np.ndarray | None = None  # kept channel indices, sorted
    removed_units: list = field(default_factory=list)
    status: str = "unchanged"
    notes: list = field(default_factory=list)

    @property
    def keep_units(self) -> np.ndarray:
        return self.keep[:: self.unit] // self.unit


@dataclass
class DensePlan:
    weight: WeightRef
    in_gid: int | None
    out_gid: int | None
    in_values: np.ndarray | None


@dataclass
class ConvPlan:
    weight: WeightRef
    in_gid: int | None
    out_gid: int | None
    depthwise: bool
    in_values: np.ndarray | None


@dataclass
class BatchNormPlan:
    gid: int
    name: str
    itemsize: int


@dataclass
class ElementwisePlan:
    const_slices: list  # (arg index, const axis, numpy value)


# ----------------------------------------------------------------------------- helpers


def static_shape(expr) -> tuple | None:
    """The static shape of a Relax expression, None when unknown or symbolic."""
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    out = []
    for v in shape.values:
        if not isinstance(getattr(v, "value", None), int):
            return None  # symbolic dimension
        out.append(int(v.value))
    return tuple(out)


def is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.GenericConst) and hasattr(expr.value, "numpy")


def name_of(var) -> str:
    return getattr(var, "name", None) or getattr(var, "name_hint", "?")


def anon(d: int) -> tuple:
    """The factors of an untracked axis of extent ``d``."""
    return () if d == 1 else (Factor("A", d),)


def axis_extent(axis: tuple) -> int:
    return math.prod(f.size for f in axis)


def group_axis(layout: Layout) -> int:
    for i, axis in enumerate(layout):
        if any(f.kind in ("G", "U") for f in axis):
            return i
    raise AssertionError("tracked layout without a group factor")


def unit_zero(values: np.ndarray, unit: int) -> np.ndarray:
    """Per channel: True when every channel of its unit is 0."""
    z = (values == 0.0).reshape(-1, unit).all(axis=1)
    return np.repeat(z, unit)


def merge_units(axis: tuple, channels: int, unit: int) -> tuple:
    """Merge ``U`` followed by ``W`` back into ``G`` inside one axis."""
    out = list(axis)
    for i in range(len(out) - 1):
        if out[i].kind == "U" and out[i + 1].kind == "W" and out[i].size * out[i + 1].size == channels:
            out[i:i + 2] = [Factor("G", channels)]
            break
    return tuple(out)


def broadcast_layout(layout: Layout, out_shape: tuple) -> Layout:
    """``layout`` broadcast (numpy rules) to ``out_shape``; never over the group axis."""
    lead = len(out_shape) - len(layout)
    out = []
    for i, d in enumerate(out_shape):
        j = i - lead
        if j >= 0 and axis_extent(layout[j]) == d:
            out.append(layout[j])
        else:
            if j >= 0 and any(f.kind in ("G", "U") for f in layout[j]):
                raise Unsupported("broadcast over the channel axis")
            out.append(anon(d))
    return tuple(out)
