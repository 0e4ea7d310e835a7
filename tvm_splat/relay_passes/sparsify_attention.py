"""``SparsifyAttention``: rewrite attention in a Relax module into ACSR sparse kernels.

The design card names it ``relay.transform.SparsifyAttention()``; Relay is gone from
TVM >= 0.20, so this is a ``tvm.ir.transform`` module pass over **Relax** IRModules (e.g.
from ``torch.export`` + ``relax.frontend.torch.from_exported_program``), usable alone or in
``tvm.transform.Sequential`` next to TVM's passes, before ``tvm.compile``.

Per attention site (see :mod:`._attention_match` for the forms recognised) the pass

0. legalises arithmetic over bool tensors (:mod:`.legalize_bool`: the importer's bool
   ``cumsum`` that every transformers 5.x mask contains and LLVM cannot compile) and
   rewrites small integer powers into products (:mod:`.legalize_power`: RMSNorm's
   ``pow(2)`` is NaN for negative inputs under TVM's fast-math CUDA ``powf``),
1. reads the site's constant mask, if any, into a boolean keep-mask (:mod:`._site_mask`;
   each constant binding is computed once per function, however many sites share it); a
   HuggingFace padding ``attention_mask`` and-ed into it (a runtime input) becomes per-batch
   key lengths instead (:mod:`._padding_mask`: right padding only, checked at run time),
2. picks the sparsity from the user pattern and/or that mask (:mod:`._pattern_choice`),
3. plans the site (:func:`tvm_splat.planner.plan`, the same plan ``sparse_attention`` runs:
   kernel family, tuned or default knobs, tile plan, launch steps) and replaces the ``P @ V``
   (or ``nn.attention``) binding by one ``R.call_tir`` per launch step of the plan, with the
   plan's int32 tables as constants; the now dead dense score code is dropped.

Everything else in the module is left as it is. A site that cannot be rewritten exactly is
skipped with a reason. What happened is in ``pass_obj.report`` (:class:`SparsifyReport`)
and logged on the ``tvm_splat.relay_passes`` logger.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Dict, List, Optional

import numpy as np
import tvm
from tvm import relax

from ..formats import ACSR
from ..kernels import VARIANTS
from ..kernels.common import KV_LEN
from ..kernels.spec import SUPPORTED_DTYPES
from ..planner import AttentionPlan, choose_variant, plan
from ..schedules.targets import as_target, target_name
from ..tensors import check_acsr_tables
from ._attention_match import AttentionMatch, find_attention
from ._constant_eval import ConstantValues, function_bindings
from ._pattern_choice import PatternChoice, SiteInfo, choose_acsr, describe
from ._padding_mask import KV_LENGTHS_FUNC
from ._site_mask import analyse_site_mask
from .legalize_bool import legalize_bool_arithmetic
from .legalize_power import legalize_integer_power
from .sparsify_report import SiteReport, SparsifyReport

logger = logging.getLogger("tvm_splat.relay_passes")

__all__ = ["SparsifyAttention"]


class _Site:
    """A site that will be rewritten, with its plan; ``kv_padding``: the ``[batch, n]``
    padding mask parameter its key lengths come from (plans with ``kv_lengths``), or None."""

    def __init__(self, site: AttentionMatch, plan: AttentionPlan, site_name: str, kv_padding=None):
        self.site, self.plan, self.site_name, self.kv_padding = site, plan, site_name, kv_padding


def _check_names(names) -> Optional[Dict[int, str]]:
    if names is None:
        return None
    if isinstance(names, Mapping):
        table = dict(names)
    elif isinstance(names, Sequence) and not isinstance(names, str):
        table = dict(enumerate(names))
    else:
        raise TypeError(f"names must be a sequence of site names or a dict index -> name, "
                        f"got {type(names).__name__}")
    for key, value in table.items():
        if not isinstance(key, int) or not isinstance(value, str):
            raise TypeError(f"names must map int site indices to str names, got {key!r}: "
                            f"{value!r}")
    if len(set(table.values())) != len(table):
        raise ValueError(f"names must be unique, got {sorted(table.values())}")
    return table


def _takes_a_module(pass_cls):
    """Make calling a module pass class's instance on anything but an ``IRModule`` a
    ``TypeError`` that says so (TVM's own reads ``Mismatched type on argument #1 when calling
    transform.RunPass``)."""
    run = pass_cls.__call__

    def __call__(self, mod):
        if not isinstance(mod, tvm.IRModule):
            raise TypeError(f"{type(self).__name__} runs on a tvm.IRModule (e.g. from "
                            f"relax.frontend.torch.from_exported_program), got {type(mod).__name__}")
        return run(self, mod)

    pass_cls.__call__ = __call__
    return pass_cls


@_takes_a_module
@tvm.ir.transform.module_pass(opt_level=0, name="SparsifyAttention")
class SparsifyAttention:
    """Rewrite attention in a Relax IRModule into ACSR sparse attention kernels.

    Works on **Relax** (TVM >= 0.20 has no Relay; the package keeps the design's name).

    Parameters
    ----------
    pattern : Pattern | str | ACSR | dict | callable | None
        The sparsity. ``None``: only sites with a constant mask in the graph are sparsified,
        using that mask. One pattern (``Window(256)``, ``"window:256"``, an ACSR): every
        site. ``{site name: pattern}``: per site (names: ``attn<i>`` or from ``names``);
        unknown names raise ``ValueError`` when the pass runs. ``f(SiteInfo) -> pattern or
        None``: per site. Where a site also has a mask, the **intersection** is used (the
        model's mask is never widened; ``is_causal`` + ``Window(w)`` = causal window).
    target : Target | str | None
        Target the kernels are scheduled for (``"llvm"``, ``"cuda"``, a tag such as
        ``"nvidia/nvidia-h100"``). Default: the current target context (``tvm.compile``
        sets it for its pipeline), else ``llvm``.
    variant : str
        ``"auto"`` (default: what ``sparse_attention`` picks for the target — the
        geometry-driven tiled kernel with tensor cores for 16-bit inputs on the GPU),
        ``"tiled"``, ``"row"`` (one mask row per thread) or ``"separate"`` (R-SDDMM, row
        softmax, R-SpMM).
    names : sequence of str | dict int -> str | None
        Site names by softmax index (e.g. torch module paths from
        :func:`~tvm_splat.relay_passes.attention_layer_names`).
    max_segments : int
        ACSR segment slots per row before a row falls back to CSR.

    Padding: a model called with ``attention_mask`` (transformers builds ``structure AND
    attention_mask[b, j]``) is rewritten too: the structure becomes the ACSR, the mask
    per-batch key lengths computed at run time; the mask must be right-padded (a
    ``ValueError`` names the first row that is not). Real tokens match PyTorch; padding
    positions give zeros where a finite-fill (eager) softmax over no key averages the values.

    Shapes: q, k, v of a site are ``[batch, heads, seq_len, head_dim]`` float16/bfloat16/float32
    (any batch reshape around them is accepted); the output keeps the replaced binding's
    shape and dtype. A row whose mask is empty gives zeros (torch: zeros for SDPA, NaN for a
    hand-written softmax).

    After the pass runs, ``report`` holds a :class:`SparsifyReport`.
    """

    def __init__(self, pattern=None, *, target=None, variant: str = "auto", names=None,
                 max_segments: int = 4):
        self._choice = PatternChoice(pattern)
        if variant != "auto" and variant not in VARIANTS:
            choose_variant(variant, "llvm")  # raises with the reason ("fused" was renamed)
        self._variant = variant
        self._target = None if target is None else as_target(target)
        self._names = _check_names(names)
        if isinstance(max_segments, bool) or not isinstance(max_segments, int) or max_segments < 1:
            raise ValueError(f"max_segments must be an int >= 1, got {max_segments!r}")
        self._max_segments = max_segments
        self.report = SparsifyReport()
        self.workloads: tuple = ()

    # ------------------------------------------------------------------ pass entry
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not isinstance(mod, tvm.IRModule):
            raise TypeError(f"SparsifyAttention transforms a tvm.IRModule, got {type(mod).__name__}")
        target = self._resolve_target()
        # the importer's bool-typed cumsum (every transformers 5.x mask) would crash both the
        # mask evaluation and tvm.compile of whatever is left dense
        mod, widened = legalize_bool_arithmetic(mod)
        if widened:
            logger.info("SparsifyAttention: %d arithmetic op(s) over bool now compute in int64",
                        widened)
        # RMSNorm's pow(2): fast-math CUDA powf is NaN for negative x (see legalize_power)
        mod, powers = legalize_integer_power(mod)
        if powers:
            logger.info("SparsifyAttention: %d integer power(s) now computed as products", powers)
        reports: List[SiteReport] = []
        plans: Dict[str, List[_Site]] = {}
        all_names = []
        for gv, func in mod.functions.items():
            if not isinstance(func, relax.Function):
                continue
            constants = ConstantValues(function_bindings(func))
            sites = find_attention(func, constants)
            all_names += [self._site_name(s) for s in sites]
            for site in sites:
                plan, report = self._decide(gv.name_hint, site, constants, target)
                reports.append(report)
                if plan is not None:
                    plans.setdefault(gv.name_hint, []).append(plan)
        self._choice.check_names(all_names)
        self.report = SparsifyReport(tuple(reports))
        # (site name, AttentionPlan) of every rewritten site: what tuning needs
        self.workloads = tuple((p.site_name, p.plan) for ps in plans.values() for p in ps)
        if reports:
            logger.info("%s", self.report)
        if not plans:
            return mod
        return _rewrite(mod, plans, target)

    def _resolve_target(self):
        if self._target is not None:
            return self._target
        current = tvm.target.Target.current(allow_none=True)
        if current is not None:
            return as_target(current)
        logger.info("SparsifyAttention: no target given and none current; scheduling for llvm")
        return as_target("llvm")

    def _site_name(self, site: AttentionMatch) -> str:
        if self._names is not None and site.softmax_index in self._names:
            return self._names[site.softmax_index]
        return f"attn{site.softmax_index}"

    # ------------------------------------------------------------------ decisions
    def _decide(self, function: str, site: AttentionMatch, constants: ConstantValues, target):
        name = self._site_name(site)

        def report(rewritten, reason="", mask="?", pattern=None, density=None, kernels=""):
            return SiteReport(name, function, site.form, site.batch, site.heads, site.seq_len,
                              site.head_dim, site.dtype, mask, describe(pattern), density,
                              rewritten, reason, kernels)

        if site.problem:
            return None, report(False, site.problem)
        if site.dtype not in SUPPORTED_DTYPES:
            return None, report(False, f"dtype {site.dtype} (kernels support {SUPPORTED_DTYPES})")
        mask = analyse_site_mask(site, constants)
        info = SiteInfo(name, site.softmax_index, function, site.batch, site.heads,
                        site.seq_len, site.head_dim, site.dtype, mask.description)
        pattern = self._choice.for_site(info)  # looked up first: a skip still shows it
        if mask.problem:
            return None, report(False, mask.problem, mask.description, pattern)
        if isinstance(pattern, ACSR):  # a hand-built one must not send the kernels out of bounds
            check_acsr_tables(pattern)
        acsr, reason = choose_acsr(mask.keep, pattern, site.seq_len, site.heads,
                                   self._max_segments)
        if acsr is None:
            return None, report(False, reason, mask.description, pattern)
        shape = (site.batch, site.heads, site.seq_len, site.head_dim)
        planned = plan(acsr, shape, shape, site.dtype, None, target=target, scale=site.scale,
                       variant=self._variant, kv_lengths=mask.kv_padding is not None)
        kernels = f"{planned.variant}: " + ", ".join(step.kernel for step in planned.steps)
        return (_Site(site, planned, name, mask.kv_padding),
                report(True, "", mask.description, pattern, float(acsr.density), kernels))


# ---------------------------------------------------------------------- rewriting
def _const(array) -> tvm.ir.Constant:
    return relax.const(np.ascontiguousarray(array, dtype=np.int32))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """Replaces each planned site's output binding by the launch steps of its plan."""

    def __init__(self, mod):
        super().__init__(mod)
        self.sites: Dict[relax.Var, _Site] = {}
        self.kernel_cache: dict = {}  # plan identity -> {kernel name: GlobalVar}
        self.kv_lengths: dict = {}  # padding mask parameter -> its key lengths (per function)

    def emit(self, expr, name=""):
        return self.builder_.emit(expr, name)

    def _kernels(self, plan: AttentionPlan) -> dict:
        """GlobalVars of the plan's scheduled kernels, added to the module once per workload."""
        key = (plan.variant, plan.spec.key, repr(plan.knobs),
               None if plan.tile_plan is None else plan.tile_plan.shape.key)
        if key not in self.kernel_cache:
            suffix = plan.spec.key if plan.tile_plan is None else f"{plan.spec.key}_{plan.tile_plan.shape.key}"
            self.kernel_cache[key] = {
                gv.name_hint: self.builder_.add_func(
                    func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True),
                    f"splat_{gv.name_hint}_{suffix}")
                for gv, func in plan.module().functions.items()}
        return self.kernel_cache[key]

    def _kv_lengths(self, padding_mask, batch: int):
        """``int32 [batch]`` key lengths of the padding mask parameter, computed once per
        function (every layer shares them) by :func:`~._padding_mask.kv_lengths_from_padding_mask`
        at run time."""
        if padding_mask not in self.kv_lengths:
            call = relax.call_pure_packed(KV_LENGTHS_FUNC, self.visit_expr(padding_mask),
                                          ty_args=relax.TensorType((batch,), "int32"))
            self.kv_lengths[padding_mask] = self.emit(call, "kv_len")
        return self.kv_lengths[padding_mask]

    def _bhnd(self, expr, site: AttentionMatch, transpose_last: bool = False):
        """An operand as [batch, heads, n, d]."""
        x = self.visit_expr(expr)
        shape = (site.batch, site.heads, site.seq_len, site.head_dim)
        if site.layout == "bnhd":
            return self.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))
        if transpose_last:
            nd = len(x.ty.shape)
            x = self.emit(relax.op.permute_dims(x, list(range(nd - 2)) + [nd - 1, nd - 2]))
        if tuple(int(d) for d in x.ty.shape.values) != shape:
            x = self.emit(relax.op.reshape(x, shape))
        return x

    def _sparse_attention(self, planned: _Site):
        """The plan's steps as ``call_tir`` / ``call_tir_inplace``: buffers by name, tables as
        constants, scratch and outputs as fresh tensors."""
        site, plan = planned.site, planned.plan
        kernels = self._kernels(plan)
        env = {"q": self._bhnd(site.q, site),
               "k": self._bhnd(site.k, site, transpose_last=site.k_transposed),
               "v": self._bhnd(site.v, site)}
        env.update({name: _const(a) for name, a in plan.tables.items()})
        if planned.kv_padding is not None:
            env[KV_LEN] = self._kv_lengths(planned.kv_padding, site.batch)
        types = {"out": relax.TensorType(plan.q_shape, plan.spec.dtype)}
        types.update({name: relax.TensorType(shape, dtype) for name, (shape, dtype) in plan.scratch.items()})
        for step in plan.steps:
            out_types = [types[o] for o in step.outputs]
            if step.inplace:
                idx = [step.args.index(o) for o in step.outputs]
                call = relax.call_tir_inplace(kernels[step.kernel], [env[a] for a in step.args],
                                              idx[0] if len(idx) == 1 else idx,
                                              out_types[0] if len(out_types) == 1 else out_types)
            else:
                call = relax.call_tir(kernels[step.kernel], [env[a] for a in step.inputs],
                                      out_types[0] if len(out_types) == 1 else out_types)
            result = self.emit(call)
            if len(step.outputs) == 1:
                env[step.outputs[0]] = result
            else:
                for i, name in enumerate(step.outputs):
                    env[name] = self.emit(relax.TupleGetItem(result, i))
        return env["out"]

    def visit_var_binding_(self, binding: relax.VarBinding):
        planned = self.sites.get(binding.var)
        if planned is None:
            return super().visit_var_binding_(binding)
        out = self._sparse_attention(planned)
        want = binding.var.ty
        if planned.site.layout == "bnhd":
            value = relax.op.permute_dims(out, [0, 2, 1, 3])
        else:
            value = relax.op.reshape(out, want.shape)
        if str(want.dtype) != planned.plan.spec.dtype:
            value = relax.op.astype(self.emit(value), want.dtype)
        # an output of a dataflow block stays visible after it; keep its kind
        if isinstance(binding.var, relax.DataflowVar) or not self.builder_.current_block_is_dataflow():
            new_var = self.builder_.emit(value, binding.var.name)
        else:
            new_var = self.builder_.emit_output(value, binding.var.name)
        self.set_var_remap(binding.var, new_var)

    def run(self, plans: Dict[str, List[_Site]]) -> tvm.IRModule:
        mod = self.builder_.get()
        for gv, func in list(mod.functions.items()):
            if gv.name_hint not in plans:
                continue
            self.sites = {p.site.out_var: p for p in plans[gv.name_hint]}
            self.kv_lengths = {}
            new_func = self.visit_expr(func)
            new_func = relax.analysis.remove_all_unused(new_func)
            self.builder_.update_func(gv, new_func)
        return self.builder_.get()


def _rewrite(mod, plans, target) -> tvm.IRModule:
    logger.debug("SparsifyAttention: scheduling kernels for %s", target_name(target))
    return _Rewriter(mod).run(plans)
