"""The training kernels (fwd_lse, bwd_dq, bwd_dkdv) against the dense float64 reference on the
CPU, for every mask case; the GPU schedule builds with nvcc."""
import numpy as np
import pytest

from tvm_splat.compile import backward_module, compile_backward, cuda_source, nvcc_compile
from tvm_splat.formats import ACSR, Window
from tvm_splat.formats.transpose import transpose_acsr
from tvm_splat.kernels.backward import BACKWARD_KERNEL_NAMES, BackwardSpec
from tvm_splat.reference import masked_attention, masked_attention_grads
from tvm_splat.testing import dense_mask, mask_cases

torch = pytest.importorskip("torch")
CASES = mask_cases()


def _inputs(rng, batch, heads, kv_heads, n, d, dtype):
    shapes = [(batch, heads, n, d), (batch, kv_heads, n, d), (batch, kv_heads, n, d), (batch, heads, n, d)]
    return [torch.from_numpy(rng.standard_normal(s)).to(getattr(torch, dtype)) for s in shapes]


def _dense_lse(q, k, mask, scale):
    q, k = (np.asarray(x, dtype=np.float64) for x in (q, k))
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    s = np.where(mask if mask.ndim == 3 else mask[None], np.einsum("bhid,bhjd->bhij", q, k) * scale, -np.inf)
    with np.errstate(divide="ignore"):
        m = s.max(-1)
        return np.where(np.isneginf(m), -np.inf, m + np.log(np.exp(s - np.where(np.isneginf(m), 0, m)[..., None]).sum(-1)))


def _run(acsr, heads, kv_heads, dtype, rng, batch=2, d=8, scale=None):
    from tvm_splat.training import plan_training

    q, k, v, dout = _inputs(rng, batch, heads, kv_heads, acsr.n, d, dtype)
    plan = plan_training(acsr, q.shape, k.shape, dtype, "cpu", scale=scale)
    out, lse = plan.forward(q, k, v)
    grads = plan.backward(q, k, v, out, lse, dout)
    return (q, k, v, dout), (out, lse), grads, plan


@pytest.mark.parametrize("name,acsr,heads", CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_dense_float64(name, acsr, heads, rng):
    (q, k, v, dout), (out, lse), grads, plan = _run(acsr, heads, heads, "float64", rng)
    mask = dense_mask(acsr)
    np.testing.assert_allclose(out.numpy(), masked_attention(q, k, v, mask), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), _dense_lse(q, k, mask, plan.spec.rows.scale), rtol=1e-12, atol=1e-12)
    for got, ref in zip(grads, masked_attention_grads(q, k, v, mask, dout)):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("bfloat16", 4e-2), ("float16", 5e-3)])
@pytest.mark.parametrize("name", ["global+window", "irregular -> CSR fallback", "per-head"])
def test_low_precision_inputs_accumulate_in_fp32(name, dtype, tol, rng):
    _, acsr, heads = next(c for c in CASES if c[0] == name)
    (q, k, v, dout), _, grads, _ = _run(acsr, heads, heads, dtype, rng)
    refs = masked_attention_grads(*(x.double().numpy() for x in (q, k, v)), dense_mask(acsr), dout.double().numpy())
    for got, ref in zip(grads, refs):
        assert got.dtype == q.dtype
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention_sums_dk_dv_over_the_group(kv_heads, rng):
    acsr = ACSR.from_pattern(Window(3, causal=True), 21)
    (q, k, v, dout), _, (dq, dk, dv), _ = _run(acsr, 4, kv_heads, "float64", rng)
    assert dk.shape == k.shape and dv.shape == v.shape
    for got, ref in zip((dq, dk, dv), masked_attention_grads(q, k, v, dense_mask(acsr), dout)):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_gqa_per_head_masks(rng):
    _, acsr, _ = next(c for c in CASES if c[0] == "per-head")  # 3 head masks
    (q, k, v, dout), _, grads, _ = _run(acsr, 3, 1, "float64", rng)
    for got, ref in zip(grads, masked_attention_grads(q, k, v, dense_mask(acsr), dout)):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_nan_in_masked_out_keys_values_queries_and_output_gradients_does_not_leak(rng):
    n = 24
    mask = np.random.default_rng(5).random((n, n)) < 0.3
    dead_keys, dead_rows = [2, 11, 23], [0, 7]
    mask[:, dead_keys] = False  # keys nobody attends (padding)
    mask[dead_rows] = False  # queries that attend to nothing
    acsr = ACSR.from_mask(mask)
    from tvm_splat.training import plan_training

    q, k, v, dout = _inputs(rng, 1, 2, 2, n, 8, "float32")
    plan = plan_training(acsr, q.shape, k.shape, "float32", "cpu")
    clean = plan.backward(q, k, v, *plan.forward(q, k, v), dout)
    for x, rows in ((k, dead_keys), (v, dead_keys), (q, dead_rows), (dout, dead_rows)):
        x[:, :, rows] = float("nan")
    out, lse = plan.forward(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, [1, 3]]).all()
    assert (out[:, :, dead_rows] == 0).all() and torch.isneginf(lse[:, :, dead_rows]).all()
    dirty = plan.backward(q, k, v, out, lse, dout)
    for a, b in zip(clean, dirty):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (dirty[1][:, :, dead_keys] == 0).all() and (dirty[0][:, :, dead_rows] == 0).all()


