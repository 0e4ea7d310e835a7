"""Bench harness bookkeeping (no GPU: the per-case timing is replaced by a stub that returns
made-up times, so only summaries, budgets and resuming are under test here)."""
import json
from types import SimpleNamespace

import pytest

from tvm_splat.bench import run as R


def _fake_case(case, impls, repeats, peak, bw, console):
    # ours twice as fast as every baseline, so every geomean speedup is exactly 2
    res = {name: {"ms": 1.0 if name in R.OURS else 2.0} for name in impls}
    row = {"case": case.as_dict(), "name": case.name, "density": 0.1, "results": res}
    for ours in R.OURS:
        if ours in res:
            res[ours]["speedup"] = {b: r["ms"] / res[ours]["ms"] for b, r in res.items() if b not in R.OURS}
    return row


@pytest.fixture
def fake_gpu(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    monkeypatch.setattr(R, "run_case", _fake_case)
    monkeypatch.setattr(R, "plot", lambda rows, path: path.write_bytes(b"png"))


def _args(tmp_path, **kw):
    base = dict(suite="quick", pattern=None, impl=["sdpa_dense", "flex", "splat_fused"], out=str(tmp_path),
                prefix="t", repeats=1, peak_tflops=989.0, bandwidth_tbs=3.35, time_budget=float("inf"),
                resume=False)
    base.update(kw)
    return SimpleNamespace(**base)


def test_summary_and_resume(tmp_path, fake_gpu):
    R.run_bench(_args(tmp_path, time_budget=-1))  # budget already spent: nothing runs
    first = json.loads((tmp_path / "t_quick.json").read_text())
    assert first["cases"] == [] and len(first["meta"]["cases_not_run"]) == 13
    R.run_bench(_args(tmp_path, pattern=["window:128"], resume=True))
    assert len(json.loads((tmp_path / "t_quick.json").read_text())["cases"]) == 1
    R.run_bench(_args(tmp_path, resume=True))
    data = json.loads((tmp_path / "t_quick.json").read_text())
    assert len(data["cases"]) == 13
    assert len({c["name"] for c in data["cases"]}) == 13
    assert data["summary"]["splat_fused"]["flex"]["geomean"] == pytest.approx(2.0)
    assert data["summary"]["splat_fused"]["sdpa_dense"]["cases"] == 13


def test_geomean_ignores_missing_values():
    from tvm_splat.bench.baselines import geomean

    assert geomean([2.0, 8.0, None]) == pytest.approx(4.0)
