"""What the torch-side group walk records, and its per-family handler registry.

A node that carries a group has a :class:`Flow`; a group is a :class:`Chain` of parameter
slices (:class:`Member`).  Handlers (``_group_ops``) are registered per op family of
``OP_RULES`` with :func:`handles`; each is ``fn(walk, node, relax_op)`` where ``walk`` is the
``GraphWalk`` (``_group_walk``) and ``relax_op`` the Relax op name of the fx ``node``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from ..channel_rules import OP_RULES, Value


class Blocked(Exception):
    """An op the walk cannot follow: every chain it touches is pinned."""


@dataclass
class Flow:
    gid: int
    axis: int  # negative: counted from the last axis
    rank: Optional[int]  # None when unknown (e.g. after a Linear on an input of any rank)
    value: Value = Value.ZERO
    merged: bool = False  # other axes were flattened into the channel axis


@dataclass
class Member:
    """Parameter ``name`` (of ``module``) belongs to the chain along ``dim``, ``block`` entries per group."""

    name: str
    module: str
    attr: str
    dim: int
    block: int = 1


@dataclass
class Chain:
    gid: int
    channels: int
    kind: str  # "hidden" | "channel" | "head"
    name: str  # first producer (or attention) module
    unit: int = 1
    members: List[Member] = field(default_factory=list)
    layers: Dict[str, str] = field(default_factory=dict)  # module -> role
    consumers: int = 0
    pins: List[str] = field(default_factory=list)

    @property
    def removable(self) -> bool:
        return not self.pins and self.consumers > 0


FAMILY_HANDLERS: Dict[str, Callable] = {}


def handles(*families: str):
    """Decorator: the walk's handler of every op of ``families`` (families of ``OP_RULES``)."""
    known = {rule.family for rule in OP_RULES.values()}
    unknown = [f for f in families if f not in known]
    if unknown:
        raise KeyError(f"op families {unknown} are not in OP_RULES")

    def deco(fn):
        for fam in families:
            FAMILY_HANDLERS[fam] = fn
        return fn

    return deco
