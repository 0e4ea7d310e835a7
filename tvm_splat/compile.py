"""Build scheduled kernel modules and compile them, with an in-memory and on-disk cache.

Two module builders, one per kernel family, and one compile entry:

* :func:`row_module` — the ``row`` / ``separate`` variants, scheduled with the best tuning
  record of the workload when one exists (:func:`tvm_splat.records.apply_best`), else the row
  schedule;
* :func:`tiled_module` — the tiled family for a tile plan's static shape and knobs
  (``tiled`` [+ ``merge``] [+ ``fallback``]);
* :func:`compile_module` — ``tvm.tirx.build`` of such a module, cached.

The on-disk cache (``$TVM_SPLAT_CACHE_DIR``, default ``~/.cache/tvm_splat``) holds one shared
library per (module identity, target, fingerprint of this package's kernel and schedule code),
so a process that has compiled a workload once never compiles it again, and a changed kernel
never loads a stale library.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import tvm

from ._version import __version__
from .formats.tile_plan import PlanShape
from .kernels import ROW_KERNEL_NAMES, row_variant_funcs
from .kernels.backward import BackwardSpec, backward_funcs
from .kernels.spec import AttentionSpec
from .records import apply_best, record_mark, workload_dir
from .schedules.row import RowKnobs, row_schedule
from .schedules.backward_mma import backward_mma_funcs
from .schedules.targets import arch_specific, as_target, target_key
from .schedules.tiled import TiledKnobs, schedule_tiled, tiled_funcs

#: compiled libraries of this process, by identity (see :func:`load_or_build`)
_LIBRARIES: dict = {}


def cache_dir() -> Path:
    return Path(os.environ.get("TVM_SPLAT_CACHE_DIR", Path.home() / ".cache" / "tvm_splat"))


def clear_memory_cache() -> None:
    """Forget the libraries compiled or loaded in this process (the disk cache stays)."""
    _LIBRARIES.clear()


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """SHA-256 (16 hex digits) of the source of the modules that generate code: kernels,
    schedules and this one. Part of every cache key."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256(__version__.encode())
    for path in sorted([*root.glob("kernels/*.py"), *root.glob("schedules/*.py"), root / "compile.py"]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def row_module(spec: AttentionSpec, target, variant: str = "row", knobs: RowKnobs | None = None,
               use_tuned: bool = True) -> tvm.IRModule:
    """The scheduled IRModule of a row-parallel variant (functions named as in
    ``ROW_KERNEL_NAMES``): a tuning record's schedule when one exists and no ``knobs`` were
    asked for, else :func:`~tvm_splat.schedules.row.row_schedule` with ``knobs``."""
    target = as_target(target)
    funcs = {}
    for name, func in row_variant_funcs(spec, variant).items():
        tuned = apply_best(name, func, spec, target) if use_tuned and knobs is None else None
        funcs[name] = (tuned or row_schedule(func, target, knobs or RowKnobs())).with_attr("global_symbol", name)
    return tvm.IRModule(funcs)


def tiled_module(spec: AttentionSpec, plan_shape: PlanShape, target, knobs: TiledKnobs) -> tvm.IRModule:
    """The scheduled IRModule of the tiled family: ``tiled`` [, ``merge``] [, ``fallback``]."""
    target = as_target(target)
    funcs = tiled_funcs(spec, plan_shape, knobs, target)
    return tvm.IRModule({name: schedule_tiled(name, f, target, knobs, spec).with_attr("global_symbol", name)
                         for name, f in funcs.items()})


def backward_module(spec: BackwardSpec, target, knobs: RowKnobs | None = None) -> tvm.IRModule:
    """The scheduled training kernels (``fwd_lse``, ``bwd_dq``, ``bwd_dkdv``,
    :mod:`tvm_splat.kernels.backward`) under the row schedule: one query row or key per thread
    on the GPU (CUDA cores), rows as parallel tasks on the CPU."""
    target = as_target(target)
    return tvm.IRModule({name: row_schedule(f, target, knobs or RowKnobs()).with_attr("global_symbol", name)
                         for name, f in backward_funcs(spec).items()})


def compile_backward(spec: BackwardSpec, target, knobs: RowKnobs | None = None, use_disk_cache=True):
    """Compiled training kernels of ``spec`` (cached like every other module)."""
    return compile_module(f"backward|{spec.key}|{knobs!r}", lambda: backward_module(spec, target, knobs),
                          target, use_disk_cache)


def backward_mma_module(spec: BackwardSpec, knobs, plan_shapes) -> tvm.IRModule:
    """The tensor-core training kernels (``fwd_lse``, ``bwd_dq``, ``bwd_dkdv``,
    :mod:`tvm_splat.kernels.backward_mma`) for the tile plan shapes ``(forward, dq, dkdv)``;
    written bound to threads, so nothing is scheduled."""
    return tvm.IRModule({name: f.with_attr("global_symbol", name)
                         for name, f in backward_mma_funcs(spec, knobs, plan_shapes).items()})


def compile_backward_mma(spec: BackwardSpec, target, knobs, plan_shapes, use_disk_cache=True):
    """Compiled tensor-core training kernels (cached like every other module; the wgmma forms
    build for the architecture-specific target, ``sm_90a``)."""
    target = arch_specific(as_target(target)) if knobs.forward.wgmma or knobs.wgmma else as_target(target)
    ident = f"backward_mma|{spec.key}|{knobs!r}|{'|'.join(s.key for s in plan_shapes)}"
    return compile_module(ident, lambda: backward_mma_module(spec, knobs, plan_shapes), target, use_disk_cache)


def row_tuning_mark(spec: AttentionSpec, target, variant: str) -> str:
    """Changes whenever a tuning database of this row workload changes."""
    return record_mark(workload_dir(name, spec, target) / "database_tuning_record.json"
                       for name in ROW_KERNEL_NAMES[variant])


def cuda_source(lib) -> str:
    """CUDA C source of a module built for a CUDA target (empty string if it has none): of
    the CUDA modules among its imports, at any depth (a Relax VM executable holds its kernels
    one library further down)."""
    found, todo = [], list(lib.imports)
    while todo:
        m = todo.pop(0)
        if m.kind == "cuda":
            found.append(m.inspect_source("cuda"))
        else:
            todo.extend(m.imports)
    return "".join(found)


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


def runtime_ptxas_options() -> list[str]:
    """The nvcc options with which TVM itself builds CUDA kernels (``tvm.support.nvcc``, by NVRTC
    or nvcc) that change the machine code: ``-O3 --use_fast_math`` and its ptxas options, among
    them ``--register-usage-level`` (``TVM_CUDA_PTXAS_REG_LEVEL``, default 10).

    Checks of registers and spills must compile with them: the warp-specialized window kernel
    (d=128, fp16) compiled with ptxas's own defaults uses 168 registers without spilling, with
    TVM's level 10 it keeps one register on the stack (4 bytes stored, 12 loaded, in the tile's
    epilogue), and ``ncu`` on the H200 counted those local-memory accesses in the kernel TVM
    built there."""
    from tvm.support import nvcc

    # the flags TVM passes are a private helper of its nvcc module; without it (another TVM),
    # ptxas's verbose report alone
    flags = nvcc._ptxas_option_flags() if hasattr(nvcc, "_ptxas_option_flags") else ["-v"]
    return ["-O3", "--use_fast_math", f"--ptxas-options={','.join(dict.fromkeys(['-v', *flags]))}"]


def compile_cubin(source: str, target="nvidia/nvidia-h100") -> tuple[bytes, str]:
    """``(cubin, ptxas report)``: CUDA ``source`` compiled by the local ``nvcc`` for the target's
    architecture with the options TVM's own builds use (:func:`runtime_ptxas_options`), and what
    ptxas says (``-v``) doing so (:func:`ptxas_report`)."""
    arch = str(as_target(target).attrs["arch"])
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "k.cu").write_text(source)
        run = subprocess.run(["nvcc", f"-arch={arch}", "-cubin", *runtime_ptxas_options(), "-o",
                              str(Path(tmp, "k.cubin")), str(Path(tmp, "k.cu"))],
                             capture_output=True, text=True, check=True)
        return Path(tmp, "k.cubin").read_bytes(), run.stderr


