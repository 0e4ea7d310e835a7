"""End to end: HESSO/GETA-pruned torch model -> torch.export -> Relax -> CompactPrunedChannels ->
tvm.compile(llvm) gives the pruned torch model's output (1e-5) with fewer parameters."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tvm_splat.pruning.compact import compact_model, count_params
from tvm_splat.pruning.data import make_image_task, make_token_task
from tvm_splat.pruning.export import compile_relax, relax_param_count, run_vm, to_relax
from tvm_splat.pruning.geta import GETA
from tvm_splat.pruning.groups import discover_groups
from tvm_splat.pruning.hesso import HESSO
from tvm_splat.pruning.quant import attach_quantizers, finalize_quantization
from tvm_splat.pruning.zoo import TinyCNN, TinyTransformer

cc = pytest.importorskip("tvm_splat.relay_passes.compact_channels",
                         reason="CompactPrunedChannels (tvm_splat/relay_passes/compact_channels.py) not available")


def _prune(model, x, y, flat, quant=False):
    space = discover_groups(model)
    kw = dict(lr=0.01, variant="adamw", target_group_sparsity=0.5, warmup_steps=4, pruning_steps=6,
              pruning_periods=2)
    if quant:
        layers = attach_quantizers(model, (x[:16],), weight_bits=(4, 8), act_bits=(4, 8))
        opt = GETA(model.parameters(), space, layers, quant_lr=1e-3, **kw)
    else:
        opt = HESSO(model.parameters(), space, **kw)
    model.train()
    for s in range(12):
        i = torch.arange(s * 16, (s + 1) * 16) % x.shape[0]
        opt.zero_grad()
        out = model(x[i])
        loss = F.cross_entropy(out.flatten(0, 1), y[i].flatten()) if flat else F.cross_entropy(out, y[i])
        loss.backward()
        opt.step()
    if quant:
        finalize_quantization(model)
    assert space.group_sparsity() == pytest.approx(round(0.5 * len(space)) / len(space))
    return model.eval()


@pytest.mark.parametrize("kind", ["cnn", "transformer", "cnn-geta"])
def test_pruned_model_compacts_and_compiles_to_same_output(kind):
    if kind.startswith("cnn"):
        x, y = make_image_task(64)
        model, flat = TinyCNN(width=(8, 16, 8), hidden=16), False
        probe = x[:4]
    else:
        x, y = make_token_task(64)
        model, flat = TinyTransformer(dim=16, num_heads=4, depth=1), True
        probe = x[:4]
    model = _prune(model, x, y, flat, quant=kind.endswith("geta"))
    with torch.no_grad():
        ref = model(probe).numpy()

    mod = to_relax(model, (probe,))
    small, report = cc.compact_pruned_channels(mod)
    assert report.error is None and report.pruned, report.summary()
    before, after = relax_param_count(mod), relax_param_count(small)
    assert after < before
    # the pass removes at least what the torch-side compaction removes (same groups)
    torch_small = compact_model(model)
    assert before - after >= count_params(model) - count_params(torch_small)

    out = run_vm(compile_relax(small), (probe,))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(torch_small(probe).numpy(), ref, rtol=0, atol=1e-5)
