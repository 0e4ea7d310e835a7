"""``tvm-splat bench --backward``: forward + backward throughput of our differentiable op
(:mod:`tvm_splat.autograd`) against compiled FlexAttention (analytic ``mask_mod``) and dense SDPA,
on the cases of a suite, same inputs, one process.

Per implementation and case, three directions are timed with :func:`~tvm_splat.bench.run.measure`
(per-call ms, back-to-back ``throughput_ms``, CUPTI ``kernel_ms``):

* ``forward``: the forward with autograd recording (what a training step runs);
* ``backward``: ``torch.autograd.grad`` of one retained forward graph; where the
  implementation refuses a retained graph (compiled FlexAttention donates its saved buffers to
  the backward), ``forward_backward - forward`` per timing, marked ``"derived"``
  (:func:`derive_backward`);
* ``forward_backward``: both, as a training step runs them.

Gradients are checked against float64 dense masked attention (torch autograd in float64) on
every case: whole where its n x n scores fit :data:`REFERENCE_BYTES`, else on a sample, batch 0
and KV head 0 with its group of query heads, computed in chunks of :data:`SAMPLE_ROWS` rows
over the keys those rows attend (:func:`sampled_reference_grads`; each row's softmax is its
own, and dK, dV are sums over rows, so the chunks are exact). The error is relative to the
reference's largest magnitude, per gradient; each case says which scope it was checked on
(``reference_scope``). Writes ``<prefix>_<suite>_backward.json`` and a PNG of the
forward+backward speedups.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from . import baselines as B
from .flex import FallbackWatch, configure_dynamo
from .inputs import CaseInputs, make_inputs, masked_attention_rows
from .run import TIMINGS, TRAINING_IMPL, RunOptions, _meta, measure
from .suite import suite

#: float64 tensors of n x n per (batch, head) the gradient reference may hold at once (scores,
#: probabilities and their gradients, ~4 of them): 16 GiB, an eighth of an H200's memory
REFERENCE_BYTES = 16 * 2**30
#: query rows per chunk of the sampled reference: float64 [group, rows, keys attended] tensors
#: (scores, probabilities, their gradients), at most 4 x 1024 x 32768 x 8 B = 1 GiB each on the
#: models suite
SAMPLE_ROWS = 1024
#: largest relative gradient error accepted: the forward bench's absolute tolerances
#: (``run.TOLERANCE``) read as relative ones; not separately measured for gradients
GRAD_TOLERANCE = {"float16": 2e-2, "bfloat16": 1.6e-1, "float32": 1e-3}
DIRECTIONS = ("forward", "backward", "forward_backward")
BASELINES = ("sdpa_dense", "flex")
OURS = TRAINING_IMPL


def _splat_train(inputs):
    """Our differentiable op (training kernels: fwd_lse, bwd_dq, bwd_dkdv) on the inputs."""
    from ..autograd import register_mask, sparse_attention, training_plan_for

    handle = register_mask(inputs.fresh_acsr())
    q, k, v = inputs.q, inputs.k, inputs.v

    def forward():
        return sparse_attention(q, k, v, handle)

    def training_plan():  # which kernels ran, and with which tile knobs
        plan = training_plan_for(q, k, handle, None)
        knobs = {} if plan.mma_knobs is None else {
            name: value for name, value in vars(plan.mma_knobs).items() if name != "forward"}
        return repr(plan), knobs

    forward.training_plan = training_plan
    return forward


#: name -> factory(inputs whose q, k, v require grad) -> forward() -> out
IMPLEMENTATIONS = {"sdpa_dense": B.sdpa_dense, "flex": B.flex_attention, OURS: _splat_train}


def _leaves(inputs: CaseInputs) -> CaseInputs:
    return CaseInputs(*(x.detach().clone().requires_grad_() for x in (inputs.q, inputs.k, inputs.v)),
                      inputs.acsr, inputs.pattern)


@dataclass(frozen=True)
class GradReference:
    """float64 ``(dq, dk, dv)`` of dense masked attention and where they lie: the whole
    tensors (``kv_head`` None), or batch 0, KV head ``kv_head`` and its ``group`` query heads
    (``dq [group, n, d]``, ``dk`` and ``dv [n, d]``)."""

    grads: tuple
    kv_head: int | None = None
    group: int = 1

    @property
    def scope(self) -> str:
        if self.kv_head is None:
            return "all"
        first = self.kv_head * self.group
        return f"batch 0, KV head {self.kv_head} and its query heads {first}..{first + self.group - 1}"

    def select(self, grads):
        """The same part of an implementation's ``(dq, dk, dv)``."""
        if self.kv_head is None:
            return grads
        dq, dk, dv = grads
        first = self.kv_head * self.group
        return dq[0, first:first + self.group], dk[0, self.kv_head], dv[0, self.kv_head]


