"""LegalizeIntegerPower: x ** k (k = 1..4) as products; no fast-math powf left for CUDA."""
import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from tvm_splat.relay_passes import LegalizeIntegerPower, SparsifyAttention


class Powers(torch.nn.Module):
    """RMSNorm's statistic (pow 2) beside the other rewritten exponents and two that are not."""

    def forward(self, x):
        return (x.pow(2).mean(-1, keepdim=True), x.pow(1), x.pow(3), x ** 4, x.pow(0.5), x.pow(5))


def _import(model, *args):
    return from_exported_program(torch.export.export(model.eval(), args))


def _powers(mod):
    found = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: found.append(e) if isinstance(e, relax.Call)
                and getattr(e.op, "name", "") == "relax.power" else None)
    return found


def _all_sources(lib):
    def walk(m):
        yield m.inspect_source() if m.kind == "cuda" else ""
        for sub in m.imports:
            yield from walk(sub)
    return "".join(walk(lib))


def test_integer_powers_become_products_with_torchs_values():
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(0)) * 3  # negatives included
    mod = _import(Powers(), x)
    legalize = LegalizeIntegerPower()
    new = legalize(mod)
    assert legalize.count == 4                      # 2, 1, 3, 4; not 0.5 nor 5
    assert len(_powers(new)) == 2
    outs = relax.VirtualMachine(tvm.compile(new, "llvm"), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    for got, want in zip(outs, Powers()(x)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, equal_nan=True)


def test_no_powf_reaches_cuda_for_rmsnorm():
    class RMSNorm(torch.nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    mod = _import(RMSNorm(), torch.randn(4, 64))
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    assert "powf" in _all_sources(tvm.compile(mod, target).mod)   # what TVM does without the pass
    assert "powf" not in _all_sources(tvm.compile(LegalizeIntegerPower()(mod), target).mod)


def test_module_without_integer_powers_is_unchanged():
    class Root(torch.nn.Module):
        def forward(self, x):
            return x.abs().pow(0.5)

    mod = _import(Root(), torch.randn(3, 5))
    legalize = LegalizeIntegerPower()
    new = legalize(mod)
    assert legalize.count == 0
    tvm.ir.assert_structural_equal(new, mod)


def test_sparsify_attention_applies_it():
    class NormThenAttention(torch.nn.Module):
        def forward(self, x):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            q = h.view(1, x.shape[1], 2, 8).transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    mod = _import(NormThenAttention(), torch.randn(1, 40, 16))
    new = SparsifyAttention("window:4", target="llvm")(mod)
    assert not _powers(new)
