"""Which Relax op each torch module / function / method imports as, for the channel rules.

Group discovery reads ``OP_RULES`` (``tvm_splat.channel_rules``), which is keyed by Relax op
name; this module maps an fx node to that name: the op ``torch.export`` +
``from_exported_program`` turn it into, so both sides apply the same rule.  ``IDENTITY``
marks ops that vanish from an eval-mode export (dropout, identity); ``None`` an op outside
the table (a barrier for any group that reaches it).
"""
from __future__ import annotations

import operator
from typing import Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["IDENTITY", "is_shape_query", "relax_op_of"]

IDENTITY = "identity"

_MODULE_OPS = {
    nn.Linear: "relax.matmul",
    nn.Conv2d: "relax.nn.conv2d",
    nn.BatchNorm2d: "relax.nn.batch_norm",
    nn.LayerNorm: "relax.nn.layer_norm",
    nn.ReLU: "relax.nn.relu",
    nn.SiLU: "relax.nn.silu",
    nn.Tanh: "relax.tanh",
    nn.Sigmoid: "relax.sigmoid",
    nn.LeakyReLU: "relax.nn.leakyrelu",
    nn.ReLU6: "relax.clip",
    nn.Hardtanh: "relax.clip",
    nn.MaxPool2d: "relax.nn.max_pool2d",
    nn.AvgPool2d: "relax.nn.avg_pool2d",
    nn.Flatten: "relax.flatten",
    nn.Softmax: "relax.nn.softmax",
    nn.LogSoftmax: "relax.nn.log_softmax",
    nn.Dropout: IDENTITY,
    nn.Identity: IDENTITY,
}

_FUNCTION_OPS = {
    operator.add: "relax.add", torch.add: "relax.add",
    operator.sub: "relax.subtract", torch.sub: "relax.subtract",
    operator.mul: "relax.multiply", torch.mul: "relax.multiply",
    operator.truediv: "relax.divide", torch.div: "relax.divide",
    torch.maximum: "relax.maximum", torch.minimum: "relax.minimum", torch.where: "relax.where",
    operator.gt: "relax.greater", operator.ge: "relax.greater_equal", operator.lt: "relax.less",
    operator.le: "relax.less_equal", operator.eq: "relax.equal", operator.ne: "relax.not_equal",
    torch.relu: "relax.nn.relu", F.relu: "relax.nn.relu",
    F.silu: "relax.nn.silu",
    torch.tanh: "relax.tanh", F.tanh: "relax.tanh",
    torch.sigmoid: "relax.sigmoid", F.sigmoid: "relax.sigmoid",
    torch.exp: "relax.exp",
    torch.neg: "relax.negative", operator.neg: "relax.negative",
    F.leaky_relu: "relax.nn.leakyrelu",
    F.relu6: "relax.clip", F.hardtanh: "relax.clip", torch.clamp: "relax.clip", torch.clip: "relax.clip",
    F.dropout: IDENTITY,
    torch.flatten: "relax.flatten",
    torch.mean: "relax.mean", torch.sum: "relax.sum",
    torch.softmax: "relax.nn.softmax", F.softmax: "relax.nn.softmax", F.log_softmax: "relax.nn.log_softmax",
    F.max_pool2d: "relax.nn.max_pool2d", F.avg_pool2d: "relax.nn.avg_pool2d",
    F.layer_norm: "relax.nn.layer_norm",
    torch.zeros_like: "relax.zeros_like", torch.ones_like: "relax.ones_like", torch.full_like: "relax.full_like",
}

_METHOD_OPS = {
    "add": "relax.add", "sub": "relax.subtract", "mul": "relax.multiply", "div": "relax.divide",
    "relu": "relax.nn.relu", "tanh": "relax.tanh", "sigmoid": "relax.sigmoid", "exp": "relax.exp",
    "neg": "relax.negative", "clamp": "relax.clip", "clip": "relax.clip", "flatten": "relax.flatten",
    "mean": "relax.mean", "sum": "relax.sum", "softmax": "relax.nn.softmax",
    "log_softmax": "relax.nn.log_softmax", "contiguous": IDENTITY,
}

# Reads of a tensor's metadata: no data flows, so they neither carry nor block a group.
SHAPE_QUERIES = {"size", "dim"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim"}


def relax_op_of(node: fx.Node, mods: Dict[str, nn.Module]) -> Optional[str]:
    """The Relax op name of ``node`` (a call), ``IDENTITY``, or None when outside the table."""
    if node.op == "call_module":
        mod = mods[node.target]
        if isinstance(mod, nn.GELU):
            return "relax.nn.gelu_tanh" if mod.approximate == "tanh" else "relax.nn.gelu"
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            # an output of 1x1 is exported as a mean over H, W
            return "relax.mean" if _is_one(mod.output_size) else "relax.nn.adaptive_avg_pool2d"
        return next((op for t, op in _MODULE_OPS.items() if type(mod) is t), None)
    if node.op == "call_function":
        if node.target is F.gelu:
            return "relax.nn.gelu_tanh" if node.kwargs.get("approximate") == "tanh" else "relax.nn.gelu"
        if node.target is F.adaptive_avg_pool2d:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            return "relax.mean" if _is_one(size) else "relax.nn.adaptive_avg_pool2d"
        return _FUNCTION_OPS.get(node.target)
    if node.op == "call_method":
        return _METHOD_OPS.get(node.target)
    return None


def is_shape_query(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``: metadata reads."""
    if node.op == "call_method":
        return node.target in SHAPE_QUERIES
    return node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS


def _is_one(size) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))
