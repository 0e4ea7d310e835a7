"""Target handling shared by every schedule: which targets we support and how to name them."""
from __future__ import annotations

import tvm

SUPPORTED_KINDS = ("llvm", "cuda")


def as_target(target) -> tvm.target.Target:
    """Normalise ``target`` (a Target, a tag such as ``"nvidia/nvidia-h100"``, ``"llvm"``,
    ``"cuda"`` or a config dict) and reject kinds we have no schedule for."""
    if isinstance(target, tvm.target.Target):
        tgt = target
    else:
        try:
            tgt = tvm.target.Target(target)
        except Exception as err:  # TVM raises several error types for a malformed target
            raise ValueError(f"invalid target {target!r}: {err}") from None
    if tgt.kind.name not in SUPPORTED_KINDS:
        raise ValueError(
            f"unsupported target kind {tgt.kind.name!r}; tvm_splat schedules support {SUPPORTED_KINDS}"
        )
    return tgt


def target_key(target: tvm.target.Target) -> str:
    """A cheap identity for cache keys (``str(target)`` dumps JSON): kind and the attributes
    that change generated code."""
    attrs = target.attrs
    parts = [target.kind.name] + [f"{k}={attrs[k]}" for k in ("arch", "mcpu", "mtriple", "mattr", "num-cores")
                                  if k in attrs]
    return ",".join(parts)


def is_gpu(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda"


def target_name(target: tvm.target.Target) -> str:
    """A short, filesystem-safe name of the device: ``llvm``, ``cuda-sm_90``.

    The arch-specific suffix is dropped (``sm_90a`` -> ``sm_90``): the tag
    ``nvidia/nvidia-h100`` says ``sm_90a`` while ``Target.from_device`` on the same H100 says
    ``sm_90``, and a tuning record made with one must be found with the other.
    """
    if is_gpu(target):
        arch = str(target.attrs.get("arch", "unknown"))
        return f"cuda-{arch[:-1] if arch.startswith('sm_') and arch.endswith('a') else arch}"
    return target.kind.name


def max_threads(target: tvm.target.Target) -> int:
    return int(target.attrs.get("max_num_threads", 1024)) if is_gpu(target) else 1


def supports_wgmma(target: tvm.target.Target) -> bool:
    """Whether ``target`` is a Hopper GPU (``sm_90``/``sm_90a``), which has ``wgmma``."""
    return is_gpu(target) and str(target.attrs.get("arch", "")) in ("sm_90", "sm_90a")


def arch_specific(target: tvm.target.Target) -> tvm.target.Target:
    """``target`` with its architecture-specific features on (``sm_90`` -> ``sm_90a``, which
    ``wgmma`` needs; ``Target.from_device`` says ``sm_90``). Code built for it runs only on that
    architecture, which is where the kernel was planned to run."""
    arch = str(target.attrs.get("arch", "")) if is_gpu(target) else ""
    if arch != "sm_90":
        return target
    config = {k: v for k, v in target.export().items() if k not in ("tag", "keys", "host")}
    config["arch"] = "sm_90a"
    return tvm.target.Target(config)
