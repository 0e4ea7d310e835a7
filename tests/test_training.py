"""Training plans (tvm_splat/training.py): made once, checked inputs, closed-form transposes."""
import pytest

from tvm_splat.formats import ACSR, Window

torch = pytest.importorskip("torch")
from tvm_splat.training import plan_training  # noqa: E402


@pytest.mark.parametrize("mask", ["global:1+causal_window:2", Window(3, causal=True),
                                  ACSR.from_pattern(Window(2, causal=True), 9)])
def test_the_plan_holds_the_transposed_mask(mask):
    plan = plan_training(mask, (1, 2, 9, 4), dtype="float32")
    assert (plan.transposed.to_dense() == plan.acsr.to_dense().transpose(0, 2, 1)).all()
    t = plan.transposed.to_dense()[0]
    assert t[1, 3] and not t[5, 1]  # anti-causal: key 1 is seen by query 3, key 5 not by query 1


def test_inputs_are_checked_against_the_plan():
    plan = plan_training("window:2", (1, 2, 9, 4), (1, 1, 9, 4), "float32", "cpu")
    q, k = torch.zeros(1, 2, 9, 4), torch.zeros(1, 1, 9, 4)
    with pytest.raises(ValueError, match=r"k has shape \(1, 2, 9, 4\)"):
        plan.forward(q, q, q)
    with pytest.raises(ValueError, match="q has dtype float64"):
        plan.forward(q.double(), k, k)
    with pytest.raises(TypeError, match="torch tensor"):
        plan.forward(q.numpy(), k, k)
    out, lse = plan.forward(q, k, k)
    with pytest.raises(ValueError, match="lse has dtype float64"):
        plan.backward(q, k, k, out, lse.double(), out)


def test_bad_plans_are_named():
    with pytest.raises(ValueError, match="heads % kv_heads"):
        plan_training("window:2", (1, 3, 9, 4), (1, 2, 9, 4))
    with pytest.raises(ValueError, match="unsupported dtype int8"):
        plan_training("window:2", (1, 2, 9, 4), dtype="int8")
    with pytest.raises(ValueError, match="float64 training kernels are for the CPU"):
        plan_training("window:2", (1, 2, 9, 4), dtype="float64", target="nvidia/nvidia-h100")
    with pytest.raises(ValueError, match="4 positive ints"):
        plan_training("window:2", (1, 2, 9))
