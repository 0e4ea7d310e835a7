"""Where a kernel's warps spend their time, by region of its SASS, from an ``ncu`` source page.

    python benchmarks/ncu_regions.py SOURCE.csv[.gz] [--min-share 0.3]

``SOURCE.csv`` is ``ncu --import R.ncu-rep --page source --csv --print-source sass`` of one
kernel (a first line naming the kernel, then one row per instruction in address order, with
``Instructions Executed``, ``Warp Stall Sampling (All Samples)`` and the ``stall_*`` columns).
A region is a run of consecutive instructions executed the same number of times: the block loop's
body, a tile's prologue, the PARTIAL blocks' mask test, the epilogue. For each region of at
least ``--min-share`` percent of the samples (or eight instructions) it prints its instruction
range, size, execution count, share of all warp samples, its three largest stall reasons and its
most frequent opcodes, then the share of the samples by execution count.

Read with the kernel's structure in mind: in ``results/h200_ncu_window1024_persistent_source.csv.gz``
(window ±1024, d=128, the persistent warp-specialized form) the block loop's regions run 515,072
times (64,384 blocks of the loop × 8 consumer warps), a tile's once-a-tile code 32,768 times
(4,096 tiles × 8 warps), the PARTIAL blocks' mask and V check 31,744 times, and the producer's
waits 32,124 times; those once-a-tile regions hold about a fifth of the samples.
"""
import argparse
import csv
import gzip
import io
from collections import Counter
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def number(text: str) -> float:
    """A count as ncu prints it (``1,234``; empty: 0)."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_source(text: str) -> list:
    """The instruction rows of an ncu source page (the kernel-name line skipped)."""
    lines = text.splitlines()
    if lines and lines[0].startswith('"Kernel Name"'):
        lines = lines[1:]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


def opcode(sass: str) -> str:
    """``FFMA`` of ``@!P0 FFMA.FTZ R1, ...``: the first word that is not a predicate, up to a dot."""
    words = [w for w in sass.split() if not w.startswith("@")]
    return words[0].split(".")[0] if words else ""


def regions(rows: list) -> list:
    """Runs of consecutive instructions with one execution count: dicts with ``first``,
    ``last`` (row indices), ``executed``, ``samples``, ``stalls`` (Counter by reason) and
    ``opcodes`` (Counter)."""
    stall_columns = [k for k in (rows[0] if rows else {}) if k.startswith("stall_") and "Not Issued" not in k]
    out = []
    for index, row in enumerate(rows):
        executed = number(row.get(EXECUTED, ""))
        if not out or out[-1]["executed"] != executed:
            out.append({"first": index, "last": index, "executed": executed, "samples": 0.0,
                        "stalls": Counter(), "opcodes": Counter()})
        region = out[-1]
        region["last"] = index
        region["samples"] += number(row.get(SAMPLES, ""))
        region["opcodes"][opcode(row.get("Source", ""))] += 1
        for column in stall_columns:
            region["stalls"][column[len("stall_"):]] += number(row[column])
    return out


def by_execution_count(found: list) -> list:
    """``(executed, instructions, samples)`` summed over the regions of each execution count,
    the most sampled first."""
    total = Counter(), Counter()
    for region in found:
        total[0][region["executed"]] += region["last"] - region["first"] + 1
        total[1][region["executed"]] += region["samples"]
    return sorted(((e, total[0][e], total[1][e]) for e in total[0]), key=lambda t: -t[2])


def report(rows: list, min_share: float = 0.3) -> str:
    found = regions(rows)
    all_samples = sum(r["samples"] for r in found) or 1.0
    lines = [f"{len(rows)} instructions, {all_samples:.0f} warp samples"]
    for r in found:
        share = 100 * r["samples"] / all_samples
        size = r["last"] - r["first"] + 1
        if share < min_share and size < 8:
            continue
        stalls = ", ".join(f"{k} {100 * v / r['samples']:.0f}%" for k, v in r["stalls"].most_common(3) if r["samples"])
        ops = " ".join(f"{k} {v}" for k, v in r["opcodes"].most_common(6))
        lines.append(f"[{r['first']:5d}-{r['last']:5d}] {size:4d} instr x {r['executed']:>9.0f}  {share:5.2f}%  "
                     f"({stalls})  {ops}")
    lines.append("by execution count: " + "; ".join(f"{e:.0f} x {n} instr {100 * s / all_samples:.1f}%"
                                                     for e, n, s in by_execution_count(found)[:8]))
    return "\n".join(lines)


def load(path: str) -> str:
    data = Path(path).read_bytes()
    return (gzip.decompress(data) if path.endswith(".gz") else data).decode()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="ncu's source page as CSV (.gz accepted)")
    parser.add_argument("--min-share", type=float, default=0.3, help="print regions from this percent of samples")
    args = parser.parse_args()
    print(report(read_source(load(args.source)), args.min_share))
