"""benchmarks/e2e_models.py at its --tiny size on the CPU: both models go through torch.export,
SparsifyAttention and tvm.compile, and every implementation's output matches PyTorch eager."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "e2e_models.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("e2e_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tiny_run_matches_pytorch_and_writes_json(tmp_path):
    out = tmp_path / "e2e.json"
    script = _load_script()
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


def test_mistral_window_is_the_last_4096_keys():
    config = _load_script().MODELS["mistral"]
    mask = config.pattern().dense_mask(5000)
    assert mask[4999].sum() == 4096 and mask[4999, 4999] and not mask[4999, 903] and mask[4999, 904]
    assert not mask[10, 11]  # causal
