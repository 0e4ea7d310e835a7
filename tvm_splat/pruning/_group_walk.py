"""Follow channel groups through a torch.fx graph, by the rules ``CompactPrunedChannels`` uses.

Each node that carries a group has a ``Flow`` (``_group_state``): which chain, on which axis
(counted from the end: -1 after a Linear, -3 for NCHW channels), the tensor rank when known,
and what the group's channels hold once all its slices are zero
(:class:`~tvm_splat.channel_rules.Value`).  Per-op handlers (``_group_ops``) are registered
by op family of ``OP_RULES``; the torch op -> Relax op map is ``_torch_ops``.  A chain is
removable (a family of groups) when nothing pinned it, it reaches at least one consumer
layer and every consumer absorbs its zeroed value.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..channel_rules import OP_RULES, Value
from . import _group_ops  # noqa: F401  (registers the per-family handlers)
from ._group_state import FAMILY_HANDLERS, Blocked, Chain, Flow, Member
from ._torch_ops import IDENTITY, is_shape_query, relax_op_of


class GraphWalk:
    """Walk ``graph`` (traced from ``model``) once; :meth:`run` returns the removable chains."""

    def __init__(self, model: nn.Module, graph: fx.Graph, is_attention: Callable[[nn.Module], bool]):
        self.model = model
        self.graph = graph
        self.mods = dict(model.named_modules())
        self.is_attention = is_attention
        self.flows: Dict[fx.Node, Flow] = {}
        self.chains: Dict[int, Chain] = {}
        self.parent: Dict[int, int] = {}
        self.calls = Counter(n.target for n in graph.nodes if n.op == "call_module")

    # ------------------------------------------------------------------ chains (union-find)
    def new_chain(self, channels: int, kind: str, name: str, unit: int = 1) -> int:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.chains[gid] = Chain(gid, channels, kind, name, unit)
        return gid

    def chain(self, gid: int) -> Chain:
        while self.parent[gid] != gid:
            gid = self.parent[gid]
        return self.chains[gid]

    def union(self, a: int, b: int) -> int:
        ca, cb = self.chain(a), self.chain(b)
        if ca is cb:
            return ca.gid
        if ca.channels != cb.channels or ca.unit != cb.unit:
            raise Blocked("tied groups have different channel counts")
        first, second = (ca, cb) if ca.gid < cb.gid else (cb, ca)
        self.parent[second.gid] = first.gid
        first.members += second.members
        first.layers.update({k: v for k, v in second.layers.items() if k not in first.layers})
        first.consumers += second.consumers
        first.pins += second.pins
        del self.chains[second.gid]
        return first.gid

    def pin(self, gid: int, reason: str) -> None:
        self.chain(gid).pins.append(reason)

    def add_member(self, gid: int, module: str, attr: str, dim: int, block: int = 1) -> None:
        mod = self.mods[module]
        if getattr(mod, attr, None) is None:
            return
        if self.calls[module] > 1:
            self.pin(gid, f"module {module!r} is called more than once (shared weights)")
        self.chain(gid).members.append(Member(_qualified(module, attr), module, attr, dim, block))

    # ------------------------------------------------------------------ walk
    def run(self) -> List[Chain]:
        for node in self.graph.nodes:
            try:
                self._visit(node)
            except Blocked as err:
                self._pin_inputs(node, f"{node.name}: {err}")
        return sorted((c for c in self.chains.values() if c.removable), key=lambda c: c.gid)

    def _visit(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "get_attr") or is_shape_query(node):
            return
        if node.op == "output":
            self._pin_inputs(node, "reaches the model output")
            return
        if node.op == "call_module" and self.is_attention(self.mods[node.target]):
            _attention(self, node)
            return
        op = relax_op_of(node, self.mods)
        if op == IDENTITY:
            flow = self.flow(node.args[0]) if node.args else None
            if flow is not None:
                self.flows[node] = flow
            return
        if op is None:
            if self.tracked_inputs(node):
                raise Blocked(f"torch op `{self.describe(node)}` is not followed by the compaction pass")
            return
        FAMILY_HANDLERS[OP_RULES[op].family](self, node, op)

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return type(self.mods[node.target]).__name__
        return getattr(node.target, "__name__", str(node.target))

    def flow(self, arg) -> Optional[Flow]:
        return self.flows.get(arg) if isinstance(arg, fx.Node) else None

    def tracked_inputs(self, node: fx.Node) -> List[Flow]:
        return [self.flows[n] for n in node.all_input_nodes if n in self.flows]

    def _pin_inputs(self, node: fx.Node, reason: str) -> None:
        for f in self.tracked_inputs(node):
            self.pin(f.gid, reason)

    def tensor(self, node: fx.Node) -> Optional[torch.Tensor]:
        """The parameter or buffer a ``get_attr`` node reads, else None."""
        if node.op != "get_attr":
            return None
        obj = self.model
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.Tensor) else None

    # ------------------------------------------------------------------ producers / consumers
    def produce(self, node: fx.Node, module: str, channels: int, kind: str, axis: int, rank: Optional[int],
                role: str = "producer") -> int:
        gid = self.new_chain(channels, kind, module)
        self.chain(gid).layers[module] = role
        self.add_member(gid, module, "weight", 0)
        self.add_member(gid, module, "bias", 0)
        self.flows[node] = Flow(gid, axis, rank)
        return gid

    def consume(self, flow: Flow, module: str, in_features: int, axis: int, padded: bool) -> None:
        """``module``'s input channels (weight dim 1) are ``flow``'s group."""
        c = self.chain(flow.gid)
        name = f"{module}.weight"
        if flow.axis != axis:
            raise Blocked(f"{name} consumes the group on another axis")
        if in_features != c.channels:
            raise Blocked(f"{name} consumes the group flattened with other axes (extent > 1)")
        if flow.value is Value.INPUT:
            self.pin(flow.gid, f"value at `{name}` depends on the input")
        elif flow.value is Value.CONSTANT and padded:
            self.pin(flow.gid, f"a constant would reach zero-padded conv `{name}` (inexact at borders)")
        c.layers.setdefault(module, "consumer")
        c.consumers += 1
        self.add_member(flow.gid, module, "weight", 1)


def _qualified(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


def _attention(walk: GraphWalk, node: fx.Node) -> None:
    """An attention module (q/k/v/o projections, ``num_heads``): a head chain of its own; its
    input is consumed by q, k and v, its output produced by the output projection."""
    name = node.target
    mod = walk.mods[name]
    o_attr = "o_proj" if isinstance(getattr(mod, "o_proj", None), nn.Linear) else "out_proj"
    width, heads = mod.q_proj.out_features, mod.num_heads
    for arg in node.args[1:]:
        if walk.flow(arg) is not None:
            walk.pin(walk.flow(arg).gid, f"{name}: extra attention input carries a group")
    flow = walk.flow(node.args[0]) if node.args else None
    if flow is not None:
        for attr in ("q_proj", "k_proj", "v_proj"):
            walk.consume(flow, f"{name}.{attr}", mod.q_proj.in_features, -1, False)
    d = width // heads
    gid = walk.new_chain(width, "head", name, unit=d)
    chain = walk.chain(gid)
    chain.layers.update({name: "attention", f"{name}.{o_attr}": "o_proj"})
    for attr in ("q_proj", "k_proj", "v_proj"):
        walk.add_member(gid, f"{name}.{attr}", "weight", 0, d)
        walk.add_member(gid, f"{name}.{attr}", "bias", 0, d)
    walk.add_member(gid, f"{name}.{o_attr}", "weight", 1, d)
    chain.consumers = 1
    if walk.calls[name] > 1:
        walk.pin(gid, f"attention module {name!r} is called more than once")
    walk.produce(node, f"{name}.{o_attr}", getattr(mod, o_attr).out_features, "hidden", -1, None)

