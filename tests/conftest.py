"""Shared fixtures: seeded RNG, a private kernel cache, CUDA availability."""
import os
import tempfile

import numpy as np
import pytest

# Compiled kernels go to a per-run cache so tests never read a stale library.
os.environ.setdefault("TVM_SPLAT_CACHE_DIR", tempfile.mkdtemp(prefix="tvm_splat_cache_"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def cuda_available() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:
        return False
