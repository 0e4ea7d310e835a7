"""``LegalizeBoolArithmetic``: give integer types back to arithmetic over bool tensors.

``torch.cumsum`` (and ``cumprod``) over a bool tensor returns int64 in PyTorch; TVM 0.27's
PyTorch importer types the result bool (it casts the input of ``sum``/``prod`` itself, not
that of the scans), and LLVM then refuses to compile it (``InternalError: Check failed: (t.MatchesCode(DLDataTypeCode::kDLFloat))``).
transformers 5.x builds every causal / sliding-window mask through such a ``cumsum`` (it
finds packed sequences from ``position_ids``), so every Mistral, Qwen2, Llama or GPT-2
imported as is crashes ``tvm.compile`` — and ``SparsifyAttention``, which evaluates the
mask. This pass casts the input of each such op to int64 and computes in int64 (what torch
computes); the types of everything downstream are re-derived, so ``equal``/``index_tensor``
over the result see integers. Nothing else changes.
"""
from __future__ import annotations

import tvm
from tvm import relax

from ._rewrite import rewrite_functions

__all__ = ["LegalizeBoolArithmetic"]

# The scans the importer leaves bool-typed; torch returns int64 for them over bool.
_SCANS = {"relax.cumsum": relax.op.cumsum, "relax.cumprod": relax.op.cumprod}


def _is_bool_tensor(expr) -> bool:
    return isinstance(expr.ty, relax.TensorType) and str(expr.ty.dtype) == "bool"


@relax.expr_functor.mutator
class _BoolArithmetic(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name in _SCANS):
            return call
        data = call.args[0]
        if not (_is_bool_tensor(data) and _is_bool_tensor(call)):
            return call
        self.count += 1
        widened = self.builder_.emit(relax.op.astype(data, "int64"))
        return _SCANS[call.op.name](widened, call.attrs.axis, "int64", call.attrs.exclusive)


def legalize_bool_arithmetic(mod: tvm.IRModule):
    """``(module, how many ops were widened)``; the module is unchanged when none were."""
    return rewrite_functions(_BoolArithmetic(mod), mod)


@tvm.ir.transform.module_pass(opt_level=0, name="LegalizeBoolArithmetic")
class LegalizeBoolArithmetic:
    """Module pass: ``cumsum``/``cumprod`` over bool compute in int64, as in PyTorch (see the module docstring). ``count`` holds how many ops the last run changed."""

    def __init__(self):
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod, self.count = legalize_bool_arithmetic(mod)
        return mod
