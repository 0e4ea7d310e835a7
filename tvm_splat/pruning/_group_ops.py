"""Per-family handlers of the torch-side group walk (``_group_walk``), one per op family of
``OP_RULES``: the same families, roles and value rules the Relax analysis applies.  Each
takes the ``GraphWalk``, the fx node and its Relax op name.

Where the torch side cannot see what the Relax side sees (shapes are unknown in an fx
graph), it is conservative: the group is pinned rather than guessed.  Known cases: a
reshape/view/permute of a tracked tensor (heads are found from attention modules instead),
an untracked activation or a per-channel parameter meeting a group elementwise, a matmul
between two activations, and a reduction over positive axes of a tensor whose rank is
unknown (a Linear's output: write ``mean(-2)`` rather than ``mean(1)``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch.fx as fx
import torch.nn.functional as F

from ..channel_rules import OP_RULES, Value, through
from ._group_state import Blocked, Flow, handles

_CONV_RANK = 4  # conv outputs are batched NCHW (BatchNorm2d accepts nothing else)


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _module(walk, node: fx.Node):
    return walk.mods[node.target] if node.op == "call_module" else None


# ----------------------------------------------------------------------------- layers


@handles("matmul")
def _linear(walk, node: fx.Node, op: str) -> None:
    """``nn.Linear`` (the only torch op mapped to ``relax.matmul``): consumer and producer."""
    name, lin = node.target, _module(walk, node)
    flow = walk.flow(node.args[0])
    if flow is not None:
        walk.consume(flow, name, lin.in_features, -1, False)
    walk.produce(node, name, lin.out_features, "hidden", -1, None if flow is None else flow.rank)


@handles("conv2d")
def _conv2d(walk, node: fx.Node, op: str) -> None:
    name, conv = node.target, _module(walk, node)
    flow = walk.flow(node.args[0])
    padded = conv.padding != "valid" and (conv.padding == "same" or any(p != 0 for p in conv.padding))
    if flow is not None and padded and conv.padding_mode != "zeros":
        raise Blocked(f"{name} pads with {conv.padding_mode!r} (an explicit pad op in the export)")
    if conv.groups == 1:
        if flow is not None:
            walk.consume(flow, name, conv.in_channels, -3, padded)
        walk.produce(node, name, conv.out_channels, "channel", -3, _CONV_RANK)
    elif conv.groups == conv.in_channels == conv.out_channels:
        _depthwise(walk, node, name, flow)
    elif flow is not None:
        raise Blocked(f"grouped conv2d {name}")


def _depthwise(walk, node: fx.Node, name: str, flow: Optional[Flow]) -> None:
    """A new group when its input carries none; else the group flows through, its filters
    (and bias) join the group, so a zeroed channel stays exactly 0."""
    if flow is None:
        walk.produce(node, name, walk.mods[name].out_channels, "channel", -3, _CONV_RANK, role="depthwise")
        return
    if flow.axis != -3 or flow.merged:
        raise Blocked(f"depthwise conv {name} over a non-channel axis")
    walk.chain(flow.gid).layers[name] = "depthwise"
    walk.add_member(flow.gid, name, "weight", 0)
    walk.add_member(flow.gid, name, "bias", 0)
    walk.flows[node] = dataclasses.replace(flow, value=Value.ZERO)


@handles("batch_norm")
def _batch_norm(walk, node: fx.Node, op: str) -> None:
    flow = walk.flow(node.args[0])
    if flow is None:
        return
    name, bn = node.target, _module(walk, node)
    if flow.axis != -3 or flow.merged:
        raise Blocked(f"{name} normalises another axis than the group's")
    if bn.running_mean is None:
        raise Blocked(f"{name} has no running statistics (batch statistics at inference)")
    if walk.calls[name] > 1:
        walk.pin(flow.gid, f"module {name!r} is called more than once (shared weights)")
    walk.chain(flow.gid).layers[name] = "batch_norm"
    if bn.affine:  # gamma = beta = 0 with the group: the output is exactly 0 for a finite input
        walk.add_member(flow.gid, name, "weight", 0)
        walk.add_member(flow.gid, name, "bias", 0)
        value = Value.INPUT if flow.value is Value.INPUT else Value.ZERO
    else:
        value = through(OP_RULES[op], flow.value)
    walk.flows[node] = dataclasses.replace(flow, value=value)


# ----------------------------------------------------------------------------- elementwise


@handles("elementwise")
def _elementwise(walk, node: fx.Node, op: str) -> None:
    operands = list(node.args) + ([node.kwargs["other"]] if "other" in node.kwargs else [])
    flows = [walk.flow(a) for a in operands]
    tracked = [f for f in flows if f is not None]
    if not tracked:
        return
    ref = tracked[0]
    gid = ref.gid
    for f in tracked[1:]:
        if (f.axis, f.merged) != (ref.axis, ref.merged):
            raise Blocked(f"`{walk.describe(node)}` on tensors carrying groups on different axes")
        gid = walk.union(gid, f.gid)
    values = [f.value if f is not None else _operand_value(walk, a, ref) for a, f in zip(operands, flows)]
    ranks = {f.rank for f in tracked}
    rank = ranks.pop() if len(ranks) == 1 else None
    walk.flows[node] = Flow(gid, ref.axis, rank, _combine(OP_RULES[op], values), ref.merged)


def _operand_value(walk, arg, ref: Flow) -> Value:
    """The value an untracked operand brings to the group's channels."""
    if isinstance(arg, (bool, int, float)):
        return Value.ZERO if arg == 0 else Value.CONSTANT
    if not isinstance(arg, fx.Node):
        return Value.INPUT
    t = walk.tensor(arg)
    if t is None:
        raise Blocked("mixes the group with an untracked tensor (e.g. a residual from the block "
                      "input): those channels are never constant")
    if t.numel() == 1:
        return Value.ZERO if float(t.detach().reshape(-1)[0]) == 0.0 else Value.CONSTANT
    dim = t.dim() + ref.axis
    if dim >= 0 and t.shape[dim] != 1:
        raise Blocked(f"parameter `{arg.target}` along the channel axis is not part of a discovered group")
    return Value.INPUT  # varies along the other axes


