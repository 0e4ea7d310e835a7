"""Shared fixtures: seeded RNG, a private kernel cache, CUDA availability, the repository's scripts."""
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Compiled kernels go to a per-run cache so tests never read a stale library.
os.environ.setdefault("TVM_SPLAT_CACHE_DIR", tempfile.mkdtemp(prefix="tvm_splat_cache_"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def repo_script():
    """``load(path)``: a script of the repository (``benchmarks/..``, ``examples/..``: a path from
    its root) imported as a module named by its file, registered in ``sys.modules`` while the
    test runs (dataclasses look their module up there)."""
    root, loaded = Path(__file__).resolve().parents[1], []

    def load(relative):
        spec = importlib.util.spec_from_file_location(Path(relative).stem, root / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        loaded.append(spec.name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


def cuda_available() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


@pytest.fixture
def warp_specialized_spill_bytes():
    """``bytes(head_dim, warps)``: the spill (bytes stored + loaded) ptxas reports for the
    warp-specialized forward built as TVM builds it (``compile.runtime_ptxas_options``:
    ``--register-usage-level=10``): at two consumer warpgroups (d=128, 8 warps) one register
    is kept on the stack, 4 bytes stored at the kernel's start and 12 loaded in the tile's
    epilogue, outside the block loop (its SASS, ``cuobjdump -sass``); none at one group. A
    larger spill fails the checks."""
    return lambda head_dim, warps: 16 if warps == 8 else 0


@pytest.fixture
def packed_fma_check():
    """``check(body, halves, kernel="")``: the CUDA ``body`` of one kernel (``halves``: ``bf16x2``
    or ``f16x2``; ``kernel``: its name in a failure's message) tests 16-bit rows for NaN and inf
    as ``kernels.common.nonfinite_fma`` builds it: one packed FMA a word of a thread's 16-byte
    chunks, word i into chain i of four, the chains joined without their sign bits (a finite x
    leaves a signed zero) before each flag is tagged, and none of the integer test's exponent
    masks left."""
    joined = ("nonfinite_ptr[0] = ((((nonfinite_ptr[0] | nonfinite_ptr[1]) | nonfinite_ptr[2]) | nonfinite_ptr[3])"
              " & (uint)2147450879);")  # 0x7FFF7FFF

    def check(body, halves, kernel=""):
        calls = re.findall(rf"tvm_builtin_ptx_fma_half_rn_{halves}\(nonfinite_ptr\[(\d)\], words_ptr\[(\d)\], "
                           rf"\(uint\)0, nonfinite_ptr\[(\d)\]\);", body)
        assert calls and all(acc == word == acc2 for acc, word, acc2 in calls), kernel
        assert {acc for acc, _, _ in calls} == {"0", "1", "2", "3"}, kernel
        assert body.count(joined) == body.count("if (nonfinite_ptr[0] != (uint)0)") > 0, kernel
        for exponent_bits in (0x7C007C00, 0x7F807F80):
            assert f"(uint){exponent_bits}" not in body, kernel

    return check
