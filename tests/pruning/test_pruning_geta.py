"""GETA: bit widths stay inside [b_min, b_max] after every step; pruning and quantization compose."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tvm_splat.pruning.geta import GETA
from tvm_splat.pruning.groups import discover_groups
from tvm_splat.pruning.quant import FakeQuantizer, attach_quantizers, finalize_quantization, quantizers_of


def _setup(b_min=3, b_max=6, b_init=None, **kw):
    m = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 3))
    space = discover_groups(m)
    qs = attach_quantizers(m, b_min, b_max, b_init=b_init, space=space)
    defaults = dict(lr=0.01, variant="adamw", quant_lr=0.05, target_group_sparsity=0.5, warmup_steps=6,
                    pruning_steps=12, pruning_periods=2)
    defaults.update(kw)
    opt = GETA(m.parameters(), space, qs, **defaults)
    return m, space, qs, opt


def _steps(m, opt, n, check=None):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        x = torch.randn(32, 8, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        if check is not None:
            check()


@pytest.mark.parametrize("penalty,b_init,expect", [(50.0, 6, 3), (0.0, 3, None)])
def test_bit_widths_respect_bounds_every_step(penalty, b_init, expect):
    m, space, qs, opt = _setup(b_init=b_init, bit_penalty=penalty, quant_lr=0.5)
    seen = []

    def check():
        for q in qs.values():
            b = float(q.bits.detach())
            seen.append(b)
            assert 3.0 <= b <= 6.0 and 3 <= q.integer_bits() <= 6

    _steps(m, opt, 30, check)
    if expect is not None:  # a huge penalty drives bits to the lower bound, never below
        assert opt.bit_widths() == {n: expect for n in qs}
    assert min(seen) >= 3.0 and max(seen) <= 6.0
    # after warm-up + pruning the bits are frozen at integers (cool-down)
    assert all(float(q.bits) == q.integer_bits() for q in qs.values())


def test_task_gradient_cannot_push_bits_above_upper_bound():
    m, space, qs, opt = _setup(b_min=2, b_max=4, b_init=4)
    for q in qs.values():  # an adversarial gradient asking for ever more bits
        q.bits.register_hook(lambda g: torch.full_like(g, -100.0))
    _steps(m, opt, 10)
    assert all(float(q.bits) == 4.0 for q in qs.values())


def test_pruned_groups_stay_exactly_zero_after_quantization():
    m, space, qs, opt = _setup(bit_penalty=5.0)
    _steps(m, opt, 25)
    k = round(0.5 * len(space))
    assert int(space.zero_mask().sum()) == k == len(opt.pruned_groups())
    # the *quantized* weights the model computes with: zero groups remain exact zeros
    w0 = m[0].weight  # parametrized: quantized view
    pruned_units = [g.index for g in (space.groups[i] for i in opt.pruned_groups()) if g.family.name == "0"]
    assert pruned_units and torch.all(w0[pruned_units] == 0)
    # and every layer uses at most 2^b - 1 levels (symmetric grid, no zero point)
    bits = opt.bit_widths()
    for name, q in qs.items():
        w = m.get_submodule(name).weight.detach()
        assert torch.unique(w).numel() <= 2 ** bits[name] - 1
    # quantization-aware groups: every family knows its layers' quantizers
    assert [len(f.quantizers) for f in space.families] == [2, 2]
    x = torch.randn(16, 8)
    with torch.no_grad():
        ref = m(x)
    final = finalize_quantization(m)
    assert final == bits and not quantizers_of(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    assert int(space.zero_mask().sum()) == k  # the space still points at the baked weights


def test_fake_quantizer_grid_and_ste():
    w = torch.linspace(-1, 1, 101, requires_grad=True)
    q = FakeQuantizer(w, 2, 8, b_init=3)
    out = q(w)
    assert torch.unique(out.detach()).numel() == 7  # 2^3 - 1 levels
    assert out[50] == 0  # zero maps to zero
    out.sum().backward()
    assert torch.all(w.grad[1:-1] == 1) and q.bits.grad is not None and q.q_m.grad is not None


def test_bad_bounds_and_arguments():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="2 <= b_min <= b_max"):
        attach_quantizers(nn.Sequential(lin), 1, 4)
    with pytest.raises(ValueError, match="2 <= b_min <= b_max"):
        attach_quantizers(nn.Sequential(lin), 6, 4)
    with pytest.raises(ValueError, match="integers"):
        attach_quantizers(nn.Sequential(lin), 2.5, 4)
    with pytest.raises(ValueError, match="outside"):
        FakeQuantizer(lin.weight, 2, 4, b_init=8)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    attach_quantizers(m, 2, 4)
    with pytest.raises(ValueError, match="already has fake quantizers"):
        attach_quantizers(m, 2, 4)
    space = discover_groups(m)
    with pytest.raises(ValueError, match="at least one FakeQuantizer"):
        GETA(m.parameters(), space, {}, lr=0.1, target_group_sparsity=0.5, pruning_steps=4)
    with pytest.raises(ValueError, match="bit_penalty"):
        GETA(m.parameters(), space, quantizers_of(m), lr=0.1, target_group_sparsity=0.5, pruning_steps=4,
             bit_penalty=-1)
