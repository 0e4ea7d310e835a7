"""SparsifyAttention on Relax modules imported from small torch models.

Each model is exported with ``torch.export``, imported with ``from_exported_program``,
rewritten, compiled for ``llvm`` and compared with torch running the *masked* model (the
model's own mask, intersected with the pattern the test passes).
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from tvm_splat.formats import ACSR, GlobalTokens, PerHead, Window
from tvm_splat.reference import masked_attention
from tvm_splat.relay_passes.attention_names import attention_layer_names
from tvm_splat.relay_passes.sparsify_attention import SparsifyAttention

N, H, D = 16, 4, 8
E = H * D
ATOL = 2e-5


# ----------------------------------------------------------------------------- helpers
def window(n, w):
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= w


def causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def qkv(seed=0, b=1, h=H, n=N, d=D):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) for _ in range(3))


def import_model(model, args, **kwargs):
    ep = torch.export.export(model.eval(), args)
    return from_exported_program(ep, **kwargs), ep


def run(mod, args, target="llvm"):
    ex = tvm.compile(mod, target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a.detach().numpy()) for a in args])
    return out[0].numpy()


def torch_out(fn, *args):
    with torch.no_grad():
        return fn(*args).numpy()


def main_ops(mod):
    ops = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op):
                ops.append(v.op.name)
    return ops


def sparsify(mod, pattern=None, **kwargs):
    p = SparsifyAttention(pattern, **kwargs)
    return p(mod), p.report


def assert_rewritten(mod, report, count=1):
    assert len(report.rewritten) == count, str(report)
    ops = main_ops(mod)
    # one call per launch step of each site's plan (the CPU default: SPLAT's three kernels)
    assert ops.count("relax.call_tir") + ops.count("relax.call_tir_inplace") == sum(s.launches for s in report.rewritten)
    assert "relax.nn.softmax" not in ops and "relax.nn.attention" not in ops


# ----------------------------------------------------------------------------- models
class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x, attn_mask=None):
        return self.attn(x, x, x, need_weights=False, attn_mask=attn_mask)[0]


class SDPA(nn.Module):
    def __init__(self, mask=None, is_causal=False):
        super().__init__()
        self.mask, self.is_causal = mask, is_causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask,
                                              is_causal=self.is_causal)


class HandWritten(nn.Module):
    """``softmax(q @ kᵀ * scale + mask) @ v`` with a bool (masked_fill) or additive mask."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)
        if self.mask.dtype == torch.bool:
            scores = scores.masked_fill(~self.mask, float("-inf"))
        else:
            scores = scores + self.mask
        return torch.softmax(scores, dim=-1) @ v


class HFSelfAttention(nn.Module):
    """BERT-style block: projections, view/transpose to heads, ``/ sqrt(d)``, an extended
    additive mask filled with ``finfo.min``, softmax, dropout (eval), merge heads, output."""

    def __init__(self, keep):
        super().__init__()
        torch.manual_seed(1)
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.dropout = nn.Dropout(0.1)
        ext = (1.0 - keep.float())[None, None] * torch.finfo(torch.float32).min
        self.register_buffer("ext_mask", ext)

    def heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, H, D).permute(0, 2, 1, 3)

    def forward(self, x):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
        scores = scores + self.ext_mask
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return self.o(ctx.view(x.shape[0], x.shape[1], E))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer0, self.layer1 = SDPA(), SDPA()

    def forward(self, q, k, v):
        return self.layer1(self.layer0(q, k, v), k, v)


# ----------------------------------------------------------------------------- forms
def test_multihead_attention_with_pattern():
    x = torch.randn(1, N, E)
    mod, _ = import_model(MHA(), (x,))
    new, report = sparsify(mod, Window(2))
    assert_rewritten(new, report)
    site = report.site("attn0")
    assert (site.heads, site.seq_len, site.head_dim, site.mask) == (H, N, D, "none")
    assert site.density == pytest.approx(ACSR.from_pattern(Window(2), N).density)
    # MHA's bool attn_mask is True where attention is NOT allowed
    ref = torch_out(lambda t: MHA()(t, attn_mask=~window(N, 2)), x)
    np.testing.assert_allclose(run(new, (x,)), ref, atol=ATOL)


def test_multihead_attention_without_pattern_is_skipped_and_unchanged():
    x = torch.randn(1, N, E)
    mod, _ = import_model(MHA(), (x,))
    new, report = sparsify(mod)
    assert len(report.sites) == 1 and not report.sites[0].rewritten
    assert "no pattern" in report.sites[0].reason
    tvm.ir.assert_structural_equal(new, mod)


