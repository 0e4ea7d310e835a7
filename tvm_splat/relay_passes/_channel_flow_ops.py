"""Handlers of the ops a channel group flows through: elementwise, unary, layout, reductions.

Registered by op name (``_channel_registry``) for every op of their family in
``tvm_splat.channel_rules.OP_RULES``.  Channel values follow the rule's ``zero`` /
``constant`` fields, except where the value can be computed exactly (unary functions,
elementwise arithmetic on constants).
"""

from __future__ import annotations

import math

import numpy as np

from ..channel_rules import OP_RULES, Value, ops_of_family
from ._channel_registry import register
from ._channel_state import (
    ElementwisePlan,
    Factor,
    TState,
    Unsupported,
    anon,
    broadcast_layout,
    merge_units,
    static_shape,
)

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(v):
    return v * 0.5 * (1.0 + _erf(v * _SQRT1_2))


def _gelu_tanh(v):
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


# v -> f(v) for a channel that holds the constant v (NaN stays NaN); call gives the attrs.
UNARY_VALUE = {
    "relax.nn.relu": lambda v, call: np.maximum(v, 0.0),
    "relax.nn.gelu": lambda v, call: _gelu(v),
    "relax.nn.gelu_tanh": lambda v, call: _gelu_tanh(v),
    "relax.nn.silu": lambda v, call: v * _sigmoid(v),
    "relax.tanh": lambda v, call: np.tanh(v),
    "relax.sigmoid": lambda v, call: _sigmoid(v),
    "relax.negative": lambda v, call: -v,
    "relax.exp": lambda v, call: np.exp(v),
    "relax.nn.leakyrelu": lambda v, call: np.where(v >= 0, v, v * float(call.attrs.alpha)),
}


def rule_values(op_name: str, values: np.ndarray) -> np.ndarray:
    """Channel values after ``op_name`` as its rule states them: 0 stays 0 or becomes
    input-dependent (``rule.zero``), constants stay or become input-dependent (``rule.constant``)."""
    rule = OP_RULES[op_name]
    if rule.zero is Value.CONSTANT:
        raise AssertionError(f"{op_name}: a constant made from 0 needs the op's own value function")
    out = values.copy() if rule.constant is Value.CONSTANT else np.full_like(values, np.nan)
    out[values == 0.0] = 0.0 if rule.zero is Value.ZERO else np.nan
    return out


# ----------------------------------------------------------------------------- elementwise


@register(*ops_of_family("elementwise"))
def _elementwise(an, var, call) -> None:
    args = list(call.args)
    states = [an.st(a) for a in args]
    tracked = [s for s in states if s is not None]
    if not tracked:
        return
    out_shape = an.out_shape(var)
    orank = len(out_shape)
    ref = tracked[0]
    ax_out = orank - (len(ref.layout) - ref.axis)
    factors = ref.layout[ref.axis]
    gid = ref.gid
    for s in tracked[1:]:
        if orank - (len(s.layout) - s.axis) != ax_out or s.layout[s.axis] != factors:
            raise Unsupported("elementwise op on tensors carrying groups on different axes")
        gid = an.union(gid, s.gid)
    C = an.group(gid).channels
    plain = factors == (Factor("G", C),)
    contribs, slices = [], []
    for i, (a, s) in enumerate(zip(args, states)):
        if s is not None:
            contribs.append(s.values)
        else:
            contribs.append(_untracked_operand(an, call, i, a, ax_out, orank, C, plain, slices))
    an.states[var] = TState(gid, broadcast_layout(ref.layout, out_shape), _combine(call.op.name, contribs, C))
    if slices:
        an.plans[var] = ElementwisePlan(slices)


def _untracked_operand(an, call, i, a, ax_out: int, orank: int, C: int, plain: bool, slices: list):
    """Channel values of an operand that carries no group (None = unknown); records the
    constants the rewrite must slice along the group axis in ``slices``."""
    arr = an.const_value(a)
    shape = arr.shape if arr is not None else static_shape(a)
    if shape is None:
        raise Unsupported("operand with unknown shape")
    axc = ax_out - (orank - len(shape))
    full = axc >= 0 and shape[axc] != 1
    if arr is None:
        if full:
            raise Unsupported(
                f"`{call.op.name}` mixes the group with an untracked activation over the "
                "channel axis (e.g. a residual from the block input): those channels "
                "are never constant and cannot be removed")
        return None
    if full:
        slices.append((i, axc, arr))
    if arr.size == 1:
        return np.full(C, float(arr.reshape(-1)[0]))
    if full and plain and arr.size == C:
        return arr.reshape(-1).astype(np.float64)
    return None


def _combine(op: str, contribs: list, C: int) -> np.ndarray:
    """Channel values of an elementwise op given per-operand values (None = unknown)."""
    nan = np.full(C, np.nan)
    with np.errstate(all="ignore"):
        if OP_RULES[op].zero_absorbs:  # multiply
            zero = np.zeros(C, bool)
            prod = np.ones(C)
            for c in contribs:
                if c is None:
                    prod = nan
                else:
                    zero |= c == 0.0
                    prod = prod * c
            return np.where(zero, 0.0, prod)
        if any(c is None for c in contribs):
            return nan
        binary = {"relax.add": np.add, "relax.subtract": np.subtract, "relax.divide": np.divide,
                  "relax.maximum": np.maximum, "relax.minimum": np.minimum}
        if op in binary:
            return binary[op](contribs[0], contribs[1])
        if op == "relax.where":
            _, x, y = contribs
            return np.where(x == y, x, np.nan)
    return nan


# ----------------------------------------------------------------------------- unary / fill


