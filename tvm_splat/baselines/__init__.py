"""Baselines we compare against: TVM's own dense attention (and, in benchmarks, PyTorch)."""
from .tvm_dense import compile_dense_attention, dense_attention_module

__all__ = ["compile_dense_attention", "dense_attention_module"]
