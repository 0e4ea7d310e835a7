"""Channel-group analysis of one Relax function: find groups, follow them, decide.

Reads the function only; the result (``FunctionAnalysis``: per-var tensor states, per-op
plans, groups with their decisions) is what ``_channel_rewrite`` applies.  The rules are
those of ``_channel_groups`` (module docstring and ``OP_RULES``).

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
from tvm import relax

from ._channel_groups import OP_RULES


class Unsupported(Exception):
    """An op the chain cannot go through: the groups it touches are pinned (kept)."""


@dataclass(frozen=True)
class Factor:
    kind: str  # "G" | "U" | "W" | "A"
    size: int


Layout = tuple  # tuple[tuple[Factor, ...], ...]


def _anon(d: int) -> tuple:
    return () if d == 1 else (Factor("A", d),)


def axis_extent(axis: tuple) -> int:
    return math.prod(f.size for f in axis)


def group_axis(layout: Layout) -> int:
    for i, axis in enumerate(layout):
        if any(f.kind in ("G", "U") for f in axis):
            return i
    raise AssertionError("tracked layout without a group factor")


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
    """A consumer (dense/conv) of a group: the channel values it sees."""

    name: str
    kind: str  # "dense" | "conv"
    padded: bool
    values: np.ndarray


@dataclass
class Group:
    gid: int
    channels: int
    unit: int = 1
    members: list = field(default_factory=list)
    pins: list = field(default_factory=list)
    boundaries: list = field(default_factory=list)
    zero_hint: np.ndarray | None = None  # channels whose producer weights are zero
    # decision (filled by FunctionAnalysis.decide)
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


def static_shape(expr) -> tuple | None:
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


def _is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.GenericConst) and hasattr(expr.value, "numpy")


_SQRT1_2 = 1.0 / math.sqrt(2.0)
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(v):
    return v * 0.5 * (1.0 + _erf(v * _SQRT1_2))


def _gelu_tanh(v):
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


# v -> f(v) for a channel that holds the constant v (NaN stays NaN).
UNARY_VALUE = {
    "relax.nn.relu": lambda v, c: np.maximum(v, 0.0),
    "relax.nn.gelu": lambda v, c: _gelu(v),
    "relax.nn.gelu_tanh": lambda v, c: _gelu_tanh(v),
    "relax.nn.silu": lambda v, c: v * _sigmoid(v),
    "relax.tanh": lambda v, c: np.tanh(v),
    "relax.sigmoid": lambda v, c: _sigmoid(v),
    "relax.negative": lambda v, c: -v,
    "relax.exp": lambda v, c: np.exp(v),
    "relax.nn.leakyrelu": lambda v, c: np.where(v >= 0, v, v * float(c.attrs.alpha)),
    "relax.nn.dropout_identity": lambda v, c: v,
}


class FunctionAnalysis:
    """Follow every channel group of ``func`` (a Relax function) and decide what goes.

    ``const_names`` maps constants to readable parameter names; ``weight_params`` are the
    function parameters that are weights without a value (their layers are skipped).
    """

    def __init__(self, func, fname: str, tol: float, const_names: dict, weight_params: set):
        self.func = func
        self.fname = fname
        self.tol = float(tol)
        self.const_names = const_names
        self.weight_params = weight_params
        self.bound: dict = {}
        self.states: dict = {}
        self.plans: dict = {}
        self.groups: dict[int, Group] = {}
        self.parent: dict[int, int] = {}
        self._const_cache: dict = {}

    # ------------------------------------------------------------------ groups
    def new_group(self, channels: int, member: str, zero: np.ndarray | None) -> int:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.groups[gid] = Group(gid, channels, members=[member],
                                 zero_hint=None if zero is None else zero.copy())
        return gid

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def group(self, gid: int) -> Group:
        return self.groups[self.find(gid)]

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ga, gb = self.groups[ra], self.groups[rb]
        if ga.channels != gb.channels:
            raise Unsupported("tied groups have different channel counts")
        if ga.unit != gb.unit and min(ga.unit, gb.unit) > 1:
            raise Unsupported(f"tied groups split into different head sizes ({ga.unit} vs {gb.unit})")
        self.parent[rb] = ra
        ga.unit = max(ga.unit, gb.unit)
        ga.members += [m for m in gb.members if m not in ga.members]
        ga.pins += gb.pins
        ga.boundaries += gb.boundaries
        if gb.zero_hint is not None:
            ga.zero_hint = gb.zero_hint if ga.zero_hint is None else (ga.zero_hint | gb.zero_hint)
        del self.groups[rb]
        return ra

    def pin(self, gid: int, reason: str) -> None:
        g = self.group(gid)
        if reason not in g.pins:
            g.pins.append(reason)

    def _tracked_in(self, expr) -> list:
        """All tracked states referenced by ``expr`` (args of calls, tuple fields)."""
        out = []
        if isinstance(expr, relax.Var):
            st = self.states.get(expr)
            if isinstance(st, TState):
                out.append(st)
            elif isinstance(st, TupleState):
                out += [s for s in st.items if s is not None]
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                out += self._tracked_in(f)
        elif isinstance(expr, tvm.ir.Call):
            for a in expr.args:
                out += self._tracked_in(a)
        elif isinstance(expr, tvm.ir.TupleGetItem):
            out += self._tracked_in(expr.tuple_value)
        elif isinstance(expr, relax.SeqExpr):
            out += self._tracked_in(expr.body)
        return out

    def _pin_expr(self, expr, reason: str) -> None:
        for st in self._tracked_in(expr):
            self.pin(st.gid, reason)

    # ------------------------------------------------------------------ constants
    def const_value(self, expr) -> np.ndarray | None:
        """numpy value of a constant, or of a var bound to layout ops of a constant."""
        if _is_const(expr):
            return expr.value.numpy()
        if not isinstance(expr, relax.Var) or expr not in self.bound:
            return None
        if expr in self._const_cache:
            return self._const_cache[expr]
        val = None
        v = self.bound[expr]
        if isinstance(v, tvm.ir.Call) and isinstance(v.op, tvm.ir.Op) and v.args:
            src = self.const_value(v.args[0])
            shape = static_shape(expr)
            name = v.op.name
            if src is not None and shape is not None:
                if name in ("relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten"):
                    val = src.reshape(shape)
                elif name == "relax.permute_dims":
                    axes = v.attrs.axes
                    val = np.transpose(src, None if axes is None else [int(a) for a in axes])
                elif name == "relax.broadcast_to":
                    val = np.broadcast_to(src, shape)
                elif name == "relax.astype":
                    val = src.astype(str(v.attrs.dtype))
        self._const_cache[expr] = val
        return val

    def weight_ref(self, expr) -> WeightRef | None:
        """Resolve a dense/conv weight operand to its constant (or weight parameter)."""
        chain = []
        e = expr
        while True:
            if _is_const(e) or (isinstance(e, relax.Var) and e in self.weight_params):
                break
            if not isinstance(e, relax.Var) or e not in self.bound:
                return None
            v = self.bound[e]
            if not (isinstance(v, tvm.ir.Call) and isinstance(v.op, tvm.ir.Op)):
                return None
            if v.op.name == "relax.permute_dims":
                in_shape = static_shape(v.args[0])
                if in_shape is None:
                    return None
                axes = v.attrs.axes
                axes = tuple(reversed(range(len(in_shape)))) if axes is None else tuple(int(a) for a in axes)
                chain.append(("permute", axes))
            elif v.op.name == "relax.broadcast_to":
                in_shape, out_shape = static_shape(v.args[0]), static_shape(e)
                if in_shape is None or out_shape is None or out_shape[len(out_shape) - len(in_shape):] != in_shape:
                    return None
                chain.append(("broadcast", out_shape[: len(out_shape) - len(in_shape)]))
            else:
                return None
            e = v.args[0]
        chain.reverse()
        shape = static_shape(expr)
        if shape is None:
            return None
        if _is_const(e):
            base_array = e.value.numpy()
            name = self.const_names.get(e, f"const@{_name(expr)}")
            arr = base_array
            for kind, arg in chain:
                arr = np.transpose(arr, arg) if kind == "permute" else np.broadcast_to(arr, tuple(arg) + arr.shape)
            return WeightRef(e, chain, name, shape, base_array, arr)
        return WeightRef(e, chain, e.name, shape, None, None)

    # ------------------------------------------------------------------ walk
    def run(self) -> "FunctionAnalysis":
        body = self.func.body
        for block in body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    self.bound[b.var] = b.value
                try:
                    self._visit(b)
                except Unsupported as err:
                    self._pin_expr(b.value, f"{_name(b.var)}: {err}")
        self._pin_expr(body.body, "reaches the function's return value")
        self.decide()
        return self

    def _visit(self, b) -> None:
        var, value = b.var, b.value
        if isinstance(b, relax.MatchCast):
            if self._tracked_in(value):
                raise Unsupported("match_cast on a tracked tensor")
            return
        if isinstance(value, relax.Var):
            if value in self.states:
                self.states[var] = self.states[value]
            return
        if isinstance(value, tvm.ir.TupleGetItem):
            st = self.states.get(value.tuple_value)
            if isinstance(st, TupleState):
                item = st.items[int(value.index)]
                if item is not None:
                    self.states[var] = item
            elif st is not None:
                raise Unsupported("tuple access on a tracked tensor")
            return
        if isinstance(value, tvm.ir.Call) and isinstance(value.op, tvm.ir.Op):
            rule = OP_RULES.get(value.op.name)
            if rule is not None:
                getattr(self, "_on_" + rule.family)(var, value)
                return
            if self._tracked_in(value):
                raise Unsupported(f"`{value.op.name}` is not a channel-preserving op")
            return
        if isinstance(value, relax.Tuple) and self._tracked_in(value):
            raise Unsupported("packed into a tuple (function output or an op the analysis does not follow)")
        if self._tracked_in(value):
            raise Unsupported(f"{type(value).__name__} expression on a tracked tensor")

    def st(self, expr) -> TState | None:
        s = self.states.get(expr) if isinstance(expr, relax.Var) else None
        return s if isinstance(s, TState) else None

    def _out_shape(self, var) -> tuple:
        shape = static_shape(var)
        if shape is None:
            raise Unsupported("symbolic or unknown output shape")
        return shape

    # ------------------------------------------------------------------ producers / consumers
    def _consume(self, s: TState, name: str, kind: str, padded: bool) -> int:
        """Register a consumer boundary of ``s``'s group (input channel axis of a layer)."""
        if s.layout[s.axis] != (Factor("G", self.group(s.gid).channels),):
            raise Unsupported(f"{name} consumes the group in a head/merged layout")
        g = self.group(s.gid)
        g.boundaries.append(Boundary(name, kind, padded, s.values.copy()))
        if f"{name}.in" not in g.members:
            g.members.append(f"{name}.in")
        return s.gid

    def _produce(self, var, w: WeightRef, channels: int, zero: np.ndarray | None, axis: int, suffix="out"):
        shape = self._out_shape(var)
        gid = self.new_group(channels, f"{w.name}.{suffix}", zero)
        if w.array is None:
            self.pin(gid, f"weight `{w.name}` has no constant value (bind it or pass params=)")
        layout = tuple((Factor("G", channels),) if i == axis else _anon(d) for i, d in enumerate(shape))
        values = np.where(zero, 0.0, np.nan) if zero is not None else np.full(channels, np.nan)
        self.states[var] = TState(gid, layout, values)
        return gid

    def _on_matmul(self, var, call) -> None:
        a, b = call.args
        sa, sb = self.st(a), self.st(b)
        w = self.weight_ref(b) if sb is None else None
        if w is not None and len(w.shape) >= 2:
            self._dense(var, a, sa, w)
            return
        if sa is None and sb is None:
            return
        self._batched_matmul(var, call, sa, sb)

    def _dense(self, var, a, sa: TState | None, w: WeightRef) -> None:
        out_shape = self._out_shape(var)
        N = w.shape[-1]
        in_gid = out_gid = None
        if w.array is None and sa is not None:
            self.pin(sa.gid, f"weight `{w.name}` has no constant value (bind it or pass params=)")
        if sa is not None:
            rank = len(sa.layout)
            if sa.axis == rank - 1:
                in_gid = self._consume(sa, w.name, "dense", False)
            elif sa.axis == rank - 2 or len(out_shape) == rank:
                # group on rows/batch: flows through, output columns are not a new group
                layout = list(sa.layout[:-1]) + [_anon(N)]
                lead = len(out_shape) - len(layout)
                layout = [_anon(d) for d in out_shape[:lead]] + layout
                vals = np.where(sa.values == 0.0, 0.0, np.nan)
                self.states[var] = TState(sa.gid, tuple(layout), vals)
            else:
                raise Unsupported("dense layer with broadcast batch over the group")
        if var not in self.states:
            zero = None
            if w.array is not None:
                w2 = w.array.reshape(-1, *w.shape[-2:])[0]
                zero = np.abs(w2).max(axis=0) <= self.tol if w2.shape[0] else np.ones(N, bool)
            out_gid = self._produce(var, w, N, zero, len(out_shape) - 1)
        self.plans[var] = DensePlan(w, in_gid, out_gid, None if in_gid is None else sa.values.copy())

    def _batched_matmul(self, var, call, sa, sb) -> None:
        """Two activations (attention): tie over the head/batch axis; contraction = barrier."""
        out_shape = self._out_shape(var)
        orank = len(out_shape)
        pos = []
        for s, is_a in ((sa, True), (sb, False)):
            if s is None:
                pos.append(None)
                continue
            r, ax = len(s.layout), s.axis
            if (is_a and ax == r - 1) or (not is_a and ax == r - 2):
                raise Unsupported("matmul contracts the channel group between two activations")
            if is_a and ax == r - 2:
                pos.append(("M", orank - 2))
            elif not is_a and ax == r - 1:
                pos.append(("N", orank - 1))
            else:
                pos.append(("B", orank - (r - ax)))
        tracked = [(s, p) for s, p in zip((sa, sb), pos) if s is not None]
        if len(tracked) == 2:
            (s1, p1), (s2, p2) = tracked
            if p1 != p2 or p1[0] != "B" or s1.layout[s1.axis] != s2.layout[s2.axis]:
                raise Unsupported("matmul of two tensors carrying groups on different axes")
            gid = self.union(s1.gid, s2.gid)
        else:
            (s1, p1), = tracked
            gid = s1.gid
            other_expr = call.args[1] if sa is not None else call.args[0]
            oshape = static_shape(other_expr)
            if p1[0] == "B" and oshape is not None:
                oax = p1[1] - (orank - len(oshape))
                if oax >= 0 and oshape[oax] != 1:
                    raise Unsupported("batched matmul with an untracked operand over the group axis")
            del other
        unit = self.group(gid).unit
        zero = np.zeros(self.group(gid).channels, bool)
        for s, p in tracked:
            if p[0] == "B":
                zero |= _unit_zero(s.values, unit)
            else:
                zero |= s.values == 0.0
        ax_out = tracked[0][1][1]
        factors = tracked[0][0].layout[tracked[0][0].axis]
        # Keep the operands' own factors on M (rows of a) and N (columns of b) so a
        # head_dim ("W") axis survives P @ v and can merge back with the head axis later.
        layout = [factors if i == ax_out else _anon(d) for i, d in enumerate(out_shape)]
        if sa is not None and axis_extent(sa.layout[-2]) == out_shape[-2] and ax_out != orank - 2:
            layout[-2] = sa.layout[-2]
        if sb is not None and axis_extent(sb.layout[-1]) == out_shape[-1] and ax_out != orank - 1:
            layout[-1] = sb.layout[-1]
        layout = tuple(layout)
        self.states[var] = TState(gid, layout, np.where(zero, 0.0, np.nan))

    def _on_conv2d(self, var, call) -> None:
        x, wexpr = call.args
        sx = self.st(x)
        at = call.attrs
        if (str(at.data_layout), str(at.kernel_layout), str(at.out_layout or at.data_layout)) != ("NCHW", "OIHW", "NCHW"):
            if sx is not None:
                raise Unsupported("conv2d layout other than NCHW/OIHW")
            return
        w = self.weight_ref(wexpr)
        if w is None or len(w.shape) != 4 or w.chain:
            if sx is not None:
                raise Unsupported("conv2d weight is not a constant tensor")
            return
        O, I = w.shape[:2]
        groups = int(at.groups)
        padded = any(int(p) != 0 for p in at.padding)
        if sx is not None and sx.axis != 1:
            raise Unsupported("conv2d over a group on a non-channel axis")
        filt_zero = None if w.array is None else np.abs(w.array).reshape(O, -1).max(axis=1) <= self.tol
        cin = static_shape(x)[1] if static_shape(x) else None
        if groups == 1:
            in_gid = None
            if sx is not None:
                if w.array is None:
                    self.pin(sx.gid, f"weight `{w.name}` has no constant value (bind it or pass params=)")
                in_gid = self._consume(sx, w.name, "conv", padded)
            out_gid = self._produce(var, w, O, filt_zero, 1)
            self.plans[var] = ConvPlan(w, in_gid, out_gid, False, None if sx is None else sx.values.copy())
        elif groups == O == cin and I == 1:
            if sx is None:
                out_gid = self._produce(var, w, O, filt_zero, 1, suffix="dw")
                self.plans[var] = ConvPlan(w, None, out_gid, True, None)
                return
            if w.array is None:
                raise Unsupported(f"weight `{w.name}` has no constant value")
            if sx.layout[1] != (Factor("G", O),):
                raise Unsupported("depthwise conv over a head layout")
            v = sx.values
            vals = np.where(filt_zero | (v == 0.0), 0.0,
                            v * w.array.reshape(O, -1).sum(1) if not padded else np.nan)
            shape = self._out_shape(var)
            layout = tuple(sx.layout[1] if i == 1 else _anon(d) for i, d in enumerate(shape))
            self.states[var] = TState(sx.gid, layout, vals)
            g = self.group(sx.gid)
            g.members.append(f"{w.name}.dw")
            self.plans[var] = ConvPlan(w, sx.gid, None, True, None)
        elif sx is not None:
            raise Unsupported("grouped conv2d")

    def _on_batch_norm(self, var, call) -> None:
        sx = self.st(call.args[0])
        if sx is None:
            return
        at = call.attrs
        if bool(getattr(at, "training", False)):
            raise Unsupported("batch_norm in training mode (use model.eval())")
        C = self.group(sx.gid).channels
        axis = int(at.axis) % len(sx.layout)
        if axis != sx.axis or sx.layout[axis] != (Factor("G", C),):
            raise Unsupported("batch_norm axis is not the group's channel axis")
        params = [self.const_value(a) for a in call.args[1:5]]
        if any(p is None for p in params):
            raise Unsupported("batch_norm parameters are not constants")
        gamma, beta, mean, var_ = (p.astype(np.float64).reshape(-1) for p in params)
        if not bool(at.scale):
            gamma = np.ones_like(gamma)
        if not bool(at.center):
            beta = np.zeros_like(beta)
        vals = (sx.values - mean) / np.sqrt(var_ + float(at.epsilon)) * gamma + beta
        name = self.const_names.get(call.args[1], f"batch_norm@{_name(var)}")
        g = self.group(sx.gid)
        g.members.append(name)
        stats = TState(sx.gid, ((Factor("G", C),),), np.full(C, np.nan))
        self.states[var] = TupleState([TState(sx.gid, sx.layout, vals), stats, stats])
        self.plans[var] = BatchNormPlan(sx.gid, name, params[0].dtype.itemsize)

    # ------------------------------------------------------------------ passthrough
    def _on_elementwise(self, var, call) -> None:
        args = list(call.args)
        states = [self.st(a) for a in args]
        tracked = [s for s in states if s is not None]
        if not tracked:
            return
        out_shape = self._out_shape(var)
        orank = len(out_shape)
        ref = tracked[0]
        ax_out = orank - (len(ref.layout) - ref.axis)
        factors = ref.layout[ref.axis]
        gid = ref.gid
        for s in tracked[1:]:
            if orank - (len(s.layout) - s.axis) != ax_out or s.layout[s.axis] != factors:
                raise Unsupported("elementwise op on tensors carrying groups on different axes")
            gid = self.union(gid, s.gid)
        C = self.group(gid).channels
        plain = factors == (Factor("G", C),)
        contribs, slices = [], []
        for i, (a, s) in enumerate(zip(args, states)):
            if s is not None:
                contribs.append(s.values)
                continue
            arr = self.const_value(a)
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
                contribs.append(None)
                continue
            if full:
                slices.append((i, axc, arr))
            if arr.size == 1:
                contribs.append(np.full(C, float(arr.reshape(-1)[0])))
            elif full and plain and arr.size == C:
                contribs.append(arr.reshape(-1).astype(np.float64))
            else:
                contribs.append(None)
        self.states[var] = TState(gid, _broadcast_layout(ref.layout, out_shape),
                                  _combine(call.op.name, contribs, C))
        if slices:
            self.plans[var] = ElementwisePlan(slices)

    def _on_unary(self, var, call) -> None:
        s = self.st(call.args[0])
        if s is None:
            return
        name = call.op.name
        v = s.values
        with np.errstate(all="ignore"):
            if name in UNARY_VALUE:
                vals = UNARY_VALUE[name](v, call)
            elif name == "relax.astype" and str(call.attrs.dtype).startswith(("float", "bfloat")):
                vals = v.astype(str(call.attrs.dtype)).astype(np.float64)
            elif name == "relax.clip":
                try:
                    lo, hi = (float(a.value.value if hasattr(a.value, "value") else a.value) for a in call.args[1:3])
                    vals = np.clip(v, lo, hi)
                except Exception:  # noqa: BLE001 - unknown clip bounds: input-dependent
                    vals = np.full_like(v, np.nan)
            else:
                vals = np.full_like(v, np.nan)
        self.states[var] = TState(s.gid, s.layout, vals)

    def _on_fill_like(self, var, call) -> None:
        s = self.st(call.args[0])
        if s is None:
            return
        name = call.op.name
        fill = {"relax.zeros_like": 0.0, "relax.ones_like": 1.0}.get(name)
        if fill is None:
            c = self.const_value(call.args[1]) if len(call.args) > 1 else None
            fill = float(c.reshape(-1)[0]) if c is not None and c.size == 1 else np.nan
        self.states[var] = TState(s.gid, s.layout, np.full_like(s.values, fill))

    def _on_layout(self, var, call) -> None:
        s = self.st(call.args[0])
        if s is None:
            return
        out_shape = self._out_shape(var)
        name = call.op.name
        if name == "relax.permute_dims":
            axes = call.attrs.axes
            axes = list(reversed(range(len(s.layout)))) if axes is None else [int(a) for a in axes]
            layout = tuple(s.layout[a] for a in axes)
        elif name == "relax.broadcast_to":
            layout = _broadcast_layout(s.layout, out_shape)
        else:
            layout = self._reshape(s, out_shape)
        self.states[var] = TState(s.gid, layout, s.values)

    def _reshape(self, s: TState, out_shape: tuple) -> Layout:
        g = self.group(s.gid)
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
                    need = 1
                else:
                    raise Unsupported("reshape the analysis cannot follow")
            out.append(_merge_units(tuple(axis), g.channels, g.unit))
        if any(f.size != 1 for f in queue):
            raise Unsupported("reshape the analysis cannot follow")
        layout = tuple(out)
        if sum(f.kind in ("G", "U") for ax in layout for f in ax) != 1:
            raise Unsupported("reshape loses the channel axis")
        return layout

    def _on_reduce(self, var, call) -> None:
        s = self.st(call.args[0])
        if s is None:
            return
        rank = len(s.layout)
        axes = call.attrs.axis
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
        if s.axis in axes:
            raise Unsupported(f"`{call.op.name}` reduces over the channel axis")
        keep = bool(call.attrs.keepdims)
        layout = tuple(() if i in axes else ax for i, ax in enumerate(s.layout) if keep or i not in axes)
        vals = s.values if call.op.name != "relax.sum" else np.where(s.values == 0.0, 0.0, np.nan)
        self.states[var] = TState(s.gid, layout, vals)

    def _on_softmax(self, var, call) -> None:
        s = self.st(call.args[0])
        if s is None:
            return
        if int(call.attrs.axis) % len(s.layout) == s.axis:
            raise Unsupported("softmax over the channel axis")
        self.states[var] = TState(s.gid, s.layout, np.full_like(s.values, np.nan))

    def _on_norm(self, var, call) -> None:
        s = self.st(call.args[0])
        if s is None:
            return
        rank = len(s.layout)
        if s.axis in [int(a) % rank for a in call.attrs.axes]:
            raise Unsupported(f"`{call.op.name}` normalises over the channel axis")
        self.states[var] = TState(s.gid, s.layout, np.full_like(s.values, np.nan))

    def _on_pool2d(self, var, call) -> None:
        s = self.st(call.args[0])
        if s is None:
            return
        if str(call.attrs.layout) != "NCHW" or s.axis != 1:
            raise Unsupported("pooling over the channel axis / non-NCHW layout")
        shape = self._out_shape(var)
        layout = tuple(s.layout[1] if i == 1 else _anon(d) for i, d in enumerate(shape))
        self.states[var] = TState(s.gid, layout, np.where(s.values == 0.0, 0.0, np.nan))

    # ------------------------------------------------------------------ decision
    def decide(self) -> None:
        """Per group: which units every consumer can absorb -> ``keep`` / ``removed_units``."""
        tol = self.tol
        for g in self.groups.values():
            C, unit = g.channels, g.unit
            all_ch = np.arange(C)
            g.keep = all_ch
            if g.pins:
                g.status = "skipped"
                if g.zero_hint is not None:
                    n = int(g.zero_hint.reshape(-1, unit).all(axis=1).sum())
                    if n:
                        g.notes.append(f"{n} unit(s) with zero weights kept because the group is pinned")
                continue
            if not g.boundaries:
                g.notes.append("no consumer layer: chain ends without a dense/conv input")
                continue
            ok = np.ones(C, bool)
            blocked = {}
            for b in g.boundaries:
                v = b.values
                finite = np.isfinite(v)
                zero = finite & (np.abs(v) <= tol)
                absorb = zero | (finite & (b.kind == "dense" or not b.padded))
                for c in np.where(~absorb)[0]:
                    if finite[c]:
                        why = f"constant {v[c]:.4g} would reach zero-padded conv `{b.name}` (inexact at borders)"
                    else:
                        why = f"value at `{b.name}` depends on the input (a tied branch is not zero)"
                    blocked.setdefault(c // unit, why)
                ok &= absorb
            unit_ok = ok.reshape(-1, unit).all(axis=1)
            if unit_ok.all():
                unit_ok[0] = False
                g.notes.append("every unit was removable; unit 0 is kept so no tensor becomes empty")
            g.removed_units = [int(u) for u in np.where(unit_ok)[0]]
            g.keep = np.array([c for c in all_ch if not unit_ok[c // unit]], dtype=np.int64)
            g.status = "pruned" if g.removed_units else "unchanged"
            if g.zero_hint is not None:
                hint_units = g.zero_hint.reshape(-1, unit).all(axis=1)
                for u in np.where(hint_units & ~unit_ok)[0]:
                    if int(u) in blocked:
                        g.notes.append(f"unit {int(u)} has zero weights but is kept: {blocked[int(u)]}")

    def folds(self, g: Group, values: np.ndarray) -> np.ndarray:
        """Constant input channels a consumer must absorb: value where removed, else 0."""
        removed = np.ones(g.channels, bool)
        removed[g.keep] = False
        v = np.where(removed & np.isfinite(values) & (np.abs(values) > self.tol), values, 0.0)
        return v


def _unit_zero(values: np.ndarray, unit: int) -> np.ndarray:
    z = (values == 0.0).reshape(-1, unit).all(axis=1)
    return np.repeat(z, unit)


def _merge_units(axis: tuple, channels: int, unit: int) -> tuple:
    out = list(axis)
    for i in range(len(out) - 1):
        if out[i].kind == "U" and out[i + 1].kind == "W" and out[i].size * out[i + 1].size == channels:
            out[i:i + 2] = [Factor("G", channels)]
            break
    return tuple(out)


def _broadcast_layout(layout: Layout, out_shape: tuple) -> Layout:
    lead = len(out_shape) - len(layout)
    out = []
    for i, d in enumerate(out_shape):
        j = i - lead
        if j >= 0 and axis_extent(layout[j]) == d:
            out.append(layout[j])
        else:
            if j >= 0 and any(f.kind in ("G", "U") for f in layout[j]):
                raise Unsupported("broadcast over the channel axis")
            out.append(_anon(d))
    return tuple(out)


def _combine(op: str, contribs: list, C: int) -> np.ndarray:
    """Channel values of an elementwise op given per-operand values (None = unknown)."""
    nan = np.full(C, np.nan)
    with np.errstate(all="ignore"):
        if op == "relax.multiply":
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
        if op == "relax.add":
            return contribs[0] + contribs[1]
        if op == "relax.subtract":
            return contribs[0] - contribs[1]
        if op == "relax.divide":
            return contribs[0] / contribs[1]
        if op == "relax.maximum":
            return np.maximum(contribs[0], contribs[1])
        if op == "relax.minimum":
            return np.minimum(contribs[0], contribs[1])
        if op == "relax.where":
            _, x, y = contribs
            return np.where(x == y, x, np.nan)
    return nan


def _name(var) -> str:
    return getattr(var, "name", None) or getattr(var, "name_hint", "?")
