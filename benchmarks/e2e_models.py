"""End-to-end speed of whole models through SparsifyAttention (issue 18), against PyTorch.

Two models, defined here in plain torch (the GPU machine has no ``transformers``), run on
random weights and random hidden states (no embedding, no LM head: the layers are what differs):

* ``mistral``: a Mistral-like decoder: pre-RMSNorm, RoPE, grouped-query attention with a causal
  sliding window of 4096 keys (``Window(4095, causal=True)``), SwiGLU MLP (3.5x); bf16.
* ``longformer``: a Longformer-like encoder: pre-LayerNorm, ``±window`` sliding window plus
  global tokens (``GlobalTokens(g) | Window(w)``), GELU MLP (4x); bf16.

Implementations, all on the same weights and input, each timed per call (one call, one
synchronisation, median) and in throughput (calls back to back between two CUDA events):

* ``torch_sdpa``: the model in PyTorch eager, attention by ``F.scaled_dot_product_attention``
  with the boolean mask (as HuggingFace's ``sdpa`` path passes a sliding window), GQA through
  ``enable_gqa``; its output is the reference of every other implementation;
* ``torch_flex``: the same eager model with FlexAttention: one ``torch.compile(flex_attention)``
  per process, the pattern's analytic ``mask_mod``, the block mask built once per shape; a run
  that fell back to eager FlexAttention is refused (:class:`tvm_splat.bench.flex.FallbackWatch`);
* ``tvm_splat``: ``torch.export`` -> ``from_exported_program`` -> ``SparsifyAttention(pattern)``
  -> ``tvm.compile``: every layer's attention becomes our kernels. The exported graph holds
  HuggingFace's ``eager`` attention (bf16 ``q kᵀ``, float32 softmax, bf16 ``P V``) without a
  mask over K/V repeated to the query heads (``repeat_kv``; the pass sees equal head counts),
  and the pass is given the pattern, so no n x n mask is ever built or evaluated;
* ``tvm_dense``: the same graph with the boolean mask (an input) applied by ``where``, compiled
  by TVM as it is
  (dense masked attention, dlight's default GPU schedules); skipped when its float32 scores
  would pass ``--dense-max-gb``.

TVM 0.27's PyTorch importer gives every ``matmul``/``linear`` a float32 output whatever its
inputs, so in both TVM graphs the activations between the 16-bit weights are float32 (the
models' attention is cast back to the model's dtype, :func:`_eager_attention`, so the sites run
16-bit kernels); the dense layers of the TVM rows are therefore not the torch rows' bf16 GEMMs,
and the ``tvm_splat`` / ``tvm_dense`` pair is the like-for-like comparison of the attention.
Both TVM graphs get :class:`~tvm_splat.relay_passes.LegalizeIntegerPower` (``SparsifyAttention``
applies it itself): TVM compiles CUDA with fast math, where RMSNorm's ``pow(2)`` is NaN for
negative inputs (the first H200 run gave all-NaN Mistral outputs, dense and sparse). On the GPU
each row also has its CUPTI kernel times (:func:`kernel_times`): which kernels the time goes to,
and how much of it is our attention. Weights are inputs of the compiled module (``keep_params_as_input``), uploaded once. Results go
to ``--out`` as JSON after every case (``--resume`` keeps the finished cases), so a long run
fits in several device calls. ``--tiny`` runs both models at toy sizes in float32 on the CPU
(``llvm``): the harness, checked in the tests, not a speed figure.

    python benchmarks/e2e_models.py --tiny --out /tmp/e2e_tiny.json
    python benchmarks/e2e_models.py --model mistral --seq-len 8192 16384 32768 \\
        --out benchmarks/results/h200_models_e2e.json --resume
    python benchmarks/e2e_models.py --model longformer --out benchmarks/results/h200_models_e2e.json --resume
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from tvm_splat.devices import default_target  # noqa: E402
from tvm_splat.formats import ACSR, GlobalTokens, Window  # noqa: E402
from tvm_splat.relay_passes import LegalizeIntegerPower, SparsifyAttention  # noqa: E402
from tvm_splat.tensors import to_tvm  # noqa: E402
from tvm_splat.timing import cuda_median_ms, median_ms, throughput_ms  # noqa: E402

IMPLS = ("torch_sdpa", "torch_flex", "tvm_splat", "tvm_dense")


# ------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelConfig:
    """One model: ``kind`` (``mistral``/``longformer``), sizes, and its attention pattern
    (``window``: Mistral's sliding window in keys, Longformer's ``±window``; ``globals``:
    Longformer's global tokens)."""

    kind: str
    dim: int
    heads: int
    kv_heads: int
    layers: int
    window: int
    globals: int = 0
    mlp_ratio: float = 3.5

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def pattern(self):
        if self.kind == "mistral":  # the last `window` keys, self included
            return Window(self.window - 1, causal=True)
        return GlobalTokens(self.globals) | Window(self.window)


#: the GPU sizes: Mistral 7B's head shape (d=128, 4 query heads per KV head) at hidden 2048;
#: Longformer-base's (hidden 768, 12 heads, ±256, a few global tokens)
MODELS = {
    "mistral": ModelConfig("mistral", dim=2048, heads=16, kv_heads=4, layers=4, window=4096, mlp_ratio=3.5),
    "longformer": ModelConfig("longformer", dim=768, heads=12, kv_heads=12, layers=4, window=256, globals=4,
                              mlp_ratio=4.0),
}
#: (seq_len, batch) cases per model on the GPU
GPU_CASES = {"mistral": [(8192, 1), (16384, 1), (32768, 1)], "longformer": [(4096, 8)]}
#: toy sizes of ``--tiny`` (CPU): awkward n, GQA, windows narrower than n
TINY_MODELS = {
    "mistral": ModelConfig("mistral", dim=64, heads=4, kv_heads=2, layers=2, window=24, mlp_ratio=2.0),
    "longformer": ModelConfig("longformer", dim=64, heads=4, kv_heads=4, layers=2, window=8, globals=2,
                              mlp_ratio=2.0),
}
TINY_CASES = {"mistral": [(77, 1)], "longformer": [(61, 2)]}


class Attention(nn.Module):
    """Self-attention of ``[b, n, dim]`` with ``heads`` query and ``kv_heads`` KV heads; the
    attention itself is ``self.mode``: ``"sdpa"`` (boolean mask, ``enable_gqa``), ``"flex"``
    (compiled FlexAttention with ``self.block_mask``), ``"export_sparse"`` (SDPA without a mask
    over repeated K/V: what SparsifyAttention is given) or ``"export_dense"`` (SDPA with the
    mask over repeated K/V: TVM's dense compile)."""

    def __init__(self, config: ModelConfig, rope: bool):
        super().__init__()
        c = config
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        # no biases anywhere: TVM's importer types a 16-bit addmm's product float32 and then
        # refuses the bias add (TypeError in from_exported_program, seen on bf16 Linear layers)
        self.q = nn.Linear(c.dim, c.heads * c.head_dim, bias=False)
        self.k = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
        self.v = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
        self.o = nn.Linear(c.heads * c.head_dim, c.dim, bias=False)
        self.rope = rope
        self.mode = "sdpa"
        self.block_mask = None
        self.flex = None

    def forward(self, x, mask, cos, sin):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        gqa = self.heads != self.kv_heads
        if self.mode == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif self.mode == "flex":
            out = self.flex(q, k, v, block_mask=self.block_mask, enable_gqa=gqa)
        else:
            k, v = _repeat_kv(k, self.heads // self.kv_heads), _repeat_kv(v, self.heads // self.kv_heads)
            out = _eager_attention(q, k, v, mask if self.mode == "export_dense" else None)
        return self.o(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


def _eager_attention(q, k, v, mask):
    """HuggingFace's ``eager`` attention: scores in the input dtype, softmax in float32 and back.

    (``F.scaled_dot_product_attention`` exports as its math decomposition, which upcasts 16-bit
    q, k, v to float32.) TVM 0.27's importer gives every ``matmul``/``linear`` a float32 output
    whatever its inputs, so in the imported graph q, k and v arrive as float32; the round trip
    ``.float().to(dtype)`` (a no-op in torch) puts the attention back in the model's dtype, as
    in torch, so the site runs 16-bit kernels (tensor cores) in both TVM graphs."""
    dtype = q.dtype
    q, k, v = (x.float().to(dtype) for x in (q, k, v))
    scores = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5)
    if mask is not None:  # masked in float32 (the softmax's dtype; the importer's -inf fill takes it)
        scores = scores.float().masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    return torch.matmul(probs, v)


def _rotate(x, cos, sin):
    """Rotary position embedding (the half-split form of Llama/Mistral)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _repeat_kv(x, group: int):
    """``[b, kvh, n, d]`` -> ``[b, kvh * group, n, d]`` (HuggingFace's ``repeat_kv``)."""
    if group == 1:
        return x
    b, kvh, n, d = x.shape
    return x[:, :, None].expand(b, kvh, group, n, d).reshape(b, kvh * group, n, d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        scaled = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * scaled.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in float32 (as HuggingFace's 16-bit models do): TVM 0.27's
    importer hands ``layer_norm`` a float32 input (see :func:`_eager_attention`) with the
    16-bit weight and refuses the mix."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class Block(nn.Module):
    """Pre-norm block: Mistral's (RMSNorm, RoPE, SwiGLU) or Longformer's (LayerNorm, GELU)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = int(config.dim * config.mlp_ratio)
        self.mistral = config.kind == "mistral"
        norm = RMSNorm if self.mistral else LayerNorm
        self.norm1, self.norm2 = norm(config.dim), norm(config.dim)
        self.attn = Attention(config, rope=self.mistral)
        if self.mistral:
            self.gate = nn.Linear(config.dim, hidden, bias=False)
            self.up = nn.Linear(config.dim, hidden, bias=False)
            self.down = nn.Linear(hidden, config.dim, bias=False)
        else:
            self.up = nn.Linear(config.dim, hidden, bias=False)
            self.down = nn.Linear(hidden, config.dim, bias=False)

    def forward(self, x, mask, cos, sin):
        x = x + self.attn(self.norm1(x), mask, cos, sin)
        h = self.norm2(x)
        h = F.silu(self.gate(h)) * self.up(h) if self.mistral else F.gelu(self.up(h))
        return x + self.down(h)


class Model(nn.Module):
    """``layers`` blocks over hidden states ``[b, n, dim]``; the boolean mask ``[n, n]`` and
    the RoPE tables are inputs of ``forward`` (no n x n constant in the exported graph)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))

    def set_attention(self, mode: str, flex=None, block_mask=None):
        for block in self.blocks:
            block.attn.mode, block.attn.flex, block.attn.block_mask = mode, flex, block_mask

    def forward(self, x, mask, cos, sin):
        for block in self.blocks:
            x = block(x, mask, cos, sin)
        return x


def rope_tables(n: int, head_dim: int, dtype, device, base: float = 10000.0):
    """``cos, sin [n, head_dim]`` of the half-split rotary embedding."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# ------------------------------------------------------------------------------ TVM
class _ExportWrapper(nn.Module):
    """The model with one attention mode, exported with only what that mode reads as inputs."""

    def __init__(self, model: Model, dense: bool):
        super().__init__()
        self.model, self.dense = model, dense

    def forward(self, x, mask, cos, sin):
        return self.model(x, mask if self.dense else None, cos, sin)


def compile_tvm(model: Model, inputs, config: ModelConfig, target, dense: bool):
    """``(run, info)``: ``run()`` calls the compiled module on ``inputs`` (x, mask, cos, sin;
    the mask only for the dense graph) and returns a torch tensor; ``info``: compile seconds and
    the SparsifyAttention report."""
    model.set_attention("export_dense" if dense else "export_sparse")
    t0 = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(_ExportWrapper(model, dense).eval(), tuple(inputs))
    mod = from_exported_program(exported, keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    info = {"export_s": time.perf_counter() - t0}
    if dense:  # RMSNorm's pow(2) is NaN for negative x under TVM's fast-math CUDA powf;
        mod = LegalizeIntegerPower()(mod)  # SparsifyAttention does the same to its graph
    else:
        sparsify = SparsifyAttention(config.pattern(), target=target)
        mod = sparsify(mod)
        info["sites"] = sparsify.report.as_dicts()
        rewritten = len(sparsify.report.rewritten)
        if rewritten != config.layers:
            raise RuntimeError(f"SparsifyAttention rewrote {rewritten} of {config.layers} attention sites:\n"
                               f"{sparsify.report}")
    t0 = time.perf_counter()
    executable = tvm.compile(mod, target=target)
    info["compile_s"] = time.perf_counter() - t0
    dev = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)
    vm = relax.VirtualMachine(executable, dev)
    weights = [p.copyto(dev) for p in params["main"]]
    args = [to_tvm(x, dev) for x in inputs]  # shared, or copied once when not 64-byte aligned
    main = vm["main"]

    def run():
        return torch.from_dlpack(main(*args, *weights)[0])

    return run, info


# ------------------------------------------------------------------------------ timing
def measure(fn, device: str) -> dict:
    """Per-call latency and back-to-back throughput of ``fn()`` in ms, with sample counts sized
    from one warm call: windows of about 0.3 s (at most 50 calls), three of them, and about 2 s
    of latency samples (3 to 20); a call over a second (TVM's dense attention at 16k) gets one
    window and one latency sample, so a case stays inside a 10-minute device call."""
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    once = max((time.perf_counter() - t0) * 1e3, 1e-3)
    slow = once > 1000
    calls = max(1, min(50, int(300 / once)))
    repeats = 1 if slow else max(3, min(20, int(2000 / once)))
    windows = 1 if slow else 3
    if device == "cuda":
        latency = cuda_median_ms(fn, repeats=repeats, warmup=0 if slow else 1)
    else:
        latency = median_ms(fn, repeats=repeats, warmup=0 if slow else 1)
    throughput = throughput_ms(fn, calls=calls, windows=windows, warmup=0 if slow else 1, device=device)
    return {"latency_ms": latency, "throughput_ms": throughput, "latency_samples": repeats,
            "throughput_calls": calls, "throughput_windows": windows}


def kernel_times(fn, top: int = 8) -> dict:
    """GPU kernel time of one call of ``fn`` by CUPTI (``torch.profiler``; TVM's launches are
    seen too): ``kernels_ms`` in all, ``splat_kernels_ms`` in our attention kernels (names
    ``splat_*``), and the ``top`` kernels by time as ``[name, ms, launches]``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return {"kernels_ms": sum(r[1] for r in rows),
            "splat_kernels_ms": sum(r[1] for r in rows if r[0].startswith("splat_")),
            "top_kernels": [[name[:80], round(ms, 4), count] for name, ms, count in rows[:top]]}


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max and mean absolute error against the reference, and the max relative to its scale."""
    diff = (out.float() - ref.float()).abs()
    scale = ref.float().abs().max().item()
    return {"max_abs_err": diff.max().item(), "mean_abs_err": diff.mean().item(),
            "max_err_over_max_ref": diff.max().item() / max(scale, 1e-30)}


# ------------------------------------------------------------------------------ one case
def run_case(config: ModelConfig, n: int, batch: int, dtype, device: str, target, impls, args) -> dict:
    torch.manual_seed(0)
    model = Model(config).to(device=device, dtype=dtype).eval()
    pattern = config.pattern()
    x = torch.randn(batch, n, config.dim, device=device, dtype=dtype)
    mask = torch.from_numpy(pattern.dense_mask(n)).to(device)
    cos, sin = rope_tables(n, config.head_dim, dtype, device)
    inputs = (x, mask, cos, sin)
    case = {"model": config.kind, "config": asdict(config), "seq_len": n, "batch": batch,
            "dtype": str(dtype).replace("torch.", ""), "pattern": repr(pattern),
            "density": float(ACSR.from_pattern(pattern, n).density), "tokens": batch * n, "impls": {}}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def eager(mode):
        model.set_attention(mode)

        def fn():
            with torch.no_grad():
                return model(*inputs)
        return fn

    reference = None
    for impl in impls:
        print(f"[{config.kind} n={n} b={batch}] {impl}", flush=True)
        result = {}
        try:
            if impl == "torch_sdpa":
                fn = eager("sdpa")
            elif impl == "torch_flex":
                fn, watch = _flex(model, pattern, n, device, inputs)
                result["block_mask_s"] = watch.pop("block_mask_s")
                watch = watch["watch"]
            elif impl == "tvm_splat":
                fn, info = compile_tvm(model, (x, mask, cos, sin), config, target, dense=False)
                result.update(info)
            else:  # tvm_dense
                scores_gb = 4 * batch * config.heads * n * n / 1e9
                if scores_gb > args.dense_max_gb:
                    raise _Skip(f"dense float32 scores need {scores_gb:.0f} GB per layer "
                                f"(--dense-max-gb {args.dense_max_gb})")
                fn, info = compile_tvm(model, (x, mask, cos, sin), config, target, dense=True)
                result.update(info)
            with torch.no_grad():
                out = fn()
                sync()
            if impl == "torch_sdpa":
                reference = out
            elif reference is not None:
                result.update(errors(out, reference))
            with torch.no_grad():
                result.update(measure(fn, device))
                if device == "cuda":
                    result.update(kernel_times(fn))
            if impl == "torch_flex":
                refused = watch.reason(fn)
                if refused:
                    result = {"refused": refused}
            if "throughput_ms" in result:
                result["tokens_per_s"] = batch * n / (result["throughput_ms"] / 1e3)
        except _Skip as skip:
            result = {"skipped": str(skip)}
        except Exception as err:  # recorded, never hidden: the JSON says what failed
            result = {"failed": f"{type(err).__name__}: {err}"[:2000]}
        finally:
            model.set_attention("sdpa")
            if device == "cuda":
                torch.cuda.empty_cache()
        case["impls"][impl] = result
        print(f"    {json.dumps(result)[:300]}", flush=True)
    return case


class _Skip(Exception):
    pass


def _flex(model, pattern, n, device, inputs):
    """The eager model with compiled FlexAttention; ``(fn, {"watch", "block_mask_s"})``."""
    from torch.nn.attention.flex_attention import create_block_mask

    from tvm_splat.bench.flex import FallbackWatch, compiled_flex

    watch = FallbackWatch()
    t0 = time.perf_counter()
    block_mask = create_block_mask(pattern.mask_mod(n), None, None, n, n, device=device)
    seconds = time.perf_counter() - t0
    model.set_attention("flex", flex=compiled_flex(), block_mask=block_mask)

    def fn():
        with torch.no_grad():
            return model(*inputs)

    return fn, {"watch": watch, "block_mask_s": seconds}


# ------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file, rewritten after every case")
    ap.add_argument("--model", action="append", choices=sorted(MODELS), help="repeatable; default both")
    ap.add_argument("--seq-len", type=int, nargs="+", help="override the model's sequence lengths")
    ap.add_argument("--batch", type=int, help="override the model's batch")
    ap.add_argument("--layers", type=int, help="override the model's layer count")
    ap.add_argument("--impl", action="append", choices=IMPLS, help="repeatable; default all "
                    "(torch_sdpa always runs first: it is the reference)")
    ap.add_argument("--target", default=None, help="TVM target (default: the GPU's own, llvm with --tiny)")
    ap.add_argument("--dense-max-gb", type=float, default=40.0,
                    help="skip tvm_dense when one layer's float32 scores pass this")
    ap.add_argument("--resume", action="store_true", help="keep the finished cases of --out")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, float32, on the CPU: the harness only")
    args = ap.parse_args(argv)

    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --tiny for the CPU harness)")
    dtype = torch.float32 if tiny else torch.bfloat16
    if args.target is not None:
        target = tvm.target.Target(args.target)
    elif tiny:
        target = tvm.target.Target("llvm")
    else:
        target = default_target(tvm.cuda(0))  # sm_90a on Hopper: the wgmma kernels
    impls = ["torch_sdpa"] + [i for i in (args.impl or IMPLS) if i != "torch_sdpa"]
    models, cases = (TINY_MODELS, TINY_CASES) if tiny else (MODELS, GPU_CASES)

    out = Path(args.out)
    result = {"what": "whole models end to end: PyTorch eager (SDPA, FlexAttention) against TVM with "
                      "SparsifyAttention and TVM's dense compile",
              "command": " ".join(["python", "benchmarks/e2e_models.py", *(argv if argv is not None else sys.argv[1:])]),
              "meta": {"torch": torch.__version__, "tvm": tvm.__version__, "target": str(target),
                       "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor(),
                       "host": platform.node(), "tiny": tiny,
                       "timing": "latency: median of single calls with a synchronisation; throughput: calls "
                                 "back to back between two CUDA events (host clock on the CPU), median of 3 "
                                 "windows; errors against torch_sdpa"},
              "cases": []}
    if args.resume and out.exists():
        result["cases"] = json.loads(out.read_text())["cases"]
    done = {(c["model"], c["seq_len"], c["batch"], c["config"]["layers"]) for c in result["cases"]}
    for kind in args.model or sorted(models):
        config = models[kind]
        if args.layers:
            config = replace(config, layers=args.layers)
        shapes = cases[kind]
        if args.seq_len:
            shapes = [(n, shapes[0][1]) for n in args.seq_len]
        for n, batch in shapes:
            batch = args.batch or batch
            if (kind, n, batch, config.layers) in done:
                print(f"[{kind} n={n} b={batch}] done before, kept")
                continue
            result["cases"].append(run_case(config, n, batch, dtype, device, target, impls, args))
            done.add((kind, n, batch, config.layers))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result["cases"])
    print(f"wrote {out}")
    return result


def _print_table(cases):
    print(f"{'model':<11}{'n':>7}{'b':>3}  " + "".join(f"{i:>22}" for i in IMPLS))
    for case in cases:
        cells = []
        for impl in IMPLS:
            r = case["impls"].get(impl, {})
            if "throughput_ms" in r:
                cells.append(f"{r['throughput_ms']:9.2f} ms {r['latency_ms']:7.2f}")
            else:
                cells.append(next((k for k in ("skipped", "refused", "failed") if k in r), "-"))
        print(f"{case['model']:<11}{case['seq_len']:>7}{case['batch']:>3}  " + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
