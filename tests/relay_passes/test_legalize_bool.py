"""LegalizeBoolArithmetic: the importer's bool-typed scans compute in int64, as in torch."""
import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from tvm_splat.relay_passes import LegalizeBoolArithmetic


class BoolScans(torch.nn.Module):
    """What transformers 5.x does to ``position_ids`` to find packed sequences."""

    def forward(self, x):
        starts = x > 0
        return starts.cumsum(-1), starts.cumprod(0)


def _import(model, *args):
    return from_exported_program(torch.export.export(model.eval(), args))


def test_bool_scans_compute_in_int64_like_torch():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    mod = _import(BoolScans(), x)
    legalize = LegalizeBoolArithmetic()
    new = legalize(mod)
    assert legalize.count == 2
    ex = tvm.compile(new, "llvm")
    outs = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    for got, want in zip(outs, BoolScans()(x)):
        assert got.numpy().dtype == np.int64
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_module_without_bool_scans_is_unchanged():
    class IntScan(torch.nn.Module):
        def forward(self, x):
            return (x > 0).int().cumsum(-1)

    mod = _import(IntScan(), torch.randn(3, 5))
    legalize = LegalizeBoolArithmetic()
    new = legalize(mod)
    assert legalize.count == 0
    tvm.ir.assert_structural_equal(new, mod)
