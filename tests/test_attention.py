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
    with pytest.raises(ValueError, match="does not match the inputs' device"):
        sparse_attention(q, q, q, Window(2), target="cuda")


def test_torch_entry_point_rejects_numpy(rng):
    pytest.importorskip("torch")
    import tvm_splat.torch as tst

    q = rng.standard_normal((1, 1, 8, 4)).astype("float32")
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        tst.sparse_attention(q, q, q, "window:1")


def test_torch_entry_point_matches_reference():
    torch = pytest.importorskip("torch")
    import tvm_splat.torch as tst

    q, k, v = (torch.randn(2, 2, 21, 8) for _ in range(3))
    out = tst.sparse_attention(q, k, v, "global:1+window:3")
    ref = masked_attention(q.numpy(), k.numpy(), v.numpy(), parse_pattern("global:1+window:3").dense_mask(21))
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-4)


def test_unknown_variant_is_rejected(rng):
    q = rng.standard_normal((1, 1, 8, 4)).astype("float32")
    with pytest.raises(ValueError, match="unknown kernel variant 'flash'"):
        sparse_attention(q, q, q, "window:1", variant="flash")


def test_torch_fast_path_reuses_the_launch_and_still_checks(rng):
    torch = pytest.importorskip("torch")
    from tvm_splat import attention as att

    q, k, v = (torch.randn(1, 2, 19, 8) for _ in range(3))
    pattern = parse_pattern("window:2")
    ref = masked_attention(q.numpy(), k.numpy(), v.numpy(), pattern.dense_mask(19))
    att._FAST_PATHS.clear()
    first = sparse_attention(q, k, v, pattern)
    assert len(att._FAST_PATHS) == 1  # registered by the first call
    runner = next(iter(att._FAST_PATHS.values()))
    calls = []
    launch = runner.launch
    runner.launch = lambda *a: (calls.append(1), launch(*a))
    second = sparse_attention(q, k, v, pattern)
    assert calls == [1]  # served by the fast path
    for out in (first, second):
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-4)
    # another mask object of the same shape must not hit this runner
    other = parse_pattern("window:5")
    ref5 = masked_attention(q.numpy(), k.numpy(), v.numpy(), other.dense_mask(19))
    np.testing.assert_allclose(sparse_attention(q, k, v, other).numpy(), ref5, atol=1e-4)
    assert calls == [1]
    # non-contiguous inputs and bad shapes leave the fast path (and get the full checks)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)
    np.testing.assert_allclose(sparse_attention(qt, k, v, pattern).numpy(), ref, atol=1e-4)
    assert calls == [1]
    with pytest.raises(ValueError, match="same shape"):
        sparse_attention(q, k, v[:, :, :8], pattern)
    with pytest.raises(ValueError, match="same dtype"):
        sparse_attention(q, k, v.double(), pattern)


def test_untuned_knobs_pick_stages_by_grid_size():
    """Without tuning records the fused path takes one K/V stage for small grids and two for
    large ones (the threshold is measured, see ``TWO_STAGE_MIN_TILES``); tensor cores only for
    fp16 on the GPU."""
    import tvm

    from tvm_splat.attention import TWO_STAGE_MIN_TILES, _fused_knobs, default_tiled_knobs
    from tvm_splat.kernels.spec import AttentionSpec

    h100 = tvm.target.Target("nvidia/nvidia-h100")
    acsr = ACSR.from_pattern(Window(256), 4096)
    small = AttentionSpec.from_acsr(acsr, 1, 12, 64, "float16")     # 12 * 64 row tiles of 64
    large = AttentionSpec.from_acsr(acsr, 8, 12, 64, "float16")     # 8 * 12 * 64
    assert 12 * 64 < TWO_STAGE_MIN_TILES <= 8 * 12 * 64
    assert default_tiled_knobs("float16", h100, small).stages == 1
    assert default_tiled_knobs("float16", h100, large).stages == 2
    assert default_tiled_knobs("float16", h100, large).use_tensor_cores
    assert not default_tiled_knobs("float32", h100, large).use_tensor_cores
    assert not default_tiled_knobs("float16", "llvm", large).use_tensor_cores
    # the fused path without a record uses them (the tuning logs hold nothing for n=4096, b=3)
    knobs = _fused_knobs(acsr, 3, 12, 64, "float16", h100, None)
    assert knobs == default_tiled_knobs("float16", h100, AttentionSpec.from_acsr(acsr, 3, 12, 64, "float16"))
    assert knobs.stages == 2  # 3 * 12 * 64 = 2304 tiles
