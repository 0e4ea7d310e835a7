"""A tiny MetaSchedule tuning run on the CPU: database written, best record applied, correct."""
import io
import json
import logging

import numpy as np
import pytest

from tvm_splat.formats import ACSR, GlobalTokens, Window
from tvm_splat.kernels import AttentionSpec, row_func
from tvm_splat.planner import plan
from tvm_splat.records import apply_best, workload_dir
from tvm_splat.reference import masked_attention
from tvm_splat.tuning import tune_attention


@pytest.fixture
def log_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    return tmp_path


@pytest.fixture
def unnamed_meta_schedule_handler():
    """A handler without a name on MetaSchedule's logger, as pytest's log capture or a user
    attaches one; removed after the test."""
    from tvm_splat.tuning.tune import META_SCHEDULE_LOGGER

    logger = logging.getLogger(META_SCHEDULE_LOGGER)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    assert handler.get_name() is None
    logger.addHandler(handler)
    yield logger, handler, stream
    logger.removeHandler(handler)


def test_tuning_writes_database_and_recompile_uses_it(log_root, rng, caplog, unnamed_meta_schedule_handler):
    """Also: two tuning runs in one process with an unnamed handler on MetaSchedule's logger
    both succeed (MetaSchedule's dictConfig used to fail on its missing name) and the handler
    is attached and working afterwards."""
    import tvm_splat.compile as compile_mod
    from tvm_splat import sparse_attention

    ms_logger, handler, stream = unnamed_meta_schedule_handler
    acsr = ACSR.from_pattern(GlobalTokens(2) | Window(3), 40)
    workload = plan(acsr, (1, 2, 40, 8), None, "float32", None, target="llvm", variant="row")
    res = tune_attention(workload, trials=8, variant="row")
    path = workload_dir("row", AttentionSpec.from_acsr(acsr, 1, 2, 8, "float32"), "llvm")
    assert res.dirs["row"] == str(path)
    assert res.best_us["row"] > 0
    records = (path / "database_tuning_record.json").read_text().splitlines()
    assert len(records) == 1  # pruned to the best record
    assert json.loads(records[0])[1][1]  # it carries run times

    spec = AttentionSpec.from_acsr(acsr, 1, 2, 8, "float32")
    with caplog.at_level(logging.INFO, logger="tvm_splat.tuning"):
        tuned = apply_best("row", row_func(spec), spec, "llvm")
    assert tuned is not None
    assert "applying tuned schedule" in caplog.text
    # the tuned schedule splits the fused row loop by the sampled factor
    assert "parallel" in tuned.script()

    compile_mod.clear_memory_cache()
    q, k, v = (rng.standard_normal((1, 2, 40, 8)).astype("float32") for _ in range(3))
    out = sparse_attention(q, k, v, acsr, target="llvm", variant="row")
    np.testing.assert_allclose(out, masked_attention(q, k, v, acsr.to_dense()[0]), atol=1e-4)

    # resumable: a second run continues from the database instead of starting over
    res2 = tune_attention(workload, trials=2, variant="row")
    assert res2.best_us["row"] <= res.best_us["row"] * 1.5
    assert handler in ms_logger.handlers
    ms_logger.warning("a record after tuning")
    assert "a record after tuning" in stream.getvalue()


def test_missing_record_falls_back_and_says_so_once(log_root, caplog):
    acsr = ACSR.from_pattern(Window(2), 16)
    spec = AttentionSpec.from_acsr(acsr, 1, 1, 4, "float32")
    with caplog.at_level(logging.INFO, logger="tvm_splat.tuning"):
        assert apply_best("row", row_func(spec), spec, "llvm") is None
        assert apply_best("row", row_func(spec), spec, "llvm") is None
    assert caplog.text.count("no tuning record") == 1


def test_runner_arguments_are_made_once_per_task():
    """The runner's arguments: fixed tables as given, random values of the right dtype and
    shape elsewhere, the same tensors for the next candidate of the task, fresh ones for
    another task."""
    import tvm

    from tvm_splat.tuning.tune import alloc_arguments

    dev = tvm.cpu()
    table = np.arange(6, dtype="int32")
    info = (("TENSOR", "float16", [3, 5]), ("TENSOR", "int32", [6]), ("TENSOR", "float32", [2000, 700]))
    first = alloc_arguments(dev, info, 1, [None, table, None])
    assert len(first) == 1
    a, t, big = (x.numpy() for x in first[0])
    assert a.dtype == np.float16 and a.shape == (3, 5) and np.isfinite(a).all() and a.std() > 0.3
    np.testing.assert_array_equal(t, table)
    assert big.shape == (2000, 700) and abs(big.mean()) < 0.05 and 0.9 < big.std() < 1.1

    again = alloc_arguments(dev, info, 1, [None, table.copy(), None])
    assert all(x.same_as(y) for x, y in zip(again[0], first[0]))

    other = alloc_arguments(dev, info, 1, [None, table + 1, None])
    assert not other[0][0].same_as(first[0][0])
    np.testing.assert_array_equal(other[0][1].numpy(), table + 1)
