"""Rewrite one Relax function so every pruned group is physically smaller.

Input: a ``FunctionAnalysis`` whose groups carry ``keep`` (kept channel indices).  Every
binding is re-emitted through a ``BlockBuilder`` (so types are re-inferred); weights and
per-channel constants are sliced, reshape/broadcast shapes are recomputed from the tracked
layout, and a removed channel that carried a non-zero constant is folded into an ``add``
after its consumer.  Each rewritten tracked tensor's new shape is checked against the
shape the analysis predicts; any mismatch raises ``RewriteError`` and the caller keeps the
original function (never a half-rewritten model).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from ._channel_analysis import FunctionAnalysis
from ._channel_report import LayerReport
from ._channel_state import (
    BatchNormPlan,
    ConvPlan,
    DensePlan,
    ElementwisePlan,
    TState,
    WeightRef,
    static_shape,
)


class RewriteError(Exception):
    """The rewrite could not be completed consistently; the function is left unchanged."""


class FunctionRewriter:
    def __init__(self, an: FunctionAnalysis):
        self.an = an
        self.bb = relax.BlockBuilder()
        self.vmap: dict = {}
        self.layers: list[LayerReport] = []

    # ------------------------------------------------------------------ sizes
    def _keep(self, gid: int | None):
        return None if gid is None else self.an.group(gid).keep

    def _changed(self, gid: int | None) -> bool:
        return gid is not None and len(self.an.group(gid).keep) < self.an.group(gid).channels

    def new_shape(self, st: TState) -> tuple:
        g = self.an.group(st.gid)
        out = []
        for axis in st.layout:
            size = 1
            for f in axis:
                if f.kind == "G":
                    size *= len(g.keep)
                elif f.kind == "U":
                    size *= len(g.keep) // g.unit
                else:
                    size *= f.size
            out.append(size)
        return tuple(out)

    def slice_axis(self, arr: np.ndarray, axis: int, st: TState, out_axis: int) -> np.ndarray:
        """Slice a constant along ``axis`` whose factors are ``st.layout[out_axis]``."""
        g = self.an.group(st.gid)
        factors = st.layout[out_axis]
        sizes = [f.size for f in factors]
        arr = arr.reshape(arr.shape[:axis] + tuple(sizes) + arr.shape[axis + 1:])
        for k, f in enumerate(factors):
            if f.kind == "G":
                arr = np.take(arr, g.keep, axis=axis + k)
            elif f.kind == "U":
                arr = np.take(arr, g.keep_units, axis=axis + k)
        merged = math.prod(arr.shape[axis:axis + len(sizes)])
        return arr.reshape(arr.shape[:axis] + (merged,) + arr.shape[axis + len(sizes):])

    # ------------------------------------------------------------------ emit
    def run(self) -> relax.Function:
        func = self.an.func
        attrs = dict(func.attrs) if func.attrs is not None else {}
        private = "global_symbol" not in attrs
        attrs.pop("global_symbol", None)
        name = self.an.fname
        with self.bb.function(name, params=list(func.params), attrs=attrs,
                              pure=bool(func.is_pure), private=private):
            for block in func.body.blocks:
                if isinstance(block, relax.DataflowBlock):
                    with self.bb.dataflow():
                        for b in block.bindings:
                            self._emit_binding(b, True)
                else:
                    for b in block.bindings:
                        self._emit_binding(b, False)
            self.bb.emit_func_output(self._remap(func.body.body))
        new = self.bb.get()[name]
        return relax.analysis.remove_all_unused(new)

    def _emit(self, value, name: str, output: bool):
        return self.bb.emit_output(value, name) if output else self.bb.emit(value, name)

    def _emit_binding(self, b, in_dataflow: bool):
        var = b.var
        is_output = in_dataflow and not isinstance(var, relax.DataflowVar)
        if isinstance(b, relax.MatchCast):
            nv = self.bb.match_cast(self._remap(b.value), b.ty, var.name)
            self.vmap[var] = nv
            return
        value, fold = self._rewrite(var, b.value)
        if fold is None:
            nv = self._emit(value, var.name, is_output)
        else:
            mid = self.bb.emit(value, var.name + "_pre")
            nv = self._emit(relax.op.add(mid, fold), var.name, is_output)
        self.vmap[var] = nv
        st = self.an.states.get(var)
        if isinstance(st, TState):
            want = self.new_shape(st)
            got = static_shape(nv)
            if got != want:
                raise RewriteError(f"{var.name}: rewritten shape {got} != predicted {want}")
        return nv

    def _remap(self, expr):
        if isinstance(expr, relax.Var):
            return self.vmap.get(expr, expr)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self._remap(f) for f in expr.fields])
        if isinstance(expr, tvm.ir.TupleGetItem):
            return tvm.ir.TupleGetItem(self._remap(expr.tuple_value), int(expr.index))
        if isinstance(expr, tvm.ir.Call):
            return tvm.ir.Call(expr.op, [self._remap(a) for a in expr.args], expr.attrs, expr.ty_args)
        if isinstance(expr, (tvm.ir.GenericConst, relax.ShapeExpr)) or not _has_vars(expr):
            return expr
        raise RewriteError(f"cannot rewrite a {type(expr).__name__} expression")

    def _rewrite(self, var, value):
        """-> (new value expr, fold constant to add after it or None)."""
        plan = self.an.plans.get(var)
        if not (isinstance(value, tvm.ir.Call) and isinstance(value.op, tvm.ir.Op)):
            return self._remap(value), None
        args = [self._remap(a) for a in value.args]
        name = value.op.name
        fold = None
        if isinstance(plan, DensePlan):
            if self._changed(plan.in_gid) or self._changed(plan.out_gid):
                args[1] = self._weight(plan.weight, {-2: self._keep(plan.in_gid), -1: self._keep(plan.out_gid)})
            fold = self._dense_fold(plan)
            self._layer_dense(var, value, plan)
        elif isinstance(plan, ConvPlan):
            return self._conv(var, value, args, plan)
        elif isinstance(plan, BatchNormPlan) and self._changed(plan.gid):
            keep = self._keep(plan.gid)
            for i in range(1, 5):
                args[i] = relax.const(np.take(self.an.const_value(value.args[i]).reshape(-1), keep))
            self._layer_bn(plan)
        elif isinstance(plan, ElementwisePlan):
            st = self.an.states[var]
            orank = len(st.layout)
            for i, axc, arr in plan.const_slices:
                if self._changed(st.gid):
                    out_axis = axc + (orank - arr.ndim)
                    args[i] = relax.const(np.ascontiguousarray(self.slice_axis(arr, axc, st, out_axis)))
        elif name in ("relax.reshape", "relax.broadcast_to") and isinstance(self.an.states.get(var), TState):
            args[1] = relax.ShapeExpr([int(d) for d in self.new_shape(self.an.states[var])])
        return tvm.ir.Call(value.op, args, value.attrs, value.ty_args), fold

    def _weight(self, w: WeightRef, slices: dict):
        """Emit ``w`` with operand axes sliced by ``slices`` (axis -> kept indices)."""
        rank = len(w.shape)
        arr = w.base_array
        for ax, keep in slices.items():
            if keep is None:
                continue
            a = ax % rank
            for kind, arg in reversed(w.chain):
                if kind == "permute":
                    a = arg[a]
                else:
                    a -= len(arg)
            if a < 0:
                continue  # axis came from a broadcast: nothing stored to slice
            arr = np.take(arr, keep, axis=a)
        expr = relax.const(np.ascontiguousarray(arr))
        for kind, arg in w.chain:
            if kind == "permute":
                expr = self.bb.emit(relax.op.permute_dims(expr, list(arg)))
            else:
                expr = self.bb.emit(relax.op.broadcast_to(expr, tuple(arg) + static_shape(expr)))
        return expr

    def _dense_fold(self, plan: DensePlan):
        if plan.in_gid is None or not self._changed(plan.in_gid):
            return None
        v = self.an.folds(self.an.group(plan.in_gid), plan.in_values)
        if not v.any():
            return None
        w2 = plan.weight.array.reshape(-1, *plan.weight.shape[-2:])[0].astype(np.float64)
        bias = v @ w2  # (N,)
        if plan.out_gid is not None:
            bias = bias[self._keep(plan.out_gid)]
        self.an.group(plan.in_gid).notes.append(f"folded constant channels into a bias after `{plan.weight.name}`")
        return relax.const(bias.astype(plan.weight.array.dtype))

    def _conv(self, var, value, args, plan: ConvPlan):
        at = value.attrs
        w = plan.weight
        if plan.depthwise:
            gid = plan.in_gid if plan.in_gid is not None else plan.out_gid
            keep = self._keep(gid)
            groups = len(keep)
            args[1] = self._weight(w, {0: keep}) if self._changed(gid) else args[1]
        else:
            groups = int(at.groups)
            if self._changed(plan.in_gid) or self._changed(plan.out_gid):
                args[1] = self._weight(w, {1: self._keep(plan.in_gid), 0: self._keep(plan.out_gid)})
        call = relax.op.nn.conv2d(
            args[0], args[1], strides=[int(s) for s in at.strides], padding=[int(p) for p in at.padding],
            dilation=[int(d) for d in at.dilation], groups=groups, data_layout=str(at.data_layout),
            kernel_layout=str(at.kernel_layout), out_layout=str(at.out_layout),
            out_dtype=str(at.out_dtype) if str(at.out_dtype) else None,
        )
        fold = None
        if not plan.depthwise and plan.in_gid is not None and self._changed(plan.in_gid):
            v = self.an.folds(self.an.group(plan.in_gid), plan.in_values)
            if v.any():  # only reached for unpadded convs (decide() guarantees it)
                per = w.array.astype(np.float64).sum(axis=(2, 3)) @ v  # (O,)
                if plan.out_gid is not None:
                    per = per[self._keep(plan.out_gid)]
                fold = relax.const(per.reshape(1, -1, 1, 1).astype(w.array.dtype))
        self._layer_conv(var, value, plan, groups)
        return call, fold

    # ------------------------------------------------------------------ report
    def _io(self, gid, full):
        return (full, full if gid is None else len(self.an.group(gid).keep))

    def _layer_dense(self, var, value, plan: DensePlan):
        K, N = plan.weight.shape[-2:]
        kin, kout = self._io(plan.in_gid, K), self._io(plan.out_gid, N)
        out_shape = static_shape(var) or ()
        rows = math.prod(out_shape[:-1]) if out_shape else 0
        st = self.an.states.get(var)
        rows_after = rows
        if isinstance(st, TState) and plan.out_gid is None and out_shape:
            rows_after = math.prod(self.new_shape(st)[:-1])
        itemsize = plan.weight.array.dtype.itemsize if plan.weight.array is not None else 0
        if kin[0] == kin[1] and kout[0] == kout[1] and rows == rows_after:
            return
        self.layers.append(LayerReport(
            plan.weight.name, "dense", kin, kout,
            2 * rows * K * N, 2 * rows_after * kin[1] * kout[1],
            K * N * itemsize, kin[1] * kout[1] * itemsize))

    def _layer_conv(self, var, value, plan: ConvPlan, groups):
        O, I, kh, kw = plan.weight.shape
        out_shape = static_shape(var) or (0, 0, 0, 0)
        hw = out_shape[0] * out_shape[2] * out_shape[3]
        itemsize = plan.weight.array.dtype.itemsize if plan.weight.array is not None else 0
        if plan.depthwise:
            gid = plan.in_gid if plan.in_gid is not None else plan.out_gid
            c = self._io(gid, O)
            if c[0] == c[1]:
                return
            self.layers.append(LayerReport(plan.weight.name, "depthwise_conv2d", c, c,
                                           2 * hw * O * kh * kw, 2 * hw * c[1] * kh * kw,
                                           O * kh * kw * itemsize, c[1] * kh * kw * itemsize))
            return
        cin, cout = self._io(plan.in_gid, I), self._io(plan.out_gid, O)
        if cin[0] == cin[1] and cout[0] == cout[1]:
            return
        k = kh * kw
        self.layers.append(LayerReport(plan.weight.name, "conv2d", cin, cout,
                                       2 * hw * O * I * k, 2 * hw * cout[1] * cin[1] * k,
                                       O * I * k * itemsize, cout[1] * cin[1] * k * itemsize))

    def _layer_bn(self, plan: BatchNormPlan):
        g = self.an.group(plan.gid)
        c = (g.channels, len(g.keep))
        item = plan.itemsize
        self.layers.append(LayerReport(plan.name, "batch_norm", c, c, 0, 0, 4 * item * c[0], 4 * item * c[1]))


def _has_vars(expr) -> bool:
    found = []

    def visit(e):
        if isinstance(e, relax.Var):
            found.append(e)

    try:
        relax.analysis.post_order_visit(expr, visit)
    except Exception:  # noqa: BLE001 - unknown node kinds: assume they may hold vars
        return True
    return bool(found)
