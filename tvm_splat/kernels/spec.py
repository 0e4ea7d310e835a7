"""The static description a kernel is generated from (pure data, no TVM).

A kernel is specialised on everything that changes its loop structure: shapes, dtypes, how many
ACSR segments a row may have, whether the mask is shared by all heads, and whether any row fell
back to CSR (indexed) segments. The ACSR *values* (segment starts, steps, counts) are runtime
int32 buffers, so one compiled kernel serves every mask with the same spec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..formats._checks import INT32_MAX

#: input dtypes of every kernel (accumulation is float32 for all of them)
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")
#: dtypes a spec may hold: float64 too, for the training kernels on the CPU (gradcheck needs
#: float64 throughout; those kernels accumulate in float64 then, see ``accum_dtype``)
SPEC_DTYPES = SUPPORTED_DTYPES + ("float64",)


#: the most elements a buffer of the kernels may hold: the generated code indexes every buffer
#: with int32 arithmetic, so a larger one would be read and written at wrapped-around offsets
MAX_BUFFER_ELEMENTS = INT32_MAX


def check_buffer_sizes(buffers: dict) -> None:
    """``ValueError`` naming the first buffer of ``buffers`` (name -> shape) with more than
    :data:`MAX_BUFFER_ELEMENTS` elements (a wrong answer, not an error, if it ran)."""
    for name, shape in buffers.items():
        count = math.prod(int(s) for s in shape)
        if count > MAX_BUFFER_ELEMENTS:
            raise ValueError(f"{name} {list(shape)} would hold {count:,} elements, more than the kernels' int32 "
                             f"indexing reaches ({MAX_BUFFER_ELEMENTS:,}): run the batch or the heads in smaller calls")


@dataclass(frozen=True)
class AttentionSpec:
    """Shapes and static facts of one sparse attention problem.

    Tensors: q and the output are ``[batch, heads, seq_len, head_dim]``, k and v
    ``[batch, kv_heads, seq_len, head_dim]`` (``heads % kv_heads == 0``: grouped-query
    attention reads KV head ``h // (heads // kv_heads)``; nothing is repeated in memory), all
    of ``dtype``. ACSR metadata is int32: ``seg_start/seg_step/seg_count [mask_heads, seq_len,
    max_segments]``, ``row_ptr [mask_heads, seq_len + 1]``, ``indices [mask_heads, index_len]``;
    scores and probabilities are float32 ``[batch, heads, max_nnz]`` in ACSR value order. Mask
    head ``h % mask_heads`` serves query head ``h``.

    ``has_kv_len``: the kernels take ``kv_len [batch]`` int32 (a runtime input, placed right
    before their first output buffer): key ``j`` of batch ``b`` exists only when
    ``j < kv_len[b]``, on top of the mask. Without it the generated code is that of a kernel
    that never heard of lengths.
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
    kv_heads: int = 0  # 0: the same as ``heads`` (normalised on creation)
    has_kv_len: bool = False

    def __post_init__(self):
        if self.kv_heads == 0:
            object.__setattr__(self, "kv_heads", self.heads)
        for name in ("batch", "heads", "kv_heads", "seq_len", "head_dim", "max_segments", "index_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in SPEC_DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; expected one of {SPEC_DTYPES}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.mask_heads not in (1, self.heads):
            raise ValueError(
                f"the ACSR mask has {self.mask_heads} heads but the input has {self.heads} heads"
            )
        if self.max_nnz < 0:
            raise ValueError(f"max_nnz must be >= 0, got {self.max_nnz}")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite, got {self.scale}")
        if not isinstance(self.has_kv_len, bool):
            raise ValueError(f"has_kv_len must be a bool, got {self.has_kv_len!r}")
        # k and v (kv_heads <= heads) are no larger
        check_buffer_sizes({"q (and the output)": (self.batch, self.heads, self.seq_len, self.head_dim)})

    @classmethod
    def from_acsr(cls, acsr, batch, heads, head_dim, dtype, scale=None, kv_heads=None, has_kv_len=False):
        """Spec for running ``acsr`` on q ``[batch, heads, acsr.n, head_dim]`` and k, v with
        ``kv_heads`` heads (default ``heads``) of ``dtype``; ``has_kv_len``: with per-batch key
        lengths."""
        acsr.check_heads(heads)
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
            has_indexed=acsr.has_indexed,
            scale=float(1.0 / math.sqrt(head_dim) if scale is None else scale),
            kv_heads=int(heads if kv_heads is None else kv_heads),
            has_kv_len=bool(has_kv_len),
        )

    @property
    def accum_dtype(self) -> str:
        """float64 for float64 inputs, else float32."""
        return "float64" if self.dtype == "float64" else "float32"

    @property
    def group(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads

    @property
    def key(self) -> str:
        """A short, filesystem-safe identity for caches and tuning logs (unchanged for
        ``kv_heads == heads``, so records made before GQA existed still match; ``_kvlen`` marks
        kernels that take key lengths)."""
        gqa = "" if self.kv_heads == self.heads else f"_kv{self.kv_heads}"
        lengths = "_kvlen" if self.has_kv_len else ""
        return (
            f"b{self.batch}_h{self.heads}{gqa}_n{self.seq_len}_d{self.head_dim}_{self.dtype}"
            f"_mh{self.mask_heads}_s{self.max_segments}_z{self.max_nnz}_l{self.index_len}"
            f"_{'idx' if self.has_indexed else 'aff'}_sc{self.scale:.6g}{lengths}"
        )
