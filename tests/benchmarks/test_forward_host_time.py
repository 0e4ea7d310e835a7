"""benchmarks/forward_host_time.py on the CPU at a tiny shape: every row (the bench's
sparse_attention call, with a pattern string, plan.run, the launch alone, one allocation) is
timed and written, without a kernel column, and the profile names our Python's frames."""
import json

import pytest

pytest.importorskip("torch")
SCRIPT = "benchmarks/forward_host_time.py"


def test_tiny_cpu_run_writes_every_row_and_the_profile(tmp_path, repo_script):
    script = repo_script(SCRIPT)
    out = tmp_path / "host.json"
    script.main(str(out), "dilated:4:2", (1, 2, 64, 16), "float32", "cpu", profile=True)
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and "float32" in result["case"] and result["steps"]
    assert [r["call"] for r in result["runs"]] == ["sparse_attention", "sparse_attention (pattern string)",
                                                   "plan.run", "launch", "torch.empty"]
    for row in result["runs"]:
        assert row["host_us"] > 0 and row["throughput_us"] > 0 and row["kernel_us"] is None, row
    assert "attention.py" in result["profile"] and "planner.py" in result["profile"]
