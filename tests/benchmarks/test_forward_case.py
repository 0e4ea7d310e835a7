"""benchmarks/forward_case.py's command line and its clock log's summary (the runs need a CUDA
GPU): the summary keeps the samples taken while the loop ran, and without a GPU it says so."""
import argparse
import time

import pytest

SCRIPT = "benchmarks/forward_case.py"


def _stamp(epoch: float) -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(epoch)) + ".250"


def test_clock_summary_takes_the_medians_of_the_samples_in_the_loop(repo_script):
    fc = repo_script(SCRIPT)
    t0 = float(int(time.time()))
    lines = [f"{_stamp(t0 - 30)}, 1980 MHz, 83.30 W, 41, 0x0000000000000001",  # idle, before the loop
             f"{_stamp(t0 + 1)}, 1620 MHz, 691.55 W, 64, 0x0000000000000004",
             f"{_stamp(t0 + 2)}, 1680 MHz, 692.52 W, 65, 0x0000000000000004",
             f"{_stamp(t0 + 3)}, 1590 MHz, 689.95 W, 66, 0x0000000000000004",
             "not a sample", "2026/99/99 00:00:00.000, 1 MHz, 1 W, 1, 0x0",  # skipped, not parsed
             f"{_stamp(t0 + 60)}, 1980 MHz, 90.00 W, 45, 0x0000000000000000"]  # after it
    summary = fc.clock_summary("\n".join(lines), t0, t0 + 4)
    assert summary == {"samples": 3, "sm_clock_mhz": 1620.0, "power_w": 691.55, "temperature_c": 65.0,
                       "throttle_reasons": ["0x0000000000000004"]}
    assert fc.clock_summary("\n".join(lines), t0 + 100, t0 + 200) == {"samples": 0}


def test_case_and_variant_are_checked(repo_script):
    fc = repo_script(SCRIPT)
    assert fc._case("7") == 7 and fc.CASES[7][0] == "window:1024"
    with pytest.raises(argparse.ArgumentTypeError, match=f"from 0 to {len(fc.CASES) - 1}"):
        fc._case(str(len(fc.CASES)))
    assert fc._variant('{"persistent": 0}') == {"persistent": 0}
    with pytest.raises(argparse.ArgumentTypeError, match="JSON object of knob overrides"):
        fc._variant("[{}]")


def test_without_a_gpu_it_refuses(repo_script):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        repo_script(SCRIPT).main(7, {})
