"""One way to run a counting ``PyExprMutator`` over every Relax function of a module."""
from __future__ import annotations

import tvm
from tvm import relax


def rewrite_functions(mutator, mod: tvm.IRModule):
    """``(module, mutator.count)``: every Relax function of ``mod`` visited by ``mutator`` (built
    on ``mod``, counting what it changed in ``count``); ``mod`` itself when nothing changed."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return (mutator.builder_.get(), mutator.count) if mutator.count else (mod, 0)
