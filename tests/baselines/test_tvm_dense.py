"""TVM's dense attention baseline: correct, and tunable with MetaSchedule."""
import numpy as np
import pytest
import tvm

from tvm_splat.baselines import compile_dense_attention
from tvm_splat.baselines.tvm_dense import dense_log_dir, tune_dense_attention
from tvm_splat.reference import masked_attention


def _inputs(rng, shape=(1, 2, 12, 8)):
    return [rng.standard_normal(shape).astype("float32") for _ in range(3)]


def test_dense_baseline_matches_reference_with_mask(rng):
    q, k, v = _inputs(rng)
    mask = np.tril(np.ones((12, 12), bool))
    bias = np.broadcast_to(np.where(mask, 0, -1e9).astype("float32"), (1, 2, 12, 12)).copy()
    vm, dev = compile_dense_attention(1, 2, 12, 8, "float32", "llvm", with_mask=True)
    out = vm["main"](*[tvm.runtime.tensor(x, dev) for x in (q, k, v, bias)]).numpy()
    np.testing.assert_allclose(out, masked_attention(q, k, v, mask), atol=1e-5)


def test_tuned_dense_baseline(tmp_path, monkeypatch, rng):
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tuning record"):
        compile_dense_attention(1, 2, 12, 8, "float32", "llvm", tuned=True)
    path = tune_dense_attention(1, 2, 12, 8, "float32", "llvm", trials=6)
    assert path == dense_log_dir(1, 2, 12, 8, "float32", "llvm")
    assert (path / "database_tuning_record.json").read_text().strip()
    vm, dev = compile_dense_attention(1, 2, 12, 8, "float32", "llvm", tuned=True)
    q, k, v = _inputs(rng)
    out = vm["main"](*[tvm.runtime.tensor(x, dev) for x in (q, k, v)]).numpy()
    np.testing.assert_allclose(out, masked_attention(q, k, v, np.ones((12, 12), bool)), atol=1e-5)
