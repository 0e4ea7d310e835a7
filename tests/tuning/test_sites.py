"""Tuning every attention site after SparsifyAttention, then recompiling with the records."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from tvm_splat.formats import Window
from tvm_splat.relay_passes import SparsifyAttention
from tvm_splat.reference import masked_attention
from tvm_splat.tuning.sites import tune_sites
from tvm_splat.records import tuned_tiled_knobs


class TwoLayers(nn.Module):
    def forward(self, q, k, v):
        x = F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(x, k, v)


def test_tune_sites_then_rewrite_uses_tuned_knobs(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    args = tuple(torch.randn(1, 2, 40, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mod = from_exported_program(torch.export.export(TwoLayers().eval(), args))
    sparsify = SparsifyAttention(Window(3), target="llvm", variant="tiled")
    sparsify(mod)
    assert len(sparsify.workloads) == 2
    results = tune_sites(sparsify, plans=((16, 16), (32, 16)))
    assert len(results) == 1  # both sites share one workload
    spec = sparsify.workloads[0][1].spec
    knobs = tuned_tiled_knobs(spec, "llvm")
    assert knobs is not None and (knobs.br, knobs.bc) in ((16, 16), (32, 16))

    new = sparsify(mod)
    assert all(plan.knobs_source == "tuned" and plan.knobs == knobs for _, plan in sparsify.workloads)
    names = [gv.name_hint for gv in new.functions if "splat_tiled" in gv.name_hint]
    assert names and all(f"br{knobs.br}_bc{knobs.bc}" in n for n in names)
    vm = relax.VirtualMachine(tvm.compile(new, "llvm"), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in args])[0].numpy()
    q, k, v = (a.numpy() for a in args)
    mask = Window(3).dense_mask(40)
    ref = masked_attention(masked_attention(q, k, v, mask), k, v, mask)
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_tune_sites_needs_a_run_pass():
    with pytest.raises(ValueError, match="no rewritten sites"):
        tune_sites(SparsifyAttention(Window(3)))
