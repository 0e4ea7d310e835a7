"""Datasets for the pruning example, tests and benchmark (nothing is downloaded).

* :func:`make_image_task` -- ``(x, y)``: ``x`` float32 ``(n, 3, size, size)``, ``y`` int64
  ``(n,)`` in ``[0, num_classes)``. Class ``k`` = a fixed random smooth template with a
  class-specific colour mix, placed at a random shift, plus Gaussian noise.
* :func:`make_token_task` -- ``(tokens, labels)``: int64 ``(n, seq_len)`` each; label at
  position ``t`` is ``(tok[t] + tok[t-1]) mod num_classes`` (``tok[-1] := 0``), so the
  model must attend to the previous position.
* :func:`load_digits_split` -- the sklearn digits set (ships inside scikit-learn), fixed
  1437/360 split, for the pruning benchmark.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["load_digits_split", "make_image_task", "make_token_task"]


def make_image_task(n: int, size: int = 16, num_classes: int = 4, noise: float = 0.6, seed: int = 0):
    if n <= 0 or size < 8 or num_classes < 2:
        raise ValueError(f"need n > 0, size >= 8, num_classes >= 2; got {n}, {size}, {num_classes}")
    g = torch.Generator().manual_seed(seed)
    # smooth templates: upsampled 4x4 random fields; fixed by a seed independent of ``seed``
    tg = torch.Generator().manual_seed(1234)
    base = torch.randn(num_classes, 1, 4, 4, generator=tg)
    templates = F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    colours = torch.rand(num_classes, 3, generator=tg) * 2 - 1
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = colours[y][:, :, None, None] * templates[y][:, None]
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), dims=(1, 2)) for xi, s in zip(x, shifts)])
    x = x / x.flatten(1).std(1).clamp_min(1e-6)[:, None, None, None]
    x = x + noise * torch.randn(x.shape, generator=g)
    return x.float(), y


def make_token_task(n: int, seq_len: int = 12, vocab: int = 16, num_classes: int = 4, seed: int = 0):
    if n <= 0 or seq_len < 2 or vocab < 2 or num_classes < 2:
        raise ValueError(f"need n > 0, seq_len >= 2, vocab >= 2, num_classes >= 2; got {n}, {seq_len}, {vocab}, {num_classes}")
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, vocab, (n, seq_len), generator=g)
    prev = torch.cat([torch.zeros(n, 1, dtype=tok.dtype), tok[:, :-1]], dim=1)
    return tok, (tok + prev) % num_classes


def load_digits_split(layout: str = "flat"):
    """The sklearn 8x8 digits set (shipped inside scikit-learn, nothing downloaded), fixed split.

    Returns ``(x_train, y_train, x_test, y_test)``: 1437 train / 360 test samples, stratified
    by class with ``random_state=0``; ``x`` float32 standardised per pixel with the *train*
    mean/std (constant pixels get std 1), ``y`` int64 in ``[0, 10)``. ``layout``:

    * ``"flat"``  -- ``x`` of shape ``(n, 64)`` (MLPs);
    * ``"image"`` -- ``(n, 1, 8, 8)`` (CNNs);
    * ``"rows"``  -- ``(n, 8, 8)``: a sequence of 8 row tokens of 8 pixels (transformers).
    """
    shapes = {"flat": (-1, 64), "image": (-1, 1, 8, 8), "rows": (-1, 8, 8)}
    if layout not in shapes:
        raise ValueError(f"layout must be one of {sorted(shapes)}, got {layout!r}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - declared in the test/bench extras
        raise ImportError("load_digits_split needs scikit-learn (pip install 'tvm-splat[bench]')") from e
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.data, digits.target, test_size=360, random_state=0,
                                              stratify=digits.target)
    x_tr, x_te = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(x_te, dtype=torch.float32)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    shape = shapes[layout]
    return x_tr.reshape(shape), torch.tensor(y_tr), x_te.reshape(shape), torch.tensor(y_te)
