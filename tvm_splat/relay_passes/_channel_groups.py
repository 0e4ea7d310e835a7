"""Pure data for channel compaction: the dependency rules and the report.

Nothing here touches TVM IR.  ``OP_RULES`` is the single table the Relax analysis
(``_channel_analysis``) dispatches on, and the table the torch-side HESSO/GETA group
discovery (``tvm_splat.pruning``) is meant to mirror, so that both sides agree on which
parameters form one prunable group.

Vocabulary
----------
channel group
    A set of channel indices that must be kept or removed together in *every* tensor and
    parameter it reaches.  It is born at a PRODUCER (the output-channel axis of a dense or
    conv weight: rows of a ``Linear`` weight, filters of a ``Conv2d``) and ends at
    CONSUMERS (the input-channel axis of the next dense/conv weight: columns of a
    ``Linear`` weight, input planes of a ``Conv2d`` filter).
unit
    The removal granularity of a group: 1 channel, or ``head_dim`` channels once the
    channel axis has been reshaped into ``(heads, head_dim)`` (attention heads).
value of a channel
    What the channel holds for *every* input: a known constant (0 in the usual zero-group
    case) or "depends on the input".  A unit is removable iff, at every consumer, all its
    channels hold a constant the consumer can absorb (see ``absorb`` below).

Rules (per op role)
-------------------
PRODUCER   creates a group on its output channel axis.  A channel's value is 0 when its
           weight row/filter is zero (``|w| <= tol``), otherwise input-dependent.
CONSUMER   ends the chain: the group indexes the weight's input-channel axis.  Absorb:
           a removed channel with value 0 simply disappears; a constant ``c != 0`` is
           folded as ``c * W[:, ch]`` (dense) or ``c * sum_hw W[:, ch]`` (conv, only when
           the conv has no padding: zero padding makes the constant's contribution differ
           at the borders, so the channel is kept instead).
PASSTHROUGH per-channel ops (bias add, batch norm, activations, depthwise conv, pooling,
           scalar scale): the group flows through, per-channel parameters are sliced and
           the channel value is transformed (e.g. ``relu(beta - mean*gamma/sqrt(var+eps))``
           for conv->BN->relu; ``sigmoid(0) = 0.5`` is a constant that gets folded).
LAYOUT     reshape / permute / broadcast / expand / squeeze move the channel axis.  A
           reshape that splits the channel axis ``C -> (H, C/H)`` turns the group into a
           head group with unit ``C/H`` (only whole heads can go); merging it back restores
           channel granularity.  ``take``/slicing across the group axis is a BARRIER.
TIE        two tracked tensors meeting elementwise (residual ``add``, gating ``multiply``,
           ``where``) or in a batched matmul over the head axis (``q @ k^T``, ``P @ v``)
           merge their groups: a unit goes only if it is removable in the merged group,
           i.e. every branch agrees.  An add with an *untracked* activation of full
           channel extent (a residual from the block input) pins the group: those channels
           can never be constant.
REDUCE     reductions/softmax/normalisation over axes *other* than the group axis pass the
           group through; over the group axis they are a BARRIER.
BARRIER    anything else (unknown op, tuple packing, the function return, layer_norm over
           the channels, contraction of the group axis between two activations): the whole
           group is pinned and kept, with the reason recorded in the report.

Attention heads: q, k, v projections each produce a group; ``q @ k^T`` ties q and k over
the head axis and ``P @ v`` ties in v, then the output projection consumes it.  A head's
value at the output projection is 0 when its v rows (and v bias) are zero, since ``P @ 0 =
0``; q and k of that head then only feed a product that is multiplied by zero, so the
whole head (q/k/v rows, o columns, and the head count of every reshape) is removed.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field


class Role(str, enum.Enum):
    """What an op does to a channel group flowing through it (see module docstring)."""

    PRODUCER = "producer"
    CONSUMER = "consumer"
    PASSTHROUGH = "passthrough"
    LAYOUT = "layout"
    TIE = "tie"
    REDUCE = "reduce"
    BARRIER = "barrier"


@dataclass(frozen=True)
class OpRule:
    """How one Relax op interacts with channel groups.

    ``roles`` lists every role the op can take (``matmul`` is a PRODUCER+CONSUMER with a
    constant weight and a TIE between two activations); ``family`` names the analysis
    handler; ``note`` is the human rule.
    """

    roles: tuple[Role, ...]
    family: str
    note: str


_EW = "elementwise: same channel index in every operand; constants sliced along the group axis"
_UNARY = "per-channel unary: value v -> f(v)"
_LAYOUT = "moves the channel axis; reshape may split it into heads"

OP_RULES: dict[str, OpRule] = {
    "relax.matmul": OpRule(
        (Role.PRODUCER, Role.CONSUMER, Role.TIE),
        "matmul",
        "x @ W (W constant, (K, N) after the frontend's permute_dims): output columns = "
        "producer group, K = consumer of the input group; two activations: ties groups on "
        "batch (head) axes, barrier on the contraction axis",
    ),
    "relax.nn.conv2d": OpRule(
        (Role.PRODUCER, Role.CONSUMER, Role.PASSTHROUGH),
        "conv2d",
        "NCHW/OIHW, groups=1: filters = producer, input planes = consumer; depthwise "
        "(groups = C_in = C_out): passthrough with filters sliced",
    ),
    "relax.nn.batch_norm": OpRule(
        (Role.PASSTHROUGH,), "batch_norm",
        "eval mode only; gamma/beta/mean/var sliced; v -> (v-mean)/sqrt(var+eps)*gamma+beta",
    ),
    # elementwise with broadcasting
    **{
        f"relax.{n}": OpRule((Role.PASSTHROUGH, Role.TIE), "elementwise", _EW)
        for n in ("add", "subtract", "multiply", "divide", "maximum", "minimum", "where",
                  "equal", "not_equal", "less", "less_equal", "greater", "greater_equal",
                  "logical_and", "logical_or")
    },
    # per-channel unary
    **{
        f"relax.{n}": OpRule((Role.PASSTHROUGH,), "unary", _UNARY)
        for n in ("nn.relu", "nn.gelu", "nn.gelu_tanh", "nn.silu", "tanh", "sigmoid",
                  "negative", "exp", "astype", "logical_not", "clip", "nn.leakyrelu",
                  "nn.dropout_identity")
    },
    **{
        f"relax.{n}": OpRule((Role.PASSTHROUGH,), "fill_like", "constant fill, keeps shape")
        for n in ("full_like", "zeros_like", "ones_like")
    },
    **{
        f"relax.{n}": OpRule((Role.LAYOUT,), "layout", _LAYOUT)
        for n in ("reshape", "permute_dims", "broadcast_to", "expand_dims", "squeeze",
                  "flatten")
    },
    **{
        f"relax.{n}": OpRule((Role.REDUCE,), "reduce", "over non-group axes only")
        for n in ("sum", "mean", "max", "min")
    },
    **{
        f"relax.nn.{n}": OpRule((Role.REDUCE,), "softmax", "over a non-group axis only")
        for n in ("softmax", "log_softmax")
    },
    **{
        f"relax.nn.{n}": OpRule((Role.PASSTHROUGH,), "pool2d", "NCHW, channel axis 1")
        for n in ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d")
    },
    **{
        f"relax.nn.{n}": OpRule((Role.REDUCE,), "norm", "normalised axes must exclude the group axis")
        for n in ("layer_norm", "rms_norm")
    },
}


# --------------------------------------------------------------------------- report


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
