"""benchmarks/e2e_models.py at its --tiny size on the CPU: both models go through torch.export,
SparsifyAttention and tvm.compile, and every implementation's output matches PyTorch eager."""
import json

import pytest

pytest.importorskip("torch")
SCRIPT = "benchmarks/e2e_models.py"


def test_tiny_run_matches_pytorch_and_writes_json(tmp_path, repo_script):
    out = tmp_path / "e2e.json"
    script = repo_script(SCRIPT)
    script.main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["meta"]["tiny"] and {c["model"] for c in result["cases"]} == {"mistral", "longformer"}
    for case in result["cases"]:
        impls = case["impls"]
        assert impls["torch_sdpa"]["throughput_ms"] > 0 and impls["torch_sdpa"]["latency_ms"] > 0
        sites = impls["tvm_splat"]["sites"]
        assert len(sites) == case["config"]["layers"] and all(s["rewritten"] for s in sites)
        for impl in ("tvm_splat", "tvm_dense"):
            assert impls[impl]["max_err_over_max_ref"] < 1e-5, (impl, impls[impl])
            assert impls[impl]["throughput_ms"] > 0 and impls[impl]["compile_s"] > 0
        flex = impls["torch_flex"]  # compiled FlexAttention needs inductor's CPU backend
        assert flex.get("max_err_over_max_ref", 0) < 1e-5 and ("throughput_ms" in flex or "failed" in flex
                                                               or "refused" in flex)
    # --resume keeps finished cases and runs nothing again
    again = script.main(["--tiny", "--out", str(out), "--resume"])
    assert again["cases"] == result["cases"]


def test_mistral_window_is_the_last_4096_keys(repo_script):
    config = repo_script(SCRIPT).MODELS["mistral"]
    mask = config.pattern().dense_mask(5000)
    assert mask[4999].sum() == 4096 and mask[4999, 4999] and not mask[4999, 903] and mask[4999, 904]
    assert not mask[10, 11]  # causal
