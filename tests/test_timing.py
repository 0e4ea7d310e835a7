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
