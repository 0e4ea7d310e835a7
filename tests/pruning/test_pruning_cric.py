"""HESSO-CRIC: the trial-sparsity test, violating-set cycles with reset, the stopping test, and
a constructed case where plain HESSO removes groups the network cannot lose and CRIC does not.

Construction (``Linear(4,6) -> tanh -> Linear(6,6) -> tanh -> Linear(6,1)``, two families
of 6 unit groups): units 0..3 of both layers carry the signal (layer 1 takes ``0.2 * x_i``,
layer 2 ``0.3 *`` unit ``i``, the output sums them with weight 3); layer 1's units 4,5 have big
input rows (norm 2) feeding only layer 2's units 4,5, which have norm-0.5 rows and output
weight 0 (dead). Group norms: layer-1 signal units 0.36 < layer-2 dead units 0.5 < layer-1
dead units ~2 < layer-2 signal units 3. With the magnitude criterion (near an exact fit the gradient criteria are
noise) plain HESSO removes two layer-1 signal units (the low-saliency groups whose removal
hurts); CRIC's per-layer trial test sees that pruning layer 1 costs far more than
pruning layer 2 and removes layer 2's dead units instead.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tvm_splat.pruning.cric import CRIC, make_eval_loss
from tvm_splat.pruning.groups import discover_groups
from tvm_splat.pruning.hesso import HESSO


MAGNITUDE = {"magnitude": 1.0}


def _constructed():
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    gen = torch.Generator().manual_seed(0)  # the same network every call
    with torch.no_grad():
        for lin in (m[0], m[2], m[4]):
            lin.weight.zero_()
            lin.bias.zero_()
        for i in range(4):
            m[0].weight[i, i] = 0.2
            m[2].weight[i, i] = 0.3
            m[4].weight[0, i] = 3.0
        r = torch.randn(2, 4, generator=gen)
        m[0].weight[4:] = 2 * r / r.norm(dim=1, keepdim=True)
        r = torch.randn(2, 2, generator=gen)
        m[2].weight[4:, 4:] = 0.5 * r / r.norm(dim=1, keepdim=True)
    return m


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 4, generator=gen)
    with torch.no_grad():
        y = _constructed()(x)
    return x, y + 0.01 * torch.randn(y.shape, generator=gen)  # a positive loss for the trial ratios


def _run(cric, steps=16, **kw):
    m = _constructed()
    x, y = _data()
    space = discover_groups(m)
    opt = HESSO(m.parameters(), space, lr=1e-3, momentum=0.0, target_group_sparsity=2 / 12, warmup_steps=2,
                pruning_steps=6, cric=cric, importance_weights=MAGNITUDE, **kw)
    for s in range(steps):
        i = torch.arange(s * 64, (s + 1) * 64) % x.shape[0]
        opt.zero_grad()
        F.mse_loss(m(x[i]), y[i]).backward()
        opt.step(eval_loss=make_eval_loss(m, F.mse_loss, x[i], y[i]))
    with torch.no_grad():
        return opt, F.mse_loss(m(x), y).item()


def test_cric_keeps_the_low_saliency_units_whose_removal_hurts():
    plain, plain_loss = _run(None)
    assert set(plain.selections[0]) <= {0, 1, 2, 3}  # layer-1 signal units: the lowest saliency
    cric = CRIC(cycle_steps=4, max_cycles=5, loss_weight=1.0)
    fixed, fixed_loss = _run(cric)
    assert set(fixed.selections[0]) == {10, 11}  # layer 2's dead units (global indices 6 + 4, 6 + 5)
    assert cric.layer_loss_ratio["0"] > 2 * cric.layer_loss_ratio["2"]
    assert plain.space.group_sparsity() == fixed.space.group_sparsity() == 2 / 12
    assert fixed_loss < 0.1 * plain_loss


def test_cric_cycles_reset_and_stop_when_the_violating_set_stops_changing():
    cric = CRIC(cycle_steps=4, max_cycles=5)
    m = _constructed()
    x, y = _data()
    space = discover_groups(m)
    opt = HESSO(m.parameters(), space, lr=1e-3, momentum=0.0, target_group_sparsity=2 / 12, warmup_steps=2,
                pruning_steps=6, cric=cric, importance_weights=MAGNITUDE)
    restored, reset_point = [], {}
    original_restore = opt.restore

    def restore(snap):  # record what every reset brings back
        original_restore(snap)
        restored.append([p.detach().clone() for p in m.parameters()])

    opt.restore = restore
    for s in range(16):
        i = torch.arange(s * 64, (s + 1) * 64) % x.shape[0]
        opt.zero_grad()
        F.mse_loss(m(x[i]), y[i]).backward()
        if s == 2:  # CRIC's first step: its reset point is the params after warm-up
            reset_point = [p.detach().clone() for p in m.parameters()]
        opt.step(eval_loss=make_eval_loss(m, F.mse_loss, x[i], y[i]))
    assert cric.stop_reason == "violating set stopped changing"
    assert 1 <= cric.cycles_run < cric.max_cycles
    assert opt.pruning_start == opt.warmup_steps + 1 + cric.cycles_run * cric.cycle_steps
    # one reset per later cycle and one at the stop, each back to exactly the same point
    assert len(restored) == cric.cycles_run
    for params in restored:
        for a, b in zip(params, reset_point):
            assert torch.equal(a, b)
    # every cycle's violating set is new, and the first one is the K lowest-saliency groups
    seen = [g for v in cric.history for g in v]
    assert len(seen) == len(set(seen)) and len(cric.history[0]) == opt.target_num_groups
    assert space.group_sparsity() == 2 / 12


def test_cric_stops_at_max_cycles_and_the_schedule_fits_max_pruning_end():
    cric = CRIC(cycle_steps=2, max_cycles=1)
    opt, _ = _run(cric, steps=12)
    assert cric.cycles_run == 1
    assert opt.pruning_end <= opt.max_pruning_end == 2 + 2 + 6


def test_cric_needs_eval_loss_and_one_period():
    m = _constructed()
    space = discover_groups(m)
    with pytest.raises(ValueError, match="pruning_periods must be 1"):
        HESSO(m.parameters(), space, lr=0.1, target_group_sparsity=0.2, pruning_steps=6, pruning_periods=2,
              cric=CRIC())
    opt = HESSO(m.parameters(), space, lr=0.1, target_group_sparsity=0.2, pruning_steps=6, cric=CRIC())
    F.mse_loss(m(torch.randn(4, 4)), torch.zeros(4, 1)).backward()
    with pytest.raises(ValueError, match="eval_loss"):
        opt.step()


def test_cric_bad_arguments():
    with pytest.raises(ValueError, match="cycle_steps"):
        CRIC(cycle_steps=1)
    with pytest.raises(ValueError, match="trial_sparsities"):
        CRIC(trial_sparsities=(0.5, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        CRIC(tolerance=-1)
