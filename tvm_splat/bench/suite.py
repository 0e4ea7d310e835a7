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

_SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class BenchCase:
    """One workload: q is ``[batch, heads, seq_len, head_dim]``, k and v
    ``[batch, kv_heads, seq_len, head_dim]`` (``kv_heads`` defaults to ``heads``; fewer is
    grouped-query attention), all of ``dtype``."""

    pattern: str
    seq_len: int
    heads: int
    head_dim: int
    batch: int
    dtype: str = "float16"
    kv_heads: int | None = None

    def __post_init__(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.dtype not in _SHORT_DTYPE:
            raise ValueError(f"bench dtype must be one of {sorted(_SHORT_DTYPE)}, got {self.dtype!r}")
        if self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(f"kv_heads must divide heads, got {self.kv_heads} and {self.heads}")

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.heads

    @property
    def name(self) -> str:
        heads = f"h={self.heads}/{self.kv_heads}" if self.gqa else f"h={self.heads}"
        return (f"{self.pattern} n={self.seq_len} {heads} d={self.head_dim} b={self.batch} "
                f"{_SHORT_DTYPE[self.dtype]}")

    def as_dict(self):
        return asdict(self)


def _both_dtypes(cases):
    return [BenchCase(**{**c.as_dict(), "dtype": dt}) for c in cases for dt in ("float16", "bfloat16")]


# Shapes of real long-context models, each in fp16 and bf16 (34 cases). Sized for about ten
# minutes of one H200 with every implementation (see benchmarks/README.md): one shape per model
# family and size where a family repeats, batch where it changes the picture.
MODEL_SHAPES = (
    # Mistral-7B: causal sliding window of 4096 keys (the query and 4095 before it, as in
    # HuggingFace's sliding_window=4096), 32 query / 8 KV heads, d=128
    BenchCase("causal_window:4095", 8192, 32, 128, 1, kv_heads=8),
    BenchCase("causal_window:4095", 16384, 32, 128, 1, kv_heads=8),
    BenchCase("causal_window:4095", 32768, 32, 128, 1, kv_heads=8),
    # Longformer-base (12 heads) and -large (16 heads): window ±256 (attention_window=512) and
    # a few global tokens (CLS and a short question), d=64, n=4096
    BenchCase("global:4+window:256", 4096, 12, 64, 1),
    BenchCase("global:4+window:256", 4096, 12, 64, 4),
    BenchCase("global:4+window:256", 4096, 12, 64, 8),
    BenchCase("global:4+window:256", 4096, 16, 64, 1),
    BenchCase("global:4+window:256", 4096, 16, 64, 8),
    # BigBird-like without the random blocks: global first block, block-local 64, window ±32
    BenchCase("global:64+block:64+window:32", 4096, 12, 64, 1),
    BenchCase("global:64+block:64+window:32", 4096, 12, 64, 4),
    # long context: window ±1024, d=128, n=32k
    BenchCase("window:1024", 32768, 16, 128, 1),
    # block-local 128 at n=8k
    BenchCase("block:128", 8192, 16, 64, 1),
    # dilated window and Sparse-Transformer strided (causal, stride = local = 128) at n=8k
    BenchCase("dilated:256:2", 8192, 12, 64, 1),
    BenchCase("causal_strided:128", 8192, 12, 64, 1),
    BenchCase("causal_strided:128", 8192, 16, 128, 1),
    # short sequences, large batch
    BenchCase("global:4+window:128", 1024, 12, 64, 32),
    BenchCase("window:256", 2048, 16, 64, 16),
)


def suite(name: str = "quick"):
    """``quick``: every pattern at n=4096, 12 heads, d=64, batch 1, fp16, plus n=16384/d=128/
    batch 8 probes; ``models``: :data:`MODEL_SHAPES` in fp16 and bf16; ``full``: the cross
    product the first issue lists (hours of GPU time); ``tiny``: a CPU smoke run."""
    if name == "quick":
        cases = [BenchCase(p, 4096, 12, 64, 1) for p in SUITE_PATTERNS]
        cases += [
            BenchCase("window:256", 16384, 16, 64, 1),
            BenchCase("window:256", 4096, 16, 128, 1),
            BenchCase("window:256", 4096, 12, 64, 8),
            BenchCase("global:64+window:256", 1024, 12, 64, 8),
        ]
        return cases
    if name == "models":
        return _both_dtypes(MODEL_SHAPES)
    if name == "full":
        return [
            BenchCase(p, n, 12 if d == 64 else 16, d, b)
            for p, n, d, b in itertools.product(SUITE_PATTERNS, (1024, 4096, 16384), (64, 128), (1, 8))
        ]
    if name == "tiny":  # a smoke run for CPU checks of the harness itself
        return [BenchCase("window:16", 128, 2, 16, 1, "float32")]
    raise ValueError(f"unknown suite {name!r}; expected quick, models, full or tiny")


SUITES = ("tiny", "quick", "models", "full")
