"""GETA: widths inside the bounds and under the cap after every step, the projection stage
lowering the cap per period, the joint rule and the BOPs budget the run must end within."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tvm_splat.pruning.cric import make_eval_loss
from tvm_splat.pruning.geta import GETA
from tvm_splat.pruning.groups import discover_groups
from tvm_splat.pruning.quant import attach_quantizers, finalize_quantization, quantizers_of


def _data(n=512):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()


def _setup(bits=(3, 12), **kw):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 3))
    space = discover_groups(m)
    x, _ = _data()
    layers = attach_quantizers(m, (x[:128],), weight_bits=bits, act_bits=bits)
    cfg = dict(lr=0.01, quant_lr=1e-3, variant="adamw", target_group_sparsity=0.5, warmup_steps=4,
               projection_steps=12, projection_periods=4, bit_reduction=2, pruning_steps=12, pruning_periods=2)
    cfg.update(kw)
    return m, space, layers, GETA(m.parameters(), space, layers, **cfg)


def _train(m, opt, steps, check=None):
    x, y = _data()
    for s in range(steps):
        i = torch.arange(s * 32, (s + 1) * 32) % x.shape[0]
        opt.zero_grad()
        F.cross_entropy(m(x[i]), y[i]).backward()
        opt.step(eval_loss=make_eval_loss(m, F.cross_entropy, x[i], y[i]))
        if check is not None:
            check()


def test_widths_stay_in_bounds_and_under_the_cap_every_step():
    m, space, layers, opt = _setup()

    def check():
        for l in layers.values():
            for q in (l.weight, l.act):
                assert q.b_min - 1e-4 <= q.bit_width() <= min(q.b_max, opt.cap) + 1e-4

    _train(m, opt, 40, check)
    assert opt.bits_fixed and opt.phase == "finetune"
    for n, (bw, ba) in opt.final_bits.items():
        assert 3 <= bw <= opt.cap and 3 <= ba <= opt.cap
        assert layers[n].weight.bit_width() == pytest.approx(bw, abs=1e-4)  # cool-down: d follows the width


def test_projection_stage_lowers_the_max_width_each_period():
    m, space, layers, opt = _setup()
    _train(m, opt, 4 + 12)  # warm-up + projection
    caps = opt.cap_history
    # periods of 3 steps start at steps 5, 8, 11, 14: the cap drops by 2 at each but the first
    assert caps[:4] == [12] * 4 and caps[4:7] == [12] * 3
    assert caps[7:10] == [10] * 3 and caps[10:13] == [8] * 3 and caps[13:16] == [6] * 3
    widest = [max(max(b) for b in step.values()) for step in opt.bits_history]
    for period_end, cap in ((9, 10), (12, 8), (15, 6)):
        assert widest[period_end] <= cap + 1e-4


def test_run_ends_within_the_bops_budget_with_per_layer_widths():
    m, space, layers, opt = _setup(bits=(3, 12), target_relative_bops=0.12)
    _train(m, opt, 40)
    assert opt.relative_bops() <= 0.12
    rep = opt.report()
    assert rep["relative_bops"] == opt.relative_bops() and set(rep["layers"]) == set(layers)
    widths = {(r["weight_bits"], r["activation_bits"]) for r in rep["layers"].values()}
    assert all(3 <= w <= 12 and 3 <= a <= 12 for w, a in widths)
    assert space.group_sparsity() == pytest.approx(round(0.5 * len(space)) / len(space))


def test_budget_is_checked_early_and_at_the_end():
    with pytest.raises(ValueError, match="unreachable"):
        _setup(target_relative_bops=0.001)
    m, space, layers, opt = _setup(bits=(6, 12), target_relative_bops=0.08, target_group_sparsity=0.2)
    with pytest.raises(RuntimeError, match="cannot meet"):
        _train(m, opt, 40)


def test_joint_rule_runs_on_redundant_families_and_pruned_groups_stay_zero_after_quantization():
    m, space, layers, opt = _setup()
    _train(m, opt, 40)
    families = {name for _, name, _, _ in opt.joint_history}
    assert families == {f.name for f in space.families}
    assert all(gamma >= 0 for _, _, gamma, _ in opt.joint_history)
    k = round(0.5 * len(space))
    assert int(space.zero_mask().sum()) == k == len(opt.pruned_groups())
    w0 = m[0].weight  # the quantized view the model computes with
    pruned = [space.groups[i].index for i in opt.pruned_groups() if space.groups[i].family.name == "0"]
    assert pruned and torch.all(w0[pruned] == 0)
    x, _ = _data()
    with torch.no_grad():
        ref = m(x[:16])
    bits = finalize_quantization(m)
    assert not quantizers_of(m) and {n: (b["weight"], b["activation"]) for n, b in bits.items()} == opt.final_bits
    assert int(space.zero_mask().sum()) == k  # the space still points at the baked weights
    with torch.no_grad():  # only the activation quantization is gone
        assert (m(x[:16]).argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_bad_arguments():
    m, space, layers, _ = _setup()
    kw = dict(lr=0.1, target_group_sparsity=0.5, pruning_steps=4)
    with pytest.raises(ValueError, match="QuantizedLayer"):
        GETA(m.parameters(), space, {}, quant_lr=1e-3, **kw)
    with pytest.raises(ValueError, match="quant_lr"):
        GETA(m.parameters(), space, layers, quant_lr=0.0, **kw)
    with pytest.raises(ValueError, match="target_relative_bops"):
        GETA(m.parameters(), space, layers, quant_lr=1e-3, target_relative_bops=-1, **kw)
    with pytest.raises(ValueError, match="CRIC"):
        GETA(m.parameters(), space, layers, quant_lr=1e-3, cric=object(), **kw)
