"""The tensor-core training kernels under knob variants, one kernel at a time (CUDA GPU).

    python benchmarks/training_kernels_ab.py OUT.json [CASE,CASE..] [VARIANTS_D64 [VARIANTS_D128]]

CASE: names of :data:`CASES` (default: all). VARIANTS: a JSON list of
:class:`~tvm_splat.schedules.backward_mma.BackwardMmaKnobs` overrides for the cases at head_dim
64 and at 128 (default: :data:`VARIANTS`), e.g. ``'[{}, {"dq_bc": 32, "dkdv_bc": 32}]'``;
``{}`` is the default knobs (at head_dim 128 on one segment per key row: the bulk fused dQ,
so variants there that change ``stages`` add ``"fused_dq": false, "dkdv_tma": false``; where the
transposed plan steps rows by one the default's bwd_dkdv takes Q and dO by TMA, at head_dim 64 too,
in its wgmma form beside an mma.sync bwd_dq, so variants there that leave that form add
``"wgmma": false, "dkdv_tma": false, "dq_wgmma": null``), and every other variant's
gradients are compared with its (``max_diff``). Times: throughput of ``fwd_lse`` (the plan's forward) and of the backward
(``TrainingPlan.backward``, both kernels), then of ``bwd_dq`` and ``bwd_dkdv`` alone (plans of
one component), each by CUDA events over back-to-back calls
(:func:`tvm_splat.timing.throughput_ms`), on the same random fp16 inputs for every variant.
``benchmarks/results/h200_backward_knobs.json`` holds this script's runs over several forms of
the kernels (each form a commit of ``kernels/backward_mma.py``).
"""
import dataclasses
import json
import sys

import torch

from tvm_splat.formats import parse_pattern
from tvm_splat.schedules.backward_mma import per_query_head_sums
from tvm_splat.timing import throughput_ms
from tvm_splat.training import plan_training

#: name -> (pattern, batch, heads, kv_heads, n, head_dim): shapes of the models suite
CASES = {
    "lf": ("global:4+window:256", 4, 12, 12, 4096, 64),  # Longformer-base, batch 4
    "lf1": ("global:4+window:256", 1, 12, 12, 4096, 64),  # Longformer-base, batch 1: global tiles set the length
    "mis": ("causal_window:4095", 1, 32, 8, 8192, 128),  # Mistral-7B, n=8192
    "win": ("window:1024", 1, 16, 16, 32768, 128),  # long-context window
    "str": ("causal_strided:128", 1, 12, 12, 8192, 64),  # Sparse Transformer (two components)
    "dil": ("dilated:256:2", 1, 12, 12, 8192, 128),  # dilated at d=128: one component, column blocks of step 2
    "lf8": ("global:4+window:256", 8, 16, 16, 4096, 64),  # Longformer-large, batch 8: a grid of 128 heads
    "g1k": ("global:4+window:128", 32, 12, 12, 1024, 64),  # n=1024, batch 32: 384 heads of 16 short tiles
    "gqa64": ("causal_window:1023", 4, 16, 4, 4096, 64),  # grouped KV heads at head_dim 64
    "w16": ("window:256", 16, 16, 16, 2048, 64),  # a window at batch 16: one segment per key row
    "blk": ("block:128", 1, 16, 16, 8192, 64),  # block-local (BigBird's local part), n=8192
}
#: both backward kernels in mma.sync (from a head_dim 64 default whose bwd_dkdv takes TMA)
_MMA_SYNC = {"wgmma": False, "dkdv_tma": False, "dq_wgmma": None}
#: head_dim -> knob overrides tried by default
VARIANTS = {
    64: [{}, _MMA_SYNC, {"dq_bc": 32, "dkdv_bc": 32}, {**_MMA_SYNC, "stages": 1}, {**_MMA_SYNC, "br": 32, "warps": 2}],
    128: [{}, {"dq_bc": 16, "dkdv_bc": 16}, {"dq_bc": 64}, {"stages": 1}, {"br": 128, "warps": 8}],
}


def _time(fn):
    return throughput_ms(fn, calls=20, windows=3, warmup=3, device="cuda")


def run_case(name, variants):
    """One result row per variant of case ``name`` (errors recorded, not raised)."""
    from tvm_splat.training import _DKDV_PLAN, _DQ_PLAN

    pattern, b, h, kvh, n, d = CASES[name]
    mask = parse_pattern(pattern)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, dout = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, kvh, n, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(2))
    base = plan_training(mask, q.shape, k.shape, "float16", "cuda")
    rows, reference = [], None
    for variant in variants:
        row = {"case": name, "variant": variant}
        try:
            knobs = dataclasses.replace(base.mma_knobs, **variant)
            plan = plan_training(mask, q.shape, k.shape, "float16", "cuda", mma_knobs=knobs)
            if plan.kernels != "tensor-cores":
                raise ValueError(f"not the tensor-core kernels: {plan.fallback_reason}")
            out, lse = plan.forward(q, k, v)
            dlse = torch.zeros_like(lse)
            grads = plan.backward(q, k, v, out, lse, dout, dlse)
            if reference is None:
                reference = grads
            row["max_diff"] = max((g.float() - r.float()).abs().max().item() for g, r in zip(grads, reference))
            row["components"] = [p.shape.num_components for p in plan.tile_plans]
            row["split_slots"] = [p.shape.num_slots for p in plan.tile_plans]
            row["fwd_ms"] = _time(lambda: plan.forward(q, k, v))
            row["bwd_ms"] = _time(lambda: plan.backward(q, k, v, out, lse, dout, dlse))
            if row["components"][1:] == [1, 1] and row["split_slots"][1:] == [0, 0]:  # one kernel each
                dq, dk, dv = (torch.empty_like(g) for g in grads)
                delta = torch.zeros_like(lse)
                fused = [torch.zeros(q.shape, dtype=torch.float32, device="cuda")] if plan.mma_knobs.fused_dq else []
                if per_query_head_sums(plan.spec, plan.mma_knobs):  # its programs add dK, dV into float32 sums
                    fused += [torch.zeros(k.shape, dtype=torch.float32, device="cuda") for _ in range(2)]
                if not fused:  # the fused-dQ form has no bwd_dq: its dQ is in bwd_dkdv's time
                    row["dq_ms"] = _time(lambda: plan._launch("bwd_dq", q, k, v, out, dout, lse, dlse, *_DQ_PLAN,
                                                              dq, delta))
                row["dkdv_ms"] = _time(lambda: plan._launch("bwd_dkdv", q, k, v, dout, lse, delta, *_DKDV_PLAN,
                                                            dk, dv, *fused))
        except Exception as err:  # noqa: BLE001 - a refused or failing variant is a result
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(out_path, names=None, variants=None):
    if not torch.cuda.is_available():
        raise SystemExit("training_kernels_ab.py needs a CUDA GPU")
    rows = []
    for name in names or list(CASES):
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; expected one of {', '.join(CASES)}")
        rows += run_case(name, (variants or VARIANTS)[CASES[name][5]])
        with open(out_path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "runs": rows}, f, indent=1)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    chosen = args[1].split(",") if len(args) > 1 else None
    given = {64: json.loads(args[2]), 128: json.loads(args[3] if len(args) > 3 else args[2])} if len(args) > 2 else None
    main(args[0], chosen, given)
