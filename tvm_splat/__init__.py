"""tvm_splat: sparse regular attention (ACSR) and pruned-model compaction on Apache TVM."""
