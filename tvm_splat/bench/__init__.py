"""The ``tvm-splat bench`` suite: cases (data), baselines (callables), runner and report."""
