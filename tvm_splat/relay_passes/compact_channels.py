"""CompactPrunedChannels: turn zeroed channel groups of a pruned model into smaller dense ops.

Structured pruning (HESSO / GETA, see ``/work/shared/design/seed_papers.txt``) leaves whole
groups of weights at zero -- hidden units of an MLP, conv filters (with their BN scale and
shift), attention heads -- but the model still computes them.  This pass finds those groups
in a Relax module imported from PyTorch and removes them, producing physically smaller
dense ops that compute the *same* outputs.

Usage::

    mod, report = compact_pruned_channels(mod, params)           # functional form
    p = CompactPrunedChannels(params=params)                      # a tvm.ir.transform.Pass
    mod = tvm.transform.Sequential([p, relax.transform.FoldConstant()])(mod)
    p.report.summary()

``mod``: a Relax ``IRModule`` (e.g. ``from_exported_program(torch.export.export(model.eval(),
...))``).  Weights are either constants already (``relax.transform.BindParams``) or function
parameters whose values are given in ``params``: ``{"p_fc1_weight": array, ...}`` or the
``{"main": [arrays]}`` mapping of ``relax.frontend.detach_params``.  Supplied parameters are
bound as constants in the returned module.  Parameters left without a value make the
chains through them skipped (reported), never guessed.

Dependency rules
----------------
Which ops form a chain and what constrains what is ``OP_RULES`` in
``tvm_splat.channel_rules`` (module docstring there); the torch-side group discovery
(``tvm_splat.pruning.discover_groups``) reads the same table.  In short:

* ``linear -> act -> linear``: group = rows of W1 / b1 and columns of W2.  A unit goes when
  its W1 row is zero; its constant output ``act(b1[r])`` (``act(0) = 0`` for
  relu/gelu/silu/tanh, ``sigmoid(0) = 0.5``) is folded into the next layer's bias.
* ``conv -> BN -> relu -> conv``: group = filters of conv1, BN channels, input planes of
  conv2.  A zero filter yields the constant ``relu(beta - mean*gamma/sqrt(var+eps))``; it
  is folded into the next conv's bias when that conv has no padding, and must be exactly 0
  (HESSO groups include gamma/beta) when it is zero-padded -- otherwise the channel is kept
  and the report says why.  ``conv -> BN -> act -> pool -> flatten -> linear`` likewise.
* attention heads: q/k/v rows and output-projection columns of one head, plus the head
  count of every reshape; removable when the head's v rows (and v bias) are zero.
* residual adds tie groups: a channel goes only when every branch agrees; an add with the
  block input (not a prunable producer) keeps all its channels.
* anything the analysis does not understand pins the groups that reach it (kept, with the
  reason in the report and the log).

``tol``: weights with ``|w| <= tol`` count as zero, and so do channel constants of magnitude
``<= tol`` (the model then changes by at most that much); the default 0 is exact.
Eval-mode models only (``batch_norm`` in training mode is a barrier).

NaN and inf: the compacted model gives the same NaN/inf as the model.  A removed channel
that is 0 meets its consumer's weights as ``0 * w``; torch gives NaN there when ``w`` is
NaN or inf, so a channel whose consumer weights hold a non-finite value is kept (the report
says so).  Non-finite producer weights or batch-norm parameters make the channel
input-dependent, so it is kept too.

Bad input fails early with a ``ValueError`` naming it: a ``params`` name that is no weight
parameter of the module (the message lists the known ones), a value whose shape or dtype
differs from its parameter's, a ``{func: [arrays]}`` entry of the wrong length, an unknown
function in ``functions``, a negative or non-finite ``tol``.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping

import numpy as np
import tvm
from tvm import relax

from ..channel_rules import OP_RULES, Role
from ._channel_analysis import FunctionAnalysis
from ._channel_report import CompactionReport, GroupReport
from ._channel_rewrite import FunctionRewriter
from ._channel_state import static_shape

__all__ = [
    "CompactPrunedChannels",
    "CompactionReport",
    "OP_RULES",
    "Role",
    "compact_pruned_channels",
    "count_params",
]

logger = logging.getLogger(__name__)


def compact_pruned_channels(
    mod: tvm.IRModule,
    params: Mapping | None = None,
    *,
    tol: float = 0.0,
    functions: list[str] | None = None,
) -> tuple[tvm.IRModule, CompactionReport]:
    """Remove zeroed channel groups from every Relax function of ``mod``.

    Parameters
    ----------
    mod : IRModule with Relax functions (static shapes; fp32/fp16 weights).
    params : weight values by parameter name, or ``{func_name: [arrays]}`` as returned by
        ``relax.frontend.detach_params``; bound as constants.  Arrays may be numpy,
        ``tvm.runtime.Tensor`` or torch tensors.
    tol : zero tolerance (see module docstring); 0 = exact zeros only.
    functions : names of the functions to process (default: all Relax functions).

    Returns
    -------
    (new module, CompactionReport).  The input module is not modified.

    Raises
    ------
    ValueError for unknown ``params`` names or ``functions``, a value whose shape or dtype
    differs from its parameter's, or a ``tol`` that is not a finite number >= 0.
    """
    tol = _check_tol(tol)
    relax_funcs = {gv.name_hint: (gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)}
    _check_functions(functions, relax_funcs)
    values = _param_values(params, {n: f for n, (_, f) in relax_funcs.items()})
    report = CompactionReport(tol=tol)
    out = mod
    for name, (gv, func) in relax_funcs.items():
        if functions and name not in functions:
            continue
        func, const_names, weight_params = _bind(func, values.get(name, {}))
        before = count_params(func)
        flops_before = _flops(func)
        new = func
        an = FunctionAnalysis(func, name, tol, const_names, weight_params).run()
        failure = None
        if any(g.status == "pruned" for g in an.groups.values()):
            try:
                rw = FunctionRewriter(an)
                new = rw.run()
                report.layers += rw.layers
            except Exception as err:  # noqa: BLE001 - RewriteError or a TVM error
                # Never hand back a half-rewritten model: keep the (bound) original function.
                logger.exception("CompactPrunedChannels: rewrite of %s failed", name)
                failure = f"{type(err).__name__}: {err}"
                report.error = f"{name}: {failure}"
                new = func
        groups = [_group_report(name, g) for g in sorted(an.groups.values(), key=lambda g: g.gid)]
        if failure:
            for g in groups:
                if g.status == "pruned":
                    g.status, g.removed_units = "skipped", []
                    g.reasons.append(f"rewrite abandoned: {failure}")
        report.groups += groups
        after = count_params(new)
        report.params_before += before[0]
        report.param_bytes_before += before[1]
        report.params_after += after[0]
        report.param_bytes_after += after[1]
        report.flops_before += flops_before
        report.flops_after += _flops(new)
        out = _replace(out, gv, new)
    _log(report)
    return out, report


@tvm.transform.module_pass(opt_level=0, name="CompactPrunedChannels")
class CompactPrunedChannels:
    """Relax module pass wrapping :func:`compact_pruned_channels`.

    After the pass ran, ``pass_obj.report`` holds the :class:`CompactionReport` of the last
    module it transformed.
    """

    def __init__(self, params: Mapping | None = None, tol: float = 0.0,
                 functions: list[str] | None = None):
        self.params = params
        self.tol = _check_tol(tol)
        self.functions = functions
        self.report: CompactionReport | None = None

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:  # noqa: ARG002
        mod, self.report = compact_pruned_channels(mod, self.params, tol=self.tol,
                                                   functions=self.functions)
        return mod


# ---------------------------------------------------------------------------- helpers


def count_params(func_or_mod) -> tuple[int, int]:
    """(elements, bytes) of all distinct non-scalar constants in a function or module."""
    funcs = ([f for _, f in func_or_mod.functions_items() if isinstance(f, relax.Function)]
             if isinstance(func_or_mod, tvm.IRModule) else [func_or_mod])
    seen, n, nbytes = set(), 0, 0

    def visit(e):
        nonlocal n, nbytes
        if isinstance(e, tvm.ir.GenericConst) and hasattr(e.value, "numpy") and e not in seen:
            seen.add(e)
            shape = tuple(int(d) for d in e.value.shape)
            if len(shape) == 0:
                return  # scalars (scales, fill values) are not parameters
            size = int(np.prod(shape))
            n += size
            nbytes += size * np.dtype(str(e.value.dtype)).itemsize
    for f in funcs:
        relax.analysis.post_order_visit(f.body, visit)
    return n, nbytes


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "numpy"):
        try:
            return x.detach().cpu().numpy() if hasattr(x, "detach") else x.numpy()
        except Exception:  # noqa: BLE001
            pass
    return np.asarray(x)


def _check_tol(tol) -> float:
    """``tol`` as a float, or ``ValueError``: a finite real number >= 0 (a negative one would
    silently count no weight as zero)."""
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite real number >= 0 (|w| <= tol counts as zero), got {tol!r}")
    return float(tol)


def _check_functions(functions, relax_funcs: dict) -> None:
    if functions is None:
        return
    if isinstance(functions, str):
        raise ValueError(f"functions must be a list of function names, got the string {functions!r}")
    unknown = [f for f in functions if f not in relax_funcs]
    if unknown:
        raise ValueError(f"functions {unknown} are not Relax functions of the module "
                         f"(it has {sorted(relax_funcs)})")


def _weight_params(func) -> list:
    """The parameters of ``func`` that may be bound: those after ``num_input``, else all."""
    if func.attrs is not None and "num_input" in func.attrs:
        return list(func.params)[int(func.attrs["num_input"]):]
    return list(func.params)


def _param_values(params, funcs: dict) -> dict:
    """``params`` (flat ``{name: array}`` or ``{func: [arrays]}``) -> func -> {param name: numpy},
    every name, count, shape and dtype checked against the functions' parameters."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping (name -> array, or function -> list of arrays), "
                         f"got {type(params).__name__}")
    flat = {k: v for k, v in params.items() if not isinstance(v, (list, tuple))}
    values = {}
    for fname, func in funcs.items():
        weights = _weight_params(func)
        if isinstance(params.get(fname), (list, tuple)):
            arrays = params[fname]
            if len(arrays) != len(weights):
                raise ValueError(f"params[{fname!r}] has {len(arrays)} arrays but function {fname} has "
                                 f"{len(weights)} weight parameters ({[p.name for p in weights]})")
            given = dict(zip((p.name for p in weights), arrays))
        else:
            given = {p.name: flat[p.name] for p in weights if p.name in flat}
        values[fname] = {p.name: _checked_value(fname, p, given[p.name]) for p in weights if p.name in given}
    _check_unknown(params, flat, funcs)
    return values


