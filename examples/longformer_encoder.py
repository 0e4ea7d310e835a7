"""A small Longformer-style encoder, sparsified end to end with SparsifyAttention.

The torch model attends through ``F.scaled_dot_product_attention`` with a constant boolean
mask: a sliding window of ``±window`` plus ``globals`` global tokens (they attend to every
token and every token attends to them). It is exported with ``torch.export``, imported into
Relax, and compiled twice for the same target:

* dense: the module as imported (masked dense attention, n x n scores),
* sparse: after ``SparsifyAttention(Window(w) | GlobalTokens(g))``: every layer's attention
  becomes one fused ACSR kernel.

Both outputs are checked against torch (float32, CPU) and timed end to end with the VM's
time evaluator; the result is written as JSON.

    python examples/longformer_encoder.py --target llvm --out benchmarks/results/longformer_cpu.json
    python examples/longformer_encoder.py --target nvidia/nvidia-h100 --seq-len 4096 \\
        --out benchmarks/results/longformer_h100.json
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tvm_splat.formats import GlobalTokens, Window  # noqa: E402
from tvm_splat.relay_passes.attention_names import attention_layer_names  # noqa: E402
from tvm_splat.relay_passes.sparsify_attention import SparsifyAttention  # noqa: E402


class LongformerLayer(nn.Module):
    """Pre-norm encoder layer: masked multi-head self-attention, then a GELU MLP."""

    def __init__(self, dim: int, heads: int, keep: torch.Tensor):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.register_buffer("keep", keep)  # bool [n, n], True = attend

    def forward(self, x):  # x: [batch, n, dim]
        b, n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, dim // self.heads) \
            .permute(2, 0, 3, 1, 4)  # each [b, heads, n, head_dim]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, dim))
        return x + self.mlp(self.norm2(x))


class LongformerEncoder(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int, keep: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleList(LongformerLayer(dim, heads, keep) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _device(target: tvm.target.Target):
    return tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)


def _compile(mod, target):
    t0 = time.perf_counter()
    ex = tvm.compile(mod, target)
    return ex, time.perf_counter() - t0


def _run_and_time(ex, dev, x: np.ndarray, repeat: int):
    vm = relax.VirtualMachine(ex, dev)
    inp = tvm.runtime.tensor(x, dev)
    out = vm["main"](inp)[0].numpy()
    timer = vm.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=0)
    res = timer(inp)
    return out, float(np.median(res.results) * 1e3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="llvm", help="llvm, cuda or a tag (nvidia/nvidia-h100)")
    ap.add_argument("--out", default="benchmarks/results/longformer_cpu.json")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--window", type=int, default=32, help="attend to keys within ±window")
    ap.add_argument("--globals", type=int, default=4, help="number of global tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    target = tvm.target.Target(args.target)
    dev = _device(target)
    n = args.seq_len
    pattern = Window(args.window) | GlobalTokens(args.globals)
    keep = torch.from_numpy(pattern.dense_mask(n))

    torch.manual_seed(0)
    model = LongformerEncoder(args.layers, args.dim, args.heads, keep).eval()
    x = torch.randn(args.batch, n, args.dim)
    with torch.no_grad():
        ref = model(x).numpy()

    ep = torch.export.export(model, (x,))
    dense_mod = from_exported_program(ep)
    names = attention_layer_names(ep)
    sparsify = SparsifyAttention(pattern, target=target, names=names)
    sparse_mod = sparsify(dense_mod)
    report = sparsify.report
    # the report is logged by the pass (tvm_splat.relay_passes, INFO)
    if len(report.rewritten) != args.layers:
        raise SystemExit(f"expected {args.layers} rewritten attention sites:\n{report}")

    dense_ex, dense_compile_s = _compile(dense_mod, target)
    sparse_ex, sparse_compile_s = _compile(sparse_mod, target)
    xn = x.numpy()
    dense_out, dense_ms = _run_and_time(dense_ex, dev, xn, args.repeat)
    sparse_out, sparse_ms = _run_and_time(sparse_ex, dev, xn, args.repeat)
    err_sparse = float(np.abs(sparse_out - ref).max())
    err_dense = float(np.abs(dense_out - ref).max())
    ok = bool(np.allclose(sparse_out, ref, atol=1e-3, rtol=1e-3))

    result = {
        "what": "Longformer-style encoder end to end: dense compiled module vs SparsifyAttention",
        "target": str(target), "device": str(dev), "host": platform.node(),
        "torch": torch.__version__, "tvm": tvm.__version__,
        "batch": args.batch, "seq_len": n, "dim": args.dim, "heads": args.heads,
        "head_dim": args.dim // args.heads, "layers": args.layers,
        "pattern": repr(pattern), "density": report.rewritten[0].density,
        "sites": report.as_dicts(),
        "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
        "dense_compile_s": dense_compile_s, "sparse_compile_s": sparse_compile_s,
        "max_abs_err_sparse_vs_torch": err_sparse, "max_abs_err_dense_vs_torch": err_dense,
        "output_matches_torch": ok, "repeat": args.repeat, "timing": "median of repeat runs",
    }
    print(f"dense {dense_ms:.2f} ms, sparse {sparse_ms:.2f} ms, speedup {dense_ms / sparse_ms:.2f}x; "
          f"max |err| sparse {err_sparse:.2e}, dense {err_dense:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if not ok:
        raise SystemExit("sparse output does not match torch")


if __name__ == "__main__":
    main()
