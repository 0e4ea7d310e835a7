"""One tuning record, picked up by every entry point through the same plan: ``sparse_attention``,
``SparsifyAttention``, the bench and ``tvm-splat autotune`` (issue 15).

The record is made by ``tvm-splat autotune`` itself (the tiled kernel's search on the CPU, one
plan), so the test also shows the tuner writing what the plan reads.
"""
import json

import numpy as np
import pytest

from tvm_splat import plan, sparse_attention
from tvm_splat.formats import Window
from tvm_splat.records import best_knobs_path

torch = pytest.importorskip("torch")

SHAPE = (1, 2, 48, 8)  # the autotune arguments below: --seq 48 --heads 2 --head-dim 8 --batch 1


@pytest.fixture(scope="module")
def tuned_root(tmp_path_factory):
    """``tvm-splat autotune`` of ``window:3`` at SHAPE for llvm into a fresh log root (where
    plans look, ``$TVM_SPLAT_TUNING_LOGS``); returns (root, what autotune printed)."""
    import contextlib
    import io

    from tvm_splat.cli import main

    root = tmp_path_factory.mktemp("logs")
    mp = pytest.MonkeyPatch()
    mp.setenv("TVM_SPLAT_TUNING_LOGS", str(root))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert main(["autotune", "--pattern", "window:3", "--seq", "48", "--heads", "2", "--head-dim", "8",
                         "--batch", "1", "--dtype", "float32", "--target", "llvm", "--plans", "16x16"]) == 0
    finally:
        mp.undo()
    return root, printed.getvalue()


@pytest.fixture
def logs(tuned_root, monkeypatch):
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tuned_root[0]))
    workload = plan(Window(3), SHAPE, None, "float32", None, target="llvm", variant="tiled")
    return json.loads(best_knobs_path(workload.spec, "llvm").read_text())["knobs"]


def test_autotune_plans_through_the_record_it_wrote(logs, tuned_root):
    assert (logs["br"], logs["bc"]) == (16, 16)
    printed = tuned_root[1]
    assert "plan after tuning: tiled, knobs from tuned" in printed
    assert "tuned kernel run once: max |error| vs float64 reference" in printed


def test_sparse_attention_uses_the_record(logs):
    from tvm_splat.attention import clear_plans, plan_for
    from tvm_splat.reference import masked_attention

    clear_plans()
    q, k, v = (np.random.default_rng(i).standard_normal(SHAPE).astype("float32") for i in range(3))
    out = sparse_attention(q, k, v, Window(3), variant="tiled")
    used = plan_for(q, k, v, Window(3), variant="tiled")
    assert used.knobs_source == "tuned" and (used.knobs.br, used.knobs.bc) == (16, 16)
    np.testing.assert_allclose(out, masked_attention(q, k, v, Window(3).dense_mask(48)), atol=1e-4)


def test_sparsify_attention_uses_the_record(logs):
    import torch.nn.functional as F
    from tvm.relax.frontend.torch import from_exported_program

    from tvm_splat.relay_passes import SparsifyAttention

    class SDPA(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    args = tuple(torch.randn(*SHAPE) for _ in range(3))
    sparsify = SparsifyAttention(Window(3), target="llvm", variant="tiled")
    new = sparsify(from_exported_program(torch.export.export(SDPA().eval(), args)))
    (_, used), = sparsify.workloads
    assert used.knobs_source == "tuned" and (used.knobs.br, used.knobs.bc) == (16, 16)
    assert any("br16_bc16" in gv.name_hint for gv in new.functions)


def test_bench_reports_the_record(logs, monkeypatch):
    """The bench's default column runs (and reports) the record. On the CPU the default kernel
    is the row kernel, so the test makes the tiled kernel the CPU default, as it is on the GPU."""
    import tvm_splat.planner as P
    from tvm_splat.attention import clear_plans
    from tvm_splat.bench import run as R
    from tvm_splat.bench.suite import BenchCase

    class Quiet:
        def print(self, *args, **kwargs):
            pass

    monkeypatch.setattr(P, "CPU_VARIANT", "tiled")
    clear_plans()
    case = BenchCase("window:3", 48, 2, 8, 1, "float32")
    opts = R.RunOptions(device="cpu", max_repeats=3, impl_seconds=0.05)
    res = R.run_case(case, ["splat_fused_untuned", "splat_fused"], opts, Quiet())["results"]
    assert res["splat_fused"]["knobs"]["variant"] == "tiled" and res["splat_fused"]["knobs"]["tuned"] is True
    assert (res["splat_fused"]["knobs"]["br"], res["splat_fused"]["knobs"]["bc"]) == (16, 16)
    assert res["splat_fused"]["correct"] and res["splat_fused_untuned"]["correct"]
