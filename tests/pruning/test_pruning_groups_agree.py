"""Torch-side group discovery and the Relax pass CompactPrunedChannels agree on which groups exist.

Both read one op table (``tvm_splat.channel_rules.OP_RULES``).  For each model:

* *existence*: the families ``discover_groups`` finds are exactly the groups the pass
  removes when every weight of the model is zero (what can go at all), compared as sets of
  (weights of the group, unit, units);
* *membership*: zeroing some groups of every family (their slices, nothing else) makes the
  pass remove exactly those units, and the compacted module computes the model's output,
  as does the torch-side ``compact_model``.
"""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from tvm_splat.pruning.compact import compact_model, count_params
from tvm_splat.pruning.groups import discover_groups
from tvm_splat.pruning.zoo import TinyCNN, TinyTransformer, TransformerBlock

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from tvm_splat.relay_passes.compact_channels import compact_pruned_channels  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


class SigmoidMLP(nn.Module):
    """sigmoid(0) = 0.5 reaches a Linear: folded, so the hidden units are groups."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.Sigmoid(), nn.Linear(10, 4))

    def forward(self, x):
        return self.net(x)


class ResidualMLP(nn.Module):
    """fc1's units feed fc2 and a residual add with fc2's output (one merged group, which
    reaches the output: pinned); fc3's units only feed fc4."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        y = self.fc2(h) + h
        return self.fc4(torch.relu(self.fc3(y))) + y


class Branches(nn.Module):
    """Two conv-BN branches added (one group across both), relu, mean over H, W, Linear;
    then an identity-residual block whose inner channels are a group and whose output is not."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.sc, self.bs = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.r1, self.rb1 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.r2, self.rb2 = nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)) + self.bs(self.sc(x)))
        h = torch.relu(h + self.rb2(self.r2(torch.relu(self.rb1(self.r1(h))))))
        return self.head(h.mean((2, 3)))


class Depthwise(nn.Module):
    """MobileNet-style: 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> 1x1 -> pool -> Linear;
    plus a conv -> BN -> sigmoid -> zero-padded conv chain that neither side may remove."""

    def __init__(self):
        super().__init__()
        self.expand, self.be = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.dw, self.bd = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.project, self.bp = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.gate, self.after = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        self.pool, self.flat, self.head = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)

    def forward(self, x):
        h = nn.functional.relu6(self.bd(self.dw(nn.functional.relu6(self.be(self.expand(x))))))
        h = torch.relu(self.bp(self.project(h)))
        h = self.after(torch.sigmoid(self.gate(h)))
        return self.head(self.flat(self.pool(h)))


class SpatialFlatten(nn.Module):
    """conv -> BN -> relu -> flatten over 4x4 pixels -> Linear: a channel spans 16 inputs of
    the Linear, which neither side follows (the Linear's own units reach the output)."""

    def __init__(self):
        super().__init__()
        self.c, self.b, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.b(self.c(x))), 1))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TransformerBlock(16, 4)

    def forward(self, x):
        return self.block(x)


MODELS = {
    "mlp": (SigmoidMLP, lambda: torch.randn(3, 6)),
    "residual_mlp": (ResidualMLP, lambda: torch.randn(3, 8)),
    "cnn": (lambda: TinyCNN(width=(4, 6, 6), hidden=8), lambda: torch.randn(2, 3, 8, 8)),
    "branches": (Branches, lambda: torch.randn(2, 3, 6, 6)),
    "depthwise": (Depthwise, lambda: torch.randn(2, 3, 6, 6)),
    "spatial_flatten": (SpatialFlatten, lambda: torch.randn(2, 3, 4, 4)),
    "transformer_block": (Block, lambda: torch.randn(2, 5, 16)),
    "transformer": (lambda: TinyTransformer(dim=16, num_heads=4, depth=1), lambda: torch.randint(0, 16, (2, 12))),
}


def _model(name):
    torch.manual_seed(0)
    make, inp = MODELS[name]
    m = make().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    return m, inp()


def _compact(model, x):
    ep = torch.export.export(model.eval(), (x,))
    mod, params = relax.frontend.detach_params(from_exported_program(ep, keep_params_as_input=True))
    new, report = compact_pruned_channels(mod, params)
    return new, report


def _label(member, mods):
    """The name the Relax report gives a torch group member (None for biases: the pass does
    not list them)."""
    module, attr = member.name.rsplit(".", 1)
    if attr != "weight":
        return None
    mod, pname = mods[module], "p_" + member.name.replace(".", "_")
    if isinstance(mod, nn.BatchNorm2d):
        return pname
    if isinstance(mod, nn.Conv2d) and mod.groups > 1:
        return pname + ".dw"
    return pname + (".out" if member.dim == 0 else ".in")


def _torch_groups(model):
    mods = dict(model.named_modules())
    space = discover_groups(model)
    keys = []
    for fam in space.families:
        labels = frozenset(lab for m in fam.members if (lab := _label(m, mods)) is not None)
        keys.append((labels, fam.members[0].block, fam.num_groups))
    return space, keys


@pytest.mark.parametrize("name", sorted(MODELS))
def test_discovered_groups_are_the_groups_compaction_can_remove(name):
    model, x = _model(name)
    _, torch_keys = _torch_groups(model)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for p in zeroed.parameters():
            p.zero_()
    _, report = _compact(zeroed, x)
    relax_keys = [(frozenset(g.members), g.unit, g.units) for g in report.pruned]
    assert report.error is None
    assert set(torch_keys) == set(relax_keys), report.summary()
    assert len(torch_keys) == len(relax_keys)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zeroing_discovered_groups_makes_compaction_remove_exactly_them(name):
    model, x = _model(name)
    space, keys = _torch_groups(model)
    mask = torch.zeros(len(space), dtype=torch.bool)
    for off, fam in zip(space.offsets, space.families):
        mask[off + 1: off + fam.num_groups: 2] = True  # every other group from 1: some, never all
    space.zero_(mask)
    expect = {key[0]: [i for i, z in enumerate(part.tolist()) if z] for key, part in zip(keys, space.split(mask))}
    new, report = _compact(model, x)
    assert {frozenset(g.members): g.removed_units for g in report.pruned} == expect, report.summary()
    vm = relax.VirtualMachine(tvm.compile(new, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    small = compact_model(model)
    with torch.no_grad():
        ref = model(x).numpy()
        np.testing.assert_allclose(small(x).numpy(), ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    if expect:
        assert count_params(small) < count_params(model)


def test_cnn_pool_flatten_linear_chain_is_a_group():
    model, _ = _model("cnn")
    _, keys = _torch_groups(model)
    assert (frozenset({"p_features_6_weight.out", "p_features_7_weight", "p_head_1_weight.in"}), 1, 6) in keys
