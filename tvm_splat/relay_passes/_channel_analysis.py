"""Channel-group analysis of one Relax function: find groups, follow them, decide.

Reads the function only; the result (``FunctionAnalysis``: per-var tensor states, per-op
plans, groups with their decisions) is what ``_channel_rewrite`` applies.  The rules are
``OP_RULES`` (``tvm_splat.channel_rules``); each op's handler is registered by op name in
``_channel_registry`` (producers/consumers in ``_channel_layer_ops``, everything a group
flows through in ``_channel_flow_ops``); tensor states are described in ``_channel_state``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from . import _channel_flow_ops, _channel_layer_ops  # noqa: F401  (register the op handlers)
from ._channel_decide import decide, folds
from ._channel_registry import handler_for
from ._channel_state import (
    Boundary,
    Factor,
    Group,
    TState,
    TupleState,
    Unsupported,
    WeightRef,
    anon,
    is_const,
    name_of,
    static_shape,
)

__all__ = ["FunctionAnalysis", "Unsupported", "static_shape"]


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

    # ------------------------------------------------------------------ groups (union-find)
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

    def tracked_in(self, expr) -> list:
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
                out += self.tracked_in(f)
        elif isinstance(expr, tvm.ir.Call):
            for a in expr.args:
                out += self.tracked_in(a)
        elif isinstance(expr, tvm.ir.TupleGetItem):
            out += self.tracked_in(expr.tuple_value)
        elif isinstance(expr, relax.SeqExpr):
            out += self.tracked_in(expr.body)
        return out

    def pin_expr(self, expr, reason: str) -> None:
        for st in self.tracked_in(expr):
            self.pin(st.gid, reason)

    # ------------------------------------------------------------------ constants
    def const_value(self, expr) -> np.ndarray | None:
        """numpy value of a constant, or of a var bound to layout ops of a constant."""
        if is_const(expr):
            return expr.value.numpy()
        if not isinstance(expr, relax.Var) or expr not in self.bound:
            return None
        if expr not in self._const_cache:
            self._const_cache[expr] = self._layout_of_const(expr)
        return self._const_cache[expr]

    def _layout_of_const(self, expr) -> np.ndarray | None:
        v = self.bound[expr]
        if not (isinstance(v, tvm.ir.Call) and isinstance(v.op, tvm.ir.Op) and v.args):
            return None
        src = self.const_value(v.args[0])
        shape = static_shape(expr)
        name = v.op.name
        if src is None or shape is None:
            return None
        if name in ("relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten"):
            return src.reshape(shape)
        if name == "relax.permute_dims":
            axes = v.attrs.axes
            return np.transpose(src, None if axes is None else [int(a) for a in axes])
        if name == "relax.broadcast_to":
            return np.broadcast_to(src, shape)
        if name == "relax.astype":
            return src.astype(str(v.attrs.dtype))
        return None

    def weight_ref(self, expr) -> WeightRef | None:
        """Resolve a dense/conv weight operand to its constant (or weight parameter)."""
        chain = []
        e = expr
        while not (is_const(e) or (isinstance(e, relax.Var) and e in self.weight_params)):
            step = self._weight_step(e)
            if step is None:
                return None
            chain.append(step)
            e = self.bound[e].args[0]
        chain.reverse()
        shape = static_shape(expr)
        if shape is None:
            return None
        if not is_const(e):
            return WeightRef(e, chain, e.name, shape, None, None)
        base_array = e.value.numpy()
        name = self.const_names.get(e, f"const@{name_of(expr)}")
        arr = base_array
        for kind, arg in chain:
            arr = np.transpose(arr, arg) if kind == "permute" else np.broadcast_to(arr, tuple(arg) + arr.shape)
        return WeightRef(e, chain, name, shape, base_array, arr)

    def _weight_step(self, e) -> tuple | None:
        """The layout step (permute / broadcast) that binds ``e``, None if it is anything else."""
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
            return ("permute", tuple(reversed(range(len(in_shape)))) if axes is None
                    else tuple(int(a) for a in axes))
        if v.op.name == "relax.broadcast_to":
            in_shape, out_shape = static_shape(v.args[0]), static_shape(e)
            if in_shape is None or out_shape is None or out_shape[len(out_shape) - len(in_shape):] != in_shape:
                return None
            return ("broadcast", out_shape[: len(out_shape) - len(in_shape)])
        return None

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
                    self.pin_expr(b.value, f"{name_of(b.var)}: {err}")
        self.pin_expr(body.body, "reaches the function's return value")
        decide(self.groups.values(), self.tol)
        return self

    def _visit(self, b) -> None:
        var, value = b.var, b.value
        if isinstance(b, relax.MatchCast):
            if self.tracked_in(value):
                raise Unsupported("match_cast on a tracked tensor")
            return
        if isinstance(value, relax.Var):
            if value in self.states:
                self.states[var] = self.states[value]
            return
        if isinstance(value, tvm.ir.TupleGetItem):
            self._visit_tuple_get(var, value)
            return
        if isinstance(value, tvm.ir.Call) and isinstance(value.op, tvm.ir.Op):
            handler = handler_for(value.op.name)
            if handler is not None:
                handler(self, var, value)
            elif self.tracked_in(value):
                raise Unsupported(f"`{value.op.name}` is not a channel-preserving op")
            return
        if isinstance(value, relax.Tuple) and self.tracked_in(value):
            raise Unsupported("packed into a tuple (function output or an op the analysis does not follow)")
        if self.tracked_in(value):
            raise Unsupported(f"{type(value).__name__} expression on a tracked tensor")

    def _visit_tuple_get(self, var, value) -> None:
        st = self.states.get(value.tuple_value)
        if isinstance(st, TupleState):
            item = st.items[int(value.index)]
            if item is not None:
                self.states[var] = item
        elif st is not None:
            raise Unsupported("tuple access on a tracked tensor")

    def st(self, expr) -> TState | None:
        """The tracked state of ``expr`` (a var carrying a group), else None."""
        s = self.states.get(expr) if isinstance(expr, relax.Var) else None
        return s if isinstance(s, TState) else None

    def out_shape(self, var) -> tuple:
        shape = static_shape(var)
        if shape is None:
            raise Unsupported("symbolic or unknown output shape")
        return shape

    # ------------------------------------------------------------------ producers / consumers
    def consume(self, s: TState, w: WeightRef, kind: str, padded: bool, finite: np.ndarray) -> int:
        """Register a consumer boundary of ``s``'s group (input channel axis of a layer)."""
        g = self.group(s.gid)
        if s.layout[s.axis] != (Factor("G", g.channels),):
            raise Unsupported(f"{w.name} consumes the group in a head/merged layout")
        g.boundaries.append(Boundary(w.name, kind, padded, s.values.copy(), finite))
        if f"{w.name}.in" not in g.members:
            g.members.append(f"{w.name}.in")
        return s.gid

    def produce(self, var, w: WeightRef, channels: int, zero: np.ndarray | None, axis: int,
                suffix: str = "out") -> int:
        """A new group on ``axis`` of ``var`` (the output channels of weight ``w``)."""
        shape = self.out_shape(var)
        gid = self.new_group(channels, f"{w.name}.{suffix}", zero)
        if w.array is None:
            self.pin(gid, f"weight `{w.name}` has no constant value (bind it or pass params=)")
        layout = tuple((Factor("G", channels),) if i == axis else anon(d) for i, d in enumerate(shape))
        values = np.where(zero, 0.0, np.nan) if zero is not None else np.full(channels, np.nan)
        self.states[var] = TState(gid, layout, values)
        return gid

    def folds(self, g: Group, values: np.ndarray) -> np.ndarray:
        """Constant input channels a consumer must absorb: value where removed, else 0."""
        return folds(g, values, self.tol)
