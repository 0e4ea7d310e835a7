"""GETA's quantizer: the bit width is derived from (d, q_m, t), the grid needs exactly that many
bits, the projection keeps it in bounds, the gradients are the paper's, BOPs count the
pruned shapes, and attach/finalize leave a plain model computing the quantized function."""
import math

import pytest
import torch
import torch.nn as nn

from tvm_splat.pruning.quant import (Quantizer, attach_quantizers, bops, deployed_bits, finalize_quantization,
                                     quantizers_of)


@pytest.mark.parametrize("q_m,bits", [(1.0, 4), (0.37, 8), (5.0, 2), (2.0, 16)])
def test_derived_bit_width_of_the_initial_step(q_m, bits):
    q = Quantizer(q_m, bits, 2, 16)
    assert q.d.item() == pytest.approx(q_m / (2 ** (bits - 1) - 1), rel=1e-6)
    assert q.bit_width() == pytest.approx(bits, abs=1e-5)


@pytest.mark.parametrize("q_m,t,d", [(1.0, 1.0, 0.1), (4.0, 0.5, 2 / 3), (0.5, 2.0, 0.25 ** 1 / 7)])
def test_bit_width_is_log2_of_levels_with_exponent(q_m, t, d):
    q = Quantizer(q_m, 4, 2, 16)
    with torch.no_grad():
        q.t.fill_(t)
        q.d.fill_(d)
    assert q.bit_width() == pytest.approx(math.log2(q_m ** t / d + 1) + 1, rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_grid_uses_at_most_2_pow_b_minus_1_levels_and_keeps_zero(bits):
    x = torch.linspace(-3, 3, 2001)
    q = Quantizer(2.0, bits, 2, 8)
    y = q(x).detach()
    assert torch.unique(y).numel() == 2 ** bits - 1  # symmetric, no zero point, includes 0
    assert y[1000] == 0 and q(torch.zeros(5)).eq(0).all()
    assert y.abs().max().item() == pytest.approx(2.0, rel=1e-6)  # clipped at q_m


def test_projection_keeps_width_in_bounds_and_fix_bits_is_exact():
    q = Quantizer(1.0, 6, 3, 6)
    with torch.no_grad():
        q.d.fill_(10.0)  # far too coarse: < 3 bits
    q.project_(3, 6)
    assert q.bit_width() == pytest.approx(3.0, abs=1e-5)
    with torch.no_grad():
        q.d.fill_(1e-9)  # far too fine
    q.project_(3, 5)
    assert q.bit_width() == pytest.approx(5.0, abs=1e-5)
    q.fix_bits_(4)
    assert q.bit_width() == pytest.approx(4.0, abs=1e-5)


def test_gradients_are_the_papers():
    x = torch.tensor([-2.0, -0.3, 0.0, 0.26, 0.9, 1.7], requires_grad=True)
    q = Quantizer(1.0, 3, 2, 8)  # d = 1/3
    with torch.no_grad():
        q.t.fill_(1.5)
    y = q(x)
    y.sum().backward()
    s, a = torch.sign(x.detach()), x.detach().abs()
    inside = a < 1.0
    p = torch.where(inside, a, torch.ones_like(a)) ** 1.5
    u = p / q.d.detach()
    assert torch.equal(x.grad, inside.float())  # straight-through inside the clip range, 0 outside
    torch.testing.assert_close(q.d.grad, (s * (torch.round(u) - u)).sum())
    torch.testing.assert_close(q.q_m.grad, (s * (~inside) * 1.5).sum())  # t q_m^(t-1) with q_m = 1
    logs = torch.where(inside, torch.log(a.clamp_min(1e-30)), torch.zeros_like(a)) * (a > 0)
    torch.testing.assert_close(q.t.grad, (s * p * logs).sum())


def test_attach_counts_macs_and_finalize_bakes_the_quantized_weights():
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    x = torch.randn(6, 1, 8, 8)
    layers = attach_quantizers(m, (x,), weight_bits=(3, 8), act_bits=(4, 8), init_bits=6)
    assert set(layers) == {"0", "3"} and quantizers_of(m).keys() == layers.keys()
    assert layers["0"].macs == 4 * 8 * 8 * 9 and layers["3"].macs == 256 * 5
    assert deployed_bits(layers["0"]) == (6, 6)
    assert bops(layers) == pytest.approx((4 * 64 * 9 + 256 * 5) * 36)
    with torch.no_grad():  # prune output channel 1 of the conv and its 64 inputs of the Linear
        layers["0"].weight_param[1] = 0
        layers["3"].weight_param[:, 64:128] = 0
    assert layers["0"].alive_fraction() == 0.75 and layers["3"].alive_fraction() == 0.75
    assert bops(layers) == pytest.approx(0.75 * (4 * 64 * 9 + 256 * 5) * 36)
    with torch.no_grad():
        ref = m(x)
    bits = finalize_quantization(m)
    assert bits == {"0": {"weight": 6, "activation": 6}, "3": {"weight": 6, "activation": 6}}
    assert not quantizers_of(m) and not list(m[0]._forward_pre_hooks.values())
    assert torch.unique(m[0].weight.detach()).numel() <= 2 ** 6 - 1
    with torch.no_grad():  # only the activation quantization is gone
        torch.testing.assert_close(m(x), ref, rtol=0.1, atol=0.1)


def test_bad_arguments():
    lin = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="2 <= b_min <= b_max"):
        attach_quantizers(lin, (x,), weight_bits=(1, 4))
    with pytest.raises(ValueError, match="integers"):
        attach_quantizers(lin, (x,), weight_bits=(2.5, 4))
    with pytest.raises(ValueError, match="outside"):
        Quantizer(1.0, 9, 2, 8)
    attach_quantizers(lin, (x,), weight_bits=(2, 4))
    with pytest.raises(ValueError, match="already has GETA quantizers"):
        attach_quantizers(lin, (x,), weight_bits=(2, 4))
    with pytest.raises(ValueError, match="never reached"):
        class Skip(nn.Module):
            def __init__(self):
                super().__init__()
                self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

            def forward(self, x):
                return self.used(x)

        attach_quantizers(Skip(), (x,), weight_bits=(2, 4))
