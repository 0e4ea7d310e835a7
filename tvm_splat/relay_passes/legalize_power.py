"""``LegalizeIntegerPower``: small integer powers become products, exact on every target.

TVM 0.27 lowers ``relax.power(x, 2.0)`` to ``powf(x, 2.0f)`` and compiles CUDA with
``--use_fast_math`` (``tvm.support.nvcc``; ``TVM_CUDA_NVCC_NO_FAST_MATH`` turns it off), under
which ``powf`` is ``exp2(y * log2(x))``: **NaN for every negative x**. The RMSNorm of Llama,
Mistral, Qwen2 and their kin (``hidden.pow(2).mean(-1)``) therefore gives NaN on the GPU the
moment one hidden value is negative (seen on an H200: a Mistral-like model through
``tvm.compile``, dense or sparsified, returned all-NaN; the same graph on ``llvm`` is right).
This pass rewrites ``power(x, k)`` with a scalar constant exponent ``k`` in {1, 2, 3, 4} into
``x``, ``x*x``, ``x*x*x``, ``(x*x)*(x*x)`` — what ``x ** k`` means, correctly rounded at each
product — and leaves every other power alone. ``SparsifyAttention`` applies it itself.
"""
from __future__ import annotations

import tvm
from tvm import relax

from ._rewrite import rewrite_functions

__all__ = ["LegalizeIntegerPower", "legalize_integer_power"]

#: the exponents rewritten; higher ones are rare in models and would chain more roundings
INTEGER_EXPONENTS = (1, 2, 3, 4)


def _integer_exponent(expr):
    """The exponent as an int when ``expr`` is a scalar constant in :data:`INTEGER_EXPONENTS`."""
    if not isinstance(expr, tvm.ir.Constant) or expr.value.numpy().ndim != 0:
        return None
    value = float(expr.value.numpy())
    return int(value) if value.is_integer() and int(value) in INTEGER_EXPONENTS else None


@relax.expr_functor.mutator
class _IntegerPower(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.power"):
            return call
        base, exponent = call.args
        k = _integer_exponent(exponent)
        if k is None or not isinstance(base.ty, relax.TensorType) or base.ty.dtype != call.ty.dtype:
            return call
        self.count += 1
        if k == 1:
            return base
        square = self.builder_.emit(relax.op.multiply(base, base))
        if k == 2:
            return square
        return relax.op.multiply(square, base if k == 3 else square)


def legalize_integer_power(mod: tvm.IRModule):
    """``(module, how many powers were rewritten)``; the module is unchanged when none were."""
    return rewrite_functions(_IntegerPower(mod), mod)


@tvm.ir.transform.module_pass(opt_level=0, name="LegalizeIntegerPower")
class LegalizeIntegerPower:
    """Module pass: ``power(x, k)`` for a constant k in 1..4 becomes products of ``x`` (see the
    module docstring). ``count`` holds how many powers the last run rewrote."""

    def __init__(self):
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod, self.count = legalize_integer_power(mod)
        return mod
