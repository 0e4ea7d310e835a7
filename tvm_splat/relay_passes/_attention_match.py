"""Find attention in a Relax function, in the shapes PyTorch imports produce.

Two forms are recognised:

* ``"softmax"``: ``matmul(softmax(S), V)`` where ``S`` reaches ``matmul(Q, Kᵀ)`` through
  scalar scales, additive masks (``add``), boolean masks (``where(c, S, -inf)``), casts
  and batch reshapes. This is what ``torch.export`` makes of ``nn.MultiheadAttention``,
  ``F.scaled_dot_product_attention`` (decomposed; with ``attn_mask``/``is_causal``) and of
  hand-written or HuggingFace-style attention. The decomposition's guard that zeroes rows
  whose scores are all ``-inf`` (``where(all_masked, 0, P)``) is accepted: our kernels give
  zeros for empty rows too.
* ``"nn.attention"``: ``R.nn.attention(q, k, v, bias?, scale?, causal_mask?)`` (BSNH
  layout), e.g. from ``from_exported_program(..., run_ep_decomposition=False)``.

Matching reads structure only: masks are returned as Relax expressions (:class:`MaskTerm`)
and judged later (:mod:`._site_mask`). A found site that cannot be rewritten carries a
``problem`` string instead of being dropped, so the caller can report why it was skipped.

"Batch reshape" means a reshape that keeps the last two dimensions and only merges or
splits the leading ones: for row-major tensors it does not move any element, so
``[B, H, N, D]`` and ``[B*H, N, D]`` are the same data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import tvm
from tvm import relax

from ._constant_eval import ConstantEvalError, ConstantValues

FORMS = ("softmax", "nn.attention")


@dataclass
class MaskTerm:
    """One mask applied to the scores on the way to the softmax.

    ``kind``: ``"additive"`` (``scores + expr``), ``"keep"`` (``where(expr, scores, fill)``)
    or ``"drop"`` (``where(expr, fill, scores)``). ``score_shape``: shape of the scores
    where the term applies (``expr`` broadcasts to it). ``fill``: the scalar fill value of a
    where-mask. ``value_dtype``: the
    float dtype the masking values (an additive mask, a where's fill) were made in — their
    own, or the narrowest one before float-to-float casts (HuggingFace builds an fp16 mask
    filled with -65504 and casts it to float32 for a float32 softmax).
    """

    kind: str
    expr: relax.Expr
    score_shape: Tuple[int, ...]
    fill: Optional[float] = None
    value_dtype: str = "float32"


@dataclass
class AttentionMatch:
    """One attention site.

    ``q``, ``k``, ``v``: Relax expressions holding the operands; after ``q_layout``
    (``"bhnd"``: reshape to ``[batch, heads, n, d]``; ``"bnhd"``: permute axes 1 and 2
    first) they are ``[batch, heads, seq_len, head_dim]`` of ``dtype``. ``k_transposed``:
    ``k`` holds Kᵀ (``[.., d, n]``) and needs a transpose. ``out_var``: the bound variable
    whose value the rewrite replaces (the ``P @ V`` matmul or the ``nn.attention`` call).
    ``softmax_index``: index of this site's softmax/attention op among all of them in the
    function (stable names). ``problem``: why the site cannot be rewritten, or None.
    """

    form: str
    out_var: relax.Var
    softmax_index: int
    q: Optional[relax.Expr] = None
    k: Optional[relax.Expr] = None
    v: Optional[relax.Expr] = None
    k_transposed: bool = False
    layout: str = "bhnd"
    batch: int = 0
    heads: int = 0
    seq_len: int = 0
    head_dim: int = 0
    dtype: str = ""
    scale: float = 1.0
    masks: List[MaskTerm] = field(default_factory=list)
    causal: bool = False
    has_empty_row_guard: bool = False
    problem: Optional[str] = None


# ------------------------------------------------------------------------- helpers
def _op_name(expr) -> Optional[str]:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _static_shape(expr) -> Optional[Tuple[int, ...]]:
    """Static shape of a tensor expression, or None (symbolic, unknown, not a tensor)."""
    sinfo = expr.ty
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return None
    shape = sinfo.shape
    if not isinstance(shape, relax.ShapeExpr):
        return None
    dims = []
    for d in shape.values:
        if not isinstance(getattr(d, "value", None), int):
            return None
        dims.append(int(d))
    return tuple(dims)


def _ndim(expr) -> int:
    """Rank of a tensor expression (known even when its dims are symbolic), else 0."""
    return int(expr.ty.ndim) if isinstance(expr.ty, relax.TensorType) and expr.ty.ndim >= 0 else 0


def _shape_text(expr) -> str:
    sinfo = expr.ty
    if isinstance(sinfo, relax.TensorType) and isinstance(sinfo.shape, relax.ShapeExpr):
        return "[" + ", ".join(str(d.value) if isinstance(getattr(d, "value", None), int)
                               else str(d) for d in sinfo.shape.values) + "]"
    return "[?]"


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _is_float(expr) -> bool:
    return _dtype(expr).startswith(("float", "bfloat"))


def _value_dtype(graph: "_Graph", expr) -> str:
    """The float dtype whose range ``expr``'s values were made in: the narrowest dtype on its
    chain of float-to-float casts (``expr``'s own when there is none)."""
    dtypes = [_dtype(expr)]
    while True:
        name, call = graph.call(expr)
        if name != "relax.astype" or not _is_float(call.args[0]):
            break
        expr = call.args[0]
        dtypes.append(_dtype(expr))
    narrow = [d for d in dtypes if d in ("float16", "bfloat16")]
    return "float16" if "float16" in narrow else narrow[0] if narrow else dtypes[0]


class _Graph:
    """Read access to one function's bindings and constant values."""

    def __init__(self, constants: ConstantValues):
        self.constants = constants
        self.bindings = constants.bindings

    def value(self, expr):
        """The bound value of a variable (or the expression itself)."""
        while isinstance(expr, relax.Var) and expr in self.bindings:
            expr = self.bindings[expr]
        return expr

    def call(self, expr) -> Tuple[Optional[str], Optional[relax.Call]]:
        value = self.value(expr)
        return _op_name(value), (value if isinstance(value, relax.Call) else None)

    def is_const(self, expr) -> bool:
        return self.constants.is_constant(expr)

    def scalar(self, expr) -> Optional[float]:
        """Value of a constant with a single element (any shape), else None."""
        if not _is_tensor(expr) or not self.is_const(expr):
            return None
        shape = _static_shape(expr)
        if shape is None or int(np.prod(shape, dtype=np.int64)) != 1:
            return None
        try:
            return float(self.constants.value(expr).reshape(()))
        except ConstantEvalError:
            return None


def _is_tensor(expr) -> bool:
    return isinstance(expr.ty, relax.TensorType)


def _is_batch_reshape(call) -> bool:
    """Reshape that keeps the last two dims and merges/splits only leading ones."""
    src, dst = _static_shape(call.args[0]), _static_shape(call)
    return (src is not None and dst is not None and len(src) >= 2 and len(dst) >= 2
            and src[-2:] == dst[-2:])


def _is_identity_broadcast(call) -> bool:
    return _static_shape(call.args[0]) is not None and \
        _static_shape(call.args[0]) == _static_shape(call)


def _pass_through(name, call, casts=True):
    """The input of a call the matcher looks through (it keeps the last two axes and the
    values): a batch reshape, an identity broadcast, and with ``casts`` a float-to-float cast;
    else None."""
    if ((name == "relax.reshape" and _is_batch_reshape(call))
            or (name == "relax.broadcast_to" and _is_identity_broadcast(call))
            or (casts and name == "relax.astype" and _is_float(call) and _is_float(call.args[0]))):
        return call.args[0]
    return None


def _swaps_last_two(call) -> bool:
    axes = call.attrs.axes
    if axes is None:
        return False
    axes = [int(a) for a in axes]
    nd = len(axes)
    want = list(range(nd - 2)) + [nd - 1, nd - 2]
    return nd >= 2 and [a % nd for a in axes] == want


def _last_axis(axis, ndim) -> bool:
    return int(axis) % ndim == ndim - 1


# ------------------------------------------------------------------------- operands
@dataclass
class _Operand:
    expr: relax.Expr
    scale: float
    transposed: bool


def _strip_operand(graph: _Graph, expr, scales: bool = True) -> _Operand:
    """Walk back from a matmul operand through batch reshapes, identity broadcasts,
    scalar scales (when ``scales``) and transposes of the last two axes, to the tensor that
    holds it."""
    scale, transposed = 1.0, False
    while True:
        name, call = graph.call(expr)
        if (inner := _pass_through(name, call, casts=False)) is not None:
            expr = inner
        elif name == "relax.permute_dims" and _swaps_last_two(call):
            expr, transposed = call.args[0], not transposed
        elif scales and name in ("relax.multiply", "relax.divide"):
            c = graph.scalar(call.args[1])
            other = call.args[0]
            if c is None and name == "relax.multiply":
                c, other = graph.scalar(call.args[0]), call.args[1]
            if c is None or _static_shape(other) != _static_shape(call):
                return _Operand(expr, scale, transposed)
            scale *= c if name == "relax.multiply" else 1.0 / c
            expr = other
        else:
            return _Operand(expr, scale, transposed)


# ------------------------------------------------------------------------- P side
def _find_softmax(graph: _Graph, expr) -> Tuple[Optional[relax.Call], bool, Optional[str]]:
    """From the P operand of ``P @ V`` back to its ``nn.softmax`` call.

    Returns ``(softmax_call, has_empty_row_guard, problem)``.
    """
    guard = False
    while True:
        name, call = graph.call(expr)
        if name == "relax.nn.softmax":
            ndim = _ndim(call)
            if ndim < 2 or not _last_axis(call.attrs.axis, ndim):
                return None, guard, None
            return call, guard, None
        if (inner := _pass_through(name, call)) is not None:
            expr = inner
        elif name == "relax.where" and _is_zero(graph, call.args[1]) and not guard:
            softmax, _, _ = _find_softmax(graph, call.args[2])
            if softmax is None:
                return None, guard, None
            if not _is_empty_row_guard(graph, call.args[0], softmax.args[0]):
                return softmax, guard, "the softmax output is masked by a condition other " \
                                       "than the empty-row guard"
            guard, expr = True, call.args[2]
        else:
            return None, guard, None


def _is_zero(graph: _Graph, expr) -> bool:
    name, call = graph.call(expr)
    if name == "relax.full_like":
        return graph.scalar(call.args[1]) == 0.0
    if name == "relax.zeros":
        return True
    if graph.is_const(expr) and _is_tensor(expr):
        return not np.any(graph.constants.value(expr))
    return False


def _is_empty_row_guard(graph: _Graph, cond, scores) -> bool:
    """``cond`` is ``not any(scores != -inf, axis=-1)``, spelled as torch's SDPA
    decomposition does: ``logical_not(max(astype(logical_not(equal(S, -inf)))))``."""
    steps = []
    expr = cond
    while True:
        name, call = graph.call(expr)
        if name == "relax.astype":
            expr = call.args[0]
            continue
        if name == "relax.logical_not":
            steps.append("not")
            expr = call.args[0]
        elif name == "relax.max":
            ndim = _ndim(call.args[0])
            axes = call.attrs.axis
            if axes is None or len(axes) != 1 or not _last_axis(axes[0], ndim) \
                    or not call.attrs.keepdims:
                return False
            steps.append("any")
            expr = call.args[0]
        elif name == "relax.equal":
            fill = graph.scalar(call.args[1])
            same = graph.value(call.args[0]).same_as(graph.value(scores))
            return steps == ["not", "any", "not"] and fill == -np.inf and same
        else:
            return False


# ------------------------------------------------------------------------- S side
@dataclass
class _Scores:
    qk: relax.Call
    scale: float
    masks: List[MaskTerm]
    problem: Optional[str]


def _reaches_matmul(graph: _Graph, expr, depth: int = 0) -> bool:
    """Cheap look-ahead: does this operand lead to a ``matmul`` through score ops?"""
    if depth > 64:
        return False
    name, call = graph.call(expr)
    if name == "relax.matmul":
        return True
    if name in ("relax.reshape", "relax.broadcast_to", "relax.astype", "relax.multiply",
                "relax.divide"):
        return _reaches_matmul(graph, call.args[0], depth + 1) or (
            name == "relax.multiply" and _reaches_matmul(graph, call.args[1], depth + 1))
    if name in ("relax.add",):
        return any(_reaches_matmul(graph, a, depth + 1) for a in call.args)
    if name == "relax.where":
        return any(_reaches_matmul(graph, a, depth + 1) for a in call.args[1:])
    return False


def _walk_scores(graph: _Graph, expr) -> Optional[_Scores]:
    """From the softmax input back to ``matmul(Q, Kᵀ)``, collecting scales and masks."""
    scale, masks, problem = 1.0, [], None
    while True:
        name, call = graph.call(expr)
        if name == "relax.matmul":
            return _Scores(call, scale, masks, problem)
        shape = _static_shape(expr)
        if (inner := _pass_through(name, call)) is not None:
            expr = inner
        elif name in ("relax.multiply", "relax.divide"):
            c = graph.scalar(call.args[1])
            other = call.args[0]
            if c is None and name == "relax.multiply":
                c, other = graph.scalar(call.args[0]), call.args[1]
            if c is None:
                return None
            c = c if name == "relax.multiply" else 1.0 / c
            if not c > 0:
                problem = problem or f"the scores are scaled by {c}, not a positive number"
            scale *= c
            expr = other
        elif name == "relax.add":
            a, b = call.args
            if _reaches_matmul(graph, a):
                score, mask = a, b
            elif _reaches_matmul(graph, b):
                score, mask = b, a
            else:
                return None
            masks.append(MaskTerm("additive", mask, shape, value_dtype=_value_dtype(graph, mask)))
            expr = score
        elif name == "relax.where":
            cond, x, y = call.args
            if _reaches_matmul(graph, x):
                kind, score, fill = "keep", x, y
            elif _reaches_matmul(graph, y):
                kind, score, fill = "drop", y, x
            else:
                return None
            fill_value = graph.scalar(fill)
            if fill_value is None:
                problem = problem or "a where() on the scores fills with a non-constant tensor"
            masks.append(MaskTerm(kind, cond, shape, fill=fill_value,
                                  value_dtype=_value_dtype(graph, fill)))
            expr = score
        else:
            return None


# ------------------------------------------------------------------------- sites
def _leading(shape) -> Tuple[int, ...]:
    return tuple(shape[:-2])


def _canonical_batch_heads(*shapes) -> Tuple[int, int]:
    """``(batch, heads)`` from the first 4-D shape, else ``(1, prod(leading))``."""
    for shape in shapes:
        if shape is not None and len(shape) == 4:
            return shape[0], shape[1]
    lead = next(s for s in shapes if s is not None)[:-2]
    return 1, int(np.prod(lead, dtype=np.int64))


def _match_softmax_site(graph: _Graph, out_var, pv: relax.Call, index_of) -> Optional[AttentionMatch]:
    softmax, guard, problem = _find_softmax(graph, pv.args[0])
    if softmax is None:
        return None
    scores = _walk_scores(graph, softmax.args[0])
    if scores is None:
        return None
    site = AttentionMatch("softmax", out_var, index_of(softmax), masks=scores.masks,
                          has_empty_row_guard=guard)
    site.problem = problem or scores.problem
    q = _strip_operand(graph, scores.qk.args[0])
    kt = _strip_operand(graph, scores.qk.args[1])
    # a scale on V scales the output, not the scores: keep it inside the operand
    v = _strip_operand(graph, pv.args[1], scales=False)
    q_shape, k_shape, v_shape = (_static_shape(o.expr) for o in (q, kt, v))
    if None in (q_shape, k_shape, v_shape, _static_shape(softmax)):
        site.problem = site.problem or "dynamic (symbolic) shapes are not supported"
        return site
    if q.transposed or v.transposed:
        site.problem = site.problem or "q or v reaches the matmul transposed"
        return site
    # kt.transposed: K was transposed on the way, so the operand holds K [.., n, d];
    # otherwise it holds Kᵀ [.., d, n] directly.
    k_nd = k_shape if kt.transposed else k_shape[:-2] + (k_shape[-1], k_shape[-2])
    n, d = q_shape[-2], q_shape[-1]
    if k_nd[-2] != n:
        site.problem = site.problem or f"query length {n} differs from key length {k_nd[-2]}"
    elif k_nd[-1] != d or v_shape[-1] != d or v_shape[-2] != n:
        site.problem = site.problem or (f"head dims differ (q {d}, k {k_nd[-1]}, v "
                                        f"{v_shape[-1]}); the kernels need one head dim")
    batch, heads = _canonical_batch_heads(q_shape, k_nd, v_shape, _static_shape(softmax))
    for shape in (q_shape, k_nd, v_shape):
        if int(np.prod(_leading(shape), dtype=np.int64)) != batch * heads:
            site.problem = site.problem or "q, k and v have different batch/head counts " \
                                           "(grouped-query attention is not supported)"
    dtypes = {_dtype(o.expr) for o in (q, kt, v)}
    if len(dtypes) != 1:
        site.problem = site.problem or f"q, k and v have different dtypes {sorted(dtypes)}"
    site.q, site.k, site.v = q.expr, kt.expr, v.expr
    site.k_transposed = not kt.transposed
    site.batch, site.heads, site.seq_len, site.head_dim = batch, heads, n, d
    site.dtype = _dtype(q.expr)
    site.scale = scores.scale * q.scale * kt.scale
    return site


def _match_nn_attention(graph: _Graph, out_var, call: relax.Call, index) -> AttentionMatch:
    site = AttentionMatch("nn.attention", out_var, index, layout="bnhd")
    q, k, v = call.args[:3]
    shapes = [_static_shape(x) for x in (q, k, v)]
    if None in shapes:
        site.problem = "dynamic (symbolic) shapes are not supported"
        return site
    (b, n, h, d), (_, nk, hk, dk), (_, nv, hv, dv) = shapes
    if nk != n or nv != n:
        site.problem = f"query length {n} differs from key length {nk}"
    elif (hk, hv) != (h, h) or (dk, dv) != (d, d):
        site.problem = "q, k and v differ in heads or head dim"
    if call.attrs.window_size is not None:
        site.problem = site.problem or "nn.attention window_size is not supported"
    causal = call.attrs.causal_mask
    if causal not in (None, "TopLeft", "BottomRight"):
        site.problem = site.problem or f"unknown causal_mask {causal!r}"
    if len({_dtype(x) for x in (q, k, v)}) != 1:
        site.problem = site.problem or "q, k and v have different dtypes"
    site.q, site.k, site.v = q, k, v
    site.batch, site.heads, site.seq_len, site.head_dim = b, h, n, d
    site.dtype = _dtype(q)
    scale = call.attrs.scale
    site.scale = float(scale.value) if scale is not None else 1.0 / float(np.sqrt(d))
    # n_q == n_k here, so TopLeft and BottomRight are the same lower triangle
    site.causal = causal is not None
    if len(call.args) > 3:
        site.masks.append(MaskTerm("additive", call.args[3], (b, h, n, n),
                                   value_dtype=_value_dtype(graph, call.args[3])))
    return site


def find_attention(func: relax.Function, constants: ConstantValues) -> List[AttentionMatch]:
    """Every attention site of ``func`` in binding order (see the module docstring);
    ``constants``: the function's :class:`ConstantValues`."""
    graph = _Graph(constants)
    softmax_index = {}
    sites = []
    order = [b for block in func.body.blocks for b in block.bindings
             if isinstance(b, relax.VarBinding)]
    for binding in order:
        name = _op_name(binding.value)
        if name in ("relax.nn.softmax", "relax.nn.attention", "relax.nn.attention_bias"):
            softmax_index[binding.value] = len(softmax_index)

    def index_of(call):
        return softmax_index.get(call, -1)

    for binding in order:
        name = _op_name(binding.value)
        if name == "relax.matmul":
            site = _match_softmax_site(graph, binding.var, binding.value, index_of)
        elif name in ("relax.nn.attention", "relax.nn.attention_bias"):
            site = _match_nn_attention(graph, binding.var, binding.value,
                                       index_of(binding.value))
        else:
            site = None
        if site is not None:
            sites.append(site)
    # every softmax is reported, attention or not, with the reason it was not matched
    seen = {site.softmax_index for site in sites}
    for binding in order:
        index = softmax_index.get(binding.value)
        if index is not None and index not in seen:
            site = AttentionMatch("softmax", binding.var, index, dtype=_dtype(binding.var))
            site.problem = _why_unmatched(graph, binding.value)
            sites.append(site)
    return sorted(sites, key=lambda site: site.softmax_index)


def _why_unmatched(graph: _Graph, softmax: relax.Call) -> str:
    """Why a softmax is not the softmax of an attention site the rewrite understands."""
    ndim = _ndim(softmax)
    if _static_shape(softmax) is None:
        return (f"dynamic (symbolic) shape {_shape_text(softmax)}: ACSR and the kernels are "
                f"built for one sequence length at compile time; export with a static "
                f"sequence length (one module per length)")
    if ndim < 2 or not _last_axis(softmax.attrs.axis, ndim):
        return f"softmax over axis {int(softmax.attrs.axis)} of a rank-{ndim} tensor, not over keys"
    if _walk_scores(graph, softmax.args[0]) is None:
        return ("its input is not matmul(Q, Kᵀ) reached through scalar scales, additive or "
                "where() masks, casts and batch reshapes")
    return ("its output does not reach matmul(P, V) (only casts, batch reshapes and the "
            "empty-row guard are followed)")
