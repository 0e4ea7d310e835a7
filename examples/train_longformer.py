"""Train a small Longformer-style encoder twice from the same seed: attention through
``tvm_splat``'s differentiable sparse op, and through dense SDPA with the same boolean mask.

The two models compute the same function (``softmax(q kᵀ/√d ⊙ mask) v`` over a sliding window of
``±window`` plus ``globals`` global tokens), start from the same weights and see the same
batches, so their loss curves must agree within floating-point noise; the script writes both
curves (JSON) and a plot.

The task is made here, no download: token sequences over a small vocabulary; each position's label
is the token before it when the first token is in the lower half of the vocabulary, else the token
after it. The neighbours lie in the window and the first token is global, so the sparse mask
suffices (and neither alone does).

    python examples/train_longformer.py                       # CPU-sized: 250 steps, about a minute
    python examples/train_longformer.py --device cuda --seq-len 1024 --dim 256 --heads 4 \\
        --layers 4 --window 64 --steps 300 --batch 8 --out benchmarks/results/train_longformer_cuda
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tvm_splat.autograd import sparse_attention  # noqa: E402
from tvm_splat.formats import parse_pattern  # noqa: E402


class Block(nn.Module):
    """Pre-LayerNorm transformer block; ``attend(q, k, v)`` is the attention being compared."""

    def __init__(self, dim, heads, attend):
        super().__init__()
        self.heads, self.attend = heads, attend
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(self.attend(q, k, v).transpose(1, 2).reshape(b, n, dim))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self, vocab, classes, seq_len, dim, heads, layers, attend):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, attend) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))

    def forward(self, x):
        h = self.tokens(x) + self.positions.weight[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def make_batch(gen, batch, seq_len, vocab, device):
    """Tokens ``[batch, seq_len]`` and labels: ``x[i-1]`` where ``x[0] < vocab / 2``, else
    ``x[i+1]`` (0 past either end)."""
    x = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    zero = torch.zeros_like(x[:, :1])
    before, after = torch.cat([zero, x[:, :-1]], dim=1), torch.cat([x[:, 1:], zero], dim=1)
    y = torch.where(x[:, :1] < vocab // 2, before, after)
    return x.to(device), y.to(device)


def attention_functions(pattern: str, seq_len: int, device):
    """``{"tvm_splat": ..., "sdpa": ...}``: the same masked attention, ours and dense SDPA."""
    mask = torch.from_numpy(parse_pattern(pattern).dense_mask(seq_len)).to(device)
    return {
        "tvm_splat": lambda q, k, v: sparse_attention(q, k, v, pattern),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    }


def train(attend, args, device):
    """Losses per step and seconds per step of one model trained from ``args.seed``."""
    torch.manual_seed(args.seed)
    model = Encoder(args.vocab, args.vocab, args.seq_len, args.dim, args.heads, args.layers, attend).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses, start = [], None
    for step in range(args.steps):
        if step == 1:  # the first step compiles our kernels: time the others
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = make_batch(gen, args.batch, args.seq_len, args.vocab, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / max(1, args.steps - 1) if start is not None else float("nan")
    return losses, seconds


def plot(curves, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(losses, label=name, lw=1.2, ls="-" if name == "tvm_splat" else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--globals", type=int, default=1)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (both models)")
    p.add_argument("--out", default="benchmarks/results/train_longformer_cpu",
                   help="path prefix: writes <out>.json and <out>.png")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    pattern = f"global:{args.globals}+window:{args.window}"
    curves, seconds = {}, {}
    for name, attend in attention_functions(pattern, args.seq_len, device).items():
        curves[name], seconds[name] = train(attend, args, device)
        print(f"{name:10s} loss {curves[name][0]:.4f} -> {curves[name][-1]:.4f}, {seconds[name] * 1e3:.1f} ms/step")
    gap = max(abs(a - b) for a, b in zip(curves["tvm_splat"], curves["sdpa"]))
    tail = max(1, args.steps // 10)
    result = {
        "config": {**vars(args), "pattern": pattern}, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "losses": curves, "seconds_per_step": seconds, "max_loss_gap": gap,
        "final_loss_mean": {n: sum(c[-tail:]) / tail for n, c in curves.items()},
        "chance_loss": math.log(args.vocab),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(curves, out.with_suffix(".png"),
         f"{pattern}, n={args.seq_len}, {args.layers} layers, dim {args.dim}, {args.device}"
         f"{' bf16' if args.bf16 else ''}: max |gap| {gap:.2e}")
    print(f"max loss gap {gap:.3e}; wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
