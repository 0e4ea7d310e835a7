"""The command line: demo runs on the CPU and checks itself; bad arguments fail clearly."""
import pytest

from tvm_splat.cli import build_parser, main


def test_demo_runs_and_checks_results(capsys):
    assert main(["demo", "--seq", "64", "--heads", "2", "--head-dim", "16", "--repeats", "2",
                 "--pattern", "global:2+window:4"]) == 0
    out = capsys.readouterr().out
    assert "all outputs match dense attention" in out
    for row in ("tvm_splat fused", "tvm_splat row", "tvm_splat separate", "tvm dense (masked)"):
        assert row in out


def test_unknown_pattern_is_a_clean_error(capsys):
    assert main(["demo", "--pattern", "swirl:3", "--seq", "16"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_autotune_arguments_parse():
    args = build_parser().parse_args(["autotune", "--pattern", "window:256", "--seq", "4096", "--heads", "12",
                                      "--head-dim", "64", "--dtype", "float16", "--target",
                                      "nvidia/nvidia-h100", "--trials", "500"])
    assert (args.pattern, args.seq, args.trials, args.variant, args.dense) == ("window:256", 4096, 500, "fused", False)


def test_bench_needs_a_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main(["bench", "--suite", "tiny"]) == 2


def test_autotune_suite_tunes_each_case_once(tmp_path, monkeypatch, capsys):
    """``autotune --suite tiny`` on the CPU: the case gets a best.json; a second run skips it."""
    import tvm_splat.tuning.tiled as tiled

    monkeypatch.setattr(tiled, "PLAN_CHOICES", ((16, 16),))  # one plan keeps the CPU run short
    argv = ["autotune", "--suite", "tiny", "--target", "llvm", "--log-dir", str(tmp_path)]
    assert main(argv) == 0
    best = list(tmp_path.glob("llvm/fused_*/best.json"))
    assert len(best) == 1
    assert "tiled_16x16" in capsys.readouterr().out
    assert main(argv) == 0
    assert "already tuned, skipped" in capsys.readouterr().out