def test_sdpa_without_mask_with_pattern_string():
    args = qkv()
    mod, _ = import_model(SDPA(), args)
    new, report = sparsify(mod, "window:3")
    assert_rewritten(new, report)
    ref = torch_out(lambda *a: F.scaled_dot_product_attention(*a, attn_mask=window(N, 3)), *args)
    np.testing.assert_allclose(run(new, args), ref, atol=ATOL)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_sdpa_constant_attn_mask_is_analysed(kind):
    keep = window(N, 2) | (torch.arange(N)[None, :] < 2)  # window + 2 global columns
    mask = keep if kind == "bool" else torch.zeros(N, N).masked_fill(~keep, float("-inf"))
    args = qkv(1)
    model = SDPA(mask)
    mod, _ = import_model(model, args)
    new, report = sparsify(mod)
    assert_rewritten(new, report)
    assert report.sites[0].density == pytest.approx(keep.float().mean().item())
    np.testing.assert_allclose(run(new, args), torch_out(model, *args), atol=ATOL)


def test_sdpa_is_causal_alone_and_with_window():
    args = qkv(2)
    model = SDPA(is_causal=True)
    mod, _ = import_model(model, args)
    new, report = sparsify(mod)
    assert_rewritten(new, report)
    np.testing.assert_allclose(run(new, args), torch_out(model, *args), atol=ATOL)
    # is_causal + Window(3) -> causal window (the intersection)
    new, report = sparsify(mod, Window(3))
    assert_rewritten(new, report)
    ref = torch_out(lambda *a: F.scaled_dot_product_attention(
        *a, attn_mask=causal(N) & window(N, 3)), *args)
    np.testing.assert_allclose(run(new, args), ref, atol=ATOL)
    assert report.sites[0].density == pytest.approx((causal(N) & window(N, 3)).float().mean().item())


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_hand_written_attention_with_constant_mask(kind):
    keep = window(N, 1) | (torch.arange(N)[None, :] % 5 == 0)  # band + strided columns
    mask = keep if kind == "bool" else torch.zeros(N, N).masked_fill(~keep, float("-inf"))
    args = qkv(3)
    model = HandWritten(mask)
    mod, _ = import_model(model, args)
    new, report = sparsify(mod)
    assert_rewritten(new, report)
    assert report.sites[0].mask == ("boolean" if kind == "bool" else "additive")
    np.testing.assert_allclose(run(new, args), torch_out(model, *args), atol=ATOL)


def test_hand_written_attention_mask_intersected_with_pattern():
    keep = causal(N)
    args = qkv(4)
    mod, _ = import_model(HandWritten(keep), args)
    new, report = sparsify(mod, Window(2) | GlobalTokens(1))
    assert_rewritten(new, report)
    both = keep.numpy() & (Window(2) | GlobalTokens(1)).dense_mask(N)
    ref = masked_attention(*(a.numpy() for a in args), both)
    np.testing.assert_allclose(run(new, args), ref, atol=ATOL)


def test_huggingface_style_block_with_finfo_min_mask():
    keep = window(N, 2) | torch.from_numpy(GlobalTokens(2).dense_mask(N))
    x = torch.randn(2, N, E)
    model = HFSelfAttention(keep)
    mod, _ = import_model(model, (x,))
    new, report = sparsify(mod)
    assert_rewritten(new, report)
    assert (report.sites[0].batch, report.sites[0].heads) == (2, H)
    np.testing.assert_allclose(run(new, (x,)), torch_out(model, x), atol=ATOL)


def test_relax_nn_attention_form():
    """``run_ep_decomposition=False`` keeps SDPA as ``R.nn.attention`` (BSNH layout)."""
    args = qkv(5)
    model = SDPA(is_causal=True)
    mod, _ = import_model(model, args, run_ep_decomposition=False)
    assert "relax.nn.attention" in main_ops(mod)
    new, report = sparsify(mod)
    assert_rewritten(new, report)
    assert report.sites[0].form == "nn.attention" and report.sites[0].mask == "causal"
    np.testing.assert_allclose(run(new, args), torch_out(model, *args), atol=ATOL)
    # with a bias mask (TVM's own legalization of nn.attention drops the bias)
    keep = window(N, 2)
    model = SDPA(torch.zeros(1, 1, N, N).masked_fill(~keep, float("-inf")))  # importer wants 4-D
    mod, _ = import_model(model, args, run_ep_decomposition=False)
    new, report = sparsify(mod, Window(1))
    assert_rewritten(new, report)
    ref = torch_out(lambda *a: F.scaled_dot_product_attention(*a, attn_mask=window(N, 1)), *args)
    np.testing.assert_allclose(run(new, args), ref, atol=ATOL)


