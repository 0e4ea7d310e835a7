"""The static description a kernel is generated from (pure data, no TVM).

A kernel is specialised on everything that changes its loop structure: shapes, dtypes, how many
ACSR segments a row may have, whether the mask is shared by all heads, and whether any row fell
back to CSR (indexed) segments. The ACSR *values* (segment starts, steps, counts) are runtime
int32 buffers, so one compiled kernel serves every mask with the same spec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class AttentionSpec:
    """Shapes and static facts of one sparse attention problem.

    Tensors: q, k, v and the output are ``[batch, heads, seq_len, head_dim]`` of ``dtype``;
    ACSR metadata is int32: ``seg_start/seg_step/seg_count [mask_heads, seq_len, max_segments]``,
    ``row_ptr [mask_heads, seq_len + 1]``, ``indices [mask_heads, index_len]``; scores and
    probabilities are float32 ``[batch, heads, max_nnz]`` in ACSR value order.
    """

    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str
    mask_heads: int
    max_segments: int
    max_nnz: int
    index_len: int
    has_indexed: bool
    scale: float

    def __post_init__(self):
        for name in ("batch", "heads", "seq_len", "head_dim", "max_segments", "index_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; expected one of {SUPPORTED_DTYPES}")
        if self.mask_heads not in (1, self.heads):
            raise ValueError(
                f"the ACSR mask has {self.mask_heads} heads but the input has {self.heads} heads"
            )
        if self.max_nnz < 0:
            raise ValueError(f"max_nnz must be >= 0, got {self.max_nnz}")

    @classmethod
    def from_acsr(cls, acsr, batch, heads, head_dim, dtype, scale=None):
        """Spec for running ``acsr`` on inputs ``[batch, heads, acsr.n, head_dim]`` of ``dtype``."""
        acsr.check_heads(heads)
        facts = acsr.__dict__.setdefault("_spec_facts", {})  # computed once per ACSR
        if not facts:
            facts["has_indexed"] = bool(((acsr.seg_step == 0) & (acsr.seg_count > 0)).any())
        return cls(
            batch=int(batch),
            heads=int(heads),
            seq_len=int(acsr.n),
            head_dim=int(head_dim),
            dtype=str(dtype),
            mask_heads=int(acsr.num_heads),
            max_segments=int(acsr.max_segments),
            max_nnz=max(int(acsr.max_nnz), 1),
            index_len=int(acsr.indices.shape[1]),
            has_indexed=facts["has_indexed"],
            scale=float(1.0 / math.sqrt(head_dim) if scale is None else scale),
        )

    @property
    def key(self) -> str:
        """A short, filesystem-safe identity for caches and tuning logs."""
        return (
            f"b{self.batch}_h{self.heads}_n{self.seq_len}_d{self.head_dim}_{self.dtype}"
            f"_mh{self.mask_heads}_s{self.max_segments}_z{self.max_nnz}_l{self.index_len}"
            f"_{'idx' if self.has_indexed else 'aff'}_sc{self.scale:.6g}"
        )
