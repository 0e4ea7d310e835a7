"""CompactPrunedChannels: small torch models, zero groups by hand and by group-lasso training.

Every compacted module is compiled for llvm and checked against the unpruned torch model
(fp32, atol 1e-5); parameter counts are checked exactly.
"""
import logging
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import tvm  # noqa: E402
from torch import nn  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from tvm_splat.relay_passes.compact_channels import (  # noqa: E402
    OP_RULES,
    CompactPrunedChannels,
    compact_pruned_channels,
    count_params,
)

warnings.filterwarnings("ignore", category=FutureWarning)
ATOL = 1e-5


# ----------------------------------------------------------------------------- helpers


def import_model(model, x):
    """-> (Relax module with weights as parameters, detach_params dict)."""
    ep = torch.export.export(model.eval(), (x,))
    mod = from_exported_program(ep, keep_params_as_input=True)
    return relax.frontend.detach_params(mod)


def run(mod, *inputs):
    ex = tvm.compile(mod, target=tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(i)) for i in inputs])
    return out[0].numpy()


def torch_params(model):
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if "running" in n)


def check_close(mod, model, x):
    got = run(mod, x.numpy())
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def group_lasso_train(model, x, groups, steps=30, lr=0.05, lam=0.5, seed=0):
    """A few steps of SGD + proximal group lasso: whole groups land on exact zeros.

    ``groups``: list of lists of (param, index) -- index selects the slice of the param
    that belongs to the group (a row, a column, a filter, ...); ``lam``: a float or one
    strength per group.  The proximal step
    ``g <- g * max(0, 1 - lr*lam/||g||)`` is what HESSO/OTO-style optimisers approximate.
    """
    lams = lam if isinstance(lam, list) else [lam] * len(groups)
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(model(x).shape, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for grp, lam_g in zip(groups, lams):
                norm = torch.sqrt(sum((p[idx] ** 2).sum() for p, idx in grp))
                scale = torch.clamp(1 - lr * lam_g / (norm + 1e-12), min=0.0)
                for p, idx in grp:
                    p[idx] *= scale
    model.eval()
    return [bool(all((p[idx] == 0).all() for p, idx in grp)) for grp in groups]


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, d_in=8, hidden=16, d_out=4, act=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_in, hidden), act(), nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ResBlock(nn.Module):
    """conv-BN-relu-conv-BN + identity residual, relu; then a conv head (unpadded 1x1)."""

    def __init__(self, c=4, mid=8):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.c2, self.b2 = nn.Conv2d(mid, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(x + self.b2(self.c2(h)))


class ProjBlock(nn.Module):
    """Residual block with a projection shortcut, then global pooling and a linear head:
    the channels after the add are prunable only where *both* branches are zero."""

    def __init__(self, c=3, out=6):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out)
        self.sc, self.bs = nn.Conv2d(c, out, 1, bias=False), nn.BatchNorm2d(out)
        self.head = nn.Linear(out, 5)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)) + self.bs(self.sc(x)))
        return self.head(h.mean((2, 3)))


