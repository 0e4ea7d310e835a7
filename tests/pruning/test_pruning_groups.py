"""Group discovery follows the compaction rules: right slices, residual streams untouched."""
import pytest
import torch
import torch.nn as nn

from tvm_splat.pruning.compact import compact_model, count_params
from tvm_splat.pruning.groups import discover_groups
from tvm_splat.pruning.zoo import TinyCNN, TinyTransformer


def _by_name(space):
    return {f.name: f for f in space.families}


def test_mlp_hidden_units_are_groups():
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 3), nn.GELU(), nn.Linear(3, 2))
    space = discover_groups(m)
    fams = _by_name(space)
    assert set(fams) == {"0", "3"} and len(space) == 11
    assert all(f.kind == "hidden" for f in space.families)
    sl = space.groups[5].slices  # unit 5 of layer 0
    assert [(s.name, s.dim, s.index) for s in sl] == [
        ("0.weight", 0, slice(5, 6)), ("0.bias", 0, slice(5, 6)), ("3.weight", 1, slice(5, 6))]
    assert sl[0].param is m[0].weight and sl[2].param is m[3].weight


def test_cnn_channel_group_contains_bn_affine_and_next_conv_inputs():
    m = TinyCNN()
    fams = _by_name(discover_groups(m))
    # conv1, conv2 feed conv-bn-relu-conv; conv3 feeds bn-relu-global pool-flatten-Linear
    # (issue 19: such a conv used to be missed); the head MLP's hidden units are grouped.
    assert {n: (f.kind, f.num_groups) for n, f in fams.items()} == {
        "features.0": ("channel", 16), "features.3": ("channel", 32), "features.6": ("channel", 32),
        "head.1": ("hidden", 64)}
    names = [mb.name for mb in fams["features.3"].members]
    assert names == ["features.3.weight", "features.3.bias", "features.4.weight", "features.4.bias", "features.6.weight"]
    assert fams["features.3"].members[-1].dim == 1
    pooled = [(mb.name, mb.dim) for mb in fams["features.6"].members]
    assert pooled == [("features.6.weight", 0), ("features.6.bias", 0), ("features.7.weight", 0),
                      ("features.7.bias", 0), ("head.1.weight", 1)]


def test_transformer_heads_and_mlp_units_but_no_residual_stream():
    m = TinyTransformer(dim=32, num_heads=4, depth=2)
    fams = _by_name(discover_groups(m))
    assert {n: (f.kind, f.num_groups) for n, f in fams.items()} == {
        "blocks.0.attn": ("head", 4), "blocks.0.mlp.0": ("hidden", 64),
        "blocks.1.attn": ("head", 4), "blocks.1.mlp.0": ("hidden", 64)}
    head = fams["blocks.0.attn"]
    sl = head.slices(2)
    assert [(s.name, s.dim, s.index) for s in sl][::2] == [
        ("blocks.0.attn.q_proj.weight", 0, slice(16, 24)), ("blocks.0.attn.k_proj.weight", 0, slice(16, 24)),
        ("blocks.0.attn.v_proj.weight", 0, slice(16, 24)), ("blocks.0.attn.o_proj.weight", 1, slice(16, 24))]
    grouped = {mb.name for f in fams.values() for mb in f.members}
    # o_proj rows / mlp.2 rows write the residual stream: never grouped along dim 0
    assert not any(n.endswith(("o_proj.bias", "mlp.2.bias", "ln1.weight", "tok.weight")) for n in grouped)


class _ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.fc1(x))  # h feeds fc2 AND the residual add: not groupable
        y = self.fc2(h) + h
        return self.fc4(torch.relu(self.fc3(y))) + y  # fc3's hidden units only feed fc4


def test_residual_consumers_block_grouping():
    fams = _by_name(discover_groups(_ResidualMLP()))
    assert list(fams) == ["fc3"] and fams["fc3"].num_groups == 16


@pytest.mark.parametrize("make,inp", [
    (TinyCNN, lambda: torch.randn(3, 3, 16, 16)),
    (TinyTransformer, lambda: torch.randint(0, 16, (3, 12))),
    (_ResidualMLP, lambda: torch.randn(5, 8)),
])
def test_zeroing_groups_then_compacting_preserves_function(make, inp):
    m = make().eval()
    with torch.no_grad():  # non-trivial BN statistics so the test sees them
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    space = discover_groups(m)
    mask = torch.zeros(len(space), dtype=torch.bool)
    mask[1::3] = True
    space.zero_(mask)
    assert torch.equal(space.zero_mask(), mask)
    for g in [space.groups[i] for i in torch.nonzero(mask).flatten().tolist()[:5]]:
        for s in g.slices:
            assert torch.count_nonzero(s.param.detach().narrow(s.dim, s.index.start, s.index.stop - s.index.start)) == 0
    small = compact_model(m)
    x = inp()
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=0, atol=1e-5)
    assert count_params(small) < count_params(m)


