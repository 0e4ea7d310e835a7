"""The digits split the pruning benchmark uses: fixed, stratified, standardised on train only."""
import pytest
import torch

from tvm_splat.pruning.data import load_digits_split

pytest.importorskip("sklearn")


def test_digits_split_is_fixed_and_standardised_on_train():
    x, y, xt, yt = load_digits_split("flat")
    assert x.shape == (1437, 64) and xt.shape == (360, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(torch.bincount(yt), torch.bincount(load_digits_split("flat")[3]))  # same split every call
    assert sorted(torch.bincount(yt).tolist())[0] >= 35  # stratified: every class ~36 of 360
    torch.testing.assert_close(x.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    constant = x.std(0) == 0  # pixels that are always 0 in train stay 0, not NaN
    assert constant.any() and torch.isfinite(xt).all()
    img, _, _, _ = load_digits_split("image")
    rows, _, _, _ = load_digits_split("rows")
    assert img.shape == (1437, 1, 8, 8) and rows.shape == (1437, 8, 8) and torch.equal(img.flatten(1), x)


def test_digits_layout_is_checked():
    with pytest.raises(ValueError, match="layout"):
        load_digits_split("nchw")
