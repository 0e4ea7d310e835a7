"""One case of the forward A/B, run for a profiler or under a clock and power log (CUDA GPU).

    python benchmarks/forward_case.py CASE [--variant JSON] [--dtype bfloat16] [--calls N]
    python benchmarks/forward_case.py CASE [--dtype D] --seconds S --clock-log OUT.csv
    python benchmarks/forward_case.py CASE [--dtype D] --dense cudnn --seconds S --clock-log OUT.csv

``CASE`` indexes :data:`forward_kernels_ab.CASES` (seeded random inputs); the plan is the
planner's default for the device (``--variant``: :class:`~tvm_splat.schedules.tiled.TiledKnobs`
overrides of it, a JSON object). Without ``--seconds`` it makes ``--calls`` calls (default 4)
and prints the knobs: the command ``ncu`` profiles, e.g.
``ncu -k regex:tiled -s 2 -c 1 --section SpeedOfLight python benchmarks/forward_case.py 7``.

With ``--seconds S`` the calls run back to back for about ``S`` seconds while ``nvidia-smi``
samples the GPU's SM clock, power draw, temperature and throttle reasons every 200 ms into
``--clock-log`` (CSV). The script prints the time a call and the medians of the samples taken
while the loop ran (:func:`clock_summary`). The power cap shows there: window ±1024 (case 7) on
an H200 drew a median 692 W of its 700 W, throttled for the software power cap (reason 0x4),
the SM clock at 1620 MHz in fp16 and 1710 MHz in bf16 instead of 1980
(``benchmarks/results/h200_window1024_power.csv``).

``--dense BACKEND`` (``flash``, ``cudnn`` or ``efficient``) runs PyTorch's dense SDPA with only
that backend on the same q, k, v instead (``is_causal`` for a causal mask, GQA by
``enable_gqa``): the rate a dense kernel reaches on the same GPU under the same cap. ``tflops``
is the rate of the work each one is given: ours ``4·B·H·nnz·d`` (effective: the mask's nonzeros),
dense ``4·B·H·n²·d`` (half of it when causal, the triangle the kernel computes).
"""
import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forward_kernels_ab import CASES, _case, case_inputs, variant_plan

from tvm_splat.timing import run_for

#: the fields ``nvidia-smi --query-gpu`` logs, in its CSV's order
CLOCK_FIELDS = ("timestamp", "clocks.sm", "power.draw", "temperature.gpu", "clocks_throttle_reasons.active")


def sample_stamp(text: str) -> float:
    """The epoch time of an ``nvidia-smi`` timestamp (local time, ``2026/12/06 22:30:44.123``:
    the milliseconds kept); ``ValueError`` if it is none."""
    whole, _, fraction = text.partition(".")
    return time.mktime(time.strptime(whole, "%Y/%m/%d %H:%M:%S")) + (float("0." + fraction) if fraction else 0.0)


def clock_summary(csv_text: str, start: float, end: float) -> dict:
    """Medians of the ``nvidia-smi`` samples (``CLOCK_FIELDS``, ``--format=csv,noheader``)
    taken between the epoch times ``start`` and ``end`` (to the millisecond of the samples'
    stamps): ``sm_clock_mhz``, ``power_w``, ``temperature_c``, the throttle reasons seen
    (``throttle_reasons``, as ``nvidia-smi`` prints them) and the sample count. No sample in
    the interval: ``{"samples": 0}``."""
    clocks, powers, temps, reasons = [], [], [], set()
    for line in csv_text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(CLOCK_FIELDS):
            continue
        try:
            stamp = sample_stamp(parts[0])
        except ValueError:
            continue
        if not start <= stamp <= end:
            continue
        clocks.append(float(parts[1].split()[0]))
        powers.append(float(parts[2].split()[0]))
        temps.append(float(parts[3].split()[0]))
        reasons.add(parts[4])
    if not clocks:
        return {"samples": 0}
    return {"samples": len(clocks), "sm_clock_mhz": statistics.median(clocks), "power_w": statistics.median(powers),
            "temperature_c": statistics.median(temps), "throttle_reasons": sorted(reasons)}


@contextlib.contextmanager
def clock_sampler(path: str, interval_ms: int = 200):
    """``nvidia-smi`` sampling :data:`CLOCK_FIELDS` every ``interval_ms`` into the CSV at
    ``path`` while the ``with`` block runs (its first second waited out, so that the samples
    cover the block); read them with :func:`clock_summary`."""
    with open(path, "w") as log:
        sampler = subprocess.Popen(["nvidia-smi", f"--query-gpu={','.join(CLOCK_FIELDS)}",
                                    "--format=csv,noheader", "-lms", str(interval_ms)], stdout=log)
        try:
            time.sleep(1.0)  # the sampler's first lines
            yield
        finally:
            sampler.terminate()
            sampler.wait()