def test_zeroed_hidden_unit_is_exactly_zero_after_activation():
    m = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    space = discover_groups(m)
    space.zero_(torch.tensor([False, True, False, False, True, False]))
    with torch.no_grad():
        h = m[1](m[0](torch.randn(16, 4)))
    assert torch.all(h[:, [1, 4]] == 0) and torch.all(h[:, [0, 2]] != 0)


def _family_names(model):
    return [f.name for f in discover_groups(model).families]


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-1, 1), nn.Sigmoid(), nn.GELU()])
def test_zeroed_value_must_be_absorbable_by_every_consumer(act):
    # A zeroed conv channel reaches the next conv as act(0): any constant is fine for an
    # unpadded conv (folded into its bias), only exactly 0 for a zero-padded one.
    zero_kept = not isinstance(act, nn.Sigmoid)
    for padding in (0, 1):
        m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), act, nn.Conv2d(4, 2, 3, padding=padding))
        assert _family_names(m) == (["0"] if zero_kept or padding == 0 else [])
    assert _family_names(nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2))) == ["0"]


class _Clamped(nn.Module):
    def __init__(self, lo):
        super().__init__()
        self.lo, self.c1, self.c2 = lo, nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.c2(self.c1(x).clamp(min=self.lo))


def test_clamp_keeps_a_group_only_when_zero_lies_inside_its_bounds():
    assert _family_names(_Clamped(0.0)) == ["c1"]
    assert _family_names(_Clamped(0.5)) == []  # clamp(0, min=0.5) = 0.5 would reach a padded conv


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.fc1(x)))))


class _Conservative(nn.Module):
    """What the torch side does not follow although the Relax pass may (it sees shapes and
    values): a view of a grouped tensor, a per-channel parameter added to it.  Scalar
    arithmetic is followed."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(4, 6)
        self.shift = nn.Parameter(torch.randn(6))
        self.out_a, self.out_b, self.out_c = nn.Linear(6, 2), nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x):
        a = torch.relu(self.a(x)).view(-1, 6)
        b = self.b(x) + self.shift
        c = torch.tanh(self.c(x) * 2.0 - 1.0)
        return self.out_a(a) + self.out_b(b) + self.out_c(c)


def test_shared_modules_views_and_per_channel_parameters_pin_the_group():
    assert _family_names(_Shared()) == []  # fc1 is called twice
    assert _family_names(_Conservative()) == ["c"]


class _Pooled(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool, self.conv, self.bn, self.fc = pool, nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))))


@pytest.mark.parametrize("pool,grouped", [
    (lambda h: h.mean((2, 3)), True),
    (lambda h: torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1), True),
    (lambda h: nn.functional.max_pool2d(h, 6).flatten(1), True),
    (lambda h: h.mean(1), False),  # reduces the channel axis
    (lambda h: h.mean(), False),  # reduces everything
])
def test_pooled_conv_channels_reach_the_linear_head(pool, grouped):
    assert _family_names(_Pooled(pool)) == (["conv"] if grouped else [])


def test_every_torch_op_maps_into_the_table_and_every_family_has_a_handler():
    from tvm_splat.channel_rules import OP_RULES, families
    from tvm_splat.pruning import _torch_ops
    from tvm_splat.pruning._group_state import FAMILY_HANDLERS
    from tvm_splat.pruning._group_walk import GraphWalk  # noqa: F401  (registers the handlers)

    mapped = {*_torch_ops._MODULE_OPS.values(), *_torch_ops._FUNCTION_OPS.values(), *_torch_ops._METHOD_OPS.values()}
    assert mapped - {_torch_ops.IDENTITY} <= set(OP_RULES)
    assert set(FAMILY_HANDLERS) == families()


def test_unsupported_modules_fail_clearly():
    with pytest.raises(ValueError, match=r"'1' of type Conv1d"):
        discover_groups(nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1)))
    with pytest.raises(ValueError, match=r"'attn' of type MultiheadAttention"):
        discover_groups(nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)}))

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(ValueError, match="cannot trace model Dynamic"):
        discover_groups(Dynamic())
    with pytest.raises(ValueError, match="nn.Module"):
        discover_groups("not a model")
