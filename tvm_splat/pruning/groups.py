"""Group discovery: which parameter slices of a torch model form one removable structure.

A *group* is a set of parameter slices that must be zeroed together so that one structure
(a hidden unit, a conv channel, an attention head) contributes exactly nothing to the
network; the compiler pass ``CompactPrunedChannels`` then deletes it.  Discovery follows
the model's fx graph with the pass's own rules -- the op table ``OP_RULES`` of
``tvm_splat.channel_rules``, which both read -- so a discovered group is one the pass
removes once it is zero, and the groups the pass can remove are discovered
(``tests/pruning/test_pruning_groups_agree.py`` checks both on several models):

* a group is born at a producer (rows of a ``Linear`` weight and bias, filters of a
  ``Conv2d`` and its bias), flows through per-channel ops (activations, ``BatchNorm2d``
  whose ``gamma``/``beta`` join the group, depthwise convs whose filters join it, pooling,
  means over other axes, ``flatten`` to a 1x1 spatial extent, scalar arithmetic) and ends at
  consumers (columns of the next ``Linear``, input planes of the next ``Conv2d``), whose
  slices join it too: ``Linear -> act -> Linear`` (``hidden``), ``Conv2d -> BN -> act ->
  Conv2d`` and ``Conv2d -> BN -> act -> pool -> flatten -> Linear`` (``channel``);
* residual additions of two groups merge them into one family (a unit goes only if every
  branch is zero); an addition with the block input, the model output, a reshape or any op
  outside the table pins the group (never grouped), so the channels every consumer needs
  stay;
* once zero, a unit must reach every consumer as a constant it can absorb: any constant
  for a ``Linear`` or an unpadded conv, exactly 0 for a zero-padded conv (so
  ``sigmoid(0) = 0.5`` may not reach one);
* ``head`` -- an attention module (any module with ``nn.Linear`` attributes ``q_proj``,
  ``k_proj``, ``v_proj`` and ``o_proj`` (or ``out_proj``) and an int ``num_heads``, whose
  forward is standard multi-head attention: split q/k/v rows into ``num_heads`` contiguous
  blocks of ``head_dim``, softmax(q k^T / sqrt(d)) v per head, concat, ``o_proj``). Group
  ``h`` = rows ``[h*d, (h+1)*d)`` of q/k/v weights and biases plus the same columns of
  ``o_proj``. With v rows zero the head output is exactly 0 whatever q/k are.  Attention
  modules stay fx leaves; outside them a reshape of a grouped tensor pins the group.

Supported models: anything ``torch.fx.symbolic_trace`` can trace (attention modules are
kept as leaves) whose parametrized leaf modules are ``Linear``, ``Conv2d`` (batched NCHW
input), ``BatchNorm2d``, ``LayerNorm``, ``Embedding`` or attention modules as above.
Typical: ``nn.Sequential`` MLPs, conv-bn-relu stacks with a pooled linear head, residual
blocks, pre-LN transformer blocks.  Other parametrized modules raise ``ValueError`` naming
the module, and so does a model fx cannot trace.  Modules called more than once (weight
sharing) are never grouped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ._group_state import Chain
from ._group_walk import GraphWalk

__all__ = [
    "ParamSlice",
    "GroupFamily",
    "Group",
    "GroupSpace",
    "discover_groups",
    "is_attention_module",
]

_KNOWN_PARAM_MODULES = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.Embedding)


@dataclass(frozen=True)
class ParamSlice:
    """One slice of one parameter belonging to a group.

    ``param.narrow(dim, index.start, index.stop - index.start)`` is the slice; ``name`` is
    the qualified parameter name in the model (e.g. ``"mlp.0.weight"``).
    """

    name: str
    param: nn.Parameter
    dim: int
    index: slice


@dataclass
class _Member:
    name: str
    param: nn.Parameter
    dim: int
    block: int  # group i owns indices [i*block, (i+1)*block) along dim

    def flat(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """View ``t`` (shape of ``param``) as ``(n, block * rest)``: row i = group i's entries."""
        return t.movedim(self.dim, 0).reshape(n, -1)


