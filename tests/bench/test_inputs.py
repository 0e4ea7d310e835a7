"""Bench inputs: the device mask, causality from the ACSR tables, and the float64 reference."""
import numpy as np
import pytest

from tvm_splat.bench import inputs as I
from tvm_splat.bench.suite import BenchCase
from tvm_splat.formats import ACSR, GlobalTokens, PerHead, Strided, Window, parse_pattern
from tvm_splat.reference import masked_attention

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("pattern", ["global:3+window:5", "causal_strided:7:2", "block:6+dilated:3:2"])
def test_device_mask_is_the_pattern_mask(pattern, monkeypatch):
    monkeypatch.setattr(I, "MASK_ROWS_PER_STEP", 16)  # several row steps at n=67
    inputs = I.make_inputs(BenchCase(pattern, 67, 2, 8, 1, "float32"), "cpu")
    np.testing.assert_array_equal(inputs.mask.numpy(), parse_pattern(pattern).dense_mask(67))


def test_device_mask_per_head_and_without_pattern():
    pattern = PerHead((Window(2), Strided(5, causal=True), GlobalTokens([4])))
    inputs = I.make_inputs(BenchCase("window:1", 30, 3, 8, 1, "float32"), "cpu")
    inputs.pattern, inputs.acsr = pattern, ACSR.from_pattern(pattern, 30)
    np.testing.assert_array_equal(inputs.mask.numpy(), pattern.dense_mask(30))
    irregular = np.random.default_rng(0).random((30, 30)) < 0.2
    inputs = I.make_inputs(BenchCase("window:1", 30, 3, 8, 1, "float32"), "cpu")
    inputs.pattern, inputs.acsr = None, ACSR.from_mask(irregular)
    np.testing.assert_array_equal(inputs.mask.numpy(), irregular)


@pytest.mark.parametrize("pattern, causal", [
    ("causal_window:5", True), ("causal_strided:4:2", True), ("causal_dilated:3:2", True),
    ("causal_window:3+causal_strided:8", True), ("window:5", False), ("global:1+causal_window:3", False),
    ("block:4", False),
])
def test_is_causal(pattern, causal):
    acsr = ACSR.from_pattern(parse_pattern(pattern), 41)
    assert I.is_causal(acsr) is causal
    assert causal is bool(~np.triu(acsr.to_dense(), 1).any())


def test_is_causal_reads_csr_rows():
    lower = np.tril(np.random.default_rng(1).random((40, 40)) < 0.3)
    acsr = ACSR.from_mask(lower, max_segments=1)  # irregular rows go to the CSR fallback
    assert (acsr.seg_step == 0).any()
    assert I.is_causal(acsr) is True
    upper_hit = lower.copy()
    upper_hit[7, 30] = True
    assert I.is_causal(ACSR.from_mask(upper_hit, max_segments=1)) is False


@pytest.mark.parametrize("case", [
    BenchCase("global:2+window:4", 37, 4, 8, 2, "float32", kv_heads=2),   # GQA, 2 query heads per KV head
    BenchCase("causal_strided:5:1", 37, 3, 8, 1, "float16"),
])
def test_reference_matches_the_numpy_reference(case, monkeypatch):
    monkeypatch.setattr(I, "REFERENCE_STEP_BYTES", 2 * 8 * case.batch * case.heads * 37 * 5)  # 5-row steps
    inputs = I.make_inputs(case, "cpu")
    assert tuple(inputs.k.shape) == (case.batch, case.kv_heads, 37, 8) and inputs.gqa == (case.kv_heads != case.heads)
    group = case.heads // case.kv_heads
    k, v = (x.double().repeat_interleave(group, 1).numpy() for x in (inputs.k, inputs.v))
    expected = masked_attention(inputs.q.double().numpy(), k, v, inputs.mask.numpy())
    np.testing.assert_allclose(I.reference_output(inputs).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_reference_gives_zeros_for_rows_without_keys():
    inputs = I.make_inputs(BenchCase("window:1", 20, 1, 4, 1, "float32"), "cpu")
    only_rows = np.zeros((20, 20), dtype=bool)
    only_rows[5, 3] = only_rows[6, 6] = True
    inputs.pattern, inputs.acsr = None, ACSR.from_mask(only_rows)
    out = I.reference_output(inputs)
    assert torch.isfinite(out).all()
    assert out[0, 0, 5].equal(inputs.v[0, 0, 3].double()) and out[0, 0, :5].abs().max() == 0


def test_fresh_acsr_is_a_new_object_with_the_same_mask():
    inputs = I.make_inputs(BenchCase("window:3", 25, 1, 4, 1, "float32"), "cpu")
    fresh = inputs.fresh_acsr()
    assert fresh is not inputs.acsr
    np.testing.assert_array_equal(fresh.to_dense(), inputs.acsr.to_dense())
