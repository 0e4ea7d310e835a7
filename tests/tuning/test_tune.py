"""A tiny MetaSchedule tuning run on the CPU: database written, best record applied, correct."""
import json
import logging

import numpy as np
import pytest

from tvm_splat.formats import ACSR, GlobalTokens, Window
from tvm_splat.kernels import AttentionSpec, fused_func
from tvm_splat.reference import masked_attention
from tvm_splat.tuning import apply_best, tune_attention, workload_dir


@pytest.fixture
def log_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    return tmp_path


def test_tuning_writes_database_and_recompile_uses_it(log_root, rng, caplog):
    import tvm_splat.compile as compile_mod
    from tvm_splat import sparse_attention

    acsr = ACSR.from_pattern(GlobalTokens(2) | Window(3), 40)
    res = tune_attention(acsr, 1, 2, 8, "float32", "llvm", trials=8, variant="row")
    path = workload_dir("fused", AttentionSpec.from_acsr(acsr, 1, 2, 8, "float32"), "llvm")
    assert res.dirs["fused"] == str(path)
    assert res.best_us["fused"] > 0
    records = (path / "database_tuning_record.json").read_text().splitlines()
    assert len(records) == 1  # pruned to the best record
    assert json.loads(records[0])[1][1]  # it carries run times

    spec = AttentionSpec.from_acsr(acsr, 1, 2, 8, "float32")
    with caplog.at_level(logging.INFO, logger="tvm_splat.tuning"):
        tuned = apply_best("fused", fused_func(spec), spec, "llvm")
    assert tuned is not None
    assert "applying tuned schedule" in caplog.text
    # the tuned schedule splits the fused row loop by the sampled factor
    assert "parallel" in tuned.script()

    compile_mod._MEMORY_CACHE.clear()
    q, k, v = (rng.standard_normal((1, 2, 40, 8)).astype("float32") for _ in range(3))
    out = sparse_attention(q, k, v, acsr, target="llvm", variant="row")
    np.testing.assert_allclose(out, masked_attention(q, k, v, acsr.to_dense()[0]), atol=1e-4)

    # resumable: a second run continues from the database instead of starting over
    res2 = tune_attention(acsr, 1, 2, 8, "float32", "llvm", trials=2, variant="row")
    assert res2.best_us["fused"] <= res.best_us["fused"] * 1.5


def test_missing_record_falls_back_and_says_so_once(log_root, caplog):
    acsr = ACSR.from_pattern(Window(2), 16)
    spec = AttentionSpec.from_acsr(acsr, 1, 1, 4, "float32")
    with caplog.at_level(logging.INFO, logger="tvm_splat.tuning"):
        assert apply_best("fused", fused_func(spec), spec, "llvm") is None
        assert apply_best("fused", fused_func(spec), spec, "llvm") is None
    assert caplog.text.count("no tuning record") == 1