def _combine(rule, values) -> Value:
    if rule.zero_absorbs and Value.ZERO in values:
        return Value.ZERO
    if Value.INPUT in values:
        return Value.INPUT
    if all(v is Value.ZERO for v in values):
        return rule.zero
    return rule.constant


# ----------------------------------------------------------------------------- unary / fill


@handles("unary")
def _unary(walk, node: fx.Node, op: str) -> None:
    flow = walk.flow(node.args[0])
    if flow is None:
        return
    value = through(OP_RULES[op], flow.value)
    if op == "relax.clip" and value is Value.ZERO:
        value = _clip_of_zero(walk, node)
    walk.flows[node] = dataclasses.replace(flow, value=value)


def _clip_of_zero(walk, node: fx.Node) -> Value:
    """clip(0, lo, hi): 0 when 0 lies in [lo, hi], else a bound (a constant)."""
    mod = _module(walk, node)
    if mod is not None:
        lo, hi = mod.min_val, mod.max_val  # ReLU6 is a Hardtanh(0, 6)
    elif node.target in ("clamp", "clip") or getattr(node.target, "__name__", "") in ("clamp", "clip"):
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    elif getattr(node.target, "__name__", "") == "relu6":
        lo, hi = 0.0, 6.0
    else:  # hardtanh
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    if any(isinstance(b, fx.Node) for b in (lo, hi)):
        return Value.INPUT  # tensor bounds
    inside = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    return Value.ZERO if inside else Value.CONSTANT


@handles("fill_like")
def _fill_like(walk, node: fx.Node, op: str) -> None:
    flow = walk.flow(node.args[0])
    if flow is None:
        return
    value = OP_RULES[op].zero
    fill = _arg(node, 1, "fill_value")
    if op == "relax.full_like" and isinstance(fill, (int, float)):
        value = Value.ZERO if fill == 0 else Value.CONSTANT
    walk.flows[node] = dataclasses.replace(flow, value=value)


