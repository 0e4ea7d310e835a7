"""The Relax channel analysis has one handler per op of the shared rule table, and its
value computations agree with the table's ``zero``/``constant`` fields."""
import numpy as np
import pytest
import tvm

from tvm_splat.channel_rules import OP_RULES, Value
from tvm_splat.relay_passes._channel_analysis import FunctionAnalysis  # noqa: F401  (registers handlers)
from tvm_splat.relay_passes._channel_flow_ops import UNARY_VALUE, rule_values
from tvm_splat.relay_passes._channel_registry import HANDLERS, register


def test_every_rule_has_exactly_one_handler_and_no_handler_lacks_a_rule():
    assert set(HANDLERS) == set(OP_RULES)
    by_family = {}
    for name, rule in OP_RULES.items():
        by_family.setdefault(rule.family, set()).add(HANDLERS[name])
    assert all(len(handlers) == 1 for handlers in by_family.values()), by_family


def test_every_rule_names_a_relax_op():
    for name in OP_RULES:
        assert tvm.ir.Op.get(name).name == name


def test_register_refuses_ops_without_rules_and_second_handlers():
    with pytest.raises(KeyError, match="no rule in OP_RULES"):
        register("relax.cumsum")
    with pytest.raises(KeyError, match="already has handler"):
        register("relax.add")(lambda an, var, call: None)


class _Call:
    class attrs:  # noqa: N801 - stands in for a relax Call's attrs
        alpha = 0.1


@pytest.mark.parametrize("name", sorted(UNARY_VALUE))
def test_unary_value_functions_agree_with_the_table(name):
    rule = OP_RULES[name]
    at_zero = float(UNARY_VALUE[name](np.zeros(1), _Call)[0])
    assert (at_zero == 0.0) == (rule.zero is Value.ZERO), (name, at_zero)
    at_const = UNARY_VALUE[name](np.array([0.3, -2.0]), _Call)
    assert np.isfinite(at_const).all() == (rule.constant is Value.CONSTANT)


def test_rule_values_follow_zero_and_constant_fields():
    v = np.array([0.0, 2.0, np.nan])
    np.testing.assert_array_equal(rule_values("relax.mean", v), v)
    np.testing.assert_array_equal(rule_values("relax.sum", v), [0.0, np.nan, np.nan])
    np.testing.assert_array_equal(rule_values("relax.nn.max_pool2d", v), [0.0, np.nan, np.nan])
    assert np.isnan(rule_values("relax.nn.softmax", v)).all()
    with pytest.raises(AssertionError, match="own value function"):
        rule_values("relax.sigmoid", v)
