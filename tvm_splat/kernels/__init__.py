"""Unscheduled TensorIR kernels for sparse attention over ACSR (see :mod:`.attention`)."""
from .attention import ROW_BLOCK, fused_func, sddmm_func, softmax_func, spmm_func
from .spec import AttentionSpec

VARIANTS = ("row", "separate")
# Function names of each variant (known without generating the PrimFuncs).
KERNEL_NAMES = {"row": ("fused",), "separate": ("sddmm", "softmax", "spmm")}


def attention_funcs(spec: AttentionSpec, variant: str = "row") -> dict:
    """The row-parallel PrimFuncs of one variant, by name: ``row`` -> ``{"fused"}`` (one kernel,
    online softmax), ``separate`` -> ``{"sddmm", "softmax", "spmm"}``. The tiled kernel lives in
    :mod:`tvm_splat.kernels.tiled`."""
    if variant == "row":
        return {"fused": fused_func(spec)}
    if variant == "separate":
        return {"sddmm": sddmm_func(spec), "softmax": softmax_func(spec), "spmm": spmm_func(spec)}
    raise ValueError(f"unknown kernel variant {variant!r}; expected one of {VARIANTS}")


__all__ = [
    "AttentionSpec", "VARIANTS", "ROW_BLOCK", "attention_funcs",
    "fused_func", "sddmm_func", "softmax_func", "spmm_func",
]
