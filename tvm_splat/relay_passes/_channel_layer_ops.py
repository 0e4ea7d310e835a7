"""Handlers of the layers that create and end channel groups: matmul, conv2d, batch_norm.

Registered by op name (``_channel_registry``); rules in ``tvm_splat.channel_rules``.
"""

from __future__ import annotations

import numpy as np

from ._channel_registry import register
from ._channel_state import (
    BatchNormPlan,
    ConvPlan,
    DensePlan,
    Factor,
    TState,
    TupleState,
    Unsupported,
    anon,
    axis_extent,
    name_of,
    static_shape,
    unit_zero,
)

_NO_VALUE = "weight `{}` has no constant value (bind it or pass params=)"


# ----------------------------------------------------------------------------- matmul


@register("relax.matmul")
def _matmul(an, var, call) -> None:
    a, b = call.args
    sa, sb = an.st(a), an.st(b)
    w = an.weight_ref(b) if sb is None else None
    if w is not None and len(w.shape) >= 2:
        _dense(an, var, sa, w)
    elif sa is not None or sb is not None:
        _batched_matmul(an, var, call, sa, sb)


def _dense(an, var, sa: TState | None, w) -> None:
    """``x @ W`` with a constant ``W`` of shape (..., K, N): consumer of K, producer of N."""
    out_shape = an.out_shape(var)
    N = w.shape[-1]
    in_gid = out_gid = None
    if w.array is None and sa is not None:
        an.pin(sa.gid, _NO_VALUE.format(w.name))
    if sa is not None:
        rank = len(sa.layout)
        if sa.axis == rank - 1:
            w2 = None if w.array is None else w.array.reshape(-1, *w.shape[-2:])[0]
            finite = np.ones(w.shape[-2], bool) if w2 is None else np.isfinite(w2).all(axis=1)
            in_gid = an.consume(sa, w, "dense", False, finite)
        elif sa.axis == rank - 2 or len(out_shape) == rank:
            _rows_pass_through(an, var, sa, N, out_shape)
        else:
            raise Unsupported("dense layer with broadcast batch over the group")
    if var not in an.states:
        zero = None
        if w.array is not None:
            w2 = w.array.reshape(-1, *w.shape[-2:])[0]
            zero = np.abs(w2).max(axis=0) <= an.tol if w2.shape[0] else np.ones(N, bool)
        out_gid = an.produce(var, w, N, zero, len(out_shape) - 1)
    an.plans[var] = DensePlan(w, in_gid, out_gid, None if in_gid is None else sa.values.copy())


def _rows_pass_through(an, var, sa: TState, N: int, out_shape: tuple) -> None:
    """Group on rows/batch of ``x``: it flows through; the output columns are no new group."""
    layout = list(sa.layout[:-1]) + [anon(N)]
    lead = len(out_shape) - len(layout)
    layout = [anon(d) for d in out_shape[:lead]] + layout
    vals = np.where(sa.values == 0.0, 0.0, np.nan)
    an.states[var] = TState(sa.gid, tuple(layout), vals)


def _operand_position(s: TState, is_a: bool, orank: int) -> tuple:
    """Where ``s``'s group lands in ``a @ b``: ("M"|"N"|"B", output axis)."""
    r, ax = len(s.layout), s.axis
    if (is_a and ax == r - 1) or (not is_a and ax == r - 2):
        raise Unsupported("matmul contracts the channel group between two activations")
    if is_a and ax == r - 2:
        return ("M", orank - 2)
    if not is_a and ax == r - 1:
        return ("N", orank - 1)
    return ("B", orank - (r - ax))


def _batched_matmul(an, var, call, sa, sb) -> None:
    """Two activations (attention): tie over the head/batch axis; contraction = barrier."""
    out_shape = an.out_shape(var)
    orank = len(out_shape)
    tracked = [(s, _operand_position(s, is_a, orank)) for s, is_a in ((sa, True), (sb, False)) if s is not None]
    if len(tracked) == 2:
        (s1, p1), (s2, p2) = tracked
        if p1 != p2 or p1[0] != "B" or s1.layout[s1.axis] != s2.layout[s2.axis]:
            raise Unsupported("matmul of two tensors carrying groups on different axes")
        gid = an.union(s1.gid, s2.gid)
    else:
        (s1, p1), = tracked
        gid = s1.gid
        oshape = static_shape(call.args[1] if sa is not None else call.args[0])
        if p1[0] == "B" and oshape is not None:
            oax = p1[1] - (orank - len(oshape))
            if oax >= 0 and oshape[oax] != 1:
                raise Unsupported("batched matmul with an untracked operand over the group axis")
    unit = an.group(gid).unit
    zero = np.zeros(an.group(gid).channels, bool)
    for s, p in tracked:
        zero |= unit_zero(s.values, unit) if p[0] == "B" else s.values == 0.0
    ax_out = tracked[0][1][1]
    factors = tracked[0][0].layout[tracked[0][0].axis]
    # Keep the operands' own factors on M (rows of a) and N (columns of b) so a
    # head_dim ("W") axis survives P @ v and can merge back with the head axis later.
    layout = [factors if i == ax_out else anon(d) for i, d in enumerate(out_shape)]
    if sa is not None and axis_extent(sa.layout[-2]) == out_shape[-2] and ax_out != orank - 2:
        layout[-2] = sa.layout[-2]
    if sb is not None and axis_extent(sb.layout[-1]) == out_shape[-1] and ax_out != orank - 1:
        layout[-1] = sb.layout[-1]
    an.states[var] = TState(gid, tuple(layout), np.where(zero, 0.0, np.nan))


