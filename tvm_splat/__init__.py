"""tvm_splat: sparse regular attention (ACSR) and pruned-model compaction on Apache TVM.

Public API (thin; everything else lives in submodules):

- patterns and the ACSR format: :mod:`tvm_splat.formats`
- ``sparse_attention(q, k, v, mask)``: run ACSR attention on numpy/torch tensors
- ``compile_attention(spec, target)``: compiled kernels for one :class:`AttentionSpec`
"""
__version__ = "0.1.0"

from .formats import (  # noqa: E402
    ACSR, BlockLocal, Dense, DilatedWindow, GlobalTokens, PerHead, Strided, Union, Window,
    parse_pattern,
)
from .kernels import AttentionSpec  # noqa: E402
from .compile import compile_attention  # noqa: E402
from .attention import sparse_attention  # noqa: E402

__all__ = [
    "ACSR", "AttentionSpec", "BlockLocal", "Dense", "DilatedWindow", "GlobalTokens", "PerHead",
    "Strided", "Union", "Window", "compile_attention", "parse_pattern", "sparse_attention",
]