def test_lse_gradient_enters_the_backward(rng):
    """``dlse`` (the gradient of the lse output) adds ``p_ij dlse_i`` to ``ds_ij``."""
    acsr = ACSR.from_pattern(Window(2), 9)
    from tvm_splat.training import plan_training

    q, k, v, dout = _inputs(rng, 1, 1, 1, 9, 4, "float64")
    plan = plan_training(acsr, q.shape, k.shape, "float64", "cpu")
    out, lse = plan.forward(q, k, v)
    dlse = torch.from_numpy(rng.standard_normal(lse.shape))
    got = plan.backward(q, k, v, out, lse, dout, dlse)
    mask = torch.from_numpy(acsr.to_dense()[0])
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    s = (qr @ kr.transpose(-1, -2) / 2.0).masked_fill(~mask, float("-inf"))
    torch.autograd.backward([torch.softmax(s, -1) @ vr, torch.logsumexp(s, -1)], [dout, dlse])
    for a, b in zip(got, (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_reference_gradients_are_torch_autograd_of_dense_attention(rng):
    mask = np.random.default_rng(6).random((2, 13, 13)) < 0.4
    mask[:, 3] = False
    q, k, v, dout = _inputs(rng, 2, 2, 1, 13, 5, "float64")
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    s = (qr @ kr.repeat_interleave(2, 1).transpose(-1, -2) * 5 ** -0.5).masked_fill(~torch.from_numpy(mask), float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1))  # the empty row: zeros
    (p @ vr.repeat_interleave(2, 1)).backward(dout)
    for a, b in zip(masked_attention_grads(q, k, v, mask, dout), (qr.grad, kr.grad, vr.grad)):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-12, atol=1e-12)


def test_cuda_schedule_builds_with_nvcc():
    """The GPU schedule (one row or key per thread, CUDA cores) compiles for the H100/H200."""
    _, acsr, heads = next(c for c in CASES if c[0] == "irregular -> CSR fallback")
    for dtype in ("float16", "bfloat16", "float32"):
        spec = BackwardSpec.from_acsrs(acsr, transpose_acsr(acsr), 2, 4, 64, dtype, kv_heads=2)
        src = cuda_source(compile_backward(spec, "nvidia/nvidia-h100", use_disk_cache=False))
        for name in BACKWARD_KERNEL_NAMES:
            assert f"{name}_kernel(" in src
        assert len(nvcc_compile(src)) > 1000


def test_module_holds_the_three_kernels():
    acsr = ACSR.from_pattern(Window(2), 9)
    spec = BackwardSpec.from_acsrs(acsr, transpose_acsr(acsr), 1, 2, 4, "float32")
    names = {gv.name_hint for gv, _ in backward_module(spec, "llvm").functions_items()}
    assert names == set(BACKWARD_KERNEL_NAMES)


def test_spec_checks_the_transpose_matches():
    a, b = ACSR.from_pattern(Window(2), 9), ACSR.from_pattern(Window(2), 10)
    with pytest.raises(ValueError, match="does not match the mask"):
        BackwardSpec.from_acsrs(a, b, 1, 1, 4, "float32")