def test_per_head_pattern():
    args = qkv(6)
    mod, _ = import_model(SDPA(), args)
    pattern = PerHead(tuple(Window(w) for w in range(H)))
    new, report = sparsify(mod, pattern)
    assert_rewritten(new, report)
    ref = masked_attention(*(a.numpy() for a in args), pattern.dense_mask(N))
    np.testing.assert_allclose(run(new, args), ref, atol=ATOL)


def test_separate_kernels_variant():
    args = qkv(7)
    model = SDPA(is_causal=True)
    mod, _ = import_model(model, args)
    new, report = sparsify(mod, variant="separate")
    assert len(report.rewritten) == 1 and main_ops(new).count("relax.call_tir") == 3
    assert report.rewritten[0].kernels == "separate: sddmm, softmax, spmm" and report.rewritten[0].launches == 3
    assert "rewritten (separate: sddmm, softmax, spmm)" in str(report)
    np.testing.assert_allclose(run(new, args), torch_out(model, *args), atol=ATOL)


@pytest.mark.parametrize("kind", ["merge", "fallback", "split_merge"])
def test_tiled_variant_runs_every_step_of_its_plan(kind):
    """The tiled family through the pass: a strided mask needs the merge of two row groupings
    (a kernel with three outputs), an irregular one the CSR-row fallback (in place), a global
    token's long row tile split-KV and its split-merge (in place, three outputs)."""
    args = qkv(9, n=640 if kind == "split_merge" else 40)
    if kind == "split_merge":
        from tvm_splat.formats import GlobalTokens

        pattern = Window(2) | GlobalTokens(2)
        keep = pattern.dense_mask(640)
    elif kind == "merge":
        from tvm_splat.formats import Strided

        pattern = Strided(8)
        keep = pattern.dense_mask(40)
    else:
        keep = np.random.default_rng(3).random((40, 40)) < 0.3
        pattern = ACSR.from_mask(keep, max_segments=2)
    mod, _ = import_model(SDPA(), args)
    sparsify_pass = SparsifyAttention(pattern, variant="tiled")
    new = sparsify_pass(mod)
    (_, plan), = sparsify_pass.workloads
    assert plan.variant == "tiled" and kind in [s.kernel for s in plan.steps]
    assert main_ops(new).count("relax.call_tir") + main_ops(new).count("relax.call_tir_inplace") == len(plan.steps)
    ref = masked_attention(*(a.numpy() for a in args), keep)
    np.testing.assert_allclose(run(new, args), ref, atol=ATOL)


# ----------------------------------------------------------------------------- several layers
def test_two_layers_with_different_patterns_by_name():
    args = qkv(8)
    model = TwoLayers()
    mod, ep = import_model(model, args)
    names = attention_layer_names(ep)
    assert names == ["layer0", "layer1"]
    new, report = sparsify(mod, {"layer0": Window(1), "layer1": "window:4"}, names=names)
    assert_rewritten(new, report, count=2)
    assert report.site("layer0").pattern == repr(Window(1))
    assert report.site("layer1").pattern == repr(Window(4))
    assert report.site("layer0").density < report.site("layer1").density

    def ref(q, k, v):
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=window(N, 1))
        return F.scaled_dot_product_attention(h, k, v, attn_mask=window(N, 4))
    np.testing.assert_allclose(run(new, args), torch_out(ref, *args), atol=ATOL)
    # the same through a callable, by site index
    new2, report2 = sparsify(mod, lambda site: Window(1 if site.index == 0 else 4))
    assert [s.pattern for s in report2.sites] == [s.pattern for s in report.sites]
    tvm.ir.assert_structural_equal(new2, new)


def test_dict_leaves_unnamed_sites_alone():
    args = qkv(9)
    mod, _ = import_model(TwoLayers(), args)
    new, report = sparsify(mod, {"attn1": Window(2)})
    assert [s.rewritten for s in report.sites] == [False, True]
    assert main_ops(new).count("relax.nn.softmax") == 1


