"""``benchmarks/sequence_parallel.py --tiny`` runs on the CPU with gloo and writes its JSON and PNG."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sequence_parallel.py"


def test_tiny_run_writes_json_and_png(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--world", "2", "--seq", "128", "--repeats", "1",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "cpux2_sequence_parallel.json").read_text())
    assert (tmp_path / "cpux2_sequence_parallel.png").stat().st_size > 0
    assert report["meta"]["world"] == 2 and report["meta"]["backend"] == "gloo"
    assert [(c["n"], c["pattern"]) for c in report["cases"]] == [(128, "causal_window:32"), (128, "window:16")]
    for case in report["cases"]:
        ours, gathered, single = (case["results"][k] for k in ("ours", "allgather", "single"))
        assert ours["ms"] > 0 and gathered["ms"] > 0 and single["ms"] > 0
        assert case["max_abs_diff_vs_allgather"] <= 1e-5 and case["max_abs_diff_vs_single_rank0"] <= 1e-5
        # 64-row shards: the causal window's halo is 32 rows of k and v, the window's 16, both from one side
        reach = 32 if case["pattern"].startswith("causal") else 16
        row_bytes = 2 * case["kv_heads"] * case["head_dim"] * 4
        assert ours["bytes_in_per_rank"] == reach * row_bytes
        assert gathered["bytes_in_per_rank"] == 64 * row_bytes
        assert "context_parallel" in case["results"]  # timed, or the reason it could not run here
