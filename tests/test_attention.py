"""The public ``sparse_attention`` entry: inputs, patterns, devices and errors."""
import numpy as np
import pytest

from tvm_splat import ACSR, Window, parse_pattern, sparse_attention
from tvm_splat.reference import masked_attention


def test_accepts_pattern_objects_and_strings(rng):
    q, k, v = (rng.standard_normal((1, 2, 20, 8)).astype("float32") for _ in range(3))
    ref = masked_attention(q, k, v, Window(3).dense_mask(20))
    for mask in (Window(3), "window:3", ACSR.from_pattern(parse_pattern("window:3"), 20)):
        np.testing.assert_allclose(sparse_attention(q, k, v, mask), ref, atol=1e-4)


def test_torch_tensors_in_and_out(rng):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(2, 3, 17, 8) for _ in range(3))
    out = sparse_attention(q, k, v, "global:2+window:2", target="llvm")
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == torch.float32
    mask = parse_pattern("global:2+window:2").dense_mask(17)
    ref = masked_attention(q.numpy(), k.numpy(), v.numpy(), mask)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-4)
    # non-contiguous input views are accepted
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)
    np.testing.assert_allclose(sparse_attention(qt, k, v, "global:2+window:2").numpy(), ref, atol=1e-4)


def test_bad_inputs_raise_clear_errors(rng):
    q = rng.standard_normal((1, 2, 16, 8)).astype("float32")
    with pytest.raises(ValueError, match=r"\[batch, heads, seq_len, head_dim\]"):
        sparse_attention(q[0], q[0], q[0], Window(2))
    with pytest.raises(ValueError, match="same shape"):
        sparse_attention(q, q, q[:, :, :8], Window(2))
    with pytest.raises(ValueError, match="same dtype"):
        sparse_attention(q, q, q.astype("float16"), Window(2))
    with pytest.raises(ValueError, match="unsupported dtype"):
        sparse_attention(*(q.astype("int32"),) * 3, Window(2))
    with pytest.raises(ValueError, match="sequence length 12"):
        sparse_attention(q, q, q, ACSR.from_pattern(Window(2), 12))
    with pytest.raises(ValueError, match="heads"):
        sparse_attention(q, q, q, ACSR.from_mask(np.ones((3, 16, 16), bool)))
    with pytest.raises(ValueError, match="unknown"):
        sparse_attention(q, q, q, "swirl:3")
    with pytest.raises(TypeError, match="expected an ACSR"):
        sparse_attention(q, q, q, 42)
    with pytest.raises(ValueError, match="does not match the device"):
        sparse_attention(q, q, q, Window(2), target="cuda")


def test_unknown_variant_is_rejected(rng):
    q = rng.standard_normal((1, 1, 8, 4)).astype("float32")
    with pytest.raises(ValueError, match="unknown kernel variant 'flash'"):
        sparse_attention(q, q, q, "window:1", variant="flash")
    with pytest.raises(ValueError, match="now called 'tiled'"):
        sparse_attention(q, q, q, "window:1", variant="fused")


def test_calls_reuse_their_plan_and_still_check(rng):
    """The first call of a workload plans it; later calls find the plan (patterns and strings
    by value, ACSRs by identity) and only check the tensors."""
    torch = pytest.importorskip("torch")
    from tvm_splat import attention as att

    q, k, v = (torch.randn(1, 2, 19, 8) for _ in range(3))
    pattern = parse_pattern("window:2")
    ref = masked_attention(q.numpy(), k.numpy(), v.numpy(), pattern.dense_mask(19))
    att.clear_plans()
    first = sparse_attention(q, k, v, pattern)
    assert len(att._PLANS) == 1
    plan = next(iter(att._PLANS.values()))
    assert att.plan_for(q, k, v, parse_pattern("window:2")) is plan  # an equal pattern: same plan
    second = sparse_attention(q, k, v, pattern)
    assert len(att._PLANS) == 1
    for out in (first, second):
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-4)
    other = parse_pattern("window:5")
    ref5 = masked_attention(q.numpy(), k.numpy(), v.numpy(), other.dense_mask(19))
    np.testing.assert_allclose(sparse_attention(q, k, v, other).numpy(), ref5, atol=1e-4)
    assert len(att._PLANS) == 2
    # an ACSR by identity: a fresh, equal ACSR gets its own plan
    acsr = ACSR.from_pattern(pattern, 19)
    assert att.plan_for(q, k, v, acsr) is not att.plan_for(q, k, v, ACSR.from_pattern(pattern, 19))
    # non-contiguous inputs and bad shapes are checked on every call
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)
    np.testing.assert_allclose(sparse_attention(qt, k, v, pattern).numpy(), ref, atol=1e-4)
    with pytest.raises(ValueError, match=r"v has shape \(1, 2, 8, 8\), this plan expects"):
        sparse_attention(q, k, v[:, :, :8], pattern)
    with pytest.raises(ValueError, match="v has dtype float64"):
        sparse_attention(q, k, v.double(), pattern)
    out = torch.empty_like(q)
    assert sparse_attention(q, k, v, pattern, out=out) is out
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-4)


