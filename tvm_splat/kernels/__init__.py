"""Unscheduled TensorIR kernels for sparse attention over ACSR (see :mod:`.attention`)."""
from .attention import ROW_BLOCK, fused_func, sddmm_func, softmax_func, spmm_func
from .spec import AttentionSpec

VARIANTS = ("fused", "separate")


def attention_funcs(spec: AttentionSpec, variant: str = "fused") -> dict:
    """The PrimFuncs one variant needs, by name: ``{"fused"}`` or ``{"sddmm","softmax","spmm"}``."""
    if variant == "fused":
        return {"fused": fused_func(spec)}
    if variant == "separate":
        return {"sddmm": sddmm_func(spec), "softmax": softmax_func(spec), "spmm": spmm_func(spec)}
    raise ValueError(f"unknown kernel variant {variant!r}; expected one of {VARIANTS}")


__all__ = [
    "AttentionSpec", "VARIANTS", "ROW_BLOCK", "attention_funcs",
    "fused_func", "sddmm_func", "softmax_func", "spmm_func",
]
