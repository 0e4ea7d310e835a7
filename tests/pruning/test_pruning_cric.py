"""CRIC corrects HESSO's selection on a constructed case where saliency picks an indispensable unit.

Construction (``Linear(4,8) -> tanh -> Linear(8,1)``): hidden unit 0 carries the whole
signal (``tanh(0.3 * x0)``, output weight 1.0) but has the smallest group norm (~1.04);
units 1..7 have norm 2 (big input rows) yet output weight 0.01, i.e. they are redundant.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tvm_splat.pruning.cric import CRIC, make_eval_loss
from tvm_splat.pruning.groups import discover_groups
from tvm_splat.pruning.hesso import HESSO


def _constructed():
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        m[0].bias.zero_()
        m[2].bias.zero_()
        m[0].weight.zero_()
        m[0].weight[0, 0] = 0.3
        r = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))  # same net every call
        m[0].weight[1:, 1:] = 2 * r / r.norm(dim=1, keepdim=True)
        m[2].weight.fill_(0.01)
        m[2].weight[0, 0] = 1.0
    return m


def _run(m, y, x, cric=None, removal=True, **kw):
    space = discover_groups(m)
    opt = HESSO(m.parameters(), space, lr=1e-3, momentum=0.0, target_group_sparsity=0.25, warmup_steps=0,
                pruning_steps=6, cric=cric, **kw)
    for s in range(6):
        i = torch.arange(s * 64, (s + 1) * 64)
        opt.zero_grad()
        F.mse_loss(m(x[i]), y[i]).backward()
        opt.step(eval_loss=make_eval_loss(m, F.mse_loss, x[i], y[i]) if removal else None)
    with torch.no_grad():
        return opt, F.mse_loss(m(x), y).item()


def test_cric_removal_test_rejects_indispensable_unit_at_exact_fit():
    # Exact fit: every gradient is ~0, so cosine/Taylor saliency is blind and the (default,
    # multi-criteria) saliency is decided by magnitude -> it picks unit 0.
    x = torch.randn(384, 4)
    with torch.no_grad():
        y = _constructed()(x)
    plain, plain_loss = _run(_constructed(), y, x)
    assert 0 in plain.selections[0]
    assert plain.pruned[0] and plain_loss > 0.05  # irreversible collapse: the signal is gone

    cric = CRIC(window=3)
    fixed, fixed_loss = _run(_constructed(), y, x, cric=cric)
    assert 0 not in fixed.selections[0] and not fixed.pruned[0]
    assert cric.rejected_history == [[0]]
    assert set(fixed.selections[0]) != set(plain.selections[0])
    assert len(fixed.selections[0]) == len(plain.selections[0]) == 2  # target still met exactly
    assert fixed.space.group_sparsity() == plain.space.group_sparsity() == 0.25
    assert fixed_loss < 1e-3 < 0.05 < plain_loss
    # the removal sensitivity of unit 0 dwarfs the other candidates'
    sens = cric.sensitivity_history[0]
    assert sens[0] > 100 * max(v for g, v in sens.items() if g != 0)


def test_cric_taylor_vote_without_eval_loss():
    # Under-fitted target (2x the signal): gradients are informative, so the Taylor vote
    # (no extra forward passes) catches unit 0 that magnitude-only saliency picks.
    x = torch.randn(384, 4)
    y = 2 * torch.tanh(0.3 * x[:, :1])
    mag = {"magnitude": 1.0}
    plain, plain_loss = _run(_constructed(), y, x, removal=False, importance_weights=mag)
    assert 0 in plain.selections[0]
    cric = CRIC(window=3)
    fixed, fixed_loss = _run(_constructed(), y, x, cric=cric, removal=False, importance_weights=mag)
    assert 0 in cric.rejected_history[0] and 0 not in fixed.selections[0]
    assert fixed_loss < plain_loss
    assert fixed.space.group_sparsity() == 0.25


def test_cric_falls_back_to_rejected_groups_only_to_meet_the_target():
    # Ask for 6 of 8 groups with a voting rule that rejects everything above the median:
    # the target is still met exactly, rejected groups are used last.
    x = torch.randn(384, 4)
    with torch.no_grad():
        y = _constructed()(x)
    cric = CRIC(window=3, median_tol=1e-9)
    m = _constructed()
    space = discover_groups(m)
    opt = HESSO(m.parameters(), space, lr=1e-3, momentum=0.0, target_group_sparsity=0.75, pruning_steps=6, cric=cric)
    for s in range(6):
        i = torch.arange(s * 64, (s + 1) * 64)
        opt.zero_grad()
        F.mse_loss(m(x[i]), y[i]).backward()
        opt.step(eval_loss=make_eval_loss(m, F.mse_loss, x[i], y[i]))
    rejected = cric.rejected_history[0]
    assert 0 in rejected and len(rejected) >= 3
    assert int(space.zero_mask().sum()) == 6
    # rejected groups fill the quota least-sensitive first: the indispensable unit survives
    assert not opt.pruned[0]


def test_cric_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        CRIC(window=0)
    with pytest.raises(ValueError, match="pool_factor"):
        CRIC(pool_factor=0.5)
    with pytest.raises(ValueError, match="median_tol"):
        CRIC(median_tol=0)