def reference_grads(inputs: CaseInputs, dout) -> GradReference:
    """float64 gradients of dense masked attention (rows without a key: zeros): all of them
    when the n x n float64 tensors fit :data:`REFERENCE_BYTES`, else
    :func:`sampled_reference_grads`."""
    import torch

    b, h, n, _ = inputs.q.shape
    if 4 * 8 * b * h * n * n > REFERENCE_BYTES:
        return sampled_reference_grads(inputs, dout)
    group = h // inputs.k.shape[1]
    q, k, v = (x.detach().double().requires_grad_() for x in (inputs.q, inputs.k, inputs.v))
    out = masked_attention_rows(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), inputs.mask)
    return GradReference(torch.autograd.grad(out, (q, k, v), dout.double()))


def sampled_reference_grads(inputs: CaseInputs, dout, kv_head: int = 0, rows: int = SAMPLE_ROWS) -> GradReference:
    """float64 gradients of batch 0, KV head ``kv_head`` and its group of query heads, ``rows``
    query rows at a time over the keys those rows attend (gathered, so a window costs its width,
    not n): exact, because each row's softmax is its own and dK, dV are sums over rows."""
    import torch

    _, h, n, _ = inputs.q.shape
    group = h // inputs.k.shape[1]
    heads = slice(kv_head * group, (kv_head + 1) * group)
    q, do = (x.detach()[0, heads].double() for x in (inputs.q, dout))
    k, v = (x.detach()[0, kv_head].double() for x in (inputs.k, inputs.v))
    mask = inputs.mask
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        chunk = mask[lo:hi] if mask.dim() == 2 else mask[heads, lo:hi]  # [R, n] or [group, R, n]
        cols = chunk.reshape(-1, n).any(0).nonzero().flatten()
        if cols.numel() == 0:  # rows without a key: zero gradients
            continue
        qc, kc, vc = q[:, lo:hi].requires_grad_(), k[cols].requires_grad_(), v[cols].requires_grad_()
        gq, gk, gv = torch.autograd.grad(masked_attention_rows(qc, kc, vc, chunk[..., cols]), (qc, kc, vc),
                                         do[:, lo:hi])
        dq[:, lo:hi] = gq
        dk.index_add_(0, cols, gk)
        dv.index_add_(0, cols, gv)
    return GradReference((dq, dk, dv), kv_head, group)


