"""Unscheduled TensorIR kernels for sparse attention over ACSR, generated from an
:class:`AttentionSpec` (pure functions of the spec; schedules live in :mod:`tvm_splat.schedules`).

Kernel families (``VARIANTS``):

* ``tiled`` (:mod:`.tiled`, :mod:`.tiled_mma`): the geometry-driven tiled kernel over a tile
  plan, online softmax; a logical form for CPUs / CUDA cores and a warp-level ``mma.sync`` form
  for tensor cores; plus ``merge`` and ``fallback`` kernels;
* ``row`` (:mod:`.row`): one mask row per program, online softmax;
* ``separate`` (:mod:`.row`): SPLAT's three kernels, R-SDDMM, row softmax, R-SpMM.
"""
from .row import ROW_BLOCK, row_func, sddmm_func, softmax_func, spmm_func
from .spec import SUPPORTED_DTYPES, AttentionSpec

#: every kernel family, by the name ``sparse_attention(variant=...)`` takes
VARIANTS = ("tiled", "row", "separate")
#: function names of the row-parallel variants (known without generating the PrimFuncs)
ROW_KERNEL_NAMES = {"row": ("row",), "separate": ("sddmm", "softmax", "spmm")}


def row_variant_funcs(spec: AttentionSpec, variant: str = "row") -> dict:
    """The PrimFuncs of a row-parallel variant by name: ``row`` -> ``{"row"}``, ``separate`` ->
    ``{"sddmm", "softmax", "spmm"}``. The tiled family is built from a tile plan
    (:func:`tvm_splat.schedules.tiled.tiled_funcs`)."""
    if variant == "row":
        return {"row": row_func(spec)}
    if variant == "separate":
        return {"sddmm": sddmm_func(spec), "softmax": softmax_func(spec), "spmm": spmm_func(spec)}
    raise ValueError(f"not a row-parallel variant: {variant!r}; expected one of {tuple(ROW_KERNEL_NAMES)}")


__all__ = [
    "AttentionSpec", "SUPPORTED_DTYPES", "VARIANTS", "ROW_KERNEL_NAMES", "ROW_BLOCK",
    "row_variant_funcs", "row_func", "sddmm_func", "softmax_func", "spmm_func",
]
