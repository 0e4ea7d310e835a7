"""Pruning benchmark: HESSO, HESSO+CRIC and GETA against the pruning baselines people use.

Data: the sklearn digits (shipped inside scikit-learn; fixed 1437/360 split,
``tvm_splat.pruning.data.load_digits_split``). Models (``tvm_splat.pruning.zoo``): an MLP
(64-128-64-10; 192 unit groups), a CNN (``TinyCNN`` on 1x8x8; 112 channel/unit groups) and
a transformer over the 8 pixel rows (2 blocks, 8 heads; 16 head + 128 unit groups). The
groups are ``discover_groups``' for every method, so "sparsity" is the same thing for all.

Every method gets the same optimizer (AdamW, lr 3e-3, weight decay 1e-4, batch 64) and the
same number of optimizer steps (``--steps``, default 600), at target group sparsity
30/50/70%, for ``--seeds`` seeds; mean and std of the test accuracy:

* ``dense`` -- no pruning.
* ``l2_layer``, ``l2_global``, ``random``, ``torch_pruning`` -- train dense for
  ``warmup + pruning`` steps (333 of 600), prune once, fine-tune the rest with the pruned groups
  held at zero: per layer the lowest-L2 groups (``round(s * n)`` per family), globally the
  lowest-L2 groups, per layer random groups, and Torch-Pruning's ``MetaPruner`` with
  ``GroupMagnitudeImportance`` (L2; same layers, uniform per-layer ratio, heads pruned as
  heads; it removes channels physically, so it fine-tunes a smaller model).
* ``hesso`` -- warm-up 133, 5 pruning periods over 200 steps, fine-tune.
* ``hesso_cric`` -- warm-up 133, CRIC (20-step cycles, at most 4; its steps count in the
  budget: the parameters are reset after it), one 200-step pruning period, fine-tune.
* ``geta`` -- warm-up 66, projection 67 (5 periods, max width 16 -> 8 by 2), 5 pruning
  periods over 200 steps, cool-down; weights and input activations in [4, 16] bits, budget
  ``--bops-budget`` (relative BOPs vs the dense model at 8/8 bits). Accuracy is the fake-
  quantized model's; the JSON has the achieved BOPs and the widths per layer.

Then, for seed 0, the ``hesso_cric`` and ``geta`` models go through ``torch.export`` ->
Relax -> ``CompactPrunedChannels`` and ``tvm.compile`` (llvm): latency of the pruned model
with its zeros in the dense shapes vs compacted (median of ``--repeat`` VM calls, batch 64),
max error against torch. Speed lives here, never in tests.

    python benchmarks/pruning_eval.py --out benchmarks/results/pruning_eval_cpu.json --repeat 20 --number 3
    # 16 min on the shared 2-core host (967 s, 1 torch thread)

GPU / larger variant (not run here): ``--device cuda --scale large`` doubles every width
(MLP 256-128, CNN 32/64/64 + 128, transformer dim 64), trains 3x the steps (1800) and compiles for
``--target cuda`` (needs a CUDA torch; TVM's dlight default GPU schedules).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tvm_splat.pruning.cric import CRIC, make_eval_loss  # noqa: E402
from tvm_splat.pruning.data import load_digits_split  # noqa: E402
from tvm_splat.pruning.geta import GETA  # noqa: E402
from tvm_splat.pruning.groups import discover_groups  # noqa: E402
from tvm_splat.pruning.hesso import HESSO  # noqa: E402
from tvm_splat.pruning.quant import attach_quantizers, finalize_quantization  # noqa: E402
from tvm_splat.pruning.zoo import RowTransformer, digits_cnn, digits_mlp  # noqa: E402

warnings.filterwarnings("ignore")
SPARSITIES = (0.3, 0.5, 0.7)
METHODS = ("dense", "l2_layer", "l2_global", "random", "torch_pruning", "hesso", "hesso_cric", "geta")
LR, WD, BATCH = 3e-3, 1e-4, 64


def make_model(kind: str, scale: str) -> nn.Module:
    k = 2 if scale == "large" else 1
    if kind == "mlp":
        return digits_mlp(hidden=(128 * k, 64 * k))
    if kind == "cnn":
        return digits_cnn(width=(16 * k, 32 * k, 32 * k), hidden=64 * k)
    return RowTransformer(dim=32 * k, num_heads=8, depth=2)


LAYOUT = {"mlp": "flat", "cnn": "image", "transformer": "rows"}


class Schedule:
    """Step counts of one run (all methods share ``total``)."""

    def __init__(self, total: int):
        self.total = total
        self.warmup = round(total * 2 / 9)  # 133 of 600
        self.pruning = round(total * 3 / 9)  # 200 of 600
        self.cric_cycle = max(2, round(total / 30))  # 20 of 600
        self.geta_warmup = self.warmup // 2
        self.geta_projection = self.warmup - self.geta_warmup


def accuracy(model, x, y, device) -> float:
    model.eval()
    with torch.no_grad():
        out = model(x.to(device)).argmax(-1).cpu()
    model.train()
    return float((out == y).double().mean())


def batches(n: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        yield torch.randint(0, n, (BATCH,), generator=g)


def train(model, opt, data, steps, seed, device, after_step=None, on_step=None, eval_loss=False):
    xtr, ytr = data[0].to(device), data[1].to(device)
    model.train()
    for k, i in enumerate(batches(xtr.shape[0], steps, seed)):
        i = i.to(device)
        opt.zero_grad()
        F.cross_entropy(model(xtr[i]), ytr[i]).backward()
        if eval_loss:
            opt.step(eval_loss=make_eval_loss(model, F.cross_entropy, xtr[i], ytr[i]))
        else:
            opt.step()
        if after_step is not None:
            after_step()
        if on_step is not None:
            on_step(k + 1)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)


# ----------------------------------------------------------------------------- baselines
def one_shot_mask(space, method: str, sparsity: float, seed: int) -> torch.Tensor:
    """Groups to remove (bool ``(N,)``), keeping at least one group per family."""
    norms = space.group_norms()
    mask = torch.zeros(space.num_groups, dtype=torch.bool)
    if method == "l2_global":
        k = round(sparsity * space.num_groups)
        alive = torch.tensor([f.num_groups for f in space.families])
        for g in torch.argsort(norms, stable=True).tolist():
            if int(mask.sum()) == k:
                break
            f = int(space.family_of[g])
            if alive[f] > 1:
                alive[f] -= 1
                mask[g] = True
        return mask
    gen = torch.Generator().manual_seed(seed)
    for fam, off in zip(space.families, space.offsets):
        m = min(round(sparsity * fam.num_groups), fam.num_groups - 1)
        local = norms[off:off + fam.num_groups]
        order = torch.argsort(local, stable=True) if method == "l2_layer" else torch.randperm(fam.num_groups, generator=gen)
        mask[off + order[:m]] = True
    return mask


def torch_pruning_prune(model, kind, sparsity, example):
    import torch_pruning as tp

    space = discover_groups(model)
    producers = set()
    for fam in space.families:
        producers |= {fam.modules["producer"]} if fam.kind != "head" else {f"{fam.name}.{p}" for p in ("q_proj", "k_proj", "v_proj")}
    ignored = [m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in producers
               and not n.endswith("o_proj")]
    num_heads = {}
    for n, m in model.named_modules():
        if hasattr(m, "q_proj") and hasattr(m, "num_heads"):
            for p in (m.q_proj, m.k_proj, m.v_proj):
                num_heads[p] = m.num_heads
            ignored.append(m.o_proj)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=sparsity, ignored_layers=ignored, num_heads=num_heads,
                                  prune_num_heads=bool(num_heads), prune_head_dims=False, head_pruning_ratio=sparsity)
    pruner.step()
    for m in model.modules():
        if hasattr(m, "q_proj") and hasattr(m, "num_heads"):
            m.num_heads = m.q_proj.out_features // m.head_dim
    return model


# ----------------------------------------------------------------------------- one run
def run_one(kind, method, sparsity, seed, sched: Schedule, data, device, args) -> dict:
    torch.manual_seed(seed)
    model = make_model(kind, args.scale).to(device)
    xtr, ytr, xte, yte = data
    row = {"model": kind, "method": method, "target_sparsity": sparsity, "seed": seed, "steps": sched.total}
    t0 = time.perf_counter()
    dense_groups = discover_groups(model).num_groups
    if method == "dense":
        train(model, adamw(model), data, sched.total, seed, device)
    elif method in ("l2_layer", "l2_global", "random", "torch_pruning"):
        first = sched.warmup + sched.pruning
        train(model, adamw(model), data, first, seed, device)
        if method == "torch_pruning":
            before = sum(p.numel() for p in model.parameters())
            torch_pruning_prune(model, kind, sparsity, xtr[:2].to(device))
            row["params_removed_fraction"] = 1 - sum(p.numel() for p in model.parameters()) / before
            row["acc_after_prune"] = accuracy(model, xte, yte, device)
            train(model, adamw(model), data, sched.total - first, seed + 7, device)
        else:
            space = discover_groups(model)
            mask = one_shot_mask(space, method, sparsity, seed)
            space.zero_(mask)
            row["acc_after_prune"] = accuracy(model, xte, yte, device)
            train(model, adamw(model), data, sched.total - first, seed + 7, device,
                  after_step=lambda: space.zero_(mask))
            row["group_sparsity"] = space.group_sparsity()
    elif method in ("hesso", "hesso_cric"):
        space = discover_groups(model)
        cric = CRIC(cycle_steps=sched.cric_cycle, max_cycles=4) if method == "hesso_cric" else None
        opt = HESSO(model.parameters(), space, lr=LR, variant="adamw", weight_decay=WD, target_group_sparsity=sparsity,
                    warmup_steps=sched.warmup, pruning_steps=sched.pruning, pruning_periods=1 if cric else 5, cric=cric)
        mark = {}

        def at(k):
            if opt.pruning_end is not None and k == opt.pruning_end:
                mark["acc"] = accuracy(model, xte, yte, device)

        train(model, opt, data, sched.total, seed, device, on_step=at, eval_loss=cric is not None)
        row["acc_at_pruning_end"] = mark.get("acc")
        row["group_sparsity"] = space.group_sparsity()
        if cric is not None:
            row["cric"] = {"cycles": cric.cycles_run, "stop_reason": cric.stop_reason,
                           "violating_set_sizes": [len(v) for v in cric.history],
                           "layer_loss_ratio": {k: round(v, 3) for k, v in cric.layer_loss_ratio.items()},
                           "pruning_start": opt.pruning_start}
    elif method == "geta":
        space = discover_groups(model)
        layers = attach_quantizers(model, (xtr[:256].to(device),), weight_bits=(4, 16), act_bits=(4, 16))
        opt = GETA(model.parameters(), space, layers, lr=LR, quant_lr=1e-4, variant="adamw", weight_decay=WD,
                   target_group_sparsity=sparsity, warmup_steps=sched.geta_warmup,
                   projection_steps=sched.geta_projection, projection_periods=5, bit_reduction=2,
                   pruning_steps=sched.pruning, pruning_periods=5, target_relative_bops=args.bops_budget)
        train(model, opt, data, sched.total, seed, device, eval_loss=True)
        row["group_sparsity"] = space.group_sparsity()
        rep = opt.report()
        row["geta"] = {"relative_bops": round(rep["relative_bops"], 4), "target_relative_bops": args.bops_budget,
                       "cap_history": rep["cap_history"],
                       "bits": {n: [v["weight_bits"], v["activation_bits"]] for n, v in rep["layers"].items()},
                       "t_weight": {n: v["t_weight"] for n, v in rep["layers"].items()}}
    row["acc"] = accuracy(model, xte, yte, device)
    row["groups"] = dense_groups
    row["train_s"] = round(time.perf_counter() - t0, 2)
    return row, model


# ----------------------------------------------------------------------------- compaction
def compaction_row(kind, method, sparsity, model, probe, args) -> dict:
    import tvm  # noqa: F401
    from tvm import relax

    from tvm_splat.pruning.export import to_relax
    from tvm_splat.relay_passes.compact_channels import compact_pruned_channels

    model = copy.deepcopy(model).cpu().eval()
    bits = finalize_quantization(model) if method == "geta" else None
    with torch.no_grad():
        ref = model(probe).numpy()
    mod = to_relax(model, (probe,))
    small, report = compact_pruned_channels(mod)
    target = tvm.target.Target(args.target)
    dev = tvm.cpu() if args.target == "llvm" else tvm.cuda()
    times, outs = {}, {}
    for key, m in (("zeros_in_dense_shapes", mod), ("compacted", small)):
        m = relax.transform.FoldConstant()(m)
        ex = tvm.compile(m, target=target)
        vm = relax.VirtualMachine(ex, dev)
        inp = tvm.runtime.tensor(probe.numpy(), device=dev)
        out = vm["main"](inp)
        while not hasattr(out, "numpy"):
            out = out[0]
        outs[key] = out.numpy()
        res = vm.time_evaluator("main", dev, number=args.number, repeat=args.repeat)(inp)
        times[key] = float(np.median(res.results)) * 1e3
    row = {"model": kind, "method": method, "target_sparsity": sparsity, "seed": 0,
           "groups_removed_by_pass": len(report.pruned), "skipped_by_pass": len(report.skipped),
           "params_before": report.params_before, "params_after": report.params_after,
           "flops_before": report.flops_before, "flops_after": report.flops_after,
           "ms_zeros_in_dense_shapes": round(times["zeros_in_dense_shapes"], 4), "ms_compacted": round(times["compacted"], 4),
           "speedup": round(times["zeros_in_dense_shapes"] / times["compacted"], 3),
           "max_abs_err_vs_torch": float(np.abs(outs["compacted"] - ref).max())}
    if bits is not None:
        row["bits"] = bits
    return row


def summarize(rows):
    out = {}
    for r in rows:
        key = f"{r['model']}/{r['method']}/{r['target_sparsity']}"
        out.setdefault(key, []).append(r["acc"])
    return {k: {"mean": round(statistics.mean(v), 4), "std": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0,
                "n": len(v)} for k, v in out.items()}


def plot(summary, models, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 60.0  # points below are drawn on the floor and labelled with their value
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, kind in zip(axes[0], models):
        dense = summary.get(f"{kind}/dense/0.0")
        if dense:
            ax.axhline(100 * dense["mean"], color="k", ls="--", lw=1, label="dense")
        for i, method in enumerate(METHODS[1:]):
            pts = [(s, summary[f"{kind}/{method}/{s}"]) for s in SPARSITIES if f"{kind}/{method}/{s}" in summary]
            if not pts:
                continue
            xs = [100 * s + (i - 3) * 0.6 for s, _ in pts]  # small offsets keep error bars apart
            ys = [100 * v["mean"] for _, v in pts]
            ax.errorbar(xs, [max(y, floor) for y in ys], yerr=[100 * v["std"] for _, v in pts], marker="o",
                        capsize=3, label=method)
            for x, y in zip(xs, ys):
                if y < floor:
                    ax.annotate(f"{method} {y:.0f}%", (x, floor), textcoords="offset points", xytext=(0, 6), fontsize=7)
        ax.set_ylim(floor - 1, 100)
        ax.set_title(f"digits {kind}")
        ax.set_xlabel("group sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON path; the PNG goes next to it")
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 600; 1800 large)")
    ap.add_argument("--scale", choices=("small", "large"), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--target", default=None, help="TVM target for the compaction rows (default llvm, cuda on GPU)")
    ap.add_argument("--bops-budget", type=float, default=0.25)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--number", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared 2-core host)")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON at --out")
    args = ap.parse_args(argv)
    if args.replot:
        saved = json.loads(args.out.read_text())
        plot(saved["summary"], saved["config"]["models"], args.out.with_suffix(".png"))
        return
    args.target = args.target or ("cuda" if args.device.startswith("cuda") else "llvm")
    torch.set_num_threads(args.threads)
    sched = Schedule(args.steps or (1800 if args.scale == "large" else 600))
    models = args.models.split(",")
    methods = args.methods.split(",")
    t_start = time.perf_counter()
    rows, compaction = [], []
    for kind in models:
        data = load_digits_split(LAYOUT[kind])
        probe = data[2][:BATCH]
        for method in methods:
            for sparsity in ((0.0,) if method == "dense" else SPARSITIES):
                for seed in range(args.seeds):
                    row, model = run_one(kind, method, sparsity, seed, sched, data, args.device, args)
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k not in ("geta", "cric")}), flush=True)
                    if seed == 0 and method in ("hesso_cric", "geta") and not args.no_compile:
                        compaction.append(compaction_row(kind, method, sparsity, model, probe, args))
                        print(json.dumps(compaction[-1]), flush=True)
    summary = summarize(rows)
    result = {
        "benchmark": "pruning_eval",
        "host": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "device": args.device},
        "config": {"models": models, "methods": methods, "seeds": args.seeds, "steps": sched.total,
                   "warmup": sched.warmup, "pruning_steps": sched.pruning, "cric_cycle_steps": sched.cric_cycle,
                   "lr": LR, "weight_decay": WD, "batch": BATCH, "scale": args.scale,
                   "bops_budget": args.bops_budget, "target": args.target,
                   "data": "sklearn digits, 1437 train / 360 test (stratified, random_state=0)"},
        "summary": summary,
        "runs": rows,
        "compaction": compaction,
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(summary, models, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {result['runtime_s']} s")


if __name__ == "__main__":
    main()
