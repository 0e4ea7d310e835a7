"""TVM's dense attention baseline: correct, and tunable with MetaSchedule."""
import io
import json
import re

import numpy as np
import pytest
import tvm
from rich.console import Console

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
    """Tuning writes a record for every PrimFunc that compile_relax will look up, and the
    tuned module stays correct."""
    from tvm_splat.baselines.tvm_dense import dense_attention_module, fused_module
    from tvm_splat.records import open_database

    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tuning record"):
        compile_dense_attention(1, 2, 12, 8, "float32", "llvm", with_mask=True, tuned=True)
    out = io.StringIO()
    path = tune_dense_attention(1, 2, 12, 8, "float32", "llvm", trials=8, with_mask=True,
                                console=Console(file=out, width=200))
    assert path == dense_log_dir(1, 2, 12, 8, "float32", "llvm", with_mask=True)
    db = open_database(path)
    fused = fused_module(dense_attention_module(1, 2, 12, 8, "float32", with_mask=True, decomposed=True))
    funcs = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) >= 2
    for func in funcs:
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        assert db.query_tuning_record(mod, tvm.target.Target("llvm"), "main") is not None
    summary = json.loads((path / "tuned.json").read_text())
    assert summary["trials"] == 8 and len(summary["tasks_us"]) == len(funcs)
    assert all(us > 0 for us in summary["tasks_us"].values())
    # the progress bar ends on the sum of the tasks' best latencies (rounded to 0.1 us there)
    shown = float(re.search(r"best ([0-9.]+) us", out.getvalue()).group(1))
    assert shown == pytest.approx(sum(summary["tasks_us"].values()), abs=0.1 * len(funcs))
    vm, dev = compile_dense_attention(1, 2, 12, 8, "float32", "llvm", with_mask=True, tuned=True)
    q, k, v = _inputs(rng)
    mask = np.tril(np.ones((12, 12), bool))
    bias = np.broadcast_to(np.where(mask, 0, -1e9).astype("float32"), (1, 2, 12, 12)).copy()
    out = vm["main"](*[tvm.runtime.tensor(x, dev) for x in (q, k, v, bias)]).numpy()
    np.testing.assert_allclose(out, masked_attention(q, k, v, mask), atol=1e-5)


def test_decomposed_dense_attention_tunes_for_the_h100():
    """The module MetaSchedule tunes for the GPU: TVM's default CUDA space samples candidates
    for its matmul (tensor cores) and they build with nvcc (no GPU needed)."""
    from tvm.s_tir import meta_schedule as ms

    from tvm.s_tir import tensor_intrin  # noqa: F401  the tensor-core rules name these
    from tvm_splat.baselines.tvm_dense import dense_attention_module, fused_module

    h100 = tvm.target.Target("nvidia/nvidia-h100")
    mod = fused_module(dense_attention_module(1, 2, 256, 64, "float16", with_mask=True, decomposed=True))
    tasks = ms.relax_integration.extract_tasks(mod, h100)
    task = next(t for t in tasks if t.task_name.startswith("matmul") or "_matmul" in t.task_name)
    ctx = ms.TuneContext(mod=task.dispatched[0], target=h100, space_generator="post-order-apply",
                         search_strategy=ms.search_strategy.EvolutionarySearch(
                             population_size=32, init_min_unmeasured=4, genetic_num_iters=1),
                         task_name=task.task_name)
    spaces = ctx.generate_design_space()
    ctx.search_strategy.pre_tuning(max_trials=4, num_trials_per_iter=4, design_spaces=spaces,
                                   database=ms.database.MemoryDatabase(), cost_model=ms.cost_model.RandomModel())
    candidates = ctx.search_strategy.generate_measure_candidates()
    assert candidates
    for cand in candidates:
        tvm.tirx.build(cand.sch.mod, target=h100)


def _committed_dense_logs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "tuning_logs" / "cuda-sm_90"
    return sorted(root.glob("tvm_dense_*_mask"))


@pytest.mark.parametrize("path", _committed_dense_logs(), ids=lambda p: p.name)
def test_committed_h100_dense_records_cover_their_workload(path):
    """Each committed H100 database (the bench's ``tvm_dense_tuned``) holds a record for every
    PrimFunc Relax fuses its shape into, and the tuned module generates CUDA."""
    from tvm.s_tir import meta_schedule as ms

    from tvm.s_tir import tensor_intrin  # noqa: F401  the tensor-core records name these
    from tvm_splat.baselines.tvm_dense import dense_attention_module, fused_module
    from tvm_splat.records import open_database

    b, h, n, d, dtype = re.fullmatch(r"tvm_dense_b(\d+)_h(\d+)_n(\d+)_d(\d+)_(\w+)_mask", path.name).groups()
    shape = (int(b), int(h), int(n), int(d), dtype)
    assert json.loads((path / "tuned.json").read_text())["trials"] > 0  # a finished run
    h100 = tvm.target.Target("nvidia/nvidia-h100")
    db = open_database(path)
    mod = dense_attention_module(*shape, with_mask=True, decomposed=True)
    funcs = [f for f in fused_module(mod).functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 4
    for func in funcs:
        key = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        assert db.query_tuning_record(key, h100, "main") is not None
    if shape[:3] == (8, 12, 1024):  # one shape built end to end is enough for the build check
        ex = ms.relax_integration.compile_relax(db, mod, h100, None)
        cuda = ex.mod.imports[0].imports[0].inspect_source()
        assert "wmma" in cuda  # the tuned matmuls run on tensor cores