def ptxas_report(source: str, target="nvidia/nvidia-h100") -> str:
    """What ptxas says (``-v``) compiling CUDA ``source`` as :func:`compile_cubin` does: per entry
    function its registers and spills, and its remarks (e.g. C7514, C7515, C7520: wgmma
    instructions serialized)."""
    return compile_cubin(source, target)[1]


def ptxas_usage(source: str, kernel: str, target="nvidia/nvidia-h100") -> tuple[int, int]:
    """``(registers, spill bytes)`` that ptxas reports for ``kernel`` (its entry function's
    name, ``tiled_kernel``) in CUDA ``source`` compiled with the local ``nvcc`` for the target's
    architecture: what decides how many thread blocks share an SM, read on a CPU-only machine."""
    report = ptxas_report(source, target).split(f"Compiling entry function '{kernel}'")[1]
    report = report.split("Compiling entry function")[0]
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    return registers, sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))


def serialized_kernels(report: str) -> list[str]:
    """The entry functions a ptxas report (``-v``) says it serialized the ``wgmma.mma_async`` of
    (it then waits for each one, so nothing overlaps them), sorted: any remark saying so. Seen:
    C7515 (an accumulator defined while its wgmma may run), C7514 (non-wgmma instructions
    reading an accumulator within a pipeline stage), C7520 (a fence ptxas injected on a
    divergent path). Reading C7515 alone let through a draft of the persistent form that ptxas
    serialized by C7520, then by C7514 (its block loop: 526 and 530 instructions a FULL block
    instead of 502, ``benchmarks/sass_block_path.py``)."""
    return sorted(set(re.findall(r"\(C75\d\d\) [^\n]*wgmma\.mma_async instructions are serialized[^\n]*"
                                 r"in the function '(\w+)'", report)))