def test_grouped_query_attention_reads_each_kv_head_for_its_group(rng):
    """k, v with fewer heads than q: query head h uses KV head h // group, in every variant
    (nothing is repeated in memory; the reference repeats to check)."""
    q = rng.standard_normal((2, 6, 23, 8)).astype("float32")
    k, v = (rng.standard_normal((2, 2, 23, 8)).astype("float32") for _ in range(2))
    mask = parse_pattern("global:2+window:3")
    ref = masked_attention(q, k, v, mask.dense_mask(23))
    for variant in ("tiled", "row", "separate"):
        np.testing.assert_allclose(sparse_attention(q, k, v, mask, variant=variant), ref, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        sparse_attention(q, k[:, :1].repeat(4, axis=1), v[:, :1].repeat(4, axis=1), mask)


def test_bfloat16_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(1, 2, 33, 16).to(torch.bfloat16) for _ in range(3))
    mask = parse_pattern("strided:8")
    ref = masked_attention(*(x.float().numpy() for x in (q, k, v)), mask.dense_mask(33))
    for variant in ("tiled", "row", "separate"):
        out = sparse_attention(q, k, v, mask, variant=variant)
        assert out.dtype == torch.bfloat16
        np.testing.assert_allclose(out.float().numpy(), ref, atol=2e-2, rtol=2e-2)


def test_default_variant_and_untuned_knobs():
    """Without tuning records the tiled path takes one K/V stage for small grids and two for
    large ones (the threshold is measured, see ``TWO_STAGE_MIN_TILES``); tensor cores for 16-bit
    inputs on the GPU. ``auto`` is the tiled kernel on the GPU and ``CPU_VARIANT`` on the CPU."""
    import tvm

    from tvm_splat.kernels.spec import AttentionSpec
    from tvm_splat.planner import CPU_VARIANT, choose_variant, plan
    from tvm_splat.schedules.tiled import TWO_STAGE_MIN_TILES, default_tiled_knobs

    h100 = tvm.target.Target("nvidia/nvidia-h100")
    assert choose_variant("auto", h100) == "tiled" and choose_variant("auto", "llvm") == CPU_VARIANT
    # the separate kernels' score buffers past CPU_SCRATCH_BYTES: the row kernel instead
    huge = AttentionSpec.from_acsr(ACSR.from_pattern(Window(1024), 32768), 1, 16, 128, "float32")
    assert choose_variant("auto", "llvm", huge) == "row"
    acsr = ACSR.from_pattern(Window(256), 4096)
    small = AttentionSpec.from_acsr(acsr, 1, 12, 64, "float16")     # 12 * 64 row tiles of 64
    large = AttentionSpec.from_acsr(acsr, 8, 12, 64, "float16")     # 8 * 12 * 64
    assert 12 * 64 < TWO_STAGE_MIN_TILES <= 8 * 12 * 64
    assert default_tiled_knobs(small, h100).stages == 1
    assert default_tiled_knobs(large, h100).stages == 2
    assert default_tiled_knobs(large, h100).use_tensor_cores
    assert default_tiled_knobs(AttentionSpec.from_acsr(acsr, 8, 12, 64, "bfloat16"), h100).use_tensor_cores
    assert not default_tiled_knobs(AttentionSpec.from_acsr(acsr, 8, 12, 64, "float32"), h100).use_tensor_cores
    assert not default_tiled_knobs(large, "llvm").use_tensor_cores
    # a plan without a record uses them (the tuning logs hold nothing for n=4096, b=3)
    made = plan(acsr, (3, 12, 4096, 64), None, "float16", None, target=h100)
    assert made.knobs_source == "default"
    assert made.knobs == default_tiled_knobs(made.spec, h100, tma_steps=True) and made.knobs.stages == 2
    assert made.knobs.tma  # a window's blocks all have step 1: the Hopper TMA form