def _check_unknown(params, flat: dict, funcs: dict) -> None:
    lists = [k for k, v in params.items() if isinstance(v, (list, tuple)) and k not in funcs]
    if lists:
        raise ValueError(f"params {lists} hold lists of arrays but are not Relax functions of the module "
                         f"(it has {sorted(funcs)})")
    known = {p.name for f in funcs.values() for p in _weight_params(f)}
    unknown = sorted(k for k in flat if k not in known)
    if unknown:
        inputs = {p.name for f in funcs.values() for p in f.params} - known
        what = [f"{k} (a model input, not a weight)" if k in inputs else k for k in unknown]
        raise ValueError(f"params names {what} are not weight parameters of the module; "
                         f"known: {sorted(known)}")


def _checked_value(fname: str, param, value) -> np.ndarray:
    arr = _to_numpy(value)
    want_shape, want_dtype = static_shape(param), getattr(param.ty, "dtype", None)
    if want_shape is not None and tuple(arr.shape) != want_shape:
        raise ValueError(f"params[{param.name!r}] has shape {tuple(arr.shape)} but parameter "
                         f"{param.name} of {fname} has shape {want_shape}")
    if want_dtype is not None and str(arr.dtype) != str(want_dtype):
        raise ValueError(f"params[{param.name!r}] has dtype {arr.dtype} but parameter "
                         f"{param.name} of {fname} has dtype {want_dtype}")
    return arr


