"""tvm_splat: sparse regular attention (ACSR) and pruned-model compaction on Apache TVM.

Public API (thin; everything else lives in submodules):

- patterns and the ACSR format: :mod:`tvm_splat.formats`
- ``plan(mask, q_shape, kv_shape, dtype, device)`` -> :class:`AttentionPlan`, then
  ``plan.run(q, k, v)``: plan a workload once, run it many times (:mod:`tvm_splat.planner`)
- ``sparse_attention(q, k, v, mask)``: the same through a small cache of plans, on numpy
  arrays or torch tensors
- ``differentiable_sparse_attention(q, k, v, mask)`` (:mod:`tvm_splat.autograd`, needs torch;
  loaded on first use): the torch custom op ``tvm_splat::sparse_attention`` with a backward,
  for training, ``torch.compile`` and ``torch.export``

Layers (each imports only from those above it in this list): ``formats`` (patterns, ACSR, tile
plans: data) -> ``kernels`` (TensorIR generators from an ``AttentionSpec``) -> ``schedules``
(``(func, target, knobs) -> func`` and default knobs) -> ``records`` (reading tuning records) ->
``compile`` (build + cache) -> ``devices`` / ``planner`` / ``attention`` (runtime) ->
``training`` (training plans) -> ``relay_passes``, ``tuning``, ``autograd``, ``baselines``, ``bench``, ``demo``, ``cli``. ``pruning`` stands
apart (torch training); ``reference``, ``timing`` and ``channel_rules`` are leaf helpers, and
``tensors`` (checks where arrays meet kernels) sits below ``formats``. ``tests/test_layers.py``
holds the order.
"""
from ._version import __version__  # noqa: F401  (the package version, re-exported)

from .formats import (  # noqa: E402
    ACSR, BlockLocal, Dense, DilatedWindow, GlobalTokens, PerHead, Strided, Union, Window,
    parse_pattern,
)
from .kernels import AttentionSpec  # noqa: E402
from .compile import compile_attention  # noqa: E402
from .planner import AttentionPlan, plan  # noqa: E402
from .attention import sparse_attention  # noqa: E402

__all__ = [
    "ACSR", "AttentionPlan", "AttentionSpec", "BlockLocal", "Dense", "DilatedWindow", "GlobalTokens",
    "PerHead", "Strided", "Union", "Window", "compile_attention", "parse_pattern", "plan", "sparse_attention",
]


def __getattr__(name):
    # torch is optional: the differentiable op (and torch) load on first use
    if name in ("autograd", "differentiable_sparse_attention"):
        import importlib

        autograd = importlib.import_module(".autograd", __name__)  # a plain ``from . import`` recurses here
        return autograd if name == "autograd" else autograd.sparse_attention
    raise AttributeError(f"module 'tvm_splat' has no attribute {name!r}")
