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


def test_method_times_count_each_plan_method_and_restore_them(repo_script):
    """``method_us``: per call of the op's forward + backward, each timed method of the plan
    ran as often as the step runs it (forward and backward once each; _inputs once in each),
    its time within the step's, and the methods are the plan's own again afterwards."""
    script = repo_script(SCRIPT)
    import torch

    from tvm_splat.autograd import sparse_attention
    from tvm_splat.training import TrainingPlan

    before = {name: getattr(TrainingPlan, name) for name in script.PLAN_METHODS}
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    step = lambda: torch.autograd.grad(sparse_attention(q, k, v, "window:4"), (q, k, v), torch.ones(1, 2, 32, 16))  # noqa: E731
    methods = script.method_us(step, "cpu", calls=4)
    assert {name: m["calls"] for name, m in methods.items() if name in ("forward", "backward", "_inputs")} == \
        {"forward": 1, "backward": 1, "_inputs": 2}
    assert methods["_launch"]["calls"] == 3  # the row kernels: fwd_lse, bwd_dq, bwd_dkdv
    assert 0 < methods["_inputs"]["us"] < methods["backward"]["us"] + methods["forward"]["us"]
    assert {name: getattr(TrainingPlan, name) for name in script.PLAN_METHODS} == before
