"""Rank functions of the distributed tests (a helper module, not a test file).

``run_ranks(fn, world, *args)`` is the package's :func:`tvm_splat.distributed.launch.run_ranks`
with a hang timeout: ``world`` spawned processes in a gloo group (``backend="nccl"``: NCCL, rank
r on GPU r) each call ``fn(rank, world, *args)``. The rank functions below live here, in a
module the spawned children import by name (the test modules are imported by pytest under
generated names, which the children could not import).
"""
import os

import pytest
import torch

from tvm_splat.distributed.launch import run_ranks as _run_ranks

#: per run of ranks: spawning costs ~10 s here (each child imports torch and TVM), compiling
#: the local kernels ~1 s per case and rank on the 2-core machine
TIMEOUT_S = 180.0


def run_ranks(fn, world, *args, timeout=TIMEOUT_S, backend="gloo"):
    """:func:`tvm_splat.distributed.launch.run_ranks` with the tests' hang timeout."""
    _run_ranks(fn, world, *args, backend=backend, timeout=timeout)


def inputs(case, world):
    """Full-sequence q, k, v of a case ``(pattern, shard, heads, kv_heads, head_dim, dtype)``,
    the same on every rank and in the parent (seeded)."""
    _, shard, heads, kv_heads, dim, dtype = case
    gen = torch.Generator().manual_seed(shard * 131 + heads * 7 + world)
    n = shard * world
    return (torch.randn(1, heads, n, dim, generator=gen).to(dtype),
            torch.randn(1, kv_heads, n, dim, generator=gen).to(dtype),
            torch.randn(1, kv_heads, n, dim, generator=gen).to(dtype))


def sharded_outputs(rank, world, cases, out_dir, device="cpu"):
    """Each case's sharded output of this rank, saved (on the CPU) as ``<out_dir>/<case>_<rank>.pt``;
    ``device="cuda"``: rank r computes on GPU r."""
    from tvm_splat import distributed as tsd

    where = f"cuda:{rank}" if device == "cuda" else "cpu"
    for i, case in enumerate(cases):
        q, k, v = (tsd.shard(x.to(where)) for x in inputs(case, world))
        torch.save(tsd.sparse_attention(q, k, v, case[0]).cpu(), os.path.join(out_dir, f"{i}_{rank}.pt"))


def refused(rank, world, out_dir):
    """Bad input on every rank gets the same clear error on every rank, and no hang."""
    from tvm_splat import ACSR, Window
    from tvm_splat import distributed as tsd

    shard = 16
    q = k = v = torch.randn(1, 2, shard, 8)
    messages = []
    with pytest.raises(ValueError, match="too wide") as err:  # rank 0 reaches 20 rows right, past rank 1
        tsd.sparse_attention(q, k, v, "window:20")
    messages.append(str(err.value))
    with pytest.raises(ValueError, match="closed-form pattern"):
        tsd.sparse_attention(q, k, v, ACSR.from_pattern(Window(2), shard * world))
    with pytest.raises(ValueError, match="closed-form pattern"):
        tsd.sparse_attention(q, k, v, Window(2).dense_mask(shard * world))
    with pytest.raises(ValueError, match="not divisible"):
        tsd.shard(torch.randn(1, 2, shard * world + 1, 8))
    with pytest.raises(ValueError, match="disagree on shard length"):  # rank 0 holds one row more
        tsd.sparse_attention(*(torch.randn(1, 2, shard + (rank == 0), 8) for _ in range(3)), "window:2")
    # the group still works after every refusal: nothing was left half-sent
    out = tsd.sparse_attention(q, k, v, "window:2")
    assert out.shape == q.shape and torch.isfinite(out).all()
    with open(os.path.join(out_dir, f"refused_{rank}.txt"), "w") as f:
        f.write("\n".join(messages))


def fail_on_rank_one(rank, world):
    """Rank 1 raises (the launcher's error path)."""
    if rank == 1:
        raise RuntimeError(f"rank {rank} of {world} failed on purpose")


def fail_on_rank_one_exit_late(rank, world):
    """Rank 1 raises first but its process ends late (a non-daemon thread keeps it 5 s); rank 0
    raises 1 s later and ends at once, so its process is the first the join finds dead: the
    race of a peer's consequent error, made certain."""
    import threading
    import time

    if rank == 1:
        threading.Thread(target=time.sleep, args=(5,)).start()
        raise RuntimeError(f"rank {rank} of {world} failed on purpose")
    time.sleep(1)
    raise RuntimeError(f"rank {rank} of {world} failed after rank 1")


def hang_on_rank_one(rank, world):
    """Rank 1 never finishes in time (the launcher's timeout)."""
    import time

    if rank == 1:
        time.sleep(600)
