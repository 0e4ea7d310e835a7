"""What ``CompactPrunedChannels`` reports: per channel group and per rewritten layer.

Pure data (no TVM IR).  The rules that decide what a group is live in
``tvm_splat.channel_rules``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

@dataclass
class LayerReport:
    """One weighted layer (dense / conv / batch norm) touched by compaction.

    Channel counts are ``(before, after)``; FLOPs count a multiply-add as 2 and use the
    static shapes of the op (0 when a shape is symbolic); bytes are the layer's constant
    parameters (weight, plus gamma/beta/mean/var for batch norm).
    """

    name: str
    op: str
    in_channels: tuple[int, int]
    out_channels: tuple[int, int]
    flops_before: int
    flops_after: int
    param_bytes_before: int
    param_bytes_after: int

    @property
    def flops_saved(self) -> int:
        return self.flops_before - self.flops_after

    @property
    def param_bytes_saved(self) -> int:
        return self.param_bytes_before - self.param_bytes_after


@dataclass
class GroupReport:
    """One channel group (after ties are merged).

    ``status`` is ``"pruned"`` (units removed), ``"unchanged"`` (analysable, nothing
    removable) or ``"skipped"`` (pinned by a barrier / bad input; ``reasons`` says why).
    ``unit`` is 1 for channels or ``head_dim`` for attention heads; ``removed_units`` are
    indices in units.  ``notes`` explains zero-weight units that had to stay.
    """

    group_id: int
    function: str
    channels: int
    unit: int
    members: list[str]
    status: str
    removed_units: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    folded_constants: bool = False

    @property
    def units(self) -> int:
        return self.channels // self.unit

    @property
    def kept_units(self) -> int:
        return self.units - len(self.removed_units)


@dataclass
class CompactionReport:
    """What :func:`compact_pruned_channels` did to a module.

    ``params_*`` count elements and ``param_bytes_*`` bytes of all constants of the
    rewritten functions; ``flops_*`` sum every ``matmul``/``conv2d`` with static shapes
    (attention score/value matmuls included).  ``error`` is set when the rewrite was
    abandoned and the module returned unchanged.
    """

    groups: list[GroupReport] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    param_bytes_before: int = 0
    param_bytes_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    tol: float = 0.0
    error: str | None = None

    @property
    def pruned(self) -> list[GroupReport]:
        return [g for g in self.groups if g.status == "pruned"]

    @property
    def skipped(self) -> list[GroupReport]:
        return [g for g in self.groups if g.status == "skipped"]

    @property
    def changed(self) -> bool:
        return bool(self.pruned) and self.error is None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def summary(self) -> str:
        """Multi-line human summary (also what the pass logs at INFO)."""
        lines = [
            f"CompactPrunedChannels: {len(self.pruned)} group(s) pruned, "
            f"{len(self.skipped)} skipped; params {self.params_before} -> {self.params_after} "
            f"({self.param_bytes_before - self.param_bytes_after} bytes saved); "
            f"FLOPs {self.flops_before} -> {self.flops_after}"
        ]
        if self.error:
            lines.append(f"  rewrite abandoned, module unchanged: {self.error}")
        for g in self.groups:
            what = "heads" if g.unit > 1 else "channels"
            lines.append(
                f"  [{g.function}#{g.group_id}] {g.status}: {g.units} -> {g.kept_units} {what} "
                f"({', '.join(g.members)})"
            )
            lines.extend(f"      reason: {r}" for r in g.reasons)
            lines.extend(f"      note: {n}" for n in g.notes)
        for lay in self.layers:
            lines.append(
                f"  layer {lay.name} ({lay.op}): in {lay.in_channels[0]}->{lay.in_channels[1]}, "
                f"out {lay.out_channels[0]}->{lay.out_channels[1]}, "
                f"-{lay.flops_saved} FLOPs, -{lay.param_bytes_saved} B"
            )
        return "\n".join(lines)
