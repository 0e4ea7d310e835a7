"""Timing helpers: how often they call and what they divide by (never how fast anything is)."""
import pytest

from tvm_splat.timing import throughput_ms


def test_throughput_calls_back_to_back_and_divides_by_the_calls(monkeypatch):
    import tvm_splat.timing as T

    clock = iter(range(0, 1000, 10))  # every window lasts 10 "seconds" of the fake clock
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(clock))
    calls = []
    ms = throughput_ms(lambda: calls.append(1), calls=4, windows=3, warmup=2, device="cpu")
    assert len(calls) == 2 + 3 * 4
    assert ms == pytest.approx(10 * 1e3 / 4)


def test_throughput_rejects_empty_windows():
    with pytest.raises(ValueError, match="calls and windows must be >= 1"):
        throughput_ms(lambda: None, calls=0, device="cpu")


def test_gpu_windows_open_after_one_queued_call(monkeypatch):
    """On the GPU each window's start event is recorded after one call is already queued (the
    window opens on a busy GPU), and only the calls between the two events are divided by."""
    import torch

    events, made = [], []

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing
            self.name = ("start", "end")[len(made) % 2]
            made.append(self)

        def record(self):
            events.append(self.name)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 8.0

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    ms = throughput_ms(lambda: events.append("call"), calls=4, windows=2, warmup=1, device="cuda")
    assert events == ["call"] + 2 * (["call", "start"] + ["call"] * 4 + ["end"])
    assert ms == pytest.approx(8.0 / 4)


def test_run_for_calls_in_batches_until_the_time_is_up(monkeypatch):
    """``run_for``: batches of ``batch`` calls, each followed by a synchronisation, started only
    while less than ``seconds`` have passed; it returns the calls made (none for 0 seconds)."""
    import tvm_splat.timing as T

    clock = iter(range(0, 1000))  # one "second" a reading: the start, then one reading a batch
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(clock))
    events = []
    monkeypatch.setattr(T, "synchronize", lambda device: events.append(("sync", device)))
    # readings 1 and 2 are under 3 s, reading 3 is not: two batches
    assert T.run_for(lambda: events.append("call"), 3, batch=2, device="cuda") == 4
    assert events == 2 * ["call", "call", ("sync", "cuda")]
    events.clear()
    assert T.run_for(lambda: events.append("call"), 0, device="cpu") == 0 and events == []