def wgmma_serialized(source: str, target="nvidia/nvidia-h100") -> list[str]:
    """The kernels of ``source`` whose ``wgmma.mma_async`` ptxas serializes, by entry function
    name (:func:`serialized_kernels` of its report)."""
    return serialized_kernels(ptxas_report(source, target))


def load_or_build(ident: str, build, use_disk_cache=True):
    """The compiled module named by ``ident``: from memory, else from the disk cache, else
    ``build()`` (then saved). ``ident`` must change whenever the generated code would; the code
    fingerprint is added here."""
    ident = f"{ident}|{code_fingerprint()}"
    if ident in _LIBRARIES:
        return _LIBRARIES[ident]
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
    _LIBRARIES[ident] = lib
    return lib


def check_shared_declarations(source: str) -> None:
    """Raise ValueError if two kernels of one CUDA source declare the same dynamic shared array
    with different alignments.

    The kernels of a module share one translation unit, where a function-scope
    ``extern __shared__`` array is a single symbol: nvcc keeps the first declaration's alignment
    (warning #1886). With the TMA forward's 1024-byte (128-byte swizzle) stages declared beside
    the backward kernels' 64-byte ``smem``, every training forward in its TMA form faulted with a
    misaligned address on the H200, and with the buffers named apart none did (which alignment
    the GPU machine's runtime compile, NVRTC, chose was not read directly). Kernels that need a
    stricter alignment name their buffer apart."""
    seen: dict[str, str] = {}
    for align, name in re.findall(r"extern __shared__ __align__\((\d+)\) \w+ (\w+)\[\]", source):
        if seen.setdefault(name, align) != align:
            raise ValueError(f"dynamic shared array {name!r} is declared with alignments {seen[name]} and {align} "
                             "in one CUDA module: one symbol has one alignment; give the buffers distinct names")


def compile_module(ident: str, module_fn, target, use_disk_cache=True):
    """``tvm.tirx.build(module_fn(), target)``, cached under ``ident`` (which must name the
    workload, variant, knobs and records the module depends on); a CUDA build is checked by
    :func:`check_shared_declarations`."""
    target = as_target(target)

    def build():
        lib = tvm.tirx.build(module_fn(), target=target)
        check_shared_declarations(cuda_source(lib))
        return lib

    return load_or_build(f"{ident}|{target_key(target)}", build, use_disk_cache)


def compile_attention(spec: AttentionSpec, target, variant="row", knobs=None, use_disk_cache=True,
                      use_tuned=True):
    """Compiled ``tvm.runtime.Module`` of a row-parallel variant, exposing its functions by
    name (the tiled family is compiled through :mod:`tvm_splat.planner`, which owns its tile
    plan)."""
    target = as_target(target)
    mark = row_tuning_mark(spec, target, variant) if use_tuned and knobs is None else ""
    return compile_module(f"{variant}|{spec.key}|{knobs!r}|{mark}",
                          lambda: row_module(spec, target, variant, knobs, use_tuned), target, use_disk_cache)
