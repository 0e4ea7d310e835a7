"""The command line: demo runs on the CPU and checks itself; bad arguments fail clearly."""
from types import SimpleNamespace

import pytest

from tvm_splat.cli import build_parser, main


def test_demo_runs_and_checks_results(capsys):
    assert main(["demo", "--seq", "64", "--heads", "2", "--head-dim", "16", "--repeats", "2",
                 "--pattern", "global:2+window:4"]) == 0
    out = capsys.readouterr().out
    assert "all outputs match dense attention" in out
    for row in ("tvm_splat row", "tvm_splat tiled", "tvm_splat separate", "tvm dense (masked)"):
        assert row in out
    assert "default kernel on llvm: separate" in out


def test_unknown_pattern_is_a_clean_error(capsys):
    assert main(["demo", "--pattern", "swirl:3", "--seq", "16"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_autotune_arguments_parse():
    args = build_parser().parse_args(["autotune", "--pattern", "window:256", "--seq", "4096", "--heads", "12",
                                      "--head-dim", "64", "--dtype", "float16", "--target",
                                      "nvidia/nvidia-h100", "--trials", "500"])
    assert (args.pattern, args.seq, args.trials, args.variant, args.dense) == ("window:256", 4096, 500, "tiled", False)


def test_bench_needs_a_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main(["bench", "--suite", "tiny"]) == 2


def test_autotune_suite_tunes_each_case_once(tmp_path, capsys):
    """``autotune --suite tiny`` on the CPU: the case gets a best.json; a second run skips it."""
    # one plan keeps the CPU run short
    argv = ["autotune", "--suite", "tiny", "--target", "llvm", "--log-dir", str(tmp_path), "--plans", "16x16"]
    assert main(argv) == 0
    best = list(tmp_path.glob("llvm/tiled_*/best.json"))
    assert len(best) == 1
    assert "tiled_16x16" in capsys.readouterr().out
    assert main(argv) == 0
    assert "already tuned, skipped" in capsys.readouterr().out


def test_autotune_suite_tunes_gqa_cases_as_gqa(tmp_path, monkeypatch):
    """A GQA case of a suite is tuned as itself: its workload has the case's key/value heads,
    so its record is the one the planner finds for the case (records are keyed by kv_heads)."""
    import tvm_splat.bench.suite as bench_suite
    import tvm_splat.tuning as tuning
    from tvm_splat.bench.suite import BenchCase
    from tvm_splat.planner import plan

    case = BenchCase("window:8", 64, 4, 16, 1, dtype="float32", kv_heads=2)
    seen = []

    def fake_tune(workload, **_):
        seen.append(workload)
        return SimpleNamespace(best_us={}, dirs={})

    monkeypatch.setattr(bench_suite, "suite", lambda name: [case])
    monkeypatch.setattr(tuning, "tune_tiled", fake_tune)
    assert main(["autotune", "--suite", "tiny", "--target", "llvm", "--log-dir", str(tmp_path)]) == 0
    expected = plan("window:8", (1, 4, 64, 16), (1, 2, 64, 16), "float32", None, target="llvm")
    assert [w.kv_shape for w in seen] == [(1, 2, 64, 16)] and seen[0].spec.key == expected.spec.key


def test_autotune_kv_heads_option(tmp_path, monkeypatch, capsys):
    """``--kv-heads`` reaches the tuned workload; one that does not divide ``--heads`` is refused
    with a message naming both."""
    import tvm_splat.tuning as tuning

    seen = []
    monkeypatch.setattr(tuning, "tune_tiled", lambda workload, **_: seen.append(workload) or SimpleNamespace(best_us={}, dirs={}))
    argv = ["autotune", "--pattern", "window:8", "--seq", "64", "--heads", "4", "--head-dim", "16",
            "--dtype", "float32", "--target", "llvm", "--log-dir", str(tmp_path)]
    assert main([*argv, "--kv-heads", "1"]) == 0
    assert seen[0].kv_shape == (1, 1, 64, 16) and seen[0].spec.kv_heads == 1
    assert main([*argv, "--kv-heads", "3"]) == 2
    assert "multiple of the number of key/value heads (3)" in capsys.readouterr().err


def test_autotune_plans_option(capsys):
    from tvm_splat.cli import build_parser

    assert build_parser().parse_args(["autotune", "--plans", "64x64,32X16"]).plans == ((64, 64), (32, 16))
    for bad in ("64", "64x", "0x64", "64x64x2"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["autotune", "--plans", bad])
        assert "plans must look like 64x64,32x32" in capsys.readouterr().err


def test_autotune_dense_suite_tunes_each_shape_once(tmp_path, monkeypatch, capsys):
    """``autotune --suite tiny --dense``: the orchestration only (the tuning itself is tested in
    tests/baselines): a shape is tuned until a run finishes, then skipped."""
    import tvm_splat.baselines.tvm_dense as td

    calls = []

    def fake_tune(b, h, n, d, dtype, target, *, trials, with_mask, root, console):
        calls.append((b, h, n, d, dtype))
        path = td.dense_log_dir(b, h, n, d, dtype, target, with_mask, root)
        path.mkdir(parents=True, exist_ok=True)
        (path / "database_tuning_record.json").write_text("")  # records, as a cut-short run leaves them
        if len(calls) > 1:
            (path / "tuned.json").write_text("{}")  # a finished run
        return path

    monkeypatch.setattr(td, "tune_dense_attention", fake_tune)
    argv = ["autotune", "--suite", "tiny", "--dense", "--target", "llvm", "--log-dir", str(tmp_path)]
    assert main(argv) == 0
    assert calls == [(1, 2, 128, 16, "float32")]
    assert main(argv) == 0  # records but no tuned.json: the first run was cut short, tune again
    assert len(calls) == 2
    assert main(argv) == 0
    assert len(calls) == 2 and "already tuned, skipped" in capsys.readouterr().out


def test_dense_fits():
    from tvm_splat.baselines.tvm_dense import dense_fits

    assert dense_fits(8, 12, 4096)  # 19 GB of scores, probabilities and bias
    assert not dense_fits(1, 16, 16384)  # 52 GB
