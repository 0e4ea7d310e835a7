"""The bench runner: bookkeeping (summaries, budgets, resuming) with made-up times, and real
CPU runs of tiny cases through every non-Flex implementation (Flex: tests/bench/test_flex.py)."""
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tvm_splat.bench import run as R
from tvm_splat.bench.suite import BenchCase

torch = pytest.importorskip("torch")


def _fake_case(case, impls, opts, console):
    # ours twice as fast as every baseline back to back, 1.5x per call, 3x in the kernels
    res = {}
    for name in impls:
        mine = name in R.OURS
        res[name] = {"ms": 1.0 if mine else 1.5, "throughput_ms": 1.0 if mine else 2.0,
                     "kernel_ms": 1.0 if mine else 3.0, "correct": True}
    row = {"case": case.as_dict(), "name": case.name, "density": 0.1, "results": res}
    R.add_speedups(row)
    return row


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    monkeypatch.setattr(R, "run_case", _fake_case)
    monkeypatch.setattr("tvm_splat.bench.plot.plot_speedups", lambda rows, path: path.write_bytes(b"png"))


def _args(tmp_path, **kw):
    base = dict(suite="quick", pattern=None, impl=["sdpa_dense", "tvm_dense", "splat_fused"], out=str(tmp_path),
                prefix="t", device="cuda", repeats=1, impl_seconds=0.1, peak_tflops=989.0, bandwidth_tbs=3.35,
                time_budget=float("inf"), resume=False)
    base.update(kw)
    return SimpleNamespace(**base)


def test_summary_and_resume(tmp_path, fake_gpu):
    R.run_bench(_args(tmp_path, time_budget=-1))  # budget already spent: nothing runs
    first = json.loads((tmp_path / "t_quick.json").read_text())
    assert first["cases"] == [] and len(first["meta"]["cases_not_run"]) == 13
    R.run_bench(_args(tmp_path, pattern=["window:128"], resume=True))
    assert len(json.loads((tmp_path / "t_quick.json").read_text())["cases"]) == 1
    R.run_bench(_args(tmp_path, resume=True))
    data = json.loads((tmp_path / "t_quick.json").read_text())
    assert len(data["cases"]) == 13
    assert len({c["name"] for c in data["cases"]}) == 13
    over_dense = data["summary"]["splat_fused"]["sdpa_dense"]
    assert over_dense["geomean_throughput_speedup"] == pytest.approx(2.0)
    assert over_dense["min_throughput_speedup"] == pytest.approx(2.0)
    assert over_dense["geomean_latency_speedup"] == pytest.approx(1.5)
    assert over_dense["min_latency_speedup"] == pytest.approx(1.5)
    assert over_dense["geomean_kernel_speedup"] == pytest.approx(3.0)
    assert over_dense["throughput_cases"] == over_dense["latency_cases"] == over_dense["kernel_cases"] == 13
    assert data["summary_by_dtype"]["float16"]["splat_fused"]["tvm_dense"]["throughput_cases"] == 13
    assert (tmp_path / "t_quick.png").read_bytes() == b"png"


def test_speedups_leave_out_wrong_and_missing_results():
    row = {"results": {
        "splat_fused": {"ms": 1.0, "throughput_ms": 1.0, "kernel_ms": None, "correct": True},
        "flex": {"ms": 3.0, "throughput_ms": 4.0, "kernel_ms": 2.0, "correct": True},
        "sdpa_masked": {"ms": 9.0, "throughput_ms": 9.0, "correct": False},  # wrong: no speedup over it
        "sdpa_dense": {"ms": 2.0, "throughput_ms": 2.0, "correct": None},  # a different function, timed
        "tvm_dense": {"skipped": "does not fit"},
    }}
    R.add_speedups(row)
    ours = row["results"]["splat_fused"]
    assert ours["throughput_speedup"] == {"flex": 4.0, "sdpa_dense": 2.0}
    assert ours["latency_speedup"] == {"flex": 3.0, "sdpa_dense": 2.0}
    assert "kernel_speedup" not in ours  # ours has no kernel time (CPU)
    summary = R.summarise([row, row])
    assert summary["splat_fused"]["flex"]["throughput_cases"] == 2
    assert "sdpa_masked" not in summary["splat_fused"]


def test_geomean_ignores_missing_values():
    from tvm_splat.bench.baselines import geomean

    assert geomean([2.0, 8.0, None]) == pytest.approx(4.0)