def _relative_errors(grads, refs):
    return [float((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(grads, refs)]


def run_impl(name, inputs, dout, refs, opts: RunOptions) -> dict:
    """One implementation on one case: the three timings, gradient errors, or why not."""
    import torch

    res = {}
    watch = FallbackWatch() if name == "flex" else None
    leaves = (inputs.q, inputs.k, inputs.v)
    try:
        forward = IMPLEMENTATIONS[name](inputs)
        out = forward()
        if hasattr(forward, "training_plan"):
            res["plan"], res["backward_knobs"] = forward.training_plan()
        _, res["forward"] = measure(forward, opts)
        grads, res["forward_backward"] = measure(lambda: torch.autograd.grad(forward(), leaves, dout), opts)
        try:  # a retained graph may be refused (compiled graphs): derived from the other two
            _, res["backward"] = measure(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), opts)
        except RuntimeError as err:
            res["backward"] = derive_backward(res, f"{type(err).__name__}: {err}"[:300])
        res["grad_rel_err"] = dict(zip(("dq", "dk", "dv"), _relative_errors(refs.select(grads), refs.grads)))
        if name != "sdpa_dense":  # dense SDPA computes a different function: recorded, not judged
            res["correct"] = max(res["grad_rel_err"].values()) <= GRAD_TOLERANCE[inputs.dtype]
        refusal = watch.reason(forward) if watch is not None else None
        if refusal:
            return {"refused": refusal}
    except B.Skip as why:
        res = {"skipped": str(why)}
    except torch.cuda.OutOfMemoryError as err:
        res = {"skipped": f"out of memory: {str(err).splitlines()[0]}"[:300]}
    except Exception as err:  # keep the suite going; the JSON records the failure
        res = {"error": f"{type(err).__name__}: {err}"[:500]}
    finally:
        if opts.device == "cuda":
            torch.cuda.empty_cache()
    return res


def derive_backward(res: dict, why: str) -> dict:
    """The backward timings of an implementation that refuses a retained graph: per timing,
    its ``forward_backward`` minus its ``forward`` (both measured the same way), marked
    ``derived`` with ``why`` the direct measurement was refused."""
    both, fwd = res["forward_backward"], res["forward"]
    out = {field: both[field] - fwd[field] for field in TIMINGS.values() if field in both and field in fwd}
    return {**out, "derived": "forward_backward - forward", "direct_refused": why}


def rederive(data: dict) -> dict:
    """A results file (``{"meta", "summary", "cases"}``) written before :func:`derive_backward`
    existed, with each refused backward derived from the same row's measurements and the
    speedups and summary recomputed; nothing is re-measured (``meta.backward_derived`` says
    which implementations' backward columns are derived)."""
    derived = set()
    for row in data["cases"]:
        for name, res in row["results"].items():
            back = res.get("backward")
            if isinstance(back, dict) and "error" in back and "forward" in res and "forward_backward" in res:
                res["backward"] = derive_backward(res, back["error"])
                derived.add(name)
        row["results"].get(OURS, {}).pop("speedup", None)
        add_speedups(row)
    data["meta"]["backward_derived"] = sorted(derived)
    data["summary"] = summarise(data["cases"])
    return data


def add_speedups(row):
    """``results[OURS]["speedup"][direction][base]`` = base's throughput ms / ours, where both
    were timed and neither is known wrong."""
    results = row["results"]
    mine = results.get(OURS, {})
    ok = lambda r: "forward" in r and r.get("correct") is not False  # noqa: E731
    if not ok(mine):
        return
    field = TIMINGS["throughput"]
    mine["speedup"] = {
        d: {base: results[base][d][field] / mine[d][field] for base in BASELINES
            if ok(results.get(base, {})) and field in results[base][d] and field in mine[d]}
        for d in DIRECTIONS}


def summarise(rows):
    """``summary[direction][base]``: geomean and min throughput speedup of ours, and the count."""
    out = {}
    for d in DIRECTIONS:
        for base in BASELINES:
            ratios = [r["results"][OURS]["speedup"][d][base] for r in rows
                      if base in r["results"].get(OURS, {}).get("speedup", {}).get(d, {})]
            if ratios:
                out.setdefault(d, {})[base] = {"geomean": B.geomean(ratios), "min": min(ratios), "cases": len(ratios)}
    return out


def run_case(case, impls, opts: RunOptions, console):
    import torch

    inputs = _leaves(make_inputs(case, opts.device))
    gen = torch.Generator(device=opts.device).manual_seed(1)
    dout = torch.randn(inputs.q.shape, device=opts.device, dtype=inputs.q.dtype, generator=gen)
    refs = reference_grads(inputs, dout)
    row = {"case": case.as_dict(), "name": case.name, "density": float(inputs.acsr.density),
           "reference": True, "reference_scope": refs.scope, "results": {}}
    with B.cold_compile_caches():
        for name in impls:
            res = run_impl(name, inputs, dout, refs, opts)
            row["results"][name] = res
            console.print(f"  {name:12s} " + _status(res))
    add_speedups(row)
    return row


def _status(res) -> str:
    if "forward" not in res:
        return next((f"{k}: {res[k]}" for k in ("refused", "skipped", "error") if k in res), "")
    ms = " ".join(f"{d} {res[d].get(TIMINGS['throughput'], float('nan')):.4f}" for d in DIRECTIONS)
    err = res.get("grad_rel_err")
    return ms + " ms" + (f", grad err {max(err.values()):.1e}" if err else "") + \
        ("  WRONG" if res.get("correct") is False else "")


def plot(rows, path):
    """Forward+backward throughput speedup of ours over Flex and dense SDPA, a bar per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(13, 0.35 * len(rows) + 1.5), sharey=True)
    y = np.arange(len(rows))[::-1]
    for ax, base in zip(axes, ("flex", "sdpa_dense")):
        for yi, r in zip(y, rows):
            ratio = r["results"].get(OURS, {}).get("speedup", {}).get("forward_backward", {}).get(base)
            if ratio is None:
                ax.text(0, yi, "  not comparable", va="center", fontsize=7, color="0.4")
                continue
            ax.barh(yi, abs(np.log10(ratio)), left=min(0.0, np.log10(ratio)), height=0.7)
            ax.text(np.log10(ratio), yi, f" {ratio:.2f}x ", va="center", ha="left" if ratio >= 1 else "right",
                    fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        low, high = ax.get_xlim()
        ax.set_xlim(low - 0.15, high + 0.15)  # room for the ratio labels beside the bars
        ax.set_title(f"forward+backward, ours / {base} (log10, right = faster)", fontsize=9)
    axes[0].set_yticks(y, [r["name"] for r in rows], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_backward_bench(args):
    from rich.console import Console

    if getattr(args, "sustained", 0.0):
        raise ValueError("--sustained times the forward bench only; tvm-splat bench --backward has no sustained "
                         "timing (run it without --sustained)")
    console = Console(width=200)
    opts = RunOptions(args.device, args.repeats, args.impl_seconds, args.peak_tflops, args.bandwidth_tbs)
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("tvm-splat bench --backward needs a CUDA GPU; --device cpu checks the harness")
    configure_dynamo()
    cases = [c for c in suite(args.suite) if not args.pattern or c.pattern in args.pattern]
    impls = [i for i in (args.impl or IMPLEMENTATIONS) if i in IMPLEMENTATIONS]
    if not impls:
        raise ValueError(f"--backward runs {', '.join(IMPLEMENTATIONS)}; none of {args.impl} is one")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{args.prefix}_{args.suite}_backward.json"
    meta = {**_meta(args, opts, impls), "reference": "float64 dense masked attention, torch autograd (each case's "
                                                     "reference_scope: all, or a sample past REFERENCE_BYTES)",
            "grad_tolerance_relative": GRAD_TOLERANCE,
            "sdpa_dense": "dense attention over every key (is_causal for causal masks): what the sparsity saves; its "
                          "grad_rel_err is against the masked reference, so it says how far the dense function is "
                          "from the masked one, not an error, and is not judged",
            "ours": "tvm_splat.autograd.sparse_attention: the training plan's kernels (fwd_lse, bwd_dq, "
                    "bwd_dkdv): tensor cores for float16/bfloat16 where the plan takes them (mma.sync; on sm_90a "
                    "the forward planner's wgmma/TMA forms and, from head_dim 128 on one-component plans, the "
                    "wgmma backward, whose bwd_dkdv computes dQ too at head_dim 128 where each key row of the "
                    "transposed mask is one segment; bwd_dkdv takes its Q and dO blocks by TMA where its plan "
                    "steps rows by one, at head_dim 64 in its wgmma form, computing dQ too where key rows of the "
                    "transposed mask have two segments (global tokens), else beside an mma.sync bwd_dq), else "
                    "row-parallel CUDA-core kernels; each case's plan repr (results.splat_train.plan) and "
                    "backward_knobs say which"}
    rows, start = [], time.time()
    if args.resume and json_path.exists():  # keep every earlier case, run the missing ones
        previous = json.loads(json_path.read_text())
        rows, meta["resumed_from"] = previous["cases"], previous["meta"].get("date")
    done = {r["name"] for r in rows}
    cases = [c for c in cases if c.name not in done]
    for i, case in enumerate(cases):
        if time.time() - start > args.time_budget:
            meta["cases_not_run"] = [c.name for c in cases[i:]]
            break
        console.print(f"[bold]{case.name}[/]")
        rows.append(run_case(case, impls, opts, console))
        json_path.write_text(json.dumps({"meta": meta, "summary": summarise(rows), "cases": rows}, indent=1))
    summary = summarise(rows)
    json_path.write_text(json.dumps({"meta": meta, "summary": summary, "cases": rows}, indent=1))
    for d, per in summary.items():
        console.print(f"[bold]{OURS}[/] {d}: " + ", ".join(
            f"{b} {s['geomean']:.2f}x geomean (min {s['min']:.2f}x, {s['cases']} cases)" for b, s in per.items()))
    plot(rows, out_dir / f"{args.prefix}_{args.suite}_backward.png")
    console.print(f"wrote {json_path}")
    return rows
