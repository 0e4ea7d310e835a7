"""Benchmark cases as plain data."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

# The patterns of the SPLAT suite: windows, dilated windows, Sparse-Transformer strided,
# Longformer-like window + global tokens, block-local.
SUITE_PATTERNS = (
    "window:128", "window:256", "window:512",
    "dilated:256:2", "dilated:128:4",
    "strided:64", "strided:128",
    "global:64+window:256",
    "block:256",
)


@dataclass(frozen=True)
class BenchCase:
    pattern: str
    seq_len: int
    heads: int
    head_dim: int
    batch: int
    dtype: str = "float16"

    @property
    def name(self) -> str:
        return f"{self.pattern} n={self.seq_len} h={self.heads} d={self.head_dim} b={self.batch}"

    def as_dict(self):
        return asdict(self)


def suite(name: str = "quick"):
    """``quick``: every pattern at n=4096, 12 heads, d=64, batch 1, plus n=16384/d=128/batch 8
    probes; ``full``: the cross product the issue lists (hours of GPU time)."""
    if name == "quick":
        cases = [BenchCase(p, 4096, 12, 64, 1) for p in SUITE_PATTERNS]
        cases += [
            BenchCase("window:256", 16384, 16, 64, 1),
            BenchCase("window:256", 4096, 16, 128, 1),
            BenchCase("window:256", 4096, 12, 64, 8),
            BenchCase("global:64+window:256", 1024, 12, 64, 8),
        ]
        return cases
    if name == "full":
        return [
            BenchCase(p, n, 12 if d == 64 else 16, d, b)
            for p, n, d, b in itertools.product(SUITE_PATTERNS, (1024, 4096, 16384), (64, 128), (1, 8))
        ]
    if name == "tiny":  # a smoke run for CPU checks of the harness itself
        return [BenchCase("window:16", 128, 2, 16, 1, "float32")]
    raise ValueError(f"unknown suite {name!r}; expected quick, full or tiny")
