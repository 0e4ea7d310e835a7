"""Compile attention kernels for a spec and target, with an in-memory and on-disk cache.

The on-disk cache (``$TVM_SPLAT_CACHE_DIR``, default ``~/.cache/tvm_splat``) holds one shared
library per (spec, target, variant, knobs, package version), so a process that has compiled a
shape once never compiles it again.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import tvm

from . import __version__
from .kernels import KERNEL_NAMES, attention_funcs
from .kernels.spec import AttentionSpec
from .schedules.dispatch import schedule_attention
from .schedules.targets import as_target, target_key

_MEMORY_CACHE: dict = {}


def cache_dir() -> Path:
    return Path(os.environ.get("TVM_SPLAT_CACHE_DIR", Path.home() / ".cache" / "tvm_splat"))


def schedule_kernel(name, func, spec, target, knobs=None, geometry=None, use_tuned=True):
    """One scheduled PrimFunc: the best tuning record for this workload if one exists (and no
    explicit ``knobs`` were asked for), else the default schedule of the dispatcher."""
    if use_tuned and knobs is None:
        from .tuning import apply_best

        tuned = apply_best(name, func, spec, target)
        if tuned is not None:
            return tuned
    return schedule_attention(name, func, spec, target, knobs=knobs, geometry=geometry)


def build_module(spec: AttentionSpec, target, variant="row", knobs=None, geometry=None,
                 use_tuned=True) -> tvm.IRModule:
    """The scheduled (not yet compiled) IRModule of one variant."""
    target = as_target(target)
    funcs = attention_funcs(spec, variant)
    scheduled = {
        name: schedule_kernel(name, func, spec, target, knobs, geometry, use_tuned).with_attr(
            "global_symbol", name
        )
        for name, func in funcs.items()
    }
    return tvm.IRModule(scheduled)


def _tuning_mark(spec, target, variant) -> str:
    """Changes whenever a tuning database of this workload changes, so caches never serve a
    library compiled before a new tuning record arrived."""
    from .tuning.logs import workload_dir

    marks = []
    for name in KERNEL_NAMES.get(variant, ()):
        rec = workload_dir(name, spec, target) / "database_tuning_record.json"
        if rec.exists():
            marks.append(f"{name}:{rec.stat().st_mtime_ns}:{rec.stat().st_size}")
    return ",".join(marks)


def cuda_source(lib) -> str:
    """CUDA C source of a module built for a CUDA target (empty string if it has none)."""
    return "".join(m.inspect_source("cuda") for m in lib.imports if m.kind == "cuda")


def nvcc_compile(source: str, target="nvidia/nvidia-h100") -> bytes:
    """Compile CUDA source with the local ``nvcc`` to a fatbin; raises on compile errors.

    TVM's pip wheel keeps CUDA source in the module and compiles it when it is loaded on a
    machine with a GPU; this lets a CPU-only machine prove that the code compiles.
    """
    from tvm.support.nvcc import compile_cuda

    target = as_target(target)
    code = str(target.attrs["arch"]).removeprefix("sm_")
    gencode = ["-gencode", f"arch=compute_{code},code=sm_{code}"]
    with target:  # TVM's nvcc driver reads the compute version off the current target
        return bytes(compile_cuda(source, target_format="fatbin", arch=gencode, compiler="nvcc"))


def load_or_build(ident: str, build, use_disk_cache=True):
    """The compiled module named by ``ident``: from memory, else from the disk cache, else
    ``build()`` (then saved). ``ident`` must change whenever the generated code would."""
    if ident in _MEMORY_CACHE:
        return _MEMORY_CACHE[ident]
    path = cache_dir() / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.so"
    if use_disk_cache and path.exists():
        lib = tvm.runtime.load_module(str(path))
    else:
        lib = build()
        if use_disk_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.so")
            lib.export_library(str(tmp))
            os.replace(tmp, path)  # atomic: concurrent processes never load half a file
            lib = tvm.runtime.load_module(str(path))
    _MEMORY_CACHE[ident] = lib
    return lib


def compile_attention(spec: AttentionSpec, target, variant="row", knobs=None, geometry=None,
                      use_disk_cache=True, use_tuned=True):
    """Compiled ``tvm.runtime.Module`` exposing the variant's functions by name."""
    target = as_target(target)
    tuned_mark = _tuning_mark(spec, target, variant) if use_tuned and knobs is None else ""
    ident = f"{__version__}|{spec.key}|{target_key(target)}|{variant}|{knobs!r}|{geometry!r}|{tuned_mark}"
    return load_or_build(
        ident,
        lambda: tvm.tirx.build(build_module(spec, target, variant, knobs, geometry, use_tuned), target=target),
        use_disk_cache,
    )