# ----------------------------------------------------------------------------- flows
def test_inside_sequential_and_compile_pipeline():
    args = qkv(10)
    model = SDPA(is_causal=True)
    mod, _ = import_model(model, args)
    # next to TVM's own passes: fusion (zero) and the default lowering to the VM
    seq = tvm.transform.Sequential([SparsifyAttention(), relax.get_pipeline("zero"),
                                    relax.get_pipeline("default")])
    ex = tvm.compile(mod, "llvm", relax_pipeline=seq)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in args])[0].numpy()
    np.testing.assert_allclose(out, torch_out(model, *args), atol=ATOL)


def test_builds_for_cuda():
    args = qkv(11)
    mod, _ = import_model(SDPA(is_causal=True), args)
    target = tvm.target.Target("nvidia/nvidia-h100")
    new, report = sparsify(mod, Window(2), target=target)
    assert_rewritten(new, report)
    kernel = [f for f in new.functions.values() if isinstance(f, tvm.tirx.PrimFunc)][0]
    assert "threadIdx.x" in kernel.script()  # scheduled for the GPU, not for llvm
    ex = tvm.compile(new, target)
    assert ex is not None


def test_builds_the_hopper_tma_form_for_a_half_precision_window():
    """A float16 window site on sm_90a takes the default TMA form inside the Relax module too:
    the host encodes the K/V tensor maps in the same PrimFunc the graph calls."""
    from tvm_splat.compile import cuda_source, nvcc_compile

    class HalfEager(nn.Module):  # 16-bit scores, the softmax in float32 (as HF's eager attention)
        def __init__(self, keep):
            super().__init__()
            self.register_buffer("keep", keep)

        def forward(self, q, k, v):
            scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
            probs = torch.softmax(scores.masked_fill(~self.keep, float("-inf")), dim=-1)
            return probs.to(q.dtype) @ v

    args = tuple(a.half() for a in qkv(12, n=200, d=64))
    mod, _ = import_model(HalfEager(window(200, 24)), args)
    target = tvm.target.Target("nvidia/nvidia-h100")
    rewrite = SparsifyAttention(Window(24), target=target)
    new = rewrite(mod)
    assert_rewritten(new, rewrite.report)
    (_, site_plan), = rewrite.workloads
    knobs = site_plan.knobs
    assert knobs.wgmma and knobs.tma
    src = cuda_source(tvm.compile(new, target).mod)
    assert "cp.async.bulk.tensor" in src and "CUtensorMap" in src
    assert nvcc_compile(src, target)


# ----------------------------------------------------------------------------- skipped sites
def test_no_attention_module_is_unchanged_and_its_softmax_reported():
    model = nn.Sequential(nn.Linear(E, E), nn.GELU(), nn.Linear(E, 4), nn.Softmax(-1))
    mod, _ = import_model(model, (torch.randn(2, E),))
    new, report = sparsify(mod, Window(2))
    (site,) = report.sites
    assert not site.rewritten and "does not reach matmul(P, V)" in site.reason
    assert "0 of 1 attention site(s) rewritten" in str(report)
    tvm.ir.assert_structural_equal(new, mod)


def test_every_softmax_is_reported_with_its_reason():
    """Attention, a softmax over the query axis, attention whose probabilities are re-scaled
    before ``@ v`` and one over ``tanh`` of the scores: four softmaxes, four report lines,
    in graph order."""

    class Mixed(nn.Module):
        def forward(self, q, k, v):
            scores = q @ k.transpose(-2, -1)
            a = torch.softmax(scores, dim=-1) @ v
            b = torch.softmax(scores, dim=-2) @ v
            c = (torch.softmax(scores, dim=-1) * 0.5) @ v
            d = torch.softmax(scores.tanh(), dim=-1) @ v
            return a + b + c + d

    mod, _ = import_model(Mixed(), qkv(18))
    _, report = sparsify(mod, Window(2))
    assert [s.name for s in report.sites] == ["attn0", "attn1", "attn2", "attn3"]
    assert report.sites[0].rewritten
    assert "softmax over axis" in report.sites[1].reason
    assert "does not reach matmul(P, V)" in report.sites[2].reason
    assert "is not matmul(Q, Kᵀ)" in report.sites[3].reason
    assert str(report).count("skipped") == 3


def test_dynamic_sequence_length_is_reported_not_dropped():
    args = qkv(19)
    n = torch.export.Dim("n", min=2, max=64)
    ep = torch.export.export(SDPA(is_causal=True).eval(), args,
                             dynamic_shapes=tuple({2: n} for _ in range(3)))
    mod = from_exported_program(ep)
    new, report = sparsify(mod, Window(2))
    (site,) = report.sites
    assert not site.rewritten and "dynamic (symbolic) shape" in site.reason
    assert "0 of 1 attention site(s) rewritten" in str(report)
    tvm.ir.assert_structural_equal(new, mod)