# ---- real runs on the CPU ------------------------------------------------------------
CPU = R.RunOptions(device="cpu", max_repeats=3, impl_seconds=0.05)
CPU_IMPLS = ["sdpa_dense", "sdpa_masked", "tvm_dense", "splat_fused_untuned", "splat_fused"]


class _Quiet:
    def print(self, *args, **kwargs):
        pass


def test_run_case_on_cpu_times_and_checks_every_implementation():
    case = BenchCase("global:2+window:5", 67, 2, 16, 2, "float32")
    row = R.run_case(case, CPU_IMPLS, CPU, _Quiet())
    assert row["name"] == case.name and row["causal"] is False
    assert row["density"] == pytest.approx(row["nnz_per_head"] / 67**2)
    for name in CPU_IMPLS:
        res = row["results"][name]
        assert {"ms", "throughput_ms", "tflops", "first_call_s", "setup_s", "max_abs_err"} <= res.keys(), (name, res)
        assert res["kernel_ms"] is None  # no CUPTI on the CPU
        assert res["ms"] > 0 and res["throughput_ms"] > 0 and res["first_call_s"] > 0
        expected_tflops = 4 * 2 * 2 * row["nnz_per_head"] * 16 / (res["throughput_ms"] * 1e-3) / 1e12
        assert res["tflops"] == pytest.approx(expected_tflops)
        assert res["correct"] is (None if name == "sdpa_dense" else True), (name, res["max_abs_err"])
    assert row["results"]["sdpa_dense"]["max_abs_err"] > 1e-2  # dense SDPA ignores the mask
    assert row["results"]["splat_fused"]["knobs"]["tuned"] is False
    assert set(row["results"]["splat_fused"]["throughput_speedup"]) == set(CPU_IMPLS) - {"splat_fused"}


def test_causal_case_gives_dense_sdpa_is_causal():
    """A causal window as wide as n is plain causal attention, so dense SDPA, run with
    is_causal=True for causal masks, matches the masked reference."""
    case = BenchCase("causal_window:40", 40, 2, 16, 1, "float32")
    row = R.run_case(case, ["sdpa_dense"], CPU, _Quiet())
    assert row["causal"] is True
    assert row["results"]["sdpa_dense"]["max_abs_err"] < 1e-5


def test_gqa_and_bf16_record_ours_as_unsupported_and_run_the_baselines():
    """k/v keep their 2 KV heads and bf16: no repeat, no upcast for ours. A kernel lacking either
    must read "unsupported" (a message), not an error or a silent conversion; ours take both now
    and are judged like everyone else."""
    case = BenchCase("window:4", 33, 4, 16, 1, "bfloat16", kv_heads=2)
    row = R.run_case(case, ["sdpa_dense", "sdpa_masked", "splat_fused"], CPU, _Quiet())
    res = row["results"]
    assert res["sdpa_masked"]["correct"] is True  # SDPA with enable_gqa, bf16 tolerance
    ours = res["splat_fused"]
    if "unsupported" in ours:
        assert "error" not in ours and "ms" not in ours
        assert ours["unsupported"].split(":")[0] in ("ValueError", "NotImplementedError", "TypeError")
    else:  # the kernels learnt bf16 and GQA: then they are judged like everyone else
        assert ours["correct"] is True


def test_a_genuine_failure_of_ours_is_an_error_not_unsupported(monkeypatch):
    def broken(inputs):
        raise ValueError("a bug")

    monkeypatch.setitem(R.IMPLEMENTATIONS, "splat_fused", broken)
    case = BenchCase("window:4", 33, 2, 16, 1, "float32")
    res = R.run_case(case, ["splat_fused"], CPU, _Quiet())["results"]["splat_fused"]
    assert res == {"error": "ValueError: a bug"}


def test_measure_calls_fn_as_planned():
    calls = []
    out, fields = R.measure(lambda: calls.append(1) or len(calls), R.RunOptions(device="cpu", max_repeats=4,
                                                                                impl_seconds=0.03))
    assert out == 1  # the first call's output is the one checked
    s = fields["samples"]
    assert R.MIN_REPEATS <= s["latency"] <= 4 and s["throughput_calls"] >= 1
    assert R.MIN_REPEATS <= s["throughput_windows"] <= R.THROUGHPUT_WINDOWS
    # first + estimate (the warm-up), latency samples, throughput windows x calls
    assert len(calls) == 2 + s["latency"] + s["throughput_windows"] * s["throughput_calls"]


