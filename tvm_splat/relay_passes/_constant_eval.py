"""Evaluate the constant-only parts of a Relax function (attention masks) to numpy.

Masks reach the attention in many shapes: a stored bool buffer (``metadata[...]``), an
additive float tensor, or a little graph built from ``arange``/``full``/comparisons (what
``is_causal=True`` decomposes to; transformers 5.x adds ``strided_slice``, ``concat``,
``cumsum`` and ``index_tensor`` over the position ids). Whatever the shape, if an
expression depends on constants only, its value is a fixed array that :mod:`._site_mask`
can analyse.

:class:`ConstantValues` answers both questions for one function, each binding once (every
layer of a model shares one mask: it is computed for the first site and read for the
others). A binding is computed with numpy when its op is in the table below, otherwise by
compiling that one op alone for ``llvm``, its arguments as constants (exact for every Relax
op, ~0.1 s per op). Arithmetic over bool must have been legalised first
(:mod:`.legalize_bool`); a binding that still cannot be computed raises
:class:`ConstantEvalError` naming it, its op and the error.
"""
from __future__ import annotations

from typing import Callable, Dict

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
        "relax.strided_slice": _strided_slice,
        "relax.concat": lambda call, a: np.concatenate(a[0], axis=int(call.attrs.axis)),
        "relax.cumsum": lambda call, a: _scan(np.cumsum, call, a[0]),
        "relax.cumprod": lambda call, a: _scan(np.cumprod, call, a[0]),
        "relax.index_tensor": lambda call, a: a[0][tuple(a[1])],
        "relax.take": lambda call, a: np.take(a[0], a[1], axis=int(call.attrs.axis)),
    }


def _ints(tuple_expr) -> list:
    return [int(_prim(f)) for f in tuple_expr.fields]


def _strided_slice(call, a):
    index = [slice(None)] * a[0].ndim
    axes, begin, end, strides = (_ints(t) for t in call.args[1:5])
    for axis, lo, hi, step in zip(axes, begin, end, strides):
        index[axis] = slice(lo, hi, step)
    return a[0][tuple(index)]


def _scan(fn, call, x):
    if call.attrs.exclusive:
        raise NotImplementedError("exclusive scans are left to the VM")
    if _dtype(call) == "bool":  # the importer's typing, not torch's int64: see legalize_bool
        raise NotImplementedError("a scan typed bool is left to the VM")
    return fn(x, axis=int(call.attrs.axis), dtype=_dtype(call))



_NP_OPS = _np_ops()


def _is_tensor(expr) -> bool:
    return isinstance(expr.ty, relax.TensorType)


class ConstantEvalError(Exception):
    """A constant binding that neither numpy nor a compiled op could compute."""


class ConstantValues:
    """Which expressions of one function are constant, and their values, each computed once.

    ``bindings``: the function's :func:`function_bindings`. Values are numpy arrays of the
    expression's dtype (bfloat16 as ``ml_dtypes.bfloat16``, as TVM returns it).
    """

    def __init__(self, bindings: Bindings):
        self.bindings = bindings
        self._constant: Dict[relax.Var, bool] = {}
        self._values: Dict[relax.Var, np.ndarray] = {}

    def is_constant(self, expr: relax.Expr) -> bool:
        """True when ``expr`` reads no function parameter and calls only operators (no
        functions, no ``call_tir``), so its value is known at compile time."""
        if isinstance(expr, relax.Var):
            if expr not in self._constant:
                self._constant[expr] = False  # guards against (impossible) cycles
                value = self.bindings.get(expr)
                self._constant[expr] = value is not None and self.is_constant(value)
            return self._constant[expr]
        if isinstance(expr, (tvm.ir.Constant, relax.ShapeExpr, tvm.tirx.IntImm, tvm.tirx.FloatImm)):
            return True
        if isinstance(expr, relax.Call):
            if not isinstance(expr.op, tvm.ir.Op) or expr.op.name.startswith("relax.call_"):
                return False
            return all(self.is_constant(a) for a in expr.args)
        if isinstance(expr, (relax.Tuple, relax.TupleGetItem)):
            return all(self.is_constant(c) for c in _children(expr))
        return False

    def value(self, expr: relax.Expr) -> np.ndarray:
        """The value of a tensor expression that :meth:`is_constant`; raises
        :class:`ConstantEvalError` naming the binding that failed."""
        if isinstance(expr, tvm.ir.Constant):
            return expr.value.numpy()
        if isinstance(expr, relax.Call):
            return self._compute(expr)
        if not isinstance(expr, relax.Var) or expr not in self.bindings:
            raise ConstantEvalError(f"{expr} is not a constant expression of the function")
        if expr not in self._values:
            bound = self.bindings[expr]
            try:
                self._values[expr] = self.value(bound)
            except ConstantEvalError:
                raise
            except Exception as err:  # noqa: BLE001 - any TVM/numpy failure, named
                last = (str(err).strip().splitlines() or [""])[-1]
                raise ConstantEvalError(f"{expr.name} = {_op_name(bound)}(...) could not "
                                        f"be evaluated: {type(err).__name__}: {last}") from err
        return self._values[expr]

    def _argument(self, arg):
        if isinstance(arg, relax.Tuple):
            return [self._argument(f) for f in arg.fields]
        if isinstance(arg, relax.Expr) and _is_tensor(arg):
            return self.value(arg)
        return arg

    def _compute(self, call) -> np.ndarray:
        if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
                and _is_tensor(call)):
            raise ConstantEvalError(f"not a tensor-valued operator call: {call}")
        args = [self._argument(a) for a in call.args]
        fn = _NP_OPS.get(call.op.name)
        if fn is not None:
            try:
                return np.asarray(fn(call, args))
            except (NotImplementedError, TypeError, ValueError, AttributeError, IndexError):
                pass  # an attribute form the table does not know: compile the op instead
        return _evaluate_op_with_vm(call, args)


def _op_name(expr) -> str:
    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) \
        else type(expr).__name__


def _as_constant(arg, value):
    if isinstance(arg, relax.Tuple):
        return relax.Tuple([_as_constant(f, v) for f, v in zip(arg.fields, value)])
    if isinstance(arg, relax.Expr) and _is_tensor(arg):
        return relax.const(value, str(arg.ty.dtype))
    return arg


def _evaluate_op_with_vm(call, args) -> np.ndarray:
    """Compile ``call`` alone for llvm, its tensor arguments replaced by their values."""
    new_call = relax.Call(call.op, [_as_constant(a, v) for a, v in zip(call.args, args)],
                          call.attrs, call.ty_args)
    builder = relax.BlockBuilder()
    with builder.function("main", []):
        with builder.dataflow():
            out = builder.emit_output(new_call)
        builder.emit_func_output(out)
    ex = tvm.compile(builder.get(), target="llvm")
    return relax.VirtualMachine(ex, tvm.cpu())["main"]().numpy()