@register(*ops_of_family("unary"))
def _unary(an, var, call) -> None:
    s = an.st(call.args[0])
    if s is None:
        return
    an.states[var] = TState(s.gid, s.layout, _unary_values(call, s.values))


def _unary_values(call, v: np.ndarray) -> np.ndarray:
    name = call.op.name
    with np.errstate(all="ignore"):
        if name in UNARY_VALUE:
            return UNARY_VALUE[name](v, call)
        if name == "relax.astype" and str(call.attrs.dtype).startswith(("float", "bfloat")):
            return v.astype(str(call.attrs.dtype)).astype(np.float64)
        if name == "relax.clip":
            try:
                lo, hi = (float(a.value.value if hasattr(a.value, "value") else a.value) for a in call.args[1:3])
            except Exception:  # noqa: BLE001 - unknown clip bounds: input-dependent
                return np.full_like(v, np.nan)
            return np.clip(v, lo, hi)
    return np.full_like(v, np.nan)


@register(*ops_of_family("fill_like"))
def _fill_like(an, var, call) -> None:
    s = an.st(call.args[0])
    if s is None:
        return
    fill = {"relax.zeros_like": 0.0, "relax.ones_like": 1.0}.get(call.op.name)
    if fill is None:
        c = an.const_value(call.args[1]) if len(call.args) > 1 else None
        fill = float(c.reshape(-1)[0]) if c is not None and c.size == 1 else np.nan
    an.states[var] = TState(s.gid, s.layout, np.full_like(s.values, fill))


# ----------------------------------------------------------------------------- layout


@register(*ops_of_family("layout"))
def _layout(an, var, call) -> None:
    s = an.st(call.args[0])
    if s is None:
        return
    out_shape = an.out_shape(var)
    name = call.op.name
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        axes = list(reversed(range(len(s.layout)))) if axes is None else [int(a) for a in axes]
        layout = tuple(s.layout[a] for a in axes)
    elif name == "relax.broadcast_to":
        layout = broadcast_layout(s.layout, out_shape)
    else:
        layout = _reshape(an.group(s.gid), s, out_shape)
    an.states[var] = TState(s.gid, layout, rule_values(name, s.values))


def _reshape(g, s: TState, out_shape: tuple) -> tuple:
    """The layout of ``s`` reshaped to ``out_shape``; a split of the channel axis sets the
    group's unit (heads)."""
    queue = [f for axis in s.layout for f in axis]
    out = []
    for d in out_shape:
        axis, need = [], d
        while need > 1:
            if not queue:
                raise Unsupported("reshape the analysis cannot follow")
            f = queue.pop(0)
            if need % f.size == 0:
                axis.append(f)
                need //= f.size
            elif f.size % need == 0:
                _split_factor(g, f, need, axis, queue)
                need = 1
            else:
                raise Unsupported("reshape the analysis cannot follow")
        out.append(merge_units(tuple(axis), g.channels, g.unit))
    if any(f.size != 1 for f in queue):
        raise Unsupported("reshape the analysis cannot follow")
    layout = tuple(out)
    if sum(f.kind in ("G", "U") for ax in layout for f in ax) != 1:
        raise Unsupported("reshape loses the channel axis")
    return layout


def _split_factor(g, f: Factor, need: int, axis: list, queue: list) -> None:
    """Split ``f`` as (need, f.size // need): the outer part joins ``axis``."""
    inner = f.size // need
    if f.kind == "G":
        if g.unit not in (1, inner):
            raise Unsupported(f"reshape splits heads of size {inner}, group already uses {g.unit}")
        g.unit = inner
        axis.append(Factor("U", need))
        queue.insert(0, Factor("W", inner))
    elif f.kind in ("A", "W"):
        axis.append(Factor("A", need))
        queue.insert(0, Factor("A", inner))
    else:
        raise Unsupported("reshape splits the head axis")


# ----------------------------------------------------------------------------- reductions


@register(*ops_of_family("reduce"))
def _reduce(an, var, call) -> None:
    s = an.st(call.args[0])
    if s is None:
        return
    rank = len(s.layout)
    axes = call.attrs.axis
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    if s.axis in axes:
        raise Unsupported(f"`{call.op.name}` reduces over the channel axis")
    keep = bool(call.attrs.keepdims)
    layout = tuple(() if i in axes else ax for i, ax in enumerate(s.layout) if keep or i not in axes)
    an.states[var] = TState(s.gid, layout, rule_values(call.op.name, s.values))


@register(*ops_of_family("softmax"))
def _softmax(an, var, call) -> None:
    s = an.st(call.args[0])
    if s is None:
        return
    if int(call.attrs.axis) % len(s.layout) == s.axis:
        raise Unsupported("softmax over the channel axis")
    an.states[var] = TState(s.gid, s.layout, rule_values(call.op.name, s.values))


@register(*ops_of_family("norm"))
def _norm(an, var, call) -> None:
    s = an.st(call.args[0])
    if s is None:
        return
    rank = len(s.layout)
    if s.axis in [int(a) % rank for a in call.attrs.axes]:
        raise Unsupported(f"`{call.op.name}` normalises over the channel axis")
    an.states[var] = TState(s.gid, s.layout, rule_values(call.op.name, s.values))


@register(*ops_of_family("pool2d"))
def _pool2d(an, var, call) -> None:
    s = an.st(call.args[0])
    if s is None:
        return
    if str(call.attrs.layout) != "NCHW" or s.axis != 1:
        raise Unsupported("pooling over the channel axis / non-NCHW layout")
    shape = an.out_shape(var)
    layout = tuple(s.layout[1] if i == 1 else anon(d) for i, d in enumerate(shape))
    an.states[var] = TState(s.gid, layout, rule_values(call.op.name, s.values))