# ----------------------------------------------------------------------------- layout / reductions


@handles("layout")
def _flatten(walk, node: fx.Node, op: str) -> None:
    """``flatten`` (the only layout op mapped on the torch side): the channel axis may absorb
    neighbours; a consumer then accepts it only if their extent is 1."""
    flow = walk.flow(node.args[0])
    if flow is None:
        return
    mod = _module(walk, node)
    start, end = (mod.start_dim, mod.end_dim) if mod is not None else (_arg(node, 1, "start_dim", 0),
                                                                        _arg(node, 2, "end_dim", -1))
    if flow.rank is None:
        raise Blocked("flatten of a tensor whose rank is unknown")
    r = flow.rank
    s, e, a = start % r, end % r, r + flow.axis
    rank = r - (e - s)
    if a > e:
        axis, merged = flow.axis, flow.merged
    elif a < s:
        axis, merged = a - rank, flow.merged
    else:
        axis, merged = s - rank, flow.merged or e > s
    walk.flows[node] = Flow(flow.gid, axis, rank, flow.value, merged)


def _negative_dims(dims, flow: Flow) -> tuple:
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    if any(isinstance(d, int) and d >= 0 for d in dims) and flow.rank is None:
        raise Blocked("reduction over positive axes of a tensor whose rank is unknown")
    return tuple(d - flow.rank if d >= 0 else d for d in dims)


@handles("reduce")
def _reduce(walk, node: fx.Node, op: str) -> None:
    flow = walk.flow(node.args[0])
    if flow is None:
        return
    if node.op == "call_module" or node.target is F.adaptive_avg_pool2d:
        dims, keep = (-2, -1), True  # adaptive average pooling to 1x1: a mean over H and W
    else:
        dims, keep = _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False))
    if dims is None or dims in ((), []):
        raise Blocked(f"`{walk.describe(node)}` reduces over every axis")
    dims = _negative_dims(dims, flow)
    if flow.axis in dims:
        raise Blocked(f"`{walk.describe(node)}` reduces over the channel axis")
    if flow.merged:
        raise Blocked(f"`{walk.describe(node)}` of a flattened channel axis")
    axis = flow.axis if keep else flow.axis + sum(d > flow.axis for d in dims)
    rank = flow.rank if keep or flow.rank is None else flow.rank - len(dims)
    walk.flows[node] = Flow(flow.gid, axis, rank, through(OP_RULES[op], flow.value))


@handles("softmax")
def _softmax(walk, node: fx.Node, op: str) -> None:
    flow = walk.flow(node.args[0])
    if flow is None:
        return
    mod = _module(walk, node)
    dim = mod.dim if mod is not None else _arg(node, 1, "dim")
    if dim is None or _negative_dims(dim, flow) == (flow.axis,):
        raise Blocked(f"`{walk.describe(node)}` over the channel axis")
    walk.flows[node] = dataclasses.replace(flow, value=through(OP_RULES[op], flow.value))


@handles("pool2d")
def _pool2d(walk, node: fx.Node, op: str) -> None:
    flow = walk.flow(node.args[0])
    if flow is None:
        return
    if flow.axis != -3 or flow.merged:
        raise Blocked("pooling over the channel axis")
    walk.flows[node] = dataclasses.replace(flow, value=through(OP_RULES[op], flow.value))


@handles("norm")
def _norm(walk, node: fx.Node, op: str) -> None:
    flow = walk.flow(node.args[0])
    if flow is None:
        return
    mod = _module(walk, node)
    shape = mod.normalized_shape if mod is not None else _arg(node, 1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    if flow.axis >= -k:
        raise Blocked(f"`{walk.describe(node)}` normalises over the channel axis")
    walk.flows[node] = dataclasses.replace(flow, value=through(OP_RULES[op], flow.value))
