"""Sequence-parallel sparse attention over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

The sequence is split in equal consecutive shards across the ranks of a process group; each rank
receives only the keys and values its rows can see from its two neighbours (a halo sized by the
pattern's reach) plus the few global tokens, and runs our single-device kernels on them.

- :func:`sparse_attention` (``q, k, v`` shards, pattern, ``group``), usable under ``torchrun``;
  :func:`shard` cuts this rank's part of a full tensor;
- :func:`halo_bytes`: what one call moves into each rank, against what ring attention moves;
- :func:`shard_layouts` / :func:`local_acsr`: each rank's halos and local mask (numpy only);
- :func:`run_ranks`: a function on N local ranks of a fresh process group, without ``torchrun``
  (errors and hangs reach the caller).

Needs torch (the ``torch`` extra). Forward only.
"""
from .attention import clear_plans, shard, sparse_attention
from .launch import free_port, run_ranks
from .layout import ExchangeVolume, ShardLayout, halo_bytes, local_acsr, shard_layouts, split_pattern

__all__ = ["sparse_attention", "shard", "clear_plans", "halo_bytes", "ExchangeVolume", "ShardLayout",
           "shard_layouts", "local_acsr", "split_pattern", "run_ranks", "free_port"]
