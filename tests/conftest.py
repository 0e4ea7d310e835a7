"""Shared fixtures: seeded RNG, a private kernel cache, CUDA availability, the repository's scripts."""
import importlib.util
import os
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
