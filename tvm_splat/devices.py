"""Devices, targets and array kinds of the runtime (bottom helpers: no kernel knowledge).

Inputs are numpy arrays or torch tensors (torch is optional: nothing here imports it unless a
torch tensor is passed in).
"""
from __future__ import annotations

import functools

import numpy as np
import tvm

from .schedules.targets import arch_specific, as_target
from .tensors import is_torch


def dtype_name(x) -> str:
    """``"float16"``, ``"bfloat16"``, ``"float32"``, ... of a numpy array or torch tensor."""
    return str(x.dtype).replace("torch.", "")


def device_of(x) -> tvm.runtime.Device:
    """The TVM device holding ``x`` (numpy: the CPU)."""
    if is_torch(x):
        if x.device.type == "cuda":
            return tvm.cuda(x.device.index or 0)
        if x.device.type == "cpu":
            return tvm.cpu()
        raise ValueError(f"unsupported torch device {x.device}")
    if isinstance(x, np.ndarray):
        return tvm.cpu()
    raise TypeError(f"expected a numpy array or a torch tensor, got {type(x).__name__}")


def as_device(device) -> tvm.runtime.Device:
    """A TVM device from ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a torch device or a TVM device."""
    if isinstance(device, tvm.runtime.Device):
        return device
    text = str(device)
    kind, _, index = text.partition(":")
    if kind == "cpu":
        return tvm.cpu()
    if kind == "cuda":
        return tvm.cuda(int(index or 0))
    raise ValueError(f"unsupported device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")


def is_gpu_device(dev: tvm.runtime.Device) -> bool:
    return dev.dlpack_device_type() == 2


@functools.lru_cache(maxsize=None)
def _target_of_device(dev_name: str):
    if dev_name.startswith("cuda"):
        # sm_90 -> sm_90a: the kernels are built for this very GPU, so its arch-specific
        # instructions (Hopper's wgmma) are fair game
        return arch_specific(as_target(tvm.target.Target.from_device(tvm.cuda(int(dev_name.split(":")[1])))))
    return as_target("llvm")


def default_target(dev: tvm.runtime.Device) -> tvm.target.Target:
    """The target kernels are compiled for on ``dev``: the GPU's own (its ``sm_XX``, ``sm_90a``
    on Hopper), or
    ``llvm`` for the CPU. Built once per device (constructing Targets is slow)."""
    return _target_of_device(str(dev))


def torch_raw_stream(index: int):
    """``() -> int``: the handle of torch's current CUDA stream on device ``index``, as torch's
    dispatcher keeps it (``torch._C._cuda_getCurrentRawStream``, which TorchInductor's generated
    launchers call), or ``torch.cuda.current_stream(index).cuda_stream`` where torch lacks it.
    Resolved once, called before every launch: the public call builds a Stream object each time
    (3-7 us on the lent GPU machines, the sixteenth session's host-time runs)."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return lambda: raw(index)
    return lambda: torch.cuda.current_stream(index).cuda_stream
