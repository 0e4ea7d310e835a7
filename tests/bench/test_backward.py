"""``tvm-splat bench --backward`` on the CPU (the harness itself; the figures come from the GPU)."""
import json

import numpy as np
import pytest

from tvm_splat.bench import backward as BW
from tvm_splat.bench.inputs import CaseInputs, make_inputs
from tvm_splat.bench.suite import BenchCase
from tvm_splat.formats import ACSR
from tvm_splat.reference import masked_attention_grads

torch = pytest.importorskip("torch")


def test_tiny_suite_on_the_cpu(tmp_path):
    from tvm_splat.cli import main

    main(["bench", "--backward", "--suite", "tiny", "--device", "cpu", "--out", str(tmp_path), "--prefix", "cpu",
          "--impl", "sdpa_dense", "--impl", "splat_train", "--impl-seconds", "0.2"])
    data = json.loads((tmp_path / "cpu_tiny_backward.json").read_text())
    (case,) = data["cases"]
    ours = case["results"]["splat_train"]
    assert case["reference"] and case["reference_scope"] == "all" and ours["correct"] is True
    assert max(ours["grad_rel_err"].values()) < 1e-5  # float32 against float64
    assert ours["plan"].startswith("TrainingPlan(") and "kernels=rows" in ours["plan"]  # which kernels ran
    assert ours["backward_knobs"] == {}  # the row kernels have no tile knobs
    for direction in BW.DIRECTIONS:
        assert ours[direction]["throughput_ms"] > 0
        assert ours["speedup"][direction]["sdpa_dense"] == pytest.approx(
            case["results"]["sdpa_dense"][direction]["throughput_ms"] / ours[direction]["throughput_ms"])
    assert data["summary"]["forward_backward"]["sdpa_dense"]["cases"] == 1
    # the record says how it was made, also when main() is called with its arguments
    assert data["meta"]["command"] == (f"tvm-splat bench --backward --suite tiny --device cpu --out {tmp_path} --prefix cpu "
                                       "--impl sdpa_dense --impl splat_train --impl-seconds 0.2")
    assert (tmp_path / "cpu_tiny_backward.png").stat().st_size > 0
    main(["bench", "--backward", "--suite", "tiny", "--device", "cpu", "--out", str(tmp_path), "--prefix", "cpu",
          "--resume"])  # every case done: nothing runs, the earlier results stay
    again = json.loads((tmp_path / "cpu_tiny_backward.json").read_text())
    assert again["cases"] == data["cases"] and again["meta"]["resumed_from"] == data["meta"]["date"]


def test_sustained_is_refused_with_backward(tmp_path, capsys):
    """``--sustained`` times the forward bench only: with ``--backward`` it is refused before any
    case runs (exit status 2, the reason on stderr), not ignored."""
    from tvm_splat.cli import main

    out = tmp_path / "out"
    assert main(["bench", "--backward", "--suite", "tiny", "--device", "cpu", "--out", str(out),
                 "--sustained", "1"]) == 2
    assert "--sustained times the forward bench only" in capsys.readouterr().err
    assert not out.exists()


def test_reference_gradients_agree_with_the_numpy_reference():
    inputs = BW._leaves(make_inputs(BenchCase("global:2+causal_window:5", 40, 4, 8, 2, "float32", kv_heads=2), "cpu"))
    dout = torch.randn(inputs.q.shape)
    got = BW.reference_grads(inputs, dout)
    assert got.scope == "all" and got.select("anything") == "anything"
    want = masked_attention_grads(*(x.detach().numpy() for x in (inputs.q, inputs.k, inputs.v)),
                                  inputs.mask.numpy(), dout.numpy())
    for a, b in zip(got.grads, want):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pattern,heads,kv_heads", [
    ("global:2+causal_window:5", 4, 2),  # global columns gathered beside each chunk's window; GQA
    ("dilated:6:3", 3, 1),  # MQA: dK, dV of the one KV head sum over every query head
    ("window:0", 2, 2),  # one key per row
])
def test_past_the_memory_budget_a_sample_is_checked_exactly(monkeypatch, pattern, heads, kv_heads):
    """Where the whole float64 reference would not fit, batch 0 and KV head 0 with its query
    heads are computed in row chunks over the keys each chunk attends: the same numbers as
    the whole reference on that part (chunks of 7 rows, the last one short, n=45)."""
    inputs = BW._leaves(make_inputs(BenchCase(pattern, 45, heads, 8, 2, "float32", kv_heads=kv_heads), "cpu"))
    dout = torch.randn(inputs.q.shape)
    whole = BW.reference_grads(inputs, dout)
    monkeypatch.setattr(BW, "REFERENCE_BYTES", 4 * 8 * 2 * heads * 45 * 45 - 1)
    monkeypatch.setattr(BW, "SAMPLE_ROWS", 7)
    sample = BW.reference_grads(inputs, dout)
    group = heads // kv_heads
    assert sample.kv_head == 0 and sample.group == group
    assert sample.scope == f"batch 0, KV head 0 and its query heads 0..{group - 1}"
    assert [tuple(g.shape) for g in sample.grads] == [(group, 45, 8), (45, 8), (45, 8)]
    for a, b in zip(sample.grads, sample.select(whole.grads)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)
    # an implementation's gradients are cut the same way before they are compared
    errors = BW._relative_errors(sample.select([g.float() for g in whole.grads]), sample.grads)
    assert max(errors) < 1e-6