#: ``--dense`` choices: PyTorch's SDPA backends by name
DENSE_BACKENDS = ("flash", "cudnn", "efficient")


def dense_call(backend: str, q, k, v, causal: bool):
    """``fn()`` running PyTorch's dense SDPA on q, k, v with only ``backend`` allowed (one of
    :data:`DENSE_BACKENDS`); a backend that refuses the inputs raises on the first call."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    gqa = k.shape[1] != q.shape[1]

    def run():
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return run


def mask_is_causal(pattern: str, n: int) -> bool:
    """Whether the case's mask keeps no key after its query (dense SDPA then runs ``is_causal``)."""
    from tvm_splat.bench.inputs import is_causal
    from tvm_splat.formats import ACSR, parse_pattern

    return is_causal(ACSR.from_pattern(parse_pattern(pattern), n))


def work_flop(pattern: str, b: int, h: int, n: int, d: int, dense: bool, causal: bool = False) -> float:
    """FLOPs of one call: ``4·b·h·nnz·d`` over the mask's mean nonzeros a head (ours, as the
    bench counts them: :func:`tvm_splat.bench.baselines.flops`), or over the scores a dense
    kernel computes (``dense``: n², or n(n+1)/2 when it runs ``causal``)."""
    from tvm_splat.bench.baselines import flops
    from tvm_splat.formats import parse_pattern

    if not dense:
        mask = parse_pattern(pattern)
        return flops(b, h, mask.nnz(n) / mask.num_heads, d)
    return flops(b, h, n * (n + 1) / 2 if causal else float(n) * n, d)


def make_plan(case: int, variant: dict, dtype: str):
    """``(plan, q, k, v)`` of ``CASES[case]`` on the GPU, as ``forward_kernels_ab.py`` makes
    them: the planner's default, or its knobs with ``variant``'s overrides."""
    from tvm_splat.planner import plan

    mask, q, k, v = case_inputs(*CASES[case], dtype)
    return variant_plan(mask, q, k, dtype, plan(mask, q.shape, k.shape, dtype, "cuda"), variant), q, k, v


def main(case: int, variant: dict, dtype: str = "float16", calls: int = 4, seconds: float = 0.0,
         clock_log: "str | None" = None, dense: "str | None" = None) -> dict:
    import torch

    if seconds and not clock_log:
        raise SystemExit("--seconds needs --clock-log (where nvidia-smi's samples go)")
    if dense and variant:
        raise SystemExit("--variant sets our kernel's knobs; it has no meaning with --dense")
    if not torch.cuda.is_available():
        raise SystemExit("forward_case.py needs a CUDA GPU")
    pattern, b, h, _, n, d = CASES[case]
    if dense:
        _, q, k, v = case_inputs(*CASES[case], dtype)
        causal = mask_is_causal(pattern, n)
        flop = work_flop(pattern, b, h, n, d, dense=True, causal=causal)
        call, result = dense_call(dense, q, k, v, causal), {"dense": dense}
    else:
        made, q, k, v = make_plan(case, variant, dtype)
        flop = work_flop(pattern, b, h, n, d, dense=False)
        call, result = (lambda: made.run(q, k, v)), {"knobs": repr(made.knobs)}
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    result = {"case": CASES[case], "dtype": dtype, **result}
    if seconds:
        with clock_sampler(clock_log):
            start = time.time()
            first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            first.record()
            done = run_for(call, seconds, batch=50)
            last.record()
            last.synchronize()
            end = time.time()
        ms = first.elapsed_time(last) / done
        result.update(calls=done, ms=ms, tflops=flop / ms / 1e9,
                      **clock_summary(Path(clock_log).read_text(), start, end))
    print(json.dumps(result))
    return result


def _variant(text):
    variant = json.loads(text)
    if not isinstance(variant, dict):
        raise argparse.ArgumentTypeError(f"--variant takes a JSON object of knob overrides, got {text}")
    return variant


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", type=_case, help="index of forward_kernels_ab.CASES")
    parser.add_argument("--variant", type=_variant, default={}, help="TiledKnobs overrides (a JSON object)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--calls", type=int, default=4, help="calls before any timed loop")
    parser.add_argument("--seconds", type=float, default=0.0, help="run back to back this long, logging clocks")
    parser.add_argument("--clock-log", help="CSV of nvidia-smi's samples (with --seconds)")
    parser.add_argument("--dense", choices=DENSE_BACKENDS, help="time PyTorch's dense SDPA (this backend) instead")
    args = parser.parse_args()
    main(args.case, args.variant, args.dtype, args.calls, args.seconds, args.clock_log, args.dense)
