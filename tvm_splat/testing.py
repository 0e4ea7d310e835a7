"""Awkward mask cases shared by the kernel tests (CPU), the CUDA checks and the benchmarks."""
import numpy as np

from tvm_splat.formats import (
    ACSR, BlockLocal, DilatedWindow, GlobalTokens, PerHead, Strided, Window,
)


def _empty_rows_mask(n=29):
    rng = np.random.default_rng(1)
    m = rng.random((n, n)) < 0.2
    m[[0, 7, n - 1]] = False  # rows that attend to nothing
    return m


def mask_cases():
    """(name, ACSR, heads) triples: every pattern family, unions, per-head, fallback, empty rows."""
    rng = np.random.default_rng(2)
    return [
        ("window n=37", ACSR.from_pattern(Window(5), 37), 2),
        ("window wider than n", ACSR.from_pattern(Window(100), 23), 2),
        ("causal window", ACSR.from_pattern(Window(4, causal=True), 33), 2),
        ("dilated", ACSR.from_pattern(DilatedWindow(3, 2), 41), 2),
        ("strided", ACSR.from_pattern(Strided(8), 50), 2),
        ("block-local", ACSR.from_pattern(BlockLocal(16), 45), 2),
        ("global+window", ACSR.from_pattern(GlobalTokens(3) | Window(4), 39), 2),
        ("per-head", ACSR.from_pattern(PerHead((Window(2), DilatedWindow(2, 3), BlockLocal(7))), 31), 3),
        ("irregular -> CSR fallback", ACSR.from_mask(rng.random((34, 34)) < 0.3, max_segments=2), 2),
        ("empty rows", ACSR.from_mask(_empty_rows_mask()), 2),
        ("one head", ACSR.from_pattern(Window(3), 19), 1),
    ]


def qkv(rng, batch, heads, n, d, dtype):
    return [rng.standard_normal((batch, heads, n, d)).astype(dtype) for _ in range(3)]


def dense_mask(acsr):
    m = acsr.to_dense()
    return m[0] if acsr.num_heads == 1 else m