def test_finite_additive_bias_is_skipped():
    """An ALiBi-like bias re-weights scores: no ACSR can express it; nothing changes."""
    i = torch.arange(N).float()
    bias = -(i[:, None] - i[None, :]).abs() * 0.5
    args = qkv(12)
    model = HandWritten(bias)
    mod, _ = import_model(model, args)
    new, report = sparsify(mod, Window(2))
    assert not report.sites[0].rewritten and "re-weights" in report.sites[0].reason
    tvm.ir.assert_structural_equal(new, mod)
    np.testing.assert_allclose(run(new, args), torch_out(model, *args), atol=ATOL)


def test_runtime_mask_is_skipped():
    class RuntimeMask(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    args = qkv(13) + (window(N, 2),)
    mod, _ = import_model(RuntimeMask(), args)
    new, report = sparsify(mod, Window(2))
    assert not report.sites[0].rewritten and "runtime" in report.sites[0].reason


def test_mask_varying_over_batch_is_skipped():
    mask = torch.stack([window(N, 1), window(N, 3)])[:, None]  # [2, 1, N, N]
    args = qkv(14, b=2)
    mod, _ = import_model(SDPA(mask), args)
    _, report = sparsify(mod)
    assert not report.sites[0].rewritten and "batch" in report.sites[0].reason


def test_empty_rows_give_zeros():
    """A query row with an empty mask gives zeros (torch's SDPA decomposition agrees)."""
    keep = window(N, 1)
    keep[3] = False
    args = qkv(15)
    mod, _ = import_model(SDPA(keep), args)
    new, report = sparsify(mod)
    assert_rewritten(new, report)
    out = run(new, args)
    np.testing.assert_array_equal(out[:, :, 3], 0)
    ref = masked_attention(*(a.numpy() for a in args), keep.numpy())
    np.testing.assert_allclose(out, ref, atol=ATOL)


# ----------------------------------------------------------------------------- report
def test_report_is_plain_data_and_logged(caplog):
    args = qkv(16)
    mod, _ = import_model(TwoLayers(), args)
    with caplog.at_level("INFO", logger="tvm_splat.relay_passes"):
        _, report = sparsify(mod, {"attn0": "window:2"})
    rows = json.loads(json.dumps(report.as_dicts()))
    assert [(r["name"], r["rewritten"]) for r in rows] == [("attn0", True), ("attn1", False)]
    assert rows[1]["reason"] and rows[0]["density"] > 0
    assert "1 of 2 attention site(s) rewritten" in caplog.text


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("pattern, error, words", [
    (42, TypeError, "pattern must be a Pattern"),
    ("windw:3", ValueError, "unknown pattern 'windw'"),
    ("window", ValueError, "takes 1 argument"),
    ({3: Window(2)}, TypeError, "site names"),
    ({"attn0": 1.5}, TypeError, "pattern['attn0']"),
])
def test_bad_pattern_arguments(pattern, error, words):
    with pytest.raises(error, match=None) as info:
        SparsifyAttention(pattern)
    assert words in str(info.value)


def test_bad_other_arguments():
    with pytest.raises(ValueError, match="variant"):
        SparsifyAttention(Window(2), variant="flash")
    with pytest.raises(ValueError, match="now called 'tiled'"):
        SparsifyAttention(Window(2), variant="fused")
    with pytest.raises(ValueError, match="target"):
        SparsifyAttention(Window(2), target="c")
    with pytest.raises(TypeError, match="names"):
        SparsifyAttention(Window(2), names="attn")
    with pytest.raises(ValueError, match="max_segments"):
        SparsifyAttention(Window(2), max_segments=0)


def test_unknown_site_name_and_bad_callable_result():
    args = qkv(17)
    mod, _ = import_model(SDPA(), args)
    with pytest.raises(ValueError, match=r"unknown attention site\(s\) \['attn7'\]"):
        SparsifyAttention({"attn7": Window(2)})(mod)
    with pytest.raises(TypeError, match="returned a value that must be a Pattern"):
        SparsifyAttention(lambda site: 3)(mod)
    # a PerHead pattern with the wrong head count is a skip with a reason, not a crash
    _, report = sparsify(mod, PerHead((Window(1), Window(2))))
    assert "2 head masks" in report.sites[0].reason
