"""Torch-side compaction: physically remove exactly-zero groups from a copy of the model.

This is the training side's reference for what ``CompactPrunedChannels`` does in Relax:
same groups, same result (up to float rounding), and it lets the example report the
compacted parameter count and latency even without the compiler pass.
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn as nn

from .groups import GroupSpace, discover_groups

__all__ = ["compact_model", "count_params"]


def count_params(model: nn.Module) -> int:
    """Number of scalar parameters (float, trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _slice_param(mod: nn.Module, attr: str, dim: int, keep: torch.Tensor) -> None:
    p = getattr(mod, attr, None)
    if p is None:
        return
    new = p.detach().index_select(dim, keep).clone()
    if isinstance(p, nn.Parameter):
        setattr(mod, attr, nn.Parameter(new, requires_grad=p.requires_grad))
    else:  # BN running statistics are buffers
        setattr(mod, attr, new)


def compact_model(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` with every exactly-zero group removed.

    Groups are re-discovered on the copy (same rules as :func:`discover_groups`), so the
    model must be plain (call :func:`tvm_splat.pruning.quant.finalize_quantization` first
    for GETA models). At least one group per family is kept so no layer gets width 0.
    The copy computes the same function as ``model`` in eval mode.
    """
    if any("parametrizations" in n.split(".") for n, _ in model.named_modules()):
        raise ValueError("compact_model needs a plain model: call finalize_quantization(model) first")
    new = copy.deepcopy(model)
    space: GroupSpace = discover_groups(new)
    mods: Dict[str, nn.Module] = dict(new.named_modules())
    # Masks first: slicing one family (e.g. W2's columns) must not change another's test.
    zeros = [fam.stats()["xx"] == 0 for fam in space.families]
    for fam, zero in zip(space.families, zeros):
        keep_groups = torch.nonzero(~zero).flatten()
        if keep_groups.numel() == 0:
            keep_groups = torch.zeros(1, dtype=torch.long)  # keep one (all-zero) group
        if keep_groups.numel() == fam.num_groups:
            continue
        if fam.kind == "hidden":
            prod, cons = mods[fam.modules["producer"]], mods[fam.modules["consumer"]]
            _slice_param(prod, "weight", 0, keep_groups)
            _slice_param(prod, "bias", 0, keep_groups)
            _slice_param(cons, "weight", 1, keep_groups)
            prod.out_features = cons.in_features = int(keep_groups.numel())
        elif fam.kind == "channel":
            prod, bn, cons = (mods[fam.modules[r]] for r in ("producer", "bn", "consumer"))
            _slice_param(prod, "weight", 0, keep_groups)
            _slice_param(prod, "bias", 0, keep_groups)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                _slice_param(bn, attr, 0, keep_groups)
            _slice_param(cons, "weight", 1, keep_groups)
            prod.out_channels = cons.in_channels = bn.num_features = int(keep_groups.numel())
        elif fam.kind == "head":
            att = mods[fam.modules["attention"]]
            o = mods[fam.modules["o_proj"]]
            d = att.q_proj.out_features // att.num_heads
            rows = (keep_groups[:, None] * d + torch.arange(d)[None, :]).flatten()
            for lin in (att.q_proj, att.k_proj, att.v_proj):
                _slice_param(lin, "weight", 0, rows)
                _slice_param(lin, "bias", 0, rows)
                lin.out_features = int(rows.numel())
            _slice_param(o, "weight", 1, rows)
            o.in_features = int(rows.numel())
            att.num_heads = int(keep_groups.numel())
        else:  # pragma: no cover - discover_groups only makes the kinds above
            raise ValueError(f"unknown group kind {fam.kind!r} in family {fam.name!r}")
    return new
