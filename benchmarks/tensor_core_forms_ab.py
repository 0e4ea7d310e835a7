"""A/B of the tensor-core forms of the tiled kernel on model-sized shapes (GPU): kernel
throughput (50 back-to-back calls between CUDA events, ms) and the max difference to the first
form's output, per case; JSON to $OUT/ab_wgmma.json. Forms by name on the command line
(default all), cases by index in $AB_CASES (default all); COMPILE_ONLY=1 builds and checks only.

    AB_CASES=0,1,2 python benchmarks/tensor_core_forms_ab.py wg_128_s2 wg_128_s2_tma wg_64_s2 wg_64_s2_tma
"""
import json, sys, os
import torch
from tvm_splat import sparse_attention
from tvm_splat.schedules.tiled import TiledKnobs

CASES = [("window:1024", 1, 16, 16, 32768, 128), ("causal_window:4095", 1, 32, 8, 16384, 128),
         ("global:4+window:256", 8, 16, 16, 4096, 64), ("window:256", 16, 16, 16, 2048, 64),
         ("dilated:256:2", 1, 12, 12, 8192, 64), ("global:4+window:128", 32, 12, 12, 1024, 64)]
FORMS = {"mma_64_s2": dict(), "mma_64_s1": dict(stages=1),
         "wg_64_s2": dict(wgmma=True), "wg_64_s1": dict(wgmma=True, stages=1),
         "wg_128_s2": dict(wgmma=True, br=128, warps=8), "wg_128_bc128_s2": dict(wgmma=True, br=128, warps=8, bc=128),
         "wg_64_bc128_s2": dict(wgmma=True, bc=128), "wg_128_s4": dict(wgmma=True, br=128, warps=8, stages=4),
         "wg_64_s4": dict(wgmma=True, stages=4),
         "wg_128_s2_tma": dict(wgmma=True, br=128, warps=8, tma=True), "wg_64_s2_tma": dict(wgmma=True, tma=True),
         "wg_128_bc128_s2_tma": dict(wgmma=True, br=128, warps=8, bc=128, tma=True)}
only = sys.argv[1:] or list(FORMS)
if os.environ.get("AB_CASES"):
    CASES = [CASES[int(i)] for i in os.environ["AB_CASES"].split(",")]
out = []
for pat, b, h, kvh, n, d in CASES:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, n, d, device="cuda", dtype=torch.float16, generator=g)
    k, v = (torch.randn(b, kvh, n, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(2))
    ref = None
    row = {"case": f"{pat} b{b} h{h}/{kvh} n{n} d{d}"}
    for name in only:
        try:
            kn = TiledKnobs(use_tensor_cores=True, **FORMS[name])
            o = sparse_attention(q, k, v, pat, variant="tiled", knobs=kn)
            torch.cuda.synchronize()
            if ref is None:
                ref = o
            err = (o.float() - ref.float()).abs().max().item()
            if os.environ.get("COMPILE_ONLY"):
                row[name] = "compiled"
                continue
            for _ in range(3):
                sparse_attention(q, k, v, pat, variant="tiled", knobs=kn)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(50):
                sparse_attention(q, k, v, pat, variant="tiled", knobs=kn)
            e.record(); torch.cuda.synchronize()
            row[name] = (round(s.elapsed_time(e) / 50, 4), round(err, 4))
        except Exception as ex:
            row[name] = f"{type(ex).__name__}: {str(ex)[:200]}"
    print(row, flush=True)
    out.append(row)
os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ab_wgmma.json"), "w"), indent=1)
