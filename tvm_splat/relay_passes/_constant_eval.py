"""Evaluate the constant-only parts of a Relax function (attention masks) to numpy.

Masks reach the attention in many shapes: a stored bool buffer (``metadata[...]``), an
additive float tensor, or a little graph built from ``arange``/``full``/comparisons (what
``is_causal=True`` decomposes to). Whatever the shape, if an expression depends on
constants only, its value is a fixed array that :mod:`._site_mask` can analyse.

:func:`depends_only_on_constants` decides that; :func:`evaluate_constant` computes the value,
with numpy for the handful of ops masks are built from, and otherwise by compiling the
sub-graph alone for ``llvm`` and running it (slower, but exact for every Relax op).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
import tvm
from tvm import relax

Bindings = Dict[relax.Var, relax.Expr]


def function_bindings(func: relax.Function) -> Bindings:
    """Map every bound variable of ``func`` (all blocks) to its value."""
    table: Bindings = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                table[binding.var] = binding.value
    return table


def _children(expr: relax.Expr):
    if isinstance(expr, relax.Call):
        return list(expr.args)
    if isinstance(expr, relax.Tuple):
        return list(expr.fields)
    if isinstance(expr, relax.TupleGetItem):
        return [expr.tuple_value]
    return []


def depends_only_on_constants(expr: relax.Expr, bindings: Bindings,
                              _memo: Optional[dict] = None) -> bool:
    """True when ``expr`` reads no function parameter and calls only operators (no
    functions, no ``call_tir``), so its value is known at compile time."""
    memo = {} if _memo is None else _memo
    if isinstance(expr, relax.Var):
        if expr in memo:
            return memo[expr]
        memo[expr] = False  # guards against (impossible) cycles
        value = bindings.get(expr)
        memo[expr] = value is not None and depends_only_on_constants(value, bindings, memo)
        return memo[expr]
    if isinstance(expr, (tvm.ir.Constant, relax.ShapeExpr, tvm.tirx.IntImm, tvm.tirx.FloatImm)):
        return True
    if isinstance(expr, relax.Call):
        if not isinstance(expr.op, tvm.ir.Op) or expr.op.name.startswith("relax.call_"):
            return False
        return all(depends_only_on_constants(a, bindings, memo) for a in expr.args)
    if isinstance(expr, (relax.Tuple, relax.TupleGetItem)):
        return all(depends_only_on_constants(c, bindings, memo) for c in _children(expr))
    return False


def _static_shape(expr) -> tuple:
    return tuple(int(d) for d in expr.ty.shape.values)


def _shape_values(shape_expr) -> tuple:
    return tuple(int(d) for d in shape_expr.values)


def _prim(value) -> float:
    """An IntImm/FloatImm argument as a Python number."""
    return value.value


def _dtype(call) -> str:
    return str(call.ty.dtype)


def _np_ops() -> Dict[str, Callable]:
    """numpy versions of the ops masks are commonly built from, keyed by Relax op name.

    Each takes ``(call, args)`` where ``args`` are the already evaluated arguments (numpy
    arrays, or the raw Relax argument when it is not a tensor) and returns a numpy array of
    the call's dtype.
    """
    def binary(fn):
        return lambda call, a: fn(a[0], a[1]).astype(_dtype(call))

    def unary(fn):
        return lambda call, a: fn(a[0]).astype(_dtype(call))

    return {
        "relax.add": binary(np.add), "relax.subtract": binary(np.subtract),
        "relax.multiply": binary(np.multiply),
        "relax.equal": binary(np.equal), "relax.not_equal": binary(np.not_equal),
        "relax.less": binary(np.less), "relax.less_equal": binary(np.less_equal),
        "relax.greater": binary(np.greater), "relax.greater_equal": binary(np.greater_equal),
        "relax.logical_and": binary(np.logical_and), "relax.logical_or": binary(np.logical_or),
        "relax.bitwise_and": binary(np.bitwise_and), "relax.bitwise_or": binary(np.bitwise_or),
        "relax.maximum": binary(np.maximum), "relax.minimum": binary(np.minimum),
        "relax.logical_not": unary(np.logical_not), "relax.bitwise_not": unary(np.invert),
        "relax.negative": unary(np.negative), "relax.abs": unary(np.abs),
        "relax.astype": lambda call, a: a[0].astype(_dtype(call)),
        "relax.where": lambda call, a: np.where(a[0], a[1], a[2]).astype(_dtype(call)),
        "relax.reshape": lambda call, a: a[0].reshape(_static_shape(call)),
        "relax.broadcast_to": lambda call, a: np.broadcast_to(a[0], _static_shape(call)).copy(),
        "relax.expand_dims": lambda call, a: a[0].reshape(_static_shape(call)),
        "relax.squeeze": lambda call, a: a[0].reshape(_static_shape(call)),
        "relax.permute_dims": lambda call, a: np.transpose(
            a[0], None if call.attrs.axes is None else [int(x) for x in call.attrs.axes]),
        "relax.full": lambda call, a: np.full(_shape_values(call.args[0]), a[1],
                                              dtype=_dtype(call)),
        "relax.full_like": lambda call, a: np.full(a[0].shape, a[1], dtype=_dtype(call)),
        "relax.zeros": lambda call, a: np.zeros(_static_shape(call), dtype=_dtype(call)),
        "relax.ones": lambda call, a: np.ones(_static_shape(call), dtype=_dtype(call)),
        "relax.arange": lambda call, a: np.arange(_prim(call.args[0]), _prim(call.args[1]),
                                                  _prim(call.args[2])).astype(_dtype(call)),
        "relax.tril": lambda call, a: np.tril(a[0], int(_prim(call.args[1]))),
        "relax.triu": lambda call, a: np.triu(a[0], int(_prim(call.args[1]))),
    }


_NP_OPS = _np_ops()


def _is_tensor(expr) -> bool:
    return isinstance(expr.ty, relax.TensorType)


def _try_numpy(expr, bindings, memo) -> Optional[np.ndarray]:
    """Value of ``expr`` with numpy only, or None when some op has no numpy version here."""
    if isinstance(expr, relax.Var):
        if expr not in memo:
            memo[expr] = _try_numpy(bindings[expr], bindings, memo)
        return memo[expr]
    if isinstance(expr, tvm.ir.Constant):
        return expr.value.numpy() if hasattr(expr.value, "numpy") else None
    if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
        return None
    fn = _NP_OPS.get(expr.op.name)
    if fn is None or not _is_tensor(expr):
        return None
    args = []
    for arg in expr.args:
        if _is_tensor(arg):
            value = _try_numpy(arg, bindings, memo)
            if value is None:
                return None
            args.append(value)
        else:
            args.append(arg)
    # scalar fill values of full/full_like arrive as 0-d tensors: use them as numbers
    try:
        return np.asarray(fn(expr, args))
    except Exception:  # an attribute form this table does not know: let the VM do it
        return None


def _needed_bindings(expr, bindings) -> list:
    """Bindings ``expr`` depends on, in dependency order."""
    order, seen = [], set()

    def visit(e):
        if isinstance(e, relax.Var):
            if e in seen or e not in bindings:
                return
            seen.add(e)
            visit(bindings[e])
            order.append(relax.VarBinding(e, bindings[e]))
            return
        for child in _children(e):
            visit(child)

    visit(expr)
    return order


def _evaluate_with_vm(expr, bindings) -> np.ndarray:
    """Compile the constant sub-graph of ``expr`` alone for llvm and run it."""
    block = _needed_bindings(expr, bindings)
    out = relax.Var("out", expr.ty)
    block.append(relax.VarBinding(out, expr))
    body = relax.SeqExpr([relax.DataflowBlock(block)], out)
    func = relax.Function([], body, ret_ty=expr.ty).with_attr(
        "global_symbol", "main")
    ex = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"]().numpy()


def evaluate_constant(expr: relax.Expr, bindings: Bindings) -> np.ndarray:
    """The value of a tensor expression that :func:`depends_only_on_constants`."""
    value = _try_numpy(expr, bindings, {})
    if value is None:
        value = _evaluate_with_vm(expr, bindings)
    return value
