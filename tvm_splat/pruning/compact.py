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


def _fit_widths(mod: nn.Module) -> None:
    """Set a resized layer's size attributes from its (sliced) weight."""
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.Conv2d):
        depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
        mod.out_channels = mod.weight.shape[0]
        mod.groups = mod.out_channels if depthwise else mod.groups
        mod.in_channels = mod.weight.shape[1] * mod.groups


def _compact_family(fam, keep_groups: torch.Tensor, mods: Dict[str, nn.Module]) -> None:
    """Slice every member of ``fam`` to ``keep_groups`` and fix the widths of its layers."""
    for m in fam.members:
        module, attr = m.name.rsplit(".", 1) if "." in m.name else ("", m.name)
        keep = (keep_groups[:, None] * m.block + torch.arange(m.block)[None, :]).flatten()
        _slice_param(mods[module], attr, m.dim, keep)
        _fit_widths(mods[module])
    for name, role in fam.layers.items():
        if role == "batch_norm":
            bn = mods[name]
            for attr in ("running_mean", "running_var"):
                _slice_param(bn, attr, 0, keep_groups)
            bn.num_features = int(keep_groups.numel())
        elif role == "attention":
            mods[name].num_heads = int(keep_groups.numel())


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
        if keep_groups.numel() < fam.num_groups:
            _compact_family(fam, keep_groups, mods)
    return new
