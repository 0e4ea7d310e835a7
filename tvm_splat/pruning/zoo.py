"""Small reference models whose structure group discovery supports (used by tests and the example).

* :class:`TinyCNN` -- conv-bn-relu x3 (the second with stride 2) + global pool + MLP head; input ``(B, 3, H, W)`` float32,
  output logits ``(B, num_classes)``. Channel groups on conv1/conv2, hidden groups in the head.
* :class:`TinyTransformer` -- token classifier; input ``(B, T)`` int64 token ids, output
  ``(B, T, num_classes)``. Pre-LN blocks ``x + attn(ln(x))``, ``x + mlp(ln(x))``: head groups
  in every attention, hidden groups in every MLP; the residual stream is never grouped.
* :func:`digits_mlp`, :func:`digits_cnn`, :class:`RowTransformer` -- the pruning benchmark's
  models for the 8x8 digits (``tvm_splat.pruning.data.load_digits_split``): inputs
  ``(B, 64)``, ``(B, 1, 8, 8)`` and ``(B, 8, 8)`` (8 row tokens) float32, logits ``(B, 10)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["TinyCNN", "MultiHeadSelfAttention", "TransformerBlock", "TinyTransformer", "RowTransformer", "digits_cnn",
           "digits_mlp"]


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class TinyCNN(nn.Module):
    def __init__(self, in_ch: int = 3, width=(16, 32, 32), hidden: int = 64, num_classes: int = 4):
        super().__init__()
        c1, c2, c3 = width
        self.features = nn.Sequential(*_conv_bn(in_ch, c1), *_conv_bn(c1, c2, stride=2), *_conv_bn(c2, c3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c3, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class MultiHeadSelfAttention(nn.Module):
    """Standard MHA written out (no SDPA) so the exported graph is plain matmul/softmax.

    ``num_heads`` and ``head_dim`` are plain attributes, so compaction can shrink the head
    count; x ``(B, T, dim)`` -> ``(B, T, dim)``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(x).reshape(b, t, h, d).transpose(1, 2)
        k = self.k_proj(x).reshape(b, t, h, d).transpose(1, 2)
        v = self.v_proj(x).reshape(b, t, h, d).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(d)), dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, h * d))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 16, seq_len: int = 12, dim: int = 32, num_heads: int = 4, depth: int = 2,
                 num_classes: int = 4, mlp_ratio: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq_len, dim) * 0.1)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.tok(tokens) + self.pos)))


def digits_mlp(hidden=(128, 64), num_classes: int = 10) -> nn.Sequential:
    """``Linear(64, h1) -> ReLU -> Linear(h1, h2) -> ReLU -> Linear(h2, 10)``: ``h1 + h2`` unit groups."""
    sizes = (64, *hidden)
    layers: list = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes))


def digits_cnn(width=(16, 32, 32), hidden: int = 64, num_classes: int = 10) -> TinyCNN:
    """:class:`TinyCNN` on 1-channel 8x8 digits."""
    return TinyCNN(in_ch=1, width=width, hidden=hidden, num_classes=num_classes)


class RowTransformer(nn.Module):
    """Sequence classifier over ``(B, T, in_dim)`` float tokens (the digits' 8 rows of 8 pixels).

    ``Linear(in_dim, dim)`` + learned positions, ``depth`` pre-LN :class:`TransformerBlock`s
    (head groups and MLP unit groups), final LayerNorm, mean over tokens, ``Linear(dim, classes)``.
    """

    def __init__(self, in_dim: int = 8, seq_len: int = 8, dim: int = 32, num_heads: int = 8, depth: int = 2,
                 num_classes: int = 10, mlp_ratio: int = 2):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(torch.randn(1, seq_len, dim) * 0.1)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.embed(x) + self.pos)).mean(1))