def test_a_sample_of_a_per_head_mask_uses_its_heads_masks(monkeypatch):
    from tvm_splat.formats import PerHead, Window

    case = BenchCase("window:1", 30, 2, 8, 1, "float32")
    inputs = BW._leaves(make_inputs(case, "cpu"))
    acsr = ACSR.from_pattern(PerHead((Window(1), Window(4, causal=True))), 30)
    inputs = CaseInputs(inputs.q, inputs.k, inputs.v, acsr, None)
    dout = torch.randn(inputs.q.shape)
    whole = BW.reference_grads(inputs, dout)
    monkeypatch.setattr(BW, "REFERENCE_BYTES", 0)
    monkeypatch.setattr(BW, "SAMPLE_ROWS", 4)
    sample = BW.sampled_reference_grads(inputs, dout, kv_head=1)
    assert sample.scope == "batch 0, KV head 1 and its query heads 1..1"
    for a, b in zip(sample.grads, sample.select(whole.grads)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)


def test_speedups_skip_a_direction_a_baseline_could_not_time():
    timed = lambda ms: {"throughput_ms": ms}  # noqa: E731
    row = {"results": {
        "splat_train": {d: timed(1.0) for d in BW.DIRECTIONS} | {"correct": True},
        "flex": {"forward": timed(2.0), "forward_backward": timed(6.0), "backward": {"error": "retain_graph"},
                 "correct": True},
        "sdpa_dense": {"forward": timed(0.5), "forward_backward": timed(1.5), "backward": timed(1.0)},
    }}
    BW.add_speedups(row)
    speedup = row["results"]["splat_train"]["speedup"]
    assert speedup["forward"] == {"sdpa_dense": 0.5, "flex": 2.0}
    assert speedup["backward"] == {"sdpa_dense": 1.0}
    summary = BW.summarise([row])
    assert summary["forward_backward"]["flex"] == {"geomean": 6.0, "min": 6.0, "cases": 1}


def test_a_refused_backward_is_derived_from_the_same_rows_timings():
    """Compiled Flex refuses a retained graph: its backward is forward_backward - forward (marked
    derived), so the backward direction still compares against it; old files are rederived."""
    import copy

    timed = lambda ms: {"throughput_ms": ms, "ms": ms + 0.5}  # noqa: E731
    flex = {"forward": timed(2.0), "forward_backward": timed(6.0)}
    derived = BW.derive_backward(flex, "RuntimeError: donated buffers")
    assert derived["throughput_ms"] == 4.0 and derived["ms"] == 4.0 and "kernel_ms" not in derived
    assert derived["derived"] == "forward_backward - forward" and "donated" in derived["direct_refused"]
    row = {"name": "c", "results": {
        "splat_train": {d: timed(1.0) for d in BW.DIRECTIONS} | {"correct": True},
        "flex": {**flex, "backward": {"error": "RuntimeError: donated buffers"}, "correct": True},
        "sdpa_dense": {d: timed(0.5) for d in BW.DIRECTIONS},
    }}
    BW.add_speedups(row)
    old = {"meta": {}, "summary": BW.summarise([row]), "cases": [row]}
    assert "flex" not in old["summary"]["backward"]
    new = BW.rederive(copy.deepcopy(old))
    assert new["meta"]["backward_derived"] == ["flex"]
    assert new["summary"]["backward"]["flex"] == {"geomean": 4.0, "min": 4.0, "cases": 1}
    assert new["cases"][0]["results"]["splat_train"]["speedup"]["backward"]["flex"] == 4.0
    assert new["summary"]["forward_backward"] == old["summary"]["forward_backward"]  # measured: untouched
