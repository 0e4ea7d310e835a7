"""Per-op handlers of the channel analysis, registered by Relax op name.

Like Relax's ``legalize_ops`` (``register_legalize("relax.add")``), each handler is a small
function registered under the op names it understands::

    @register(*ops_of_family("unary"))
    def _unary(an: FunctionAnalysis, var: relax.Var, call: relax.Call) -> None: ...

A handler reads the states of the call's arguments (``an.st(arg)``) and records the state
of ``var`` (``an.states[var]``) and, when the rewrite must change the call, a plan
(``an.plans[var]``); it raises ``Unsupported`` for what it cannot follow, which pins the
groups the call touches.  Which ops exist, and their roles, is ``OP_RULES``
(``tvm_splat.channel_rules``): every op there has exactly one handler here.
"""

from __future__ import annotations

from collections.abc import Callable

from ..channel_rules import OP_RULES

Handler = Callable  # (FunctionAnalysis, relax.Var, relax.Call) -> None
HANDLERS: dict[str, Handler] = {}


def register(*op_names: str):
    """Decorator: ``fn`` handles the Relax ops ``op_names`` (each must be in ``OP_RULES``)."""
    unknown = [n for n in op_names if n not in OP_RULES]
    if unknown:
        raise KeyError(f"ops {unknown} have no rule in OP_RULES: add the rule first")

    def deco(fn: Handler) -> Handler:
        for name in op_names:
            if name in HANDLERS:
                raise KeyError(f"{name} already has handler {HANDLERS[name].__name__}")
            HANDLERS[name] = fn
        return fn

    return deco


def handler_for(op_name: str) -> Handler | None:
    """The handler of ``op_name``, None for ops outside the table (a barrier)."""
    return HANDLERS.get(op_name)
