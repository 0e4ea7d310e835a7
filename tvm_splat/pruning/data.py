"""Synthetic, seeded datasets for the pruning example and tests (nothing is downloaded).

* :func:`make_image_task` -- ``(x, y)``: ``x`` float32 ``(n, 3, size, size)``, ``y`` int64
  ``(n,)`` in ``[0, num_classes)``. Class ``k`` = a fixed random smooth template with a
  class-specific colour mix, placed at a random shift, plus Gaussian noise.
* :func:`make_token_task` -- ``(tokens, labels)``: int64 ``(n, seq_len)`` each; label at
  position ``t`` is ``(tok[t] + tok[t-1]) mod num_classes`` (``tok[-1] := 0``), so the
  model must attend to the previous position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["make_image_task", "make_token_task"]


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
