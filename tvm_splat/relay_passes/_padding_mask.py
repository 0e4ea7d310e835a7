"""Padding masks: HuggingFace's ``attention_mask`` combined with a constant structural mask.

transformers 5.x builds every mask (sdpa and eager, Mistral, Qwen2, Llama, GPT-2, BERT) as
one boolean conjunction, then turns it into scores with ``where(mask, 0, fill)``::

    padding = index_tensor(astype(attention_mask, bool), (batch_idx, kv_idx))  # [b, 1, 1, n]
    mask    = and(structural, padding)                                          # [b, 1, n, n]

where ``batch_idx`` is ``arange(batch)`` on axis 0 and ``kv_idx`` ``arange(n)`` on the last
axis, so ``padding[b, 0, 0, j] = attention_mask[b, j]``. :func:`split_key_padding` finds that
shape in a mask term: the constant factors stay a compile-time mask (ACSR), the padding factor
becomes per-batch key lengths. The kernels take lengths (key ``j`` of batch ``b`` exists only
when ``j < kv_len[b]``), so the ``attention_mask`` must be right-padded (ones, then zeros);
:func:`kv_lengths_from_padding_mask` computes the lengths at run time and raises a
``ValueError`` naming the batch row when a mask is not right-padded (left padding, holes).
It is called from the compiled module through ``call_pure_packed`` by its global name
:data:`KV_LENGTHS_FUNC`, so the module needs ``tvm_splat`` imported in the process that runs
it; on the GPU it copies the ``[batch, n]`` mask to the host once per call (and waits for it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from ._attention_match import MaskTerm
from ._constant_eval import ConstantEvalError, ConstantValues

KV_LENGTHS_FUNC = "tvm_splat.kv_lengths_from_padding_mask"


@dataclass
class KeyPadding:
    """A mask term split in two: ``keep`` (bool, broadcastable to the scores: the constant
    factors, all True when there are none) and ``mask``, the ``[batch, n]`` runtime tensor
    (the model's ``attention_mask`` parameter) whose row ``b`` says which keys exist."""

    keep: np.ndarray
    mask: relax.Expr
    finite_fill: bool


def _static_shape(expr) -> Optional[tuple]:
    shape = getattr(expr.ty, "shape", None)
    if not isinstance(shape, relax.ShapeExpr):
        return None
    dims = [getattr(d, "value", None) for d in shape.values]
    return tuple(int(d) for d in dims) if all(isinstance(d, int) for d in dims) else None


def _op(graph_value):
    return graph_value.op.name if isinstance(graph_value, relax.Call) and \
        isinstance(graph_value.op, tvm.ir.Op) else None


class _Walker:
    def __init__(self, constants: ConstantValues):
        self.constants = constants

    def value(self, expr):
        while isinstance(expr, relax.Var) and expr in self.constants.bindings:
            expr = self.constants.bindings[expr]
        return expr

    def strip(self, expr, ops):
        """Walk back through the ``ops`` that keep values (casts, broadcasts)."""
        while _op(self.value(expr)) in ops:
            expr = self.value(expr).args[0]
        return expr

    def factors(self, expr) -> List[relax.Expr]:
        """The operands of a conjunction tree of bool ``and``s."""
        expr = self.strip(expr, ("relax.broadcast_to",))
        call = self.value(expr)
        if _op(call) in ("relax.bitwise_and", "relax.logical_and") and str(call.ty.dtype) == "bool":
            return self.factors(call.args[0]) + self.factors(call.args[1])
        return [expr]

    def scalar(self, expr) -> Optional[float]:
        if not self.constants.is_constant(expr) or _static_shape(expr) is None \
                or int(np.prod(_static_shape(expr))) != 1:
            return None
        try:
            return float(self.constants.value(expr).reshape(()))
        except ConstantEvalError:
            return None

    def padding_source(self, factor, batch: int, n: int) -> Optional[relax.Expr]:
        """``attention_mask`` when ``factor`` is ``index_tensor(bool(mask), (batch_idx,
        kv_idx))`` giving ``mask[b, j]`` at ``[b, ., ., j]``; else None."""
        call = self.value(factor)
        shape = _static_shape(call) if isinstance(call, relax.Expr) else None
        if _op(call) != "relax.index_tensor" or shape is None or len(shape) != 4 \
                or shape[0] != batch or shape[-1] != n or shape[2] != 1:
            return None
        indices = self.value(call.args[1])
        if not isinstance(indices, relax.Tuple) or len(indices.fields) != 2 \
                or not all(self.constants.is_constant(i) for i in indices.fields):
            return None
        try:
            rows, cols = (np.broadcast_to(self.constants.value(i), shape) for i in indices.fields)
        except (ConstantEvalError, ValueError):
            return None
        want_rows = np.broadcast_to(np.arange(batch).reshape(batch, 1, 1, 1), shape)
        want_cols = np.broadcast_to(np.arange(n).reshape(1, 1, 1, n), shape)
        if not (np.array_equal(rows, want_rows) and np.array_equal(cols, want_cols)):
            return None
        source = self.value(call.args[0])
        if _op(source) == "relax.astype" and str(source.ty.dtype) == "bool":
            source = source.args[0]
        source = self.strip(source, ("relax.reshape",))
        if not isinstance(self.value(source), relax.Var) or _static_shape(source) != (batch, n):
            return None  # not a parameter of the function itself
        return self.value(source)


def split_key_padding(term: MaskTerm, constants: ConstantValues, batch: int, n: int,
                      is_masked) -> Optional[KeyPadding]:
    """The term as constant factors + a key-padding tensor, or None when it is not of that
    shape (see the module docstring). ``is_masked(value, dtype)`` says which fill values
    mask like ``-inf``."""
    walker = _Walker(constants)
    finite_fill = False
    if term.kind == "additive":
        where = walker.value(walker.strip(term.expr, ("relax.astype", "relax.broadcast_to")))
        if _op(where) != "relax.where":
            return None
        attend, fill = walker.scalar(where.args[1]), walker.scalar(where.args[2])
        if attend != 0.0 or fill is None or not is_masked(np.float64(fill), term.value_dtype):
            return None
        condition, finite_fill = where.args[0], bool(np.isfinite(fill))
    elif term.kind == "keep" and term.fill is not None:
        if not is_masked(np.float64(term.fill), term.value_dtype):
            return None
        condition, finite_fill = term.expr, bool(np.isfinite(term.fill))
    else:
        return None
    keep, source = np.ones((1, 1), dtype=bool), None
    for factor in walker.factors(condition):
        if constants.is_constant(factor):
            try:
                keep = keep & constants.value(factor).astype(bool)
            except (ConstantEvalError, ValueError):
                return None
            continue
        found = walker.padding_source(factor, batch, n)
        if found is None or (source is not None and not found.same_as(source)):
            return None
        source = found
    if source is None:
        return None
    return KeyPadding(keep, source, finite_fill)


@tvm_ffi.register_global_func(KV_LENGTHS_FUNC, override=True)  # a re-import replaces it
def kv_lengths_from_padding_mask(mask):
    """``int32 [batch]`` key lengths of a right-padded ``[batch, n]`` padding mask (nonzero =
    the key exists), on the mask's device; ``ValueError`` naming the first row that is not
    ones followed by zeros."""
    values = mask.numpy() != 0
    lengths = values.sum(axis=1)
    prefix = np.arange(values.shape[1])[None, :] < lengths[:, None]
    bad = np.flatnonzero((values != prefix).any(axis=1))
    if bad.size:
        row = values[bad[0]].astype(np.int8)
        raise ValueError(f"attention_mask row {bad[0]} is not right-padded (ones, then zeros): "
                         f"{row.tolist() if row.size <= 32 else row[:32].tolist() + ['...']}; "
                         f"the sparse kernels take key lengths, so pad on the right")
    return tvm.runtime.tensor(lengths.astype(np.int32), device=mask.device)