class TransformerBlock(nn.Module):
    def __init__(self, d=16, heads=4, hidden=32):
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        B, N, D = x.shape
        y = self.ln1(x)
        q, k, v = (m(y).view(B, N, self.h, D // self.h).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(B, N, D))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


def zero_heads(m: TransformerBlock, heads):
    dh = m.q.out_features // m.h
    with torch.no_grad():
        for h in heads:
            sl = slice(h * dh, (h + 1) * dh)
            for lin in (m.q, m.k, m.v):
                lin.weight[sl] = 0
                lin.bias[sl] = 0
            m.o.weight[:, sl] = 0


def head_groups(m: TransformerBlock):
    dh = m.q.out_features // m.h
    groups = []
    for h in range(m.h):
        sl = slice(h * dh, (h + 1) * dh)
        grp = [(lin.weight, sl) for lin in (m.q, m.k, m.v)] + [(lin.bias, sl) for lin in (m.q, m.k, m.v)]
        groups.append(grp + [(m.o.weight, (slice(None), sl))])
    return groups


def unit_groups(fc1: nn.Linear, fc2: nn.Linear):
    return [[(fc1.weight, r), (fc1.bias, r), (fc2.weight, (slice(None), r))]
            for r in range(fc1.out_features)]


# ----------------------------------------------------------------------------- MLP


def test_mlp_hand_zeroed_units_removed_exactly():
    torch.manual_seed(0)
    m, x = MLP(), torch.randn(3, 8)
    dead = [1, 4, 5, 9, 15]
    with torch.no_grad():
        m.fc1.weight[dead] = 0
        m.fc1.bias[dead] = 0
    mod, params = import_model(m, x)
    new, rep = compact_pruned_channels(mod, params)
    kept = 16 - len(dead)
    assert count_params(new)[0] == kept * 8 + kept + 4 * kept + 4
    assert rep.params_before == torch_params(m)
    assert rep.params_after == kept * 8 + kept + 4 * kept + 4
    (g,) = rep.pruned
    assert g.removed_units == dead and g.unit == 1
    assert {lay.name: (lay.in_channels, lay.out_channels) for lay in rep.layers} == {
        "p_fc1_weight": ((8, 8), (16, kept)), "p_fc2_weight": ((16, kept), (4, 4))}
    assert sum(lay.flops_saved for lay in rep.layers) == 2 * 3 * 8 * 5 + 2 * 3 * 4 * 5
    assert rep.flops_before - rep.flops_after == 2 * 3 * 8 * 5 + 2 * 3 * 4 * 5
    check_close(new, m, x)


def test_mlp_sigmoid_constant_is_folded_into_next_bias():
    # sigmoid(b) != 0: the removed unit's constant output must move into fc2's bias.
    torch.manual_seed(1)
    m, x = MLP(act=nn.Sigmoid), torch.randn(2, 8)
    with torch.no_grad():
        m.fc1.weight[[0, 7]] = 0  # biases stay non-zero
    mod, params = import_model(m, x)
    new, rep = compact_pruned_channels(mod, params)
    assert rep.pruned[0].removed_units == [0, 7] and rep.pruned[0].folded_constants
    check_close(new, m, x)


def test_mlp_tolerance():
    torch.manual_seed(2)
    m, x = MLP(), torch.randn(2, 8)
    with torch.no_grad():
        m.fc1.weight[3] = 1e-8
        m.fc1.bias[3] = 0
    mod, params = import_model(m, x)
    _, exact = compact_pruned_channels(mod, params)
    assert not exact.pruned
    new, approx = compact_pruned_channels(mod, params, tol=1e-6)
    assert approx.pruned[0].removed_units == [3]
    check_close(new, m, x)


def test_mlp_group_lasso_training():
    torch.manual_seed(3)
    m, x = MLP(hidden=24), torch.randn(16, 8)
    zero = group_lasso_train(m, x, unit_groups(m.fc1, m.fc2), lam=0.45)
    n_zero = sum(zero)
    assert 0 < n_zero < 24, n_zero
    mod, params = import_model(m, x[:4])
    new, rep = compact_pruned_channels(mod, params)
    kept = 24 - n_zero
    assert rep.params_after == kept * 8 + kept + 4 * kept + 4
    assert rep.pruned[0].removed_units == [i for i, z in enumerate(zero) if z]
    check_close(new, m, x[:4])


# ----------------------------------------------------------------------------- ResNet-style


def _bn_random(bn, gen):
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)


def test_resnet_block_internal_channels_removed_residual_kept():
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    m, x = ResBlock(), torch.randn(1, 4, 6, 6)
    _bn_random(m.b1, gen), _bn_random(m.b2, gen)
    with torch.no_grad():
        # HESSO group of the inner channel: conv1 filter + BN gamma/beta -> post-BN exactly 0.
        for c in (2, 5):
            m.c1.weight[c] = 0
            m.b1.weight[c] = 0
            m.b1.bias[c] = 0
        # Zero an output channel of conv2/BN2 too: it meets the identity residual, so it stays.
        m.c2.weight[1] = 0
        m.b2.weight[1] = 0
        m.b2.bias[1] = 0
    mod, params = import_model(m, x)
    new, rep = compact_pruned_channels(mod, params)
    (g,) = rep.pruned
    assert g.removed_units == [2, 5]
    residual = [r for r in rep.skipped if "p_c2_weight.out" in r.members]
    assert residual and "residual" in " ".join(residual[0].reasons)
    assert any("zero weights" in n for n in residual[0].notes)
    # conv1 6 filters, BN1 4x6, conv2 input 6 planes; conv2/BN2 unchanged
    expect = 6 * 4 * 9 + 4 * 6 + 4 * 6 * 9 + 4 * 4
    assert rep.params_after == expect and rep.params_before == torch_params(m)
    check_close(new, m, x)


def test_resnet_bn_constant_channel_into_padded_conv():
    """Zero filter, non-zero BN shift: relu(const) > 0 cannot pass a zero-padded conv, but
    relu(const) == 0 (negative shift) can be removed."""
    torch.manual_seed(5)
    m, x = ResBlock(), torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        m.c1.weight[[0, 3]] = 0
        m.b1.bias[0] = 0.7  # relu(0.7) = 0.7 -> kept
        m.b1.bias[3] = -0.4  # relu(-0.4) = 0 -> removed
    mod, params = import_model(m, x)
    new, rep = compact_pruned_channels(mod, params)
    (g,) = rep.pruned
    assert g.removed_units == [3]
    assert any("zero-padded conv" in n for n in g.notes)
    check_close(new, m, x)


@pytest.mark.parametrize("agree", [True, False])
def test_projection_residual_prunes_only_where_all_branches_agree(agree):
    torch.manual_seed(6)
    m, x = ProjBlock(), torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        for conv, bn in ((m.c1, m.b1), (m.sc, m.bs)):
            conv.weight[4] = 0
            bn.weight[4] = 0
            bn.bias[4] = 0
        if not agree:  # shortcut keeps channel 4 alive
            m.sc.weight[4] = 0.3
            m.bs.weight[4] = 1.0
    mod, params = import_model(m, x)
    new, rep = compact_pruned_channels(mod, params)
    if agree:
        (g,) = rep.pruned
        assert g.removed_units == [4]
        assert {"p_c1_weight.out", "p_sc_weight.out", "p_head_weight.in"} <= set(g.members)
        assert rep.params_before - rep.params_after == 3 * 9 + 4 + 3 + 4 + 5
    else:
        assert not rep.pruned
        assert rep.params_after == rep.params_before
    check_close(new, m, x)


def test_resnet_group_lasso_training():
    torch.manual_seed(7)
    m, x = ResBlock(c=4, mid=12), torch.randn(4, 4, 6, 6)
    groups = [[(m.c1.weight, c), (m.b1.weight, c), (m.b1.bias, c), (m.c2.weight, (slice(None), c))]
              for c in range(12)]
    zero = group_lasso_train(m, x, groups, steps=25, lam=1.4)
    assert 0 < sum(zero) < 12, sum(zero)
    mod, params = import_model(m, x[:1])
    new, rep = compact_pruned_channels(mod, params)
    assert rep.pruned[0].removed_units == [i for i, z in enumerate(zero) if z]
    k = 12 - sum(zero)
    assert rep.params_after == k * 4 * 9 + 4 * k + 4 * k * 9 + 4 * 4
    check_close(new, m, x[:1])


# ----------------------------------------------------------------------------- transformer


def _transformer_expect(d, heads_kept, dh, hidden_kept):
    dk = heads_kept * dh
    return (2 * 2 * d  # layer norms
            + 3 * (dk * d + dk) + d * dk + d  # q/k/v rows, o columns
            + hidden_kept * d + hidden_kept + d * hidden_kept + d)


def test_transformer_heads_and_units_removed():
    torch.manual_seed(8)
    m, x = TransformerBlock(), torch.randn(2, 5, 16)
    zero_heads(m, [1, 3])
    dead = [0, 2, 3, 10, 31]
    with torch.no_grad():
        m.fc1.weight[dead] = 0
        m.fc1.bias[dead] = 0
    mod, params = import_model(m, x)
    new, rep = compact_pruned_channels(mod, params)
    heads = [g for g in rep.pruned if g.unit == 4]
    units = [g for g in rep.pruned if g.unit == 1]
    assert len(heads) == 1 and heads[0].removed_units == [1, 3] and heads[0].kept_units == 2
    assert {"p_q_weight.out", "p_k_weight.out", "p_v_weight.out", "p_o_weight.in"} <= set(heads[0].members)
    assert len(units) == 1 and units[0].removed_units == dead
    assert rep.params_after == _transformer_expect(16, 2, 4, 32 - len(dead))
    assert rep.params_before == torch_params(m)
    # the head count of the reshapes went from 4 to 2
    text = new.script(show_meta=False)
    assert "R.shape([2, 5, 2, 4])" in text and "R.shape([2, 5, 4, 4])" not in text
    # residual stream (o/fc2 outputs meet x) is never pruned
    assert all(g.status == "skipped" for g in rep.groups if "p_fc2_weight.out" in g.members)
    check_close(new, m, x)


def test_transformer_head_with_only_v_zero_is_removed():
    """P @ 0 = 0: a head whose v rows are zero contributes nothing, whatever q and k hold."""
    torch.manual_seed(9)
    m, x = TransformerBlock(), torch.randn(1, 6, 16)
    with torch.no_grad():
        m.v.weight[8:12] = 0
        m.v.bias[8:12] = 0
    mod, params = import_model(m, x)
    new, rep = compact_pruned_channels(mod, params)
    assert [g.removed_units for g in rep.pruned] == [[2]]
    check_close(new, m, x)


def test_transformer_group_lasso_training():
    torch.manual_seed(10)
    m, x = TransformerBlock(hidden=32), torch.randn(4, 5, 16)
    groups = head_groups(m) + unit_groups(m.fc1, m.fc2)
    zero = group_lasso_train(m, x, groups, steps=40, lr=0.1, lam=[0.6] * 4 + [0.17] * 32)
    zh, zu = zero[:4], zero[4:]
    assert 0 < sum(zh) < 4 and 0 < sum(zu) < 32, (sum(zh), sum(zu))
    mod, params = import_model(m, x[:2])
    new, rep = compact_pruned_channels(mod, params)
    assert rep.params_after == _transformer_expect(16, 4 - sum(zh), 4, 32 - sum(zu))
    check_close(new, m, x[:2])


# ----------------------------------------------------------------------------- bad input


def test_weight_without_value_skips_its_chains(caplog):
    torch.manual_seed(11)
    m, x = MLP(), torch.randn(2, 8)
    with torch.no_grad():
        m.fc1.weight[[2, 3]] = 0
        m.fc1.bias[[2, 3]] = 0
    mod, params = import_model(m, x)
    names = [p.name for p in mod["main"].params[1:]]
    partial = {n: v for n, v in zip(names, params["main"]) if n != "p_fc2_weight"}
    with caplog.at_level(logging.INFO, logger="tvm_splat.relay_passes.compact_channels"):
        new, rep = compact_pruned_channels(mod, partial)
    assert not rep.pruned
    (g,) = [g for g in rep.skipped if "p_fc1_weight.out" in g.members]
    assert "p_fc2_weight" in g.reasons[0] and "no constant value" in g.reasons[0]
    assert "no constant value" in caplog.text
    w2 = dict(zip(names, params["main"]))["p_fc2_weight"].numpy()
    got = run(new, x.numpy(), w2)
    np.testing.assert_allclose(got, m(x).detach().numpy(), atol=ATOL)


class CumsumMLP(MLP):
    def forward(self, x):
        return self.fc2(torch.cumsum(torch.relu(self.fc1(x)), dim=-1))


def test_unsupported_op_in_chain_skips_it(caplog):
    torch.manual_seed(12)
    m, x = CumsumMLP(), torch.randn(2, 8)
    with torch.no_grad():
        m.fc1.weight[[0, 1]] = 0
        m.fc1.bias[[0, 1]] = 0
    mod, params = import_model(m, x)
    with caplog.at_level(logging.WARNING, logger="tvm_splat.relay_passes.compact_channels"):
        new, rep = compact_pruned_channels(mod, params)
    assert not rep.pruned
    (g,) = [g for g in rep.skipped if "p_fc1_weight.out" in g.members]
    assert "relax.cumsum" in g.reasons[0]
    assert "relax.cumsum" in caplog.text
    check_close(new, m, x)


def test_fused_multihead_attention_is_skipped_not_mangled():
    # nn.MultiheadAttention packs q/k/v into one in_proj and slices it with `take`; the
    # analysis does not follow that, so the heads must stay (analysis only, no compile).
    torch.manual_seed(13)

    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.m(x, x, x, need_weights=False)[0]

    m, x = MHA(), torch.randn(1, 4, 16)
    with torch.no_grad():
        m.m.in_proj_weight[32:36] = 0
        m.m.in_proj_bias[32:36] = 0
    mod, params = import_model(m, x)
    new, rep = compact_pruned_channels(mod, params)
    assert not rep.pruned and rep.params_after == rep.params_before
    assert rep.skipped


class HalfTracked(nn.Module):
    """``q(x)^T @ x``: a batched matmul with one tracked operand (its group on the rows)."""

    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(8, 6), nn.Linear(8, 3)

    def forward(self, x):
        return self.o(self.q(x).transpose(-2, -1) @ x)


def test_batched_matmul_with_one_tracked_operand_is_followed():
    # Used to crash (UnboundLocalError in the analysis); the group reaches the output: kept.
    torch.manual_seed(16)
    m, x = HalfTracked(), torch.randn(2, 5, 8)
    with torch.no_grad():
        m.q.weight[1] = 0
        m.q.bias[1] = 0
    mod, params = import_model(m, x)
    new, rep = compact_pruned_channels(mod, params)
    (g,) = [g for g in rep.groups if "p_q_weight.out" in g.members]
    assert g.status == "skipped" and "function output" in g.reasons[0], g.reasons
    check_close(new, m, x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_removed_unit_meeting_nonfinite_consumer_weight_is_kept_like_torch(bad):
    """torch gives 0 * nan = nan: a zero unit whose consumer weights hold NaN/inf stays, so the
    compacted model gives the same NaN outputs; a zero unit with finite weights still goes."""
    torch.manual_seed(17)
    m, x = MLP(), torch.randn(3, 8)
    with torch.no_grad():
        m.fc1.weight[[3, 5]] = 0
        m.fc1.bias[[3, 5]] = 0
        m.fc2.weight[0, 3] = bad
    mod, params = import_model(m, x)
    new, rep = compact_pruned_channels(mod, params)
    (g,) = rep.pruned
    assert g.removed_units == [5]
    assert any("unit 3" in n and "NaN/inf" in n for n in g.notes), g.notes
    got = run(new, x.numpy())
    with torch.no_grad():
        ref = m.eval()(x).numpy()
    assert np.isnan(ref[:, 0]).all() and np.isfinite(ref[:, 1:]).all()
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)  # NaN where torch has NaN


class ConvChain(nn.Module):
    """conv-BN-relu-conv, the second conv's output is the model's (no relu after it: TVM's
    relu maps NaN to 0 where torch keeps NaN, which is not compaction's business)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.b1(self.c1(x))))


def test_removed_channel_meeting_nan_conv_plane_is_kept_like_torch():
    torch.manual_seed(18)
    m, x = ConvChain(), torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        for c in (1, 6):
            m.c1.weight[c] = 0
            m.c1.bias[c] = 0
            m.b1.weight[c] = 0
            m.b1.bias[c] = 0
        m.c2.weight[2, 6, 1, 1] = float("nan")
    mod, params = import_model(m, x)
    new, rep = compact_pruned_channels(mod, params)
    assert [g.removed_units for g in rep.pruned] == [[1]]
    got = run(new, x.numpy())
    with torch.no_grad():
        ref = m.eval()(x).numpy()
    assert np.isnan(ref[:, 2]).all() and not np.isnan(ref[:, [0, 1, 3]]).any()
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def _mlp_params():
    torch.manual_seed(19)
    m, x = MLP(), torch.randn(2, 8)
    mod, params = import_model(m, x)
    names = [p.name for p in mod["main"].params[1:]]
    return mod, dict(zip(names, (p.numpy() for p in params["main"])))


def test_unknown_param_names_are_an_error_listing_the_known_ones():
    mod, flat = _mlp_params()
    with pytest.raises(ValueError, match=r"\['p_fc9_weight'\] are not weight parameters.*known: "
                                         r"\['p_fc1_bias', 'p_fc1_weight', 'p_fc2_bias', 'p_fc2_weight'\]"):
        compact_pruned_channels(mod, {**flat, "p_fc9_weight": flat["p_fc1_weight"]})
    with pytest.raises(ValueError, match=r"x \(a model input, not a weight\)"):
        compact_pruned_channels(mod, {**flat, "x": np.zeros((2, 8), "float32")})
    with pytest.raises(ValueError, match=r"params \['mian'\] hold lists of arrays but are not Relax functions"):
        compact_pruned_channels(mod, {"mian": list(flat.values())})
    with pytest.raises(ValueError, match=r"params\['main'\] has 3 arrays but function main has 4 weight"):
        compact_pruned_channels(mod, {"main": list(flat.values())[:3]})
    with pytest.raises(ValueError, match="must be a mapping"):
        compact_pruned_channels(mod, list(flat.values()))


def test_wrong_shape_or_dtype_param_is_an_early_error_naming_both():
    mod, flat = _mlp_params()
    with pytest.raises(ValueError, match=r"params\['p_fc1_weight'\] has shape \(8, 16\) but parameter "
                                         r"p_fc1_weight of main has shape \(16, 8\)"):
        compact_pruned_channels(mod, {**flat, "p_fc1_weight": flat["p_fc1_weight"].T})
    with pytest.raises(ValueError, match=r"params\['p_fc2_bias'\] has dtype float64 but parameter "
                                         r"p_fc2_bias of main has dtype float32"):
        compact_pruned_channels(mod, {**flat, "p_fc2_bias": flat["p_fc2_bias"].astype("float64")})


@pytest.mark.parametrize("tol", [-1, float("nan"), float("inf"), "0.1", True])
def test_bad_tol_is_an_error(tol):
    mod, flat = _mlp_params()
    with pytest.raises(ValueError, match="tol must be"):
        compact_pruned_channels(mod, flat, tol=tol)
    with pytest.raises(ValueError, match="tol must be"):
        CompactPrunedChannels(flat, tol=tol)


def test_unknown_function_names_are_an_error():
    mod, flat = _mlp_params()
    with pytest.raises(ValueError, match=r"functions \['mian'\] are not Relax functions.*\['main'\]"):
        compact_pruned_channels(mod, flat, functions=["mian"])


# ----------------------------------------------------------------------------- pass API


def test_pass_in_sequential_with_prebound_constants():
    torch.manual_seed(14)
    m, x = MLP(act=nn.ReLU), torch.randn(2, 8)
    with torch.no_grad():
        m.fc1.weight[5] = 0
        m.fc1.bias[5] = 0
    mod, params = import_model(m, x)
    mod = relax.transform.BindParams("main", {p.name: v for p, v in zip(mod["main"].params[1:], params["main"])})(mod)
    p = CompactPrunedChannels()
    assert isinstance(p, tvm.ir.transform.Pass)
    new = tvm.transform.Sequential([p, relax.transform.FoldConstant()])(mod)
    assert p.report.pruned[0].removed_units == [5]
    assert count_params(new)[0] == 15 * 8 + 15 + 4 * 15 + 4
    check_close(new, m, x)


def test_rules_table_names_every_role():
    roles = {r.value for rule in OP_RULES.values() for r in rule.roles}
    assert {"producer", "consumer", "passthrough", "layout", "tie", "reduce"} <= roles
    assert OP_RULES["relax.matmul"].family == "matmul"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_compacted_transformer_builds_for_cuda():
    from tvm.s_tir import dlight as dl

    torch.manual_seed(15)
    m, x = TransformerBlock(), torch.randn(1, 8, 16)
    zero_heads(m, [0])
    mod, params = import_model(m, x)
    new, rep = compact_pruned_channels(mod, params)
    assert rep.pruned
    target = tvm.target.Target("nvidia/nvidia-h100")
    with target:
        lowered = relax.get_pipeline("zero")(new)
        lowered = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(lowered)
        ex = tvm.compile(lowered, target=target)
    assert ex is not None
