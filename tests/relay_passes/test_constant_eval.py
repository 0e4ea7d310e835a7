"""ConstantValues: constant mask graphs computed to numpy, each binding once, failures named."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from tvm_splat.relay_passes import _constant_eval, sparsify_attention
from tvm_splat.relay_passes._constant_eval import ConstantEvalError, ConstantValues, function_bindings
from tvm_splat.relay_passes.legalize_bool import legalize_bool_arithmetic
from tvm_splat.relay_passes.sparsify_attention import SparsifyAttention

N = 12


def packed_sequence_mask(n, first_restart):
    """transformers 5.x's way to a causal mask from position ids: packed sequences found by a
    ``cumsum`` over ``diff != 1``, compared through ``index_tensor``; positions restart at
    ``first_restart`` so the mask is block-diagonal-causal (two sequences)."""
    pos = torch.cat([torch.arange(first_restart), torch.arange(n - first_restart)])[None]
    shifted = torch.cat([pos[:, :1] - 1, pos], dim=-1)
    starts = (shifted[:, 1:] - shifted[:, :-1]) != 1
    seq = starts.cumsum(-1)
    rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (cols <= rows) & (seq[0][rows] == seq[0][cols])


class MaskOnly(torch.nn.Module):
    def forward(self, x):
        return packed_sequence_mask(N, 5) & (x[:1, :1] == x[:1, :1])  # x keeps export honest


class Layers(torch.nn.Module):
    """``layers`` SDPA calls sharing one constant mask that numpy cannot build (``flip``)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, q, k, v):
        i = torch.arange(N)
        keep = ((i[:, None] - i[None, :]).abs() <= 2).flip(0).flip(1)
        for _ in range(self.layers):
            q = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return q


def _import(model, *args):
    return from_exported_program(torch.export.export(model.eval(), args))


def _qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, N, 4, generator=g) for _ in range(3))


def _mask_var(mod):
    """The binding of ``packed_sequence_mask`` (the last constant bool [N, N] binding)."""
    bindings = function_bindings(mod["main"])
    values = ConstantValues(bindings)
    var = [v for v, e in bindings.items() if values.is_constant(v)
           and tuple(int(d) for d in v.ty.shape.values) == (N, N) and str(v.ty.dtype) == "bool"][-1]
    return values, var


def test_transformers_mask_ops_match_torch():
    mod, _ = legalize_bool_arithmetic(_import(MaskOnly(), torch.randn(2, 2)))
    values, var = _mask_var(mod)
    np.testing.assert_array_equal(values.value(var), packed_sequence_mask(N, 5).numpy())


def test_bool_scan_left_bool_by_the_importer_is_a_named_error():
    values, var = _mask_var(_import(MaskOnly(), torch.randn(2, 2)))
    with pytest.raises(ConstantEvalError, match=r"lv\d+ = relax.cumsum\(\.\.\.\) could not be evaluated"):
        values.value(var)


def _count_vm_ops(monkeypatch):
    calls = []
    real = _constant_eval._evaluate_op_with_vm

    def counting(call, args):
        calls.append(call.op.name)
        return real(call, args)

    monkeypatch.setattr(_constant_eval, "_evaluate_op_with_vm", counting)
    return calls


@pytest.mark.parametrize("layers", [1, 3])
def test_a_mask_shared_by_sites_is_computed_once(monkeypatch, layers):
    calls = _count_vm_ops(monkeypatch)
    sparsify = SparsifyAttention()
    sparsify(_import(Layers(layers), *_qkv()))
    assert len(sparsify.report.rewritten) == layers
    assert calls == ["relax.flip", "relax.flip"]  # however many layers read the mask


def test_a_mask_that_cannot_be_evaluated_skips_its_site_with_the_error(monkeypatch):
    """An importer gap the legaliser does not know (simulated by switching it off): the site
    is skipped naming the binding, the op and the error; the pass itself does not crash."""
    monkeypatch.setattr(sparsify_attention, "legalize_bool_arithmetic", lambda mod: (mod, 0))

    class PackedMask(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=packed_sequence_mask(N, 5))

    sparsify = SparsifyAttention()
    sparsify(_import(PackedMask(), *_qkv()))
    (site,) = sparsify.report.sites
    assert not site.rewritten
    assert "could not be evaluated at compile time" in site.reason
    assert "relax.cumsum" in site.reason and "InternalError" in site.reason


def test_value_of_a_runtime_expression_is_an_error():
    mod = _import(MaskOnly(), torch.randn(2, 2))
    func = mod["main"]
    values = ConstantValues(function_bindings(func))
    assert not values.is_constant(func.params[0])
    with pytest.raises(ConstantEvalError, match="not a constant expression"):
        values.value(func.params[0])
    assert isinstance(func.params[0], relax.Var)
