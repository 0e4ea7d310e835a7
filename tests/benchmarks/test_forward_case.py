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


def test_clock_summary_keeps_the_samples_milliseconds(repo_script):
    """Rows of half a second (``vendor_bound.py --clock-log``) take the samples within their
    own interval, to the millisecond of the stamps."""
    fc = repo_script(SCRIPT)
    t0 = float(int(time.time()))
    whole = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(t0))
    assert fc.sample_stamp(whole + ".250") == pytest.approx(t0 + 0.25)
    assert fc.sample_stamp(whole) == t0
    with pytest.raises(ValueError):
        fc.sample_stamp("not a time")
    lines = [f"{whole}.{ms:03d}, {clock} MHz, 600.00 W, 60, 0x0000000000000004"
             for ms, clock in ((100, 1500), (300, 1600), (500, 1700), (700, 1800), (900, 1900))]
    assert fc.clock_summary("\n".join(lines), t0 + 0.2, t0 + 0.6)["sm_clock_mhz"] == 1650.0
    assert fc.clock_summary("\n".join(lines), t0 + 0.6, t0 + 1.0)["samples"] == 2


def test_clock_sampler_runs_nvidia_smi_through_the_block_and_stops_it(repo_script, tmp_path, monkeypatch):
    fc = repo_script(SCRIPT)
    events = []

    class FakeSampler:
        def __init__(self, args, stdout):
            events.append(args)
            stdout.write("a sample\n")

        def terminate(self):
            events.append("terminate")

        def wait(self):
            events.append("wait")

    monkeypatch.setattr(fc.subprocess, "Popen", FakeSampler)
    monkeypatch.setattr(fc.time, "sleep", lambda seconds: events.append(f"sleep {seconds}"))
    log = tmp_path / "clocks.csv"
    with pytest.raises(RuntimeError, match="in the block"):
        with fc.clock_sampler(str(log), 50):
            events.append("block")
            raise RuntimeError("in the block")
    command, *rest = events
    assert command[0] == "nvidia-smi" and command[-2:] == ["-lms", "50"]
    assert f"--query-gpu={','.join(fc.CLOCK_FIELDS)}" in command
    assert rest == ["sleep 1.0", "block", "terminate", "wait"]  # stopped even though the block raised
    assert log.read_text() == "a sample\n"


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


def test_work_is_the_masks_nonzeros_for_ours_and_the_computed_scores_for_dense(repo_script):
    fc = repo_script(SCRIPT)
    window = 4 * 3 * 2 * 64 * (16 * 5 - 6)  # n=16, +-2: 5 keys a row, less 2+1 at each end
    assert fc.work_flop("window:2", 3, 2, 16, 64, dense=False) == window
    assert fc.work_flop("window:2", 3, 2, 16, 64, dense=True) == 4 * 3 * 2 * 64 * 16 * 16
    assert fc.work_flop("causal_window:3", 1, 2, 16, 64, dense=True, causal=True) == 4 * 2 * 64 * 16 * 17 / 2
    assert fc.mask_is_causal("causal_window:3", 16) and not fc.mask_is_causal("window:2", 16)


def test_dense_call_runs_only_the_named_backend(repo_script):
    """On the CPU PyTorch's flash backend runs (GQA, causal) and matches the math form;
    a backend that refuses the inputs raises rather than falling back to another."""
    import torch
    import torch.nn.functional as F

    fc = repo_script(SCRIPT)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 37, 16, generator=gen) for heads in (4, 2, 2))
    expect = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(fc.dense_call("flash", q, k, v, True)(), expect)
    with pytest.raises(RuntimeError, match="No viable backend"):
        fc.dense_call("cudnn", q, k, v, True)()


def test_dense_with_a_variant_is_refused_before_anything_runs(repo_script):
    with pytest.raises(SystemExit, match="no meaning with --dense"):
        repo_script(SCRIPT).main(7, {"lazy_rescale": True}, dense="flash")