@dataclass
class GroupFamily:
    """All groups of one layer pattern (e.g. the 64 hidden units of ``mlp.0``).

    Groups of a family share their slicing pattern, so norms and projections are
    vectorised over the family: ``members`` lists (param, dim, block) and group ``i`` owns
    ``[i*block, (i+1)*block)`` along ``dim`` of every member.  ``layers`` maps every module
    whose width the family sets to its role (``producer``, ``consumer``, ``batch_norm``,
    ``depthwise``, ``attention``, ``o_proj``); ``modules`` maps a role to its first module
    (``producer``, ``consumer``, ``bn``, ``attention``, ``o_proj``).
    """

    name: str  # first producer module's qualified name (for heads: the attention module)
    kind: str  # "hidden" | "channel" | "head"
    num_groups: int
    members: List[_Member]
    modules: Dict[str, str] = field(default_factory=dict)  # role -> first module of that role
    layers: Dict[str, str] = field(default_factory=dict)  # every module the group resizes -> its role
    quantizers: list = field(default_factory=list)  # GETA: quantizers attached to member layers

    def slices(self, i: int) -> List[ParamSlice]:
        if not 0 <= i < self.num_groups:
            raise ValueError(f"group index {i} out of range for family {self.name!r} ({self.num_groups})")
        return [ParamSlice(m.name, m.param, m.dim, slice(i * m.block, (i + 1) * m.block)) for m in self.members]

    def stats(self, directions: Optional[Dict[nn.Parameter, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Per-group sums, float64 tensors of shape ``(num_groups,)``.

        ``xx`` = ||x_g||^2, ``numel`` = entries per group; with ``directions`` (a map
        param -> tensor of the param's shape, e.g. gradients) also ``gg`` = ||d_g||^2 and
        ``xd`` = <x_g, d_g>. Members missing from ``directions`` contribute 0 to gg/xd.
        """
        n = self.num_groups
        xx = torch.zeros(n, dtype=torch.float64)
        numel = torch.zeros(n, dtype=torch.float64)
        gg = torch.zeros(n, dtype=torch.float64)
        xd = torch.zeros(n, dtype=torch.float64)
        for m in self.members:
            x = m.flat(m.param.detach(), n).double()
            xx += (x * x).sum(1)
            numel += x.shape[1]
            if directions is not None and m.param in directions:
                d = m.flat(directions[m.param].detach(), n).double()
                gg += (d * d).sum(1)
                xd += (x * d).sum(1)
        out = {"xx": xx, "numel": numel}
        if directions is not None:
            out.update(gg=gg, xd=xd)
        return out

    def _scale_vector(self, m: _Member, factors: torch.Tensor) -> torch.Tensor:
        shape = [1] * m.param.dim()
        shape[m.dim] = -1
        return factors.repeat_interleave(m.block).to(m.param.dtype).view(shape)

    @torch.no_grad()
    def scale_(self, factors: torch.Tensor, tensors: Optional[Dict[nn.Parameter, torch.Tensor]] = None) -> None:
        """Multiply group i by ``factors[i]`` (shape ``(num_groups,)``) in every member.

        With ``tensors`` the same scaling is applied to those per-param tensors (optimizer
        state) instead of the params themselves. A factor of exactly 0 gives exact zeros.
        """
        for m in self.members:
            target = m.param.data if tensors is None else tensors.get(m.param)
            if target is None:
                continue
            target.mul_(self._scale_vector(m, factors))

    @torch.no_grad()
    def zero_(self, mask: torch.Tensor, tensors: Optional[Dict[nn.Parameter, torch.Tensor]] = None) -> None:
        """Set groups where ``mask`` (bool, ``(num_groups,)``) is True to exactly 0."""
        if bool(mask.any()):
            keep = (~mask).to(torch.float64)
            for m in self.members:
                target = m.param.data if tensors is None else tensors.get(m.param)
                if target is None:
                    continue
                # masked_fill rather than multiply: 0 * inf/nan must still give exact 0.
                target.masked_fill_(self._scale_vector(m, keep) == 0, 0.0)


@dataclass
class Group:
    """One removable structure: group ``index`` of ``family``."""

    family: GroupFamily
    index: int

    @property
    def slices(self) -> List[ParamSlice]:
        """The (param, dim, index-slice) list that must be zero together."""
        return self.family.slices(self.index)

    @property
    def name(self) -> str:
        return f"{self.family.name}[{self.family.kind}:{self.index}]"


class GroupSpace:
    """The pruning search space of a model: families of groups with a global group index.

    Global index ``offsets[f] + i`` is group ``i`` of ``families[f]``; ``groups`` lists
    all groups in that order.
    """

    def __init__(self, families: Sequence[GroupFamily]):
        self.families: List[GroupFamily] = list(families)
        self.offsets: List[int] = []
        total = 0
        for fam in self.families:
            self.offsets.append(total)
            total += fam.num_groups
        self.num_groups = total
        self.groups: List[Group] = [Group(f, i) for f in self.families for i in range(f.num_groups)]
        self.family_of = torch.tensor(
            [k for k, f in enumerate(self.families) for _ in range(f.num_groups)], dtype=torch.long
        )

    def __len__(self) -> int:
        return self.num_groups

    def __repr__(self) -> str:
        fams = ", ".join(f"{f.name}:{f.kind}x{f.num_groups}" for f in self.families)
        return f"GroupSpace({self.num_groups} groups: {fams})"

    def params(self) -> List[nn.Parameter]:
        seen, out = set(), []
        for f in self.families:
            for m in f.members:
                if id(m.param) not in seen:
                    seen.add(id(m.param))
                    out.append(m.param)
        return out

    def stats(self, directions=None) -> Dict[str, torch.Tensor]:
        """Concatenation of :meth:`GroupFamily.stats` over families, shape ``(num_groups,)``."""
        per = [f.stats(directions) for f in self.families]
        if not per:
            return {"xx": torch.zeros(0, dtype=torch.float64), "numel": torch.zeros(0, dtype=torch.float64)}
        return {k: torch.cat([p[k] for p in per]) for k in per[0]}

    def group_norms(self) -> torch.Tensor:
        """L2 norm of every group, float64 ``(num_groups,)``."""
        return self.stats()["xx"].sqrt()

    def zero_mask(self) -> torch.Tensor:
        """Bool ``(num_groups,)``: True where every entry of the group is exactly 0."""
        return self.stats()["xx"] == 0

    def group_sparsity(self) -> float:
        """Fraction of groups that are exactly zero."""
        return float(self.zero_mask().double().mean()) if self.num_groups else 0.0

    def split(self, global_mask: torch.Tensor) -> List[torch.Tensor]:
        """Split a ``(num_groups,)`` tensor into per-family pieces."""
        return [global_mask[o : o + f.num_groups] for o, f in zip(self.offsets, self.families)]

    @torch.no_grad()
    def zero_(self, global_mask: torch.Tensor, tensors=None) -> None:
        for fam, m in zip(self.families, self.split(global_mask)):
            fam.zero_(m, tensors)

    @torch.no_grad()
    def scale_(self, global_factors: torch.Tensor, tensors=None) -> None:
        for fam, s in zip(self.families, self.split(global_factors)):
            if bool((s != 1).any()):
                fam.scale_(s, tensors)


# ----------------------------------------------------------------------------- discovery


def is_attention_module(mod: nn.Module) -> bool:
    """True for modules following the q_proj/k_proj/v_proj/o_proj + num_heads convention."""
    o = getattr(mod, "o_proj", None) or getattr(mod, "out_proj", None)
    return (
        all(isinstance(getattr(mod, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj"))
        and isinstance(o, nn.Linear)
        and isinstance(getattr(mod, "num_heads", None), int)
    )


class _Tracer(fx.Tracer):
    # Attention modules stay leaves: heads are grouped from the module structure, and the
    # reshapes inside would otherwise look like consumers that block every group.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_attention_module(m) or super().is_leaf_module(m, qualname)


def _check_supported(model: nn.Module) -> None:
    inside_attention = set()
    for name, mod in model.named_modules():
        if is_attention_module(mod):
            for sub, _ in mod.named_modules():
                if sub:
                    inside_attention.add(f"{name}.{sub}" if name else sub)
    for name, mod in model.named_modules():
        if name in inside_attention or is_attention_module(mod) or "parametrizations" in name.split("."):
            continue  # attention internals are handled by the head rule; GETA quantizers are not pruned
        own = list(mod.parameters(recurse=False))
        # Raw parameters of user modules are fine: fx traces through those modules and the
        # parameters show up as get_attr consumers (which block grouping). Built-in torch.nn
        # layers are fx leaves whose semantics we must know, so unknown ones are refused.
        builtin_leaf = type(mod).__module__.startswith("torch.nn")
        if own and builtin_leaf and not isinstance(mod, _KNOWN_PARAM_MODULES):
            raise ValueError(
                f"unsupported parametrized module {name or '<root>'!r} of type {type(mod).__name__}: "
                f"group discovery supports {', '.join(t.__name__ for t in _KNOWN_PARAM_MODULES)} "
                "and attention modules with q_proj/k_proj/v_proj/o_proj + num_heads"
            )


def _member(modname: str, module: nn.Module, attr: str, dim: int, block: int = 1) -> Optional[_Member]:
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and attr in parametrizations:
        # a parametrized weight (GETA fake-quant): the trainable tensor is the original
        return _Member(_q(modname, f"parametrizations.{attr}.original"), parametrizations[attr].original, dim, block)
    p = getattr(module, attr, None)
    if p is None:
        return None
    return _Member(_q(modname, attr), p, dim, block)


def _q(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def discover_groups(model: nn.Module) -> GroupSpace:
    """Find the removable groups of ``model`` (see the module docstring for the rules).

    Returns a :class:`GroupSpace`; families are ordered by graph order of their first
    producer. Raises ``ValueError`` naming the offending module for unsupported
    architectures.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"discover_groups expects an nn.Module, got {type(model).__name__}")
    _check_supported(model)
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many exception types for untraceable control flow
        raise ValueError(
            f"cannot trace model {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
            "supported: nn.Sequential MLPs, conv-bn-act stacks, transformer blocks with "
            "q_proj/k_proj/v_proj/o_proj attention"
        ) from e
    mods = dict(model.named_modules())
    chains = GraphWalk(model, graph, is_attention_module).run()
    return GroupSpace([_family(chain, mods) for chain in chains])


_FIRST_OF_ROLE = {"producer": "producer", "consumer": "consumer", "batch_norm": "bn", "attention": "attention",
                  "o_proj": "o_proj"}


def _family(chain: Chain, mods: Dict[str, nn.Module]) -> GroupFamily:
    members = [_member(m.module, mods[m.module], m.attr, m.dim, m.block) for m in chain.members]
    modules: Dict[str, str] = {}
    for name, role in chain.layers.items():
        if role in _FIRST_OF_ROLE:
            modules.setdefault(_FIRST_OF_ROLE[role], name)
    return GroupFamily(chain.name, chain.kind, chain.channels // chain.unit, [m for m in members if m is not None],
                       modules=modules, layers=dict(chain.layers))
