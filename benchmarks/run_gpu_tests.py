"""Run GPU tests in parallel shards on one GPU machine, each shard its own pytest process.

    python benchmarks/run_gpu_tests.py OUT_DIR SHARDS [--ids FILE] [--limit S] [PYTEST_ARGS..]

The tests of ``tests/gpu`` spend most of their time compiling kernels on the CPU (one module
per case), so on the lent H200 machine (16 cores, one GPU) 15 shards ran the 213 cases of
``tests/gpu/test_backward.py`` in 293 s where one process needs several times that
(``benchmarks/results/h200_gpu_tests.txt``). Test ids come from ``--ids FILE`` (one per line,
as ``pytest --collect-only -q`` prints them) or from collecting ``PYTEST_ARGS`` (default
``tests/gpu``), run from the repository root (ids are relative to the working directory, the
shards' ``--rootdir``); shard ``s`` takes every ``SHARDS``-th id from ``s`` on. Each shard writes
``OUT_DIR/shard<s>.log`` (verbose: one line per test) and a JUnit ``OUT_DIR/shard<s>.xml``; a
shard still running after ``--limit`` seconds (default 540: one device call may run 600) is killed
and reported with the outcomes its log shows. Prefer ``--ids`` collected here to ``-k`` on the GPU
machine: there ``-k "tma or fused" tests/gpu/test_backward.py`` selected 521 ids (all but one of
the file) where it selects 249 here; pytest's ``-k`` also matches the names of the nodes above a
test, directories included, and the checkout's directories there are not ours to name. Not
investigated further (the device time went to the selection). Prints one
line per shard, the id and first message line of every failed test (what a device call's
output brings back when its files do not all come back) and the totals; exits 1 if any test
failed or any shard was killed.
"""
import argparse
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET


def collect(pytest_args):
    """Test ids that ``pytest --collect-only -q`` finds for ``pytest_args``."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "--rootdir", os.getcwd(), *pytest_args], capture_output=True, text=True)
    return [line for line in done.stdout.splitlines() if "::" in line]


def shard_totals(xml_path):
    """``(tests, failures + errors, skipped)`` of one shard's JUnit report, or None without one."""
    if not os.path.exists(xml_path):
        return None
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = lambda key: sum(int(s.get(key, 0)) for s in suites)  # noqa: E731
    return total("tests"), total("failures") + total("errors"), total("skipped")


def shard_failures(xml_path):
    """``[(test name, first line of its message)]`` of the failed and erroring tests of one
    shard's JUnit report (empty without one)."""
    if not os.path.exists(xml_path):
        return []
    return [(case.get("name"), ((child.get("message") or "").strip().splitlines() or [""])[0][:240])
            for case in ET.parse(xml_path).getroot().iter("testcase")
            for child in case if child.tag in ("failure", "error")]


def log_outcomes(log_path):
    """``{outcome: [test ids]}`` from a shard's verbose log (``PASSED``, ``FAILED``, ``ERROR``,
    ``SKIPPED`` lines): what a shard killed at the limit finished before it had written its
    JUnit report."""
    outcomes = {}
    if os.path.exists(log_path):
        for line in open(log_path, errors="replace"):
            found = re.match(r"(\S.*::.*?) (PASSED|FAILED|ERROR|SKIPPED)\b", line)  # ids may hold spaces
            if found:
                outcomes.setdefault(found.group(2), []).append(found.group(1))
    return outcomes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("shards", type=int)
    parser.add_argument("--ids", help="file of test ids, one per line")
    parser.add_argument("--limit", type=float, default=540.0, help="seconds before running shards are killed")
    args, pytest_args = parser.parse_known_args(argv)
    if args.shards < 1:
        parser.error(f"SHARDS must be at least 1, got {args.shards}")
    ids = ([line.strip() for line in open(args.ids) if line.strip()] if args.ids
           else collect(pytest_args or ["tests/gpu"]))
    if not ids:
        raise SystemExit("no test ids to run")
    os.makedirs(args.out_dir, exist_ok=True)
    start, procs = time.monotonic(), []
    for s in range(min(args.shards, len(ids))):
        id_file = os.path.join(args.out_dir, f"shard{s}.ids")
        with open(id_file, "w") as f:
            f.write("\n".join(ids[s::args.shards]))
        code = ("import pytest, sys; ids, xml, root = sys.argv[1:]; "
                "sys.exit(pytest.main(['-v', '-p', 'no:cacheprovider', '--rootdir', root, '--junitxml', xml] "
                "+ open(ids).read().split('\\n')))")
        log = open(os.path.join(args.out_dir, f"shard{s}.log"), "w")
        procs.append((s, log, subprocess.Popen([sys.executable, "-c", code, id_file,
                                                os.path.join(args.out_dir, f"shard{s}.xml"), os.getcwd()],
                                               stdout=log, stderr=subprocess.STDOUT)))
    killed, failed, tests, skipped = [], 0, 0, 0
    for s, log, proc in procs:
        try:
            proc.wait(timeout=max(1.0, args.limit - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed.append(s)
        log.close()
        totals = shard_totals(os.path.join(args.out_dir, f"shard{s}.xml"))
        if totals:
            tests, failed, skipped = tests + totals[0], failed + totals[1], skipped + totals[2]
        if s in killed:  # no JUnit report: what its log says it finished
            done = log_outcomes(os.path.join(args.out_dir, f"shard{s}.log"))
            print(f"shard {s}: killed at the limit after " + ", ".join(f"{len(v)} {k}" for k, v in done.items()),
                  flush=True)
            for name in done.get("FAILED", []) + done.get("ERROR", []):
                print(f"  FAILED {name}", flush=True)
            tests += sum(len(v) for v in done.values())
            failed += len(done.get("FAILED", [])) + len(done.get("ERROR", []))
            skipped += len(done.get("SKIPPED", []))
        else:
            print(f"shard {s}: {totals}", flush=True)
        for name, message in shard_failures(os.path.join(args.out_dir, f"shard{s}.xml")):
            print(f"  FAILED {name}: {message}", flush=True)
    print(f"{len(ids)} ids, {len(procs)} shards, {time.monotonic() - start:.0f} s: {tests} ran, "
          f"{failed} failed, {skipped} skipped" + (f", shards killed: {killed}" if killed else ""))
    return 1 if failed or killed else 0


if __name__ == "__main__":
    sys.exit(main())
