"""benchmarks/training_host_time.py on the CPU at a tiny shape: every row (the plan's own
forward and backward, the op eager and compiled, autograd alone) is timed and written, with no
kernel column."""
import json

import pytest

pytest.importorskip("torch")
SCRIPT = "benchmarks/training_host_time.py"


def test_tiny_cpu_run_writes_every_row(tmp_path, repo_script):
    script = repo_script(SCRIPT)
    out = tmp_path / "host.json"
    script.main(str(out), "global:2+window:4", (1, 2, 32, 16), "cpu")
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and "float32" in result["case"] and "TrainingPlan" in result["plan"]
    assert [r["call"] for r in result["runs"]] == ["plan.forward", "plan.backward", "op forward", "op backward",
                                                   "op forward+backward", "compiled op forward+backward",
                                                   "autograd alone forward+backward"]
    for row in result["runs"]:
        assert row["host_us"] > 0 and row["throughput_us"] > 0 and row["kernel_us"] is None, row


def test_profile_of_the_compiled_row_names_the_custom_ops(repo_script):
    """``--profile CALL`` on the compiled row: cProfile's table and torch.profiler's, in which
    the compiled graph's calls of the two custom ops appear by name."""
    script = repo_script(SCRIPT)
    import torch

    from tvm_splat.autograd import register_mask, sparse_attention
    from tvm_splat.formats import parse_pattern

    handle = register_mask(parse_pattern("window:4"))
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, handle), fullgraph=True)
    text = script.profile_call(lambda: torch.autograd.grad(compiled(q, k, v), (q, k, v), torch.ones(1, 2, 32, 16)),
                               "cpu", calls=3)
    assert "function calls" in text and "Self CPU" in text
    assert "tvm_splat::sparse_attention" in text and "tvm_splat::sparse_attention_backward" in text
