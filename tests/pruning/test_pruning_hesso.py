"""HESSO reaches exactly the requested group sparsity, with exact zeros that stay zero."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tvm_splat.pruning.data import make_image_task, make_token_task
from tvm_splat.pruning.groups import discover_groups
from tvm_splat.pruning.hesso import HESSO
from tvm_splat.pruning.zoo import TinyCNN, TinyTransformer


def _mlp():
    return nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 16), nn.SiLU(), nn.Linear(16, 3))


def _train(model, opt, x, y, steps, batch=32, flat=False, record=None):
    for s in range(steps):
        i = torch.arange(s * batch, (s + 1) * batch) % x.shape[0]
        opt.zero_grad()
        out = model(x[i])
        loss = F.cross_entropy(out.flatten(0, 1), y[i].flatten()) if flat else F.cross_entropy(out, y[i])
        loss.backward()
        opt.step()
        if record is not None:
            record.append(int(opt.space.zero_mask().sum()))
    return float(loss.detach())


def _slices_all_zero(space, idx):
    for g in (space.groups[i] for i in idx):
        for s in g.slices:
            if torch.count_nonzero(s.param.detach().narrow(s.dim, s.index.start, s.index.stop - s.index.start)):
                return False
    return True


@pytest.mark.parametrize("variant,lr", [("sgd", 0.05), ("adamw", 0.01)])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.77])
def test_mlp_reaches_exact_group_sparsity(variant, lr, target):
    m = _mlp()
    space = discover_groups(m)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    opt = HESSO(m.parameters(), space, lr=lr, variant=variant, weight_decay=1e-4, target_group_sparsity=target,
                warmup_steps=10, pruning_steps=24, pruning_periods=3)
    k = round(target * len(space))
    assert opt.target_num_groups == k and sum(opt.period_counts) == k
    zeros = []
    _train(m, opt, x, y, 10 + 24, record=zeros)
    assert zeros[9] == 0  # nothing touched during warm-up
    # progressive: each period ends with exactly the cumulative count of exact-zero groups
    ends = [10 + 8 * (p + 1) - 1 for p in range(3)]
    cum = torch.cumsum(torch.tensor(opt.period_counts), 0).tolist()
    assert [zeros[e] for e in ends] == cum
    assert int(space.zero_mask().sum()) == k and space.group_sparsity() == pytest.approx(k / len(space))
    assert torch.equal(space.zero_mask(), opt.pruned)
    assert _slices_all_zero(space, opt.pruned_groups())
    _train(m, opt, x, y, 15)  # fine-tuning keeps them exactly zero and adds no others
    assert torch.equal(space.zero_mask(), opt.pruned)
    assert [len(s) for s in opt.selections] == opt.period_counts
    assert opt.phase == "finetune"


def test_cnn_and_transformer_reach_exact_sparsity():
    x, y = make_image_task(128, seed=0)
    m = TinyCNN(width=(8, 8, 8), hidden=16)
    space = discover_groups(m)
    opt = HESSO(m.parameters(), space, lr=0.01, variant="adamw", target_group_sparsity=0.4, warmup_steps=4,
                pruning_steps=6, pruning_periods=2)
    _train(m, opt, x, y, 12, batch=16)
    assert int(space.zero_mask().sum()) == round(0.4 * len(space)) == len(opt.pruned_groups())

    t, lab = make_token_task(128)
    m = TinyTransformer(dim=16, num_heads=4, depth=1, mlp_ratio=2)
    space = discover_groups(m)
    opt = HESSO(m.parameters(), space, lr=0.01, variant="adamw", target_group_sparsity=0.5, warmup_steps=3,
                pruning_steps=4, pruning_periods=1)
    _train(m, opt, t, lab, 9, batch=16, flat=True)
    k = round(0.5 * len(space))
    assert int(space.zero_mask().sum()) == k
    heads = space.families[0]
    assert heads.kind == "head" and 1 <= int((heads.stats()["xx"] > 0).sum())  # min 1 head kept


def test_projection_shrinks_linearly_to_exact_zero():
    # lr tiny: the shrink factor (S-j-1)/(S-j) dominates, group norm falls ~ (S-j-1)/S.
    # One family only: groups of two chained families share entries and shrink twice.
    m = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 3))
    space = discover_groups(m)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    opt = HESSO(m.parameters(), space, lr=1e-6, momentum=0.0, target_group_sparsity=0.25, warmup_steps=1,
                pruning_steps=4, pruning_periods=1)
    _train(m, opt, x, y, 2)
    sel = opt.selections[0]
    n0 = opt.space.group_norms()[sel]  # after shrink step 0 of 4: 3/4 of the original
    _train(m, opt, x, y, 1)
    torch.testing.assert_close(opt.space.group_norms()[sel], n0 * 2 / 3, rtol=1e-3, atol=1e-6)
    _train(m, opt, x, y, 2)
    assert torch.all(opt.space.group_norms()[sel] == 0)


def test_target_zero_prunes_nothing():
    m = _mlp()
    space = discover_groups(m)
    opt = HESSO(m.parameters(), space, lr=0.05, target_group_sparsity=0.0, pruning_steps=3)
    _train(m, opt, torch.randn(64, 8), torch.randint(0, 3, (64,)), 5)
    assert space.group_sparsity() == 0.0


def test_bad_arguments_raise():
    m = _mlp()
    space = discover_groups(m)
    kw = dict(lr=0.1, target_group_sparsity=0.5, pruning_steps=10)
    with pytest.raises(ValueError, match="target_group_sparsity"):
        HESSO(m.parameters(), space, **{**kw, "target_group_sparsity": 1.0})
    with pytest.raises(ValueError, match="lr"):
        HESSO(m.parameters(), space, **{**kw, "lr": 0.0})
    with pytest.raises(ValueError, match="variant"):
        HESSO(m.parameters(), space, variant="lion", **kw)
    with pytest.raises(ValueError, match="pruning_steps=10 too small"):
        HESSO(m.parameters(), space, pruning_periods=6, **kw)
    with pytest.raises(ValueError, match="not in params"):
        HESSO(m[0].parameters(), space, **kw)
    with pytest.raises(ValueError, match="only 38 can go"):
        HESSO(m.parameters(), space, **{**kw, "target_group_sparsity": 0.99})
    with pytest.raises(ValueError, match="unknown importance"):
        HESSO(m.parameters(), space, importance_weights={"norm": 1.0}, **kw)
    with pytest.raises(ValueError, match="GroupSpace"):
        HESSO(m.parameters(), [], **kw)


def test_saliency_criteria_follow_the_reference():
    # one family of 2 hidden units; unit 0's step direction shrinks it (d = x), unit 1's grows it
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        m[0].bias.zero_()
        m[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
    space = discover_groups(m)
    d = {p: p.detach().clone() for p in m.parameters()}
    d[m[0].weight][1] *= -1
    d[m[0].bias][1] *= -1
    d[m[2].weight][0, 1] *= -1
    opt = HESSO(m.parameters(), space, lr=0.1, target_group_sparsity=0.5, pruning_steps=2,
                importance_weights={"cosine_similarity": 1.0})
    cos = opt.saliency(d)
    # 1 + cos(x, d): 2 for the group the step shrinks, 0 for the one it grows (then normalised)
    torch.testing.assert_close(cos, torch.tensor([2.0, 0.0], dtype=torch.float64) / 2.0, atol=1e-6, rtol=0)
    taylor = HESSO(m.parameters(), space, lr=0.1, target_group_sparsity=0.5, pruning_steps=2,
                   importance_weights={"taylor_first_order": 1.0}).saliency(d)
    xx = space.stats()["xx"]  # |<x, d>| = ||x||^2 here
    torch.testing.assert_close(taylor, xx / xx.norm(), atol=1e-6, rtol=0)
    avg = HESSO(m.parameters(), space, lr=0.1, target_group_sparsity=0.5, pruning_steps=2,
                importance_weights={"avg_magnitude": 1.0}).saliency(d)
    v = xx.sqrt() / space.stats()["numel"]  # divided by the group's entry count, as the reference
    torch.testing.assert_close(avg, v / v.norm(), atol=1e-6, rtol=0)


def test_warmup_steps_are_torch_adamw_steps():
    m = _mlp()
    space = discover_groups(m)
    twin = [p.detach().clone().requires_grad_() for p in m.parameters()]
    ref = torch.optim.AdamW(twin, lr=0.01, weight_decay=0.0)
    opt = HESSO(m.parameters(), space, lr=0.01, variant="adamw", target_group_sparsity=0.3, warmup_steps=5,
                pruning_steps=4)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(3):
        for model_params, o in ((list(m.parameters()), opt), (twin, ref)):
            o.zero_grad()
            out = torch.func.functional_call(m, {n: p for (n, _), p in zip(m.named_parameters(), model_params)}, (x,))
            F.cross_entropy(out, y).backward()
            o.step()
    for a, b in zip(m.parameters(), twin):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
