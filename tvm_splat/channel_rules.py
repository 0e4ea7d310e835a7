"""Channel-group op rules: the one table both sides of structured pruning read.

``OP_RULES`` says, per op, what it does to a *channel group* flowing through it.  Two
analyses read it: the Relax pass ``CompactPrunedChannels`` (``tvm_splat.relay_passes``),
which finds zeroed groups in an imported model and removes them, and torch-side group
discovery (``tvm_splat.pruning.groups``), which finds the groups HESSO/GETA may zero.  The
table is keyed by Relax op name; the torch side maps each torch module/function to the
Relax op it imports as.  Pure data: no TVM, no torch (the bottom layer of the package).

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
    What the channel holds for *every* input (:class:`Value`): exactly 0, a known constant,
    or "depends on the input".  A unit is removable iff, at every consumer, all its
    channels hold a constant the consumer can absorb (see CONSUMER).

Rules (per op role)
-------------------
PRODUCER   creates a group on its output channel axis.  A channel's value is 0 when its
           weight row/filter is zero (``|w| <= tol``), otherwise input-dependent.
CONSUMER   ends the chain: the group indexes the weight's input-channel axis.  Absorb:
           a removed channel with value 0 simply disappears; a constant ``c != 0`` is
           folded as ``c * W[:, ch]`` (dense) or ``c * sum_hw W[:, ch]`` (conv, only when
           the conv has no padding: zero padding makes the constant's contribution differ
           at the borders, so the channel is kept instead).  A channel whose consumer
           weights hold a NaN/inf is kept, so the model still gives torch's NaN/inf.
PASSTHROUGH per-channel ops (bias add, batch norm, activations, depthwise conv, pooling,
           scalar scale): the group flows through, per-channel parameters are sliced and
           the channel value is transformed (``zero``/``constant`` below; e.g.
           ``relu(beta - mean*gamma/sqrt(var+eps))`` for conv->BN->relu; ``sigmoid(0) =
           0.5`` is a constant that gets folded).
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
BARRIER    anything else (an op not in the table, tuple packing, the function return,
           layer_norm over the channels, contraction of the group axis between two
           activations): the whole group is pinned and kept, with the reason recorded.

Attention heads: q, k, v projections each produce a group; ``q @ k^T`` ties q and k over
the head axis and ``P @ v`` ties in v, then the output projection consumes it.  A head's
value at the output projection is 0 when its v rows (and v bias) are zero, since ``P @ 0 =
0``; q and k of that head then only feed a product that is multiplied by zero, so the
whole head (q/k/v rows, o columns, and the head count of every reshape) is removed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(str, enum.Enum):
    """What an op does to a channel group flowing through it (see module docstring)."""

    PRODUCER = "producer"
    CONSUMER = "consumer"
    PASSTHROUGH = "passthrough"
    LAYOUT = "layout"
    TIE = "tie"
    REDUCE = "reduce"
    BARRIER = "barrier"


class Value(str, enum.Enum):
    """What a channel holds for every input of the model."""

    ZERO = "zero"  # exactly 0
    CONSTANT = "constant"  # one finite constant (maybe 0)
    INPUT = "input"  # depends on the input


@dataclass(frozen=True)
class OpRule:
    """How one Relax op interacts with channel groups.

    ``roles`` lists every role the op can take (``matmul`` is a PRODUCER+CONSUMER with a
    constant weight and a TIE between two activations); ``family`` names the op family
    (ops of a family share one handler on each side); ``note`` is the human rule.
    ``zero`` is what the op makes of channels that are 0 in every operand, ``constant``
    what it makes of constant channels (both for PASSTHROUGH/LAYOUT/TIE/REDUCE ops);
    ``zero_absorbs`` is True when one operand's 0 makes the result 0 whatever the other
    operands hold (``multiply``).
    """

    roles: tuple[Role, ...]
    family: str
    note: str
    zero: Value = Value.ZERO
    constant: Value = Value.CONSTANT
    zero_absorbs: bool = False


_EW = "elementwise: same channel index in every operand; constants sliced along the group axis"
_UNARY = "per-channel unary: value v -> f(v)"
_LAYOUT = "moves the channel axis; reshape may split it into heads"
_INPUT = dict(zero=Value.INPUT, constant=Value.INPUT)


def _family(family: str, names: tuple[str, ...], roles: tuple[Role, ...], note: str, **values) -> dict:
    return {f"relax.{n}": OpRule(roles, family, note, **values) for n in names}


OP_RULES: dict[str, OpRule] = {
    "relax.matmul": OpRule(
        (Role.PRODUCER, Role.CONSUMER, Role.TIE),
        "matmul",
        "x @ W (W constant, (K, N) after the frontend's permute_dims): output columns = "
        "producer group, K = consumer of the input group; two activations: ties groups on "
        "batch (head) axes, barrier on the contraction axis; a group on the rows of x "
        "passes through (0 stays 0, a constant becomes input-dependent)",
        constant=Value.INPUT,
    ),
    "relax.nn.conv2d": OpRule(
        (Role.PRODUCER, Role.CONSUMER, Role.PASSTHROUGH),
        "conv2d",
        "NCHW/OIHW, groups=1: filters = producer, input planes = consumer; depthwise "
        "(groups = C_in = C_out): passthrough with filters sliced",
    ),
    "relax.nn.batch_norm": OpRule(
        (Role.PASSTHROUGH,), "batch_norm",
        "eval mode only; gamma/beta/mean/var sliced; v -> (v-mean)/sqrt(var+eps)*gamma+beta "
        "(0 stays 0 only when gamma and beta are 0 too: the pruning group holds them)",
        zero=Value.CONSTANT,
    ),
    **_family("elementwise", ("add", "subtract", "maximum", "minimum", "where"),
              (Role.PASSTHROUGH, Role.TIE), _EW),
    **_family("elementwise", ("multiply",), (Role.PASSTHROUGH, Role.TIE), _EW, zero_absorbs=True),
    **_family("elementwise", ("divide",), (Role.PASSTHROUGH, Role.TIE), _EW + "; 0/0 is NaN",
              zero=Value.INPUT),
    **_family("elementwise", ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal",
                              "logical_and", "logical_or"),
              (Role.PASSTHROUGH, Role.TIE), _EW + "; boolean result: treated as input-dependent", **_INPUT),
    **_family("unary", ("nn.relu", "nn.gelu", "nn.gelu_tanh", "nn.silu", "tanh", "negative", "astype",
                        "nn.leakyrelu"), (Role.PASSTHROUGH,), _UNARY + "; f(0) = 0"),
    **_family("unary", ("clip",), (Role.PASSTHROUGH,), _UNARY + "; f(0) = 0 when 0 lies in [min, max]"),
    **_family("unary", ("sigmoid", "exp"), (Role.PASSTHROUGH,), _UNARY + "; f(0) != 0 (a constant)",
              zero=Value.CONSTANT),
    **_family("unary", ("logical_not",), (Role.PASSTHROUGH,), "boolean: input-dependent", **_INPUT),
    **_family("fill_like", ("zeros_like",), (Role.PASSTHROUGH,), "constant fill 0, keeps shape"),
    **_family("fill_like", ("ones_like", "full_like"), (Role.PASSTHROUGH,), "constant fill, keeps shape",
              zero=Value.CONSTANT),
    **_family("layout", ("reshape", "permute_dims", "broadcast_to", "expand_dims", "squeeze", "flatten"),
              (Role.LAYOUT,), _LAYOUT),
    **_family("reduce", ("mean", "max", "min"), (Role.REDUCE,), "over non-group axes only"),
    **_family("reduce", ("sum",), (Role.REDUCE,),
              "over non-group axes only; a non-zero constant becomes input-dependent (it scales with "
              "the reduced extent)", constant=Value.INPUT),
    **_family("softmax", ("nn.softmax", "nn.log_softmax"), (Role.REDUCE,), "over a non-group axis only",
              **_INPUT),
    **_family("pool2d", ("nn.max_pool2d", "nn.avg_pool2d", "nn.adaptive_avg_pool2d"), (Role.PASSTHROUGH,),
              "NCHW, channel axis 1; 0 stays 0, a non-zero constant is treated as input-dependent "
              "(padding makes border windows differ)", constant=Value.INPUT),
    **_family("norm", ("nn.layer_norm", "nn.rms_norm"), (Role.REDUCE,),
              "normalised axes must exclude the group axis", **_INPUT),
}


def ops_of_family(family: str) -> tuple[str, ...]:
    """Relax op names of ``family`` in table order (``ops_of_family("unary")``)."""
    names = tuple(name for name, rule in OP_RULES.items() if rule.family == family)
    if not names:
        raise KeyError(f"no op family {family!r} in OP_RULES (families: {sorted(families())})")
    return names


def families() -> set[str]:
    """Every op family named in ``OP_RULES``."""
    return {rule.family for rule in OP_RULES.values()}


def through(rule: OpRule, value: Value) -> Value:
    """What ``value`` (held by every tracked operand) becomes through an op of ``rule``."""
    if value is Value.INPUT:
        return Value.INPUT
    return rule.zero if value is Value.ZERO else rule.constant