def test_plot_writes_a_png(tmp_path):
    rows = []
    for i, dtype in enumerate(("float16", "bfloat16", "float16")):
        res = {"splat_fused": {"throughput_speedup": {"flex": 0.5 + i, "sdpa_dense": 3.0}},
               "splat_fused_untuned": {"throughput_speedup": {"flex": 0.4 + i}}}
        if i == 1:
            res = {"splat_fused": {"unsupported": "ValueError: bf16"}, "flex": {"throughput_ms": 1.0}}
        rows.append({"name": f"case {i}", "case": {"dtype": dtype}, "results": res})
    from tvm_splat.bench.plot import plot_speedups

    plot_speedups(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cold_compile_caches(monkeypatch, tmp_path):
    from tvm_splat import attention as A
    from tvm_splat import compile as C
    from tvm_splat.bench.baselines import CACHE_DIR_VARIABLE, cold_compile_caches

    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setitem(C._LIBRARIES, "stale", object())
    monkeypatch.setitem(A._PLANS, ("stale",), object())
    with cold_compile_caches() as folder:
        assert C._LIBRARIES == {} and len(A._PLANS) == 0
        assert str(C.cache_dir()) == folder != str(tmp_path)
        assert list(C.cache_dir().iterdir()) == []
    assert C.cache_dir() == tmp_path


def test_tflops_counts_the_mask_nonzeros():
    from tvm_splat.bench.baselines import flops, min_bytes

    assert flops(2, 3, 10.0, 4) == 4 * 2 * 3 * 10 * 4
    assert min_bytes(1, 8, 2, 16, 4, 2) == (2 * 8 + 2 * 2) * 16 * 4 * 2  # GQA: k, v have 2 heads


def test_sustained_times_the_last_two_thirds_of_its_seconds():
    """``--sustained S``: after the three timings, about S seconds of calls back to back, a third
    untimed then one window over the rest (``sustained_ms``); off by default."""
    calls = []
    opts = R.RunOptions(device="cpu", max_repeats=4, impl_seconds=0.03, sustained_seconds=0.05)
    _, fields = R.measure(lambda: calls.append(1) or time.sleep(1e-3), opts)
    s = fields["samples"]
    planned = 2 + s["latency"] + s["throughput_windows"] * s["throughput_calls"]
    total = s["sustained_calls"]
    assert total == R._count(50.0 / fields["throughput_ms"], 3, 10**7)
    assert len(calls) == planned + total
    assert fields["sustained_ms"] >= 1.0  # each call sleeps 1 ms
    _, plain = R.measure(lambda: None, R.RunOptions(device="cpu", max_repeats=4, impl_seconds=0.03))
    assert "sustained_ms" not in plain and "sustained_calls" not in plain["samples"]


def test_sustained_speedups_and_summary_on_cpu():
    """A case run with ``sustained_seconds``: every implementation has ``sustained_ms`` and
    ``sustained_tflops``; ours get ``sustained_speedup`` over each baseline, and the summary its
    geomean, beside the other three timings."""
    case = BenchCase("window:3", 40, 1, 16, 1, "float32")
    impls = ["sdpa_masked", "splat_fused"]
    opts = R.RunOptions(device="cpu", max_repeats=3, impl_seconds=0.05, sustained_seconds=0.05)
    row = R.run_case(case, impls, opts, _Quiet())
    for name in impls:
        res = row["results"][name]
        assert res["sustained_ms"] > 0
        expected = 4 * row["nnz_per_head"] * 16 / (res["sustained_ms"] * 1e-3) / 1e12
        assert res["sustained_tflops"] == pytest.approx(expected)
    mine, base = row["results"]["splat_fused"], row["results"]["sdpa_masked"]
    assert mine["sustained_speedup"]["sdpa_masked"] == pytest.approx(base["sustained_ms"] / mine["sustained_ms"])
    summary = R.summarise([row])["splat_fused"]["sdpa_masked"]
    assert summary["sustained_cases"] == 1
    assert summary["geomean_sustained_speedup"] == pytest.approx(mine["sustained_speedup"]["sdpa_masked"])


def test_bench_suite_choices_include_models():
    import argparse

    p = argparse.ArgumentParser()
    R.add_bench_args(p)
    args = p.parse_args(["--suite", "models", "--device", "cpu"])
    assert (args.suite, args.device, args.impl, args.sustained) == ("models", "cpu", None, 0.0)
    assert p.parse_args(["--sustained", "3"]).sustained == 3.0
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="number of seconds >= 0"):
            R._seconds(bad)
    assert np.isfinite(args.impl_seconds)
