"""Worked example: HESSO(+CRIC) / GETA pruning of a small CNN and a tiny transformer, then
compaction with ``CompactPrunedChannels`` and compilation with TVM (llvm, CPU).

Data is synthetic and generated here (``tvm_splat.pruning.data``): a 4-class 16x16 image
task and a token-classification task (label = (tok[t] + tok[t-1]) mod 4). For each model:

1. train the dense baseline (AdamW) and the pruned model (HESSO with CRIC, same step
   count; for the CNN also GETA: joint pruning + 4..16-bit weight and activation quantization
   under a BOPs budget of 25% of the 8-bit dense model);
2. report test accuracy, parameters (torch; Relax constants before/after the pass);
3. export (torch.export -> from_exported_program), run ``CompactPrunedChannels``, compile
   with ``tvm.compile(target="llvm")`` and time dense / pruned-uncompacted / compacted,
   checking the compacted output against the pruned torch model (max abs error).

Writes ``benchmarks/results/pruning_cpu.json``. Runtime ~2-3 minutes on 2 CPU cores.
Usage: ``python examples/prune_and_compile.py [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from tvm_splat.pruning.compact import count_params
from tvm_splat.pruning.cric import CRIC, make_eval_loss
from tvm_splat.pruning.data import make_image_task, make_token_task
from tvm_splat.pruning.export import compile_relax, relax_param_count, run_vm, time_vm, to_relax
from tvm_splat.pruning.geta import GETA
from tvm_splat.pruning.groups import discover_groups
from tvm_splat.pruning.hesso import HESSO
from tvm_splat.pruning.quant import attach_quantizers, finalize_quantization
from tvm_splat.pruning.zoo import TinyCNN, TinyTransformer
from tvm_splat.relay_passes.compact_channels import compact_pruned_channels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "pruning_cpu.json")


def _loss(out, y):
    return F.cross_entropy(out.flatten(0, -2), y.flatten()) if out.dim() == 3 else F.cross_entropy(out, y)


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train(model, opt, x, y, steps, batch, seed, use_cric=False):
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad()
        loss = _loss(model(x[i]), y[i])
        loss.backward()
        if isinstance(opt, HESSO):
            # CRIC's trial test and GETA's bit budget need a side-effect-free loss on this batch
            opt.step(eval_loss=make_eval_loss(model, _loss, x[i], y[i]) if use_cric else None)
        else:
            opt.step()
    return model.eval()


def compile_report(name, dense, pruned, probe, bits=None):
    """Export dense and pruned, compact the pruned one with the pass, compile all three, time them."""
    row = {"model": name}
    with torch.no_grad():
        ref = pruned(probe).numpy()
    mod_dense = to_relax(dense, (probe,))
    mod_pruned = to_relax(pruned, (probe,))
    t0 = time.perf_counter()
    mod_small, report = compact_pruned_channels(mod_pruned)
    row["compaction_s"] = round(time.perf_counter() - t0, 3)
    row["groups_pruned_by_pass"] = len(report.pruned)
    row["groups_skipped_by_pass"] = len(report.skipped)
    row["params_dense"] = relax_param_count(mod_dense)
    row["params_pruned_uncompacted"] = relax_param_count(mod_pruned)
    row["params_compacted"] = relax_param_count(mod_small)
    row["flops_before"], row["flops_after"] = report.flops_before, report.flops_after
    for key, mod in (("dense", mod_dense), ("pruned_uncompacted", mod_pruned), ("compacted", mod_small)):
        vm = compile_relax(mod)
        row[f"latency_ms_{key}"] = round(time_vm(vm, (probe,), repeat=100, warmup=10), 4)
        if key == "compacted":
            err = float(np.abs(run_vm(vm, (probe,)) - ref).max())
            row["max_abs_err_compiled_vs_torch"] = err
            row["max_rel_err_compiled_vs_torch"] = err / float(np.abs(ref).max())  # logits can be large
    row["speedup_compacted_vs_dense"] = round(row["latency_ms_dense"] / row["latency_ms_compacted"], 3)
    if bits is not None:
        row["bit_widths"] = bits
    return row


def run_cnn(args, rows):
    steps, batch = args.cnn_steps, 64
    x, y = make_image_task(2048, seed=0, noise=args.noise)
    xt, yt = make_image_task(1024, seed=1, noise=args.noise)
    probe = xt[:32]

    torch.manual_seed(0)
    dense = TinyCNN()
    train(dense, torch.optim.AdamW(dense.parameters(), lr=3e-3), x, y, steps, batch, seed=1)

    torch.manual_seed(0)
    pruned = TinyCNN()
    space = discover_groups(pruned)
    warm, prune = int(0.4 * steps), int(0.3 * steps)
    opt = HESSO(pruned.parameters(), space, lr=3e-3, variant="adamw", target_group_sparsity=args.target,
                warmup_steps=warm, pruning_steps=prune, cric=CRIC(cycle_steps=max(2, steps // 30)))
    train(pruned, opt, x, y, steps, batch, seed=1, use_cric=True)
    assert space.group_sparsity() == opt.target_num_groups / len(space)

    torch.manual_seed(0)
    joint = TinyCNN()
    jspace = discover_groups(joint)
    layers = attach_quantizers(joint, (x[:256],), weight_bits=(4, 16), act_bits=(4, 16))
    gopt = GETA(joint.parameters(), jspace, layers, lr=3e-3, variant="adamw", quant_lr=1e-4,
                target_group_sparsity=args.target, warmup_steps=warm // 2, projection_steps=warm - warm // 2,
                projection_periods=5, pruning_steps=prune, pruning_periods=3, target_relative_bops=0.25)
    train(joint, gopt, x, y, steps, batch, seed=1, use_cric=True)
    bits = finalize_quantization(joint)

    for label, model, sp, b in (("cnn_hesso_cric", pruned, space, None), ("cnn_geta_bops25", joint, jspace, bits)):
        row = {"task": "image 4-class 16x16", "groups_total": len(sp), "target_group_sparsity": args.target,
               "group_sparsity": sp.group_sparsity(), "acc_dense": accuracy(dense, xt, yt),
               "acc_pruned": accuracy(model, xt, yt), "torch_params_dense": count_params(dense)}
        row.update(compile_report(label, dense, model, probe, b))
        rows.append(row)
        print(json.dumps(row))


def run_transformer(args, rows):
    steps, batch = args.tf_steps, 64
    x, y = make_token_task(4096, seed=0)
    xt, yt = make_token_task(1024, seed=1)
    probe = xt[:32]
    kw = dict(dim=args.tf_dim, num_heads=4, depth=2)
    torch.manual_seed(0)
    dense = TinyTransformer(**kw)
    train(dense, torch.optim.AdamW(dense.parameters(), lr=3e-3), x, y, steps, batch, seed=1)

    torch.manual_seed(0)
    pruned = TinyTransformer(**kw)
    space = discover_groups(pruned)
    opt = HESSO(pruned.parameters(), space, lr=3e-3, variant="adamw", target_group_sparsity=args.target,
                warmup_steps=int(0.5 * steps), pruning_steps=int(0.25 * steps),
                cric=CRIC(cycle_steps=max(2, steps // 30)))
    train(pruned, opt, x, y, steps, batch, seed=1, use_cric=True)
    row = {"task": "token classification (tok[t]+tok[t-1]) mod 4", "groups_total": len(space),
           "target_group_sparsity": args.target, "group_sparsity": space.group_sparsity(),
           "acc_dense": accuracy(dense, xt, yt), "acc_pruned": accuracy(pruned, xt, yt),
           "torch_params_dense": count_params(dense)}
    row.update(compile_report("transformer_hesso_cric", dense, pruned, probe))
    rows.append(row)
    print(json.dumps(row))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps (smoke run; numbers not meaningful)")
    ap.add_argument("--target", type=float, default=0.5, help="target group sparsity")
    ap.add_argument("--noise", type=float, default=3.5, help="image task noise level")
    ap.add_argument("--cnn-steps", type=int, default=600)
    ap.add_argument("--tf-steps", type=int, default=800)
    ap.add_argument("--tf-dim", type=int, default=48)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    if args.quick:
        args.cnn_steps, args.tf_steps = 60, 80
    torch.set_num_threads(2)
    t0 = time.time()
    rows = []
    run_cnn(args, rows)
    run_transformer(args, rows)
    result = {
        "description": "HESSO(+CRIC)/GETA pruning, CompactPrunedChannels, tvm.compile llvm; latency = median "
                       "of 100 VM calls, batch 32",
        "host": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "args": vars(args),
        "runtime_s": round(time.time() - t0, 1),
        "rows": rows,
    }
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"{'model':24s} {'acc dense':>9s} {'acc pruned':>10s} {'params dense':>12s} {'compacted':>9s} "
          f"{'ms dense':>8s} {'ms pruned':>9s} {'ms compact':>10s}")
    for r in rows:
        print(f"{r['model']:24s} {r['acc_dense']:9.3f} {r['acc_pruned']:10.3f} {r['params_dense']:12d} "
              f"{r['params_compacted']:9d} {r['latency_ms_dense']:8.3f} {r['latency_ms_pruned_uncompacted']:9.3f} "
              f"{r['latency_ms_compacted']:10.3f}")
    print(f"total {result['runtime_s']} s" + ("" if args.quick else f"; wrote {args.out}"))


if __name__ == "__main__":
    main()