# ----------------------------------------------------------------------------- conv2d


@register("relax.nn.conv2d")
def _conv2d(an, var, call) -> None:
    x, wexpr = call.args
    sx = an.st(x)
    at = call.attrs
    if (str(at.data_layout), str(at.kernel_layout), str(at.out_layout or at.data_layout)) != ("NCHW", "OIHW", "NCHW"):
        if sx is not None:
            raise Unsupported("conv2d layout other than NCHW/OIHW")
        return
    w = an.weight_ref(wexpr)
    if w is None or len(w.shape) != 4 or w.chain:
        if sx is not None:
            raise Unsupported("conv2d weight is not a constant tensor")
        return
    if sx is not None and sx.axis != 1:
        raise Unsupported("conv2d over a group on a non-channel axis")
    O, I = w.shape[:2]
    groups = int(at.groups)
    filt_zero = None if w.array is None else np.abs(w.array).reshape(O, -1).max(axis=1) <= an.tol
    cin = static_shape(x)[1] if static_shape(x) else None
    if groups == 1:
        _dense_conv(an, var, sx, w, any(int(p) != 0 for p in at.padding), filt_zero)
    elif groups == O == cin and I == 1:
        _depthwise_conv(an, var, sx, w, any(int(p) != 0 for p in at.padding), filt_zero)
    elif sx is not None:
        raise Unsupported("grouped conv2d")


def _dense_conv(an, var, sx, w, padded: bool, filt_zero) -> None:
    in_gid = None
    if sx is not None:
        if w.array is None:
            an.pin(sx.gid, _NO_VALUE.format(w.name))
        finite = np.ones(w.shape[1], bool) if w.array is None else np.isfinite(w.array).all(axis=(0, 2, 3))
        in_gid = an.consume(sx, w, "conv", padded, finite)
    out_gid = an.produce(var, w, w.shape[0], filt_zero, 1)
    an.plans[var] = ConvPlan(w, in_gid, out_gid, False, None if sx is None else sx.values.copy())


def _depthwise_conv(an, var, sx, w, padded: bool, filt_zero) -> None:
    """groups = C_in = C_out: a new group (untracked input) or a passthrough with filters sliced."""
    O = w.shape[0]
    if sx is None:
        out_gid = an.produce(var, w, O, filt_zero, 1, suffix="dw")
        an.plans[var] = ConvPlan(w, None, out_gid, True, None)
        return
    if w.array is None:
        raise Unsupported(f"weight `{w.name}` has no constant value")
    if sx.layout[1] != (Factor("G", O),):
        raise Unsupported("depthwise conv over a head layout")
    v = sx.values
    vals = np.where(filt_zero | (v == 0.0), 0.0, v * w.array.reshape(O, -1).sum(1) if not padded else np.nan)
    shape = an.out_shape(var)
    layout = tuple(sx.layout[1] if i == 1 else anon(d) for i, d in enumerate(shape))
    an.states[var] = TState(sx.gid, layout, vals)
    an.group(sx.gid).members.append(f"{w.name}.dw")
    an.plans[var] = ConvPlan(w, sx.gid, None, True, None)


# ----------------------------------------------------------------------------- batch_norm


@register("relax.nn.batch_norm")
def _batch_norm(an, var, call) -> None:
    sx = an.st(call.args[0])
    if sx is None:
        return
    at = call.attrs
    if bool(getattr(at, "training", False)):
        raise Unsupported("batch_norm in training mode (use model.eval())")
    C = an.group(sx.gid).channels
    axis = int(at.axis) % len(sx.layout)
    if axis != sx.axis or sx.layout[axis] != (Factor("G", C),):
        raise Unsupported("batch_norm axis is not the group's channel axis")
    params = [an.const_value(a) for a in call.args[1:5]]
    if any(p is None for p in params):
        raise Unsupported("batch_norm parameters are not constants")
    gamma, beta, mean, var_ = (p.astype(np.float64).reshape(-1) for p in params)
    if not bool(at.scale):
        gamma = np.ones_like(gamma)
    if not bool(at.center):
        beta = np.zeros_like(beta)
    vals = (sx.values - mean) / np.sqrt(var_ + float(at.epsilon)) * gamma + beta
    name = an.const_names.get(call.args[1], f"batch_norm@{name_of(var)}")
    an.group(sx.gid).members.append(name)
    stats = TState(sx.gid, ((Factor("G", C),),), np.full(C, np.nan))
    an.states[var] = TupleState([TState(sx.gid, sx.layout, vals), stats, stats])
    an.plans[var] = BatchNormPlan(sx.gid, name, params[0].dtype.itemsize)