def _bind(func, values: dict):
    """Bind checked ``values`` (param name -> numpy) as named constants;
    -> (func, const -> name, unbound weight params)."""
    num_input = None
    if func.attrs is not None and "num_input" in func.attrs:
        num_input = int(func.attrs["num_input"])
    weight_params = list(func.params)[num_input:] if num_input is not None else []
    binding, const_names = {}, {}
    for p in func.params:
        if p.name in values:
            c = relax.const(values[p.name])
            binding[p] = c
            const_names[c] = p.name
    if binding:
        func = func.bind_params(binding)
        # bind_params keeps the constants we built: recover them for naming
        const_names = _match_consts(func, const_names)
        if num_input is not None:
            # bound weights are gone from the signature; inputs stay first
            func = func.with_attr("num_input", num_input)
    unbound = {p for p in func.params if p in set(weight_params)}
    return func, const_names, unbound


def _match_consts(func, const_names: dict) -> dict:
    found = {}

    def visit(e):
        if isinstance(e, tvm.ir.GenericConst) and e in const_names:
            found[e] = const_names[e]
    relax.analysis.post_order_visit(func.body, visit)
    return found or const_names


def _flops(func) -> int:
    """2*M*N*K of every static-shape matmul and conv2d binding of ``func``."""
    total = 0
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if not (isinstance(v, tvm.ir.Call) and isinstance(v.op, tvm.ir.Op)):
                continue
            out = static_shape(b.var)
            if out is None:
                continue
            if v.op.name == "relax.matmul":
                a = static_shape(v.args[0])
                if a:
                    total += 2 * int(np.prod(out)) * a[-1]
            elif v.op.name == "relax.nn.conv2d":
                w = static_shape(v.args[1])
                if w:
                    total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
    return total


def _replace(mod: tvm.IRModule, gv, func) -> tvm.IRModule:
    new = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    new[gv] = func
    return new


def _group_report(fname: str, g) -> GroupReport:
    return GroupReport(
        group_id=g.gid, function=fname, channels=g.channels, unit=g.unit,
        members=list(g.members), status=g.status, removed_units=list(g.removed_units),
        reasons=list(g.pins), notes=list(g.notes),
        folded_constants=any("folded" in n for n in g.notes),
    )


def _log(report: CompactionReport) -> None:
    logger.info("%s", report.summary())
    for g in report.groups:
        if g.status != "skipped":
            continue
        # A pinned group with no zero weights is routine (e.g. a residual stream); one
        # that had zero units the user presumably wanted gone deserves a warning.
        level = logging.WARNING if any("zero" in n for n in g.notes) or "weight" in " ".join(g.reasons) else logging.INFO
        logger.log(level, "skipped channel group %s#%d (%s): %s", g.function, g.group_id,
                   ", ".join(g.members), "; ".join(g.reasons))
