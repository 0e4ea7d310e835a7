"""examples/train_longformer.py: our op and dense SDPA train the same model to the same losses
(a few CPU steps; the full curves are the example's own output)."""
import json

import pytest

torch = pytest.importorskip("torch")
EXAMPLE = "examples/train_longformer.py"


def test_both_attentions_give_the_same_loss_curve(tmp_path, repo_script):
    result = repo_script(EXAMPLE).main(["--steps", "6", "--seq-len", "24", "--batch", "4", "--window", "3",
                              "--out", str(tmp_path / "run")])
    a, b = result["losses"]["tvm_splat"], result["losses"]["sdpa"]
    assert len(a) == len(b) == 6 and a[0] == pytest.approx(b[0], abs=1e-5)
    assert result["max_loss_gap"] < 1e-4
    assert a[-1] < a[0]  # it learns
    assert json.loads((tmp_path / "run.json").read_text())["config"]["pattern"] == "global:1+window:3"
    assert (tmp_path / "run.png").stat().st_size > 0


def test_labels_need_the_global_token_and_the_window(repo_script):
    gen = torch.Generator().manual_seed(0)
    x, y = repo_script(EXAMPLE).make_batch(gen, 64, 10, 16, "cpu")
    lower = x[:, 0] < 8
    assert torch.equal(y[lower, 1:], x[lower, :-1]) and torch.equal(y[~lower, :-1], x[~lower, 1:])
    assert lower.any() and (~lower).any()
