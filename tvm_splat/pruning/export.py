"""torch -> Relax -> compiled VM helpers for pruned models (export, compile, run, time).

``to_relax`` exports an eval-mode model with ``torch.export`` and imports it with
``tvm.relax.frontend.torch.from_exported_program`` (weights become constants, which is
what ``CompactPrunedChannels`` rewrites). GETA models must be finalized first
(:func:`~tvm_splat.pruning.quant.finalize_quantization`).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = ["to_relax", "compile_relax", "run_vm", "time_vm", "relax_param_count"]


def to_relax(model: nn.Module, example_inputs: Sequence[torch.Tensor]):
    """``IRModule`` of ``model`` (eval mode) traced on ``example_inputs`` (a tuple of tensors)."""
    from tvm.relax.frontend.torch import from_exported_program

    if any("parametrizations" in n.split(".") for n, _ in model.named_modules()):
        raise ValueError("model still has fake quantizers: call finalize_quantization(model) before export")
    model = model.eval()
    with torch.no_grad():
        ep = torch.export.export(model, tuple(example_inputs))
    return from_exported_program(ep, keep_params_as_input=False)


def compile_relax(mod, target: str = "llvm"):
    """Compile ``mod`` and return a ``relax.VirtualMachine`` on the CPU."""
    import tvm
    from tvm import relax

    ex = tvm.compile(mod, target=target)
    return relax.VirtualMachine(ex, tvm.cpu())


def run_vm(vm, inputs: Sequence[torch.Tensor]) -> np.ndarray:
    """Run ``main`` on ``inputs``; returns the first output as a numpy array."""
    import tvm

    out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    while not hasattr(out, "numpy"):  # from_exported_program returns a tuple of outputs
        out = out[0]
    return out.numpy()


def time_vm(vm, inputs: Sequence[torch.Tensor], repeat: int = 20, warmup: int = 3) -> float:
    """Median wall time of one ``main`` call in milliseconds."""
    import tvm

    args = [tvm.runtime.tensor(x.numpy()) for x in inputs]
    for _ in range(warmup):
        vm["main"](*args)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        vm["main"](*args)
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def relax_param_count(mod) -> int:
    """Number of scalar elements in the float constants of ``mod`` (the weights)."""
    import tvm
    from tvm import relax

    total = 0
    for _, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        def visit(e):
            nonlocal total
            # Tensor constants carry a runtime tensor in ``value`` (IntImm & co. carry ints).
            val = getattr(e, "value", None) if isinstance(e, tvm.ir.expr.Constant) else None
            if hasattr(val, "numpy"):  # post_order_visit visits each node once
                arr = val.numpy()
                if arr.dtype.kind == "f":
                    total += arr.size

        relax.analysis.post_order_visit(func, visit)
    return total
