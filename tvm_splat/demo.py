"""``tvm-splat demo``: build ACSR for a pattern, compile our kernels for the local target, check
them against dense attention and time them against dense baselines.

Runs without a GPU (``llvm``); with a CUDA device and torch it uses CUDA and fp16.
"""
from __future__ import annotations

import numpy as np
import tvm

from .attention import sparse_attention
from .kernels import VARIANTS
from .planner import choose_variant
from .baselines import compile_dense_attention
from .formats import ACSR, parse_pattern
from .reference import masked_attention
from .timing import median_ms

DEFAULT_PATTERN = "global:4+window:32"


def _has_cuda() -> bool:
    try:
        return tvm.cuda(0).exist
    except Exception:  # no CUDA runtime in this TVM build
        return False


def run_demo(pattern=DEFAULT_PATTERN, seq_len=512, heads=4, head_dim=64, batch=1, target=None,
             repeats=10, console=None):
    """Run the demo; returns a list of result rows (dicts) and prints a table."""
    from rich.console import Console
    from rich.table import Table

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1 (timed runs per kernel), got {repeats!r}")
    console = console or Console()
    gpu = _has_cuda() if target is None else str(target).startswith(("cuda", "nvidia"))
    target = target or ("cuda" if gpu else "llvm")
    dtype = "float16" if gpu else "float32"
    pat = parse_pattern(pattern)
    acsr = ACSR.from_pattern(pat, seq_len)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((batch, heads, seq_len, head_dim)).astype(dtype) for _ in range(3))
    mask = acsr.to_dense()
    ref = masked_attention(q, k, v, mask if acsr.num_heads > 1 else mask[0])
    tol = 2e-2 if dtype == "float16" else 1e-3
    console.print(f"[bold]tvm-splat demo[/]: {pattern}, n={seq_len}, heads={heads}, d={head_dim}, "
                  f"batch={batch}, {dtype}, target={target}")
    console.print(f"ACSR: {acsr!r}; metadata {acsr.metadata_bytes()} B vs CSR "
                  f"{acsr.csr_metadata_bytes()} B ({acsr.compression_ratio():.1f}x smaller)")

    if gpu:
        import torch

        tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
        sync = torch.cuda.synchronize
        inputs = (tq, tk, tv)
        to_np = lambda x: x.float().cpu().numpy()  # noqa: E731
    else:
        sync = None
        inputs = (q, k, v)
        to_np = np.asarray

    rows = []
    outputs = {}
    default = choose_variant("auto", target)
    for variant in ("auto", *(v for v in VARIANTS if v != default)):
        name = f"tvm_splat {default if variant == 'auto' else variant}"
        run = lambda variant=variant: sparse_attention(*inputs, acsr, target=target, variant=variant)  # noqa: E731
        outputs[name] = to_np(run())
        rows.append((name, median_ms(run, repeats, sync=sync)))

    vm, dev = compile_dense_attention(batch, heads, seq_len, head_dim, dtype, target, with_mask=True)
    bias = np.where(mask if acsr.num_heads > 1 else mask[0], 0, -1e4).astype(dtype)
    bias = np.broadcast_to(bias, (batch, heads, seq_len, seq_len)).copy()
    dense_args = [tvm.runtime.tensor(x, dev) for x in (q, k, v, bias)]
    dense_sync = dev.sync
    outputs["tvm dense (masked)"] = vm["main"](*dense_args).numpy()
    rows.append(("tvm dense (masked)", median_ms(lambda: vm["main"](*dense_args), repeats, sync=dense_sync)))
    dense_mask = mask[0] if acsr.num_heads == 1 else mask
    rows.append(("numpy dense (masked)", median_ms(lambda: masked_attention(q, k, v, dense_mask), max(3, repeats // 3))))
    try:
        import torch
        import torch.nn.functional as F

        tmask = torch.from_numpy(mask if acsr.num_heads > 1 else mask[0])
        if gpu:
            tmask = tmask.cuda()
        targs = inputs if gpu else tuple(torch.from_numpy(x) for x in inputs)
        sdpa = lambda: F.scaled_dot_product_attention(*targs, attn_mask=tmask)  # noqa: E731
        outputs["torch sdpa (bool mask)"] = to_np(sdpa())
        rows.append(("torch sdpa (bool mask)", median_ms(sdpa, repeats, sync=sync)))
    except ImportError:
        pass

    ok = True
    errs = {}
    for name, out in outputs.items():
        errs[name] = float(np.abs(out.astype(np.float64) - ref).max())
        ok &= errs[name] <= tol
    ours = rows[0][1]
    table = Table(title=f"{pattern}  density {acsr.density:.3f}  nnz {int(acsr.nnz.sum())}")
    for col in ("kernel", "ms (median)", "default's speedup", "max |err| vs dense"):
        table.add_column(col, justify="right" if col != "kernel" else "left")
    results = []
    for name, ms in rows:
        err = errs.get(name)
        table.add_row(name, f"{ms:.3f}", f"{ms / ours:.2f}x", "-" if err is None else f"{err:.2e}")
        results.append({"kernel": name, "ms": ms, "max_abs_err": err})
    console.print(table)
    console.print(f"default kernel on {target}: {default} (first row)")
    console.print("[green]all outputs match dense attention[/]" if ok
                  else f"[red]MISMATCH (tolerance {tol})[/]")
    if not ok:
        raise SystemExit(1)
    return results
