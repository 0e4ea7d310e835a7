"""The shared op table: families, value rules, and how a zeroed channel's value flows."""
import pytest

from tvm_splat.channel_rules import OP_RULES, Role, Value, families, ops_of_family, through


def test_families_partition_the_table():
    assert sorted(n for fam in families() for n in ops_of_family(fam)) == sorted(OP_RULES)
    assert ops_of_family("conv2d") == ("relax.nn.conv2d",)
    with pytest.raises(KeyError, match="no op family 'convolution'"):
        ops_of_family("convolution")


def test_every_op_states_its_roles_and_only_producers_are_consumers():
    for name, rule in OP_RULES.items():
        assert rule.roles and rule.note, name
        assert (Role.PRODUCER in rule.roles) == (Role.CONSUMER in rule.roles), name


@pytest.mark.parametrize("op,zero,constant", [
    ("relax.nn.relu", Value.ZERO, Value.CONSTANT),  # relu(0) = 0
    ("relax.sigmoid", Value.CONSTANT, Value.CONSTANT),  # sigmoid(0) = 0.5
    ("relax.nn.max_pool2d", Value.ZERO, Value.INPUT),  # padding makes border windows differ
    ("relax.sum", Value.ZERO, Value.INPUT),
    ("relax.mean", Value.ZERO, Value.CONSTANT),
    ("relax.nn.softmax", Value.INPUT, Value.INPUT),
    ("relax.divide", Value.INPUT, Value.CONSTANT),  # 0 / 0
])
def test_through_follows_the_rule(op, zero, constant):
    rule = OP_RULES[op]
    assert through(rule, Value.ZERO) is zero
    assert through(rule, Value.CONSTANT) is constant
    assert through(rule, Value.INPUT) is Value.INPUT


def test_only_multiply_absorbs_zero():
    assert [n for n, r in OP_RULES.items() if r.zero_absorbs] == ["relax.multiply"]
