"""Sequence-parallel sparse attention on several GPUs: ours against what users have.

Implementations, every rank holding one consecutive shard of q, k, v (bf16 by default):

* ``single``: ``tvm_splat.sparse_attention`` on the whole sequence on rank 0's GPU alone (the
  scaling reference);
* ``ours``: ``tvm_splat.distributed.sparse_attention`` (halos from the two neighbours);
* ``allgather``: every rank all-gathers all of k and v, then runs our kernel for its rows
  (the same kernels as ``ours``: only the communication differs);
* ``context_parallel``: PyTorch's context parallel (``torch.distributed.tensor.experimental.
  context_parallel``, ring attention over SDPA). Its SDPA takes no mask but ``is_causal``, so for
  a causal window it computes full causal attention and for a window full attention: what users
  of it get, not the same function (``computes`` in the JSON says which).

Per case the JSON holds per-call ``ms`` (calls back to back, the slowest rank, median of
``--repeats`` windows), ``tokens_per_s``, ``bytes_in_per_rank`` (the largest rank's received
bytes per call, from :func:`tvm_splat.distributed.halo_bytes` for ours and from the message sizes
for the others), ``speedup_vs_single`` and ``scaling_efficiency`` (speedup / ranks), and
``max_abs_diff`` of ours against ``allgather`` (every rank) and against ``single`` (rank 0's rows).

    # on a 2- or 4-GPU machine (NCCL); spawns one process per GPU itself, or runs under torchrun
    python benchmarks/sequence_parallel.py --out benchmarks/results
    torchrun --nproc-per-node 4 benchmarks/sequence_parallel.py --out benchmarks/results
    # the harness on the CPU (gloo, 2 processes, tiny sizes)
    python benchmarks/sequence_parallel.py --tiny --world 2 --out /tmp/sp

Writes ``<out>/<gpu>x<N>_sequence_parallel.json`` and ``.png`` (``cpux<N>`` on the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import tvm_splat
from tvm_splat import distributed as tsd
from tvm_splat.distributed.launch import run_ranks
from tvm_splat.distributed.layout import ELEMENT_BYTES, ShardLayout, local_acsr, split_pattern

#: the issue's cases: n = 128k-512k, causal window 4096 and window ±1024, Mistral-like heads
FULL = dict(seqs=(131072, 262144, 524288), patterns=("causal_window:4096", "window:1024"), heads=32, kv_heads=8,
            head_dim=128, dtype="bfloat16")
#: the harness on a CPU: small enough for two gloo processes on two cores in about a minute
TINY = dict(seqs=(256, 512), patterns=("causal_window:32", "window:16"), heads=2, kv_heads=1, head_dim=16,
            dtype="float32")
#: a measured window lasts at least this long (seconds): back-to-back calls, then one sync
WINDOW_S = 0.05


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats, group=None):
    """Per-call seconds: median over ``repeats`` windows of back-to-back calls, each window's
    time the slowest rank's (an all-reduce of the max); one warm-up call first."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    per_window = max(1, int(WINDOW_S / max(time.perf_counter() - start, 1e-6)))
    if group is not False:  # every rank makes the same number of (collective) calls
        agreed = torch.tensor([per_window], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        per_window = int(agreed.item())
    samples = []
    for _ in range(repeats):
        if group is not False:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(per_window):
            fn()
        _sync(device)
        elapsed = torch.tensor([(time.perf_counter() - start) / per_window], dtype=torch.float64,
                               device=device if dist.get_backend() == "nccl" else "cpu")
        if group is not False:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        samples.append(float(elapsed.item()))
    return statistics.median(samples)


def _inputs(n, cfg, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(n)
    q = torch.randn(1, cfg["heads"], n, cfg["head_dim"], generator=gen).to(device=device, dtype=dtype)
    k, v = (torch.randn(1, cfg["kv_heads"], n, cfg["head_dim"], generator=gen).to(device=device, dtype=dtype)
            for _ in range(2))
    return q, k, v


def _allgather_attention(pattern, q, k, v, rank, world):
    """All of k and v to every rank, then our kernel for this rank's rows over all n columns
    (a layout whose halos are the whole sequence, so the same local mask builder serves)."""
    local, tokens = split_pattern(pattern)
    if tokens:
        raise ValueError("the allgather baseline here covers the windowed bench patterns only")
    shard, n = q.shape[2], q.shape[2] * world
    layout = ShardLayout(n, world, rank, shard, rank * shard, n - (rank + 1) * shard,
                         tokens=np.zeros(0, dtype=np.int64), outside=np.zeros(0, dtype=np.int64))
    attn = tvm_splat.plan(local_acsr(pattern, layout), (q.shape[0], q.shape[1], n, q.shape[3]),
                          (k.shape[0], k.shape[1], n, k.shape[3]), str(q.dtype).replace("torch.", ""), q.device)
    packed = torch.stack((k, v))
    parts = [torch.empty_like(packed) for _ in range(world)]

    def run():
        dist.all_gather(parts, packed)
        full = torch.cat(parts, dim=3)
        q_full = q.new_zeros(attn.q_shape)
        q_full[:, :, rank * shard:(rank + 1) * shard] = q
        return attn.run(q_full, full[0], full[1])[:, :, rank * shard:(rank + 1) * shard]

    return run


def _context_parallel(pattern, q_full, k_full, v_full, world, device):
    """PyTorch's ring attention over SDPA: ``(run, computes, context)``. The context (entered
    here, left by the caller) shards copies of the full tensors once, as a training step does;
    ``run`` is one SDPA call inside it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    causal = getattr(split_pattern(pattern)[0], "causal", False)
    mesh = init_device_mesh(device.type, (world,))
    gqa = q_full.shape[1] != k_full.shape[1]
    q, k, v = q_full.clone(), k_full.clone(), v_full.clone()
    context = context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2], no_restore_buffers={q, k, v})
    context.__enter__()

    def run():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return run, "causal attention (all j <= i)" if causal else "dense attention (no mask)", context


def _case(n, pattern, cfg, rank, world, device, repeats):
    dtype = getattr(torch, cfg["dtype"])
    q_full, k_full, v_full = _inputs(n, cfg, device, dtype)
    q, k, v = (tsd.shard(x) for x in (q_full, k_full, v_full))
    shard_shape, kv_shard = tuple(q.shape), tuple(k.shape)
    row = {"n": n, "pattern": pattern, "world": world, "shard": n // world, **cfg}
    kv_row_bytes = 2 * cfg["kv_heads"] * cfg["head_dim"] * ELEMENT_BYTES[cfg["dtype"]]
    ring = (world - 1) * (n // world) * kv_row_bytes
    volume = tsd.halo_bytes(pattern, shard_shape, kv_shard, cfg["dtype"], world)
    results = {}

    def record(name, fn, moved, **extra):
        try:
            sec = _timed(fn, device, repeats)
            results[name] = {"ms": sec * 1e3, "tokens_per_s": n / sec, "bytes_in_per_rank": moved, **extra}
        except Exception as why:  # recorded, never hidden: e.g. out of memory, an unsupported backend
            results[name] = {"error": f"{type(why).__name__}: {why}"[:500]}
            _sync(device)

    ours = lambda: tsd.sparse_attention(q, k, v, pattern)  # noqa: E731
    record("ours", ours, max(volume.total), halo_rows=volume.halo_rows, ratio_to_ring=volume.ratio_to_ring)
    mine = ours().float()
    try:
        gathered = _allgather_attention(pattern, q, k, v, rank, world)
        record("allgather", gathered, ring)
        diff = (mine - gathered().float()).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        row["max_abs_diff_vs_allgather"] = float(diff.item())
    except Exception as why:
        results["allgather"] = {"error": f"{type(why).__name__}: {why}"[:500]}
    try:
        cp, computes, context = _context_parallel(pattern, q_full, k_full, v_full, world, device)
        try:
            record("context_parallel", cp, ring, computes=computes)
        finally:
            context.__exit__(None, None, None)
    except Exception as why:
        results["context_parallel"] = {"error": f"{type(why).__name__}: {why}"[:500]}
    # one device alone: rank 0 runs the whole sequence while the others wait
    single = {}
    if rank == 0:
        try:
            sec = _timed(lambda: tvm_splat.sparse_attention(q_full, k_full, v_full, pattern), device, repeats,
                         group=False)
            single = {"ms": sec * 1e3, "tokens_per_s": n / sec, "bytes_in_per_rank": 0}
            ref = tvm_splat.sparse_attention(q_full, k_full, v_full, pattern)[:, :, :n // world]
            row["max_abs_diff_vs_single_rank0"] = float((mine - ref.float()).abs().max().item())
        except Exception as why:
            single = {"error": f"{type(why).__name__}: {why}"[:500]}
    dist.barrier()
    results["single"] = single
    for res in results.values():
        if "ms" in res and "ms" in single:
            res["speedup_vs_single"] = single["ms"] / res["ms"]
            res["scaling_efficiency"] = res["speedup_vs_single"] / world
    row["results"] = results
    return row


def _uses_cuda(args) -> bool:
    return torch.cuda.is_available() and not args.tiny


def _worker(rank, world, args):
    """One rank's cases, in a process group already joined (``run_ranks`` or torchrun)."""
    cuda = _uses_cuda(args)
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    cfg = dict(TINY if args.tiny else FULL)
    if args.seq:
        cfg["seqs"] = tuple(args.seq)
    if args.pattern:
        cfg["patterns"] = tuple(args.pattern)
    rows = []
    for n in cfg["seqs"]:
        for pattern in cfg["patterns"]:
            case_cfg = {key: cfg[key] for key in ("heads", "kv_heads", "head_dim", "dtype")}
            rows.append(_case(n, pattern, case_cfg, rank, world, device, args.repeats))
            tsd.clear_plans()
            tvm_splat.attention.clear_plans()
            if rank == 0:
                print(json.dumps({k: rows[-1][k] for k in ("n", "pattern")}),
                      {name: round(r.get("ms", float("nan")), 3) for name, r in rows[-1]["results"].items()},
                      flush=True)
    if rank == 0:
        name = (torch.cuda.get_device_name(device).split()[-1].lower() if cuda else "cpu") + f"x{world}"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "world": world,
                "backend": dist.get_backend(), "torch": torch.__version__, "tiny": args.tiny,
                "command": " ".join(sys.argv)}
        path = out / f"{name}_sequence_parallel.json"
        path.write_text(json.dumps({"meta": meta, "cases": rows}, indent=1))
        _plot(rows, path.with_suffix(".png"), meta)
        print(f"wrote {path} and {path.with_suffix('.png')}", flush=True)


def _plot(rows, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = sorted({r["pattern"] for r in rows})
    fig, axes = plt.subplots(1, len(patterns), figsize=(6 * len(patterns), 4.5), squeeze=False)
    for ax, pattern in zip(axes[0], patterns):
        cases = [r for r in rows if r["pattern"] == pattern]
        for name in ("single", "ours", "allgather", "context_parallel"):
            pts = [(r["n"], r["results"][name]["tokens_per_s"]) for r in cases if "ms" in r["results"].get(name, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel("tokens / s (forward)")
        ax.set_title(f"{pattern}, {meta['world']} ranks ({meta['device']})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for <gpu>x<N>_sequence_parallel.json and .png")
    parser.add_argument("--world", type=int, default=None,
                        help="processes to spawn (default: every GPU, or 2 on the CPU); ignored under torchrun")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU with gloo (the harness only)")
    parser.add_argument("--seq", type=int, action="append", help="sequence length (repeatable)")
    parser.add_argument("--pattern", action="append", help="pattern (repeatable)")
    parser.add_argument("--repeats", type=int, default=5, help="measured windows per implementation")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("nccl" if _uses_cuda(args) else "gloo")
        try:
            _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        finally:
            dist.destroy_process_group()
        return
    world = args.world or (torch.cuda.device_count() if _uses_cuda(args) else 2)
    if world < 1:
        parser.error("--world must be at least 1")
    run_ranks(_worker, world, args, backend="nccl" if _uses_cuda(args) else "gloo")


if __name__ == "__main__":
    main()
