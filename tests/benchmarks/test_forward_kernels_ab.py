"""benchmarks/forward_kernels_ab.py's command line (the timing itself needs a CUDA GPU): case
indices and knob variants are checked before anything runs, and without a GPU it says so."""
import argparse

import pytest

SCRIPT = "benchmarks/forward_kernels_ab.py"


def test_case_indices_and_variants_are_checked(repo_script):
    ab = repo_script(SCRIPT)
    assert ab._indices("0,4") == [0, 4]
    with pytest.raises(argparse.ArgumentTypeError, match=f"from 0 to {len(ab.CASES) - 1}"):
        ab._indices(str(len(ab.CASES)))
    assert ab._variants('[{}, {"br": 128, "warps": 8}]') == [{}, {"br": 128, "warps": 8}]
    for bad in ('{"br": 128}', "[]", '[{}, 3]'):
        with pytest.raises(argparse.ArgumentTypeError, match="JSON list of knob overrides"):
            ab._variants(bad)
    # every variant key is a knob of the forward's tile knobs (what dataclasses.replace takes)
    from tvm_splat.schedules.tiled import TiledKnobs

    assert {"br", "warps", "split_blocks", "stages", "m_tiles", "wgmma", "tma", "warp_specialized",
            "persistent"} <= set(TiledKnobs.__dataclass_fields__)


def test_a_persistent_variant_applies_to_warp_specialized_defaults(repo_script):
    """``--variants '[{}, {"persistent": 132}]'``: the persistent form of a case whose default is
    the warp-specialized form; on another default the planner's knobs refuse it, which
    ``run_case`` records as the variant's error."""
    import dataclasses

    from tvm_splat.schedules.tiled import TiledKnobs

    ab = repo_script(SCRIPT)
    variants = ab._variants('[{}, {"persistent": 132}]')
    assert variants == [{}, {"persistent": 132}]
    ws = TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True, warp_specialized=True)
    assert dataclasses.replace(ws, **variants[1]).persistent == 132
    with pytest.raises(ValueError, match="needs warp_specialized"):
        dataclasses.replace(dataclasses.replace(ws, warp_specialized=False), **variants[1])


def test_without_a_gpu_it_refuses(repo_script, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        repo_script(SCRIPT).main("label", str(tmp_path / "ab.json"), [0], [{}])


def test_a_variant_listed_twice_times_one_plan(repo_script, monkeypatch):
    """``plan_once``: each distinct variant's plan is made once (keys in any order name the same
    variant) and its rows reuse it; the default (``{}``) is the case's own plan."""
    from types import SimpleNamespace

    from tvm_splat.schedules.tiled import TiledKnobs

    ab = repo_script(SCRIPT)
    made = []
    monkeypatch.setattr(ab, "plan", lambda *args, **kwargs: made.append(kwargs["knobs"]) or object())
    default = SimpleNamespace(knobs=TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True,
                                               warp_specialized=True, persistent=132))
    q = k = SimpleNamespace(shape=(1, 16, 4096, 128))
    plans = {}
    first, again = (ab.plan_once(plans, None, q, k, "bfloat16", default, {"head_group": 1, "out_evict_first": True})
                    for _ in range(2))
    reordered = ab.plan_once(plans, None, q, k, "bfloat16", default, {"out_evict_first": True, "head_group": 1})
    other = ab.plan_once(plans, None, q, k, "bfloat16", default, {"head_group": 2})
    assert first is again is reordered and other is not first
    assert [(m.head_group, m.out_evict_first) for m in made] == [(1, True), (2, False)]
    assert ab.plan_once(plans, None, q, k, "bfloat16", default, {}) is default


def test_reverse_runs_each_cases_variants_last_to_first(repo_script, monkeypatch, tmp_path):
    """``--reverse``: a case's variants run last to first, the last one the yardstick of
    ``max_diff``; every row's ``position`` counts the process's timed rows (the warm-up is not
    one), so two processes in the two orders put each variant at each place."""
    import json

    import torch

    ab = repo_script(SCRIPT)
    timed = []

    def fake_run_case(pattern, b, h, kvh, n, d, label, variants=({},), dtype="float16", kernel_time=False):
        timed.append((pattern, list(variants)))
        return [{"case": pattern, **({"variant": v} if v else {})} for v in variants]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ab, "run_case", fake_run_case)
    variants = [{}, {"head_group": 0}, {"head_group": 1}]
    for reverse in (False, True):
        timed.clear()
        out = tmp_path / f"ab_{reverse}.json"
        ab.main("t", str(out), [7, 19], variants, "bfloat16", reverse=reverse)
        order = variants[::-1] if reverse else variants
        assert timed == [(ab.CASES[7][0], [{}]), (ab.CASES[7][0], order), (ab.CASES[19][0], order)]
        rows = json.loads(out.read_text())
        assert [r["position"] for r in rows] == [1, 2, 3, 4, 5, 6]
        assert [r.get("variant", {}) for r in rows] == order * 2
    assert ab.CASES[21] == ("causal_window:8191", 1, 32, 8, 32768, 128)


def test_warm_runs_the_first_case_before_the_timed_rows(repo_script, monkeypatch, tmp_path):
    """``--warm S``: after the warm-up case, :func:`warm_gpu` runs the first case for S seconds
    before any row is timed, and every row records ``warm_s``; without it nothing more runs and
    the rows are as before. The value is a finite number of seconds >= 0."""
    import json

    import torch

    ab = repo_script(SCRIPT)
    events = []

    def fake_run_case(pattern, b, h, kvh, n, d, label, variants=({},), dtype="float16", kernel_time=False):
        events.append(("case", pattern, len(list(variants))))
        return [{"case": pattern} for _ in variants]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ab, "run_case", fake_run_case)
    monkeypatch.setattr(ab, "warm_gpu", lambda case, dtype, seconds: events.append(("warm", case, dtype, seconds)))
    for warm in (0.0, 2.5):
        events.clear()
        out = tmp_path / f"ab_{warm}.json"
        ab.main("t", str(out), [7, 6], [{}, {"head_group": 0}], "bfloat16", warm=warm)
        expected = [("case", ab.CASES[7][0], 1)] + ([("warm", ab.CASES[7], "bfloat16", 2.5)] if warm else [])
        assert events == expected + [("case", ab.CASES[7][0], 2), ("case", ab.CASES[6][0], 2)]
        rows = json.loads(out.read_text())
        assert [r.get("warm_s") for r in rows] == [2.5 if warm else None] * 4
    assert ab._warm("3") == 3.0 and ab._warm("0") == 0.0
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="--warm takes a number of seconds"):
            ab._warm(bad)


def test_kernel_time_adds_each_rows_cupti_time(repo_script, monkeypatch, tmp_path):
    """``--kernel-time``: every timed row of a variant that ran also holds ``kernel_ms``, one call's
    kernels by CUPTI over 50 calls of that variant's own plan; a refused variant's row stays an
    error without one; without the flag no row has it. ``main`` passes the flag to every timed
    case and not to the warm-up case's call."""
    import json
    from types import SimpleNamespace

    import torch

    from tvm_splat.schedules.tiled import TiledKnobs

    ab = repo_script(SCRIPT)
    out = torch.ones(1, 2, 8, 4)
    default_knobs = TiledKnobs(use_tensor_cores=True, br=64, bc=64, warps=4)

    def fake_plan(mask, q_shape, k_shape, dtype, target, knobs=None):
        if knobs is not None and knobs.warps == 3:
            raise ValueError("warps must be 4 or 8")
        return SimpleNamespace(knobs=knobs or default_knobs, run=lambda q, k, v: out * (2 if knobs else 1))

    profiled = []
    monkeypatch.setattr(ab, "case_inputs", lambda *case: (None, out, out, out))
    monkeypatch.setattr(ab, "plan", fake_plan)
    monkeypatch.setattr(ab, "throughput_ms", lambda fn, **kw: 0.02)
    monkeypatch.setattr(ab, "cuda_kernel_ms", lambda fn, calls: profiled.append((float(fn().sum()), calls)) or 0.0178)
    variants = [{}, {"warps": 8}, {"warps": 3}]
    rows = ab.run_case(*ab.CASES[23], "t", variants, "bfloat16", kernel_time=True)
    assert [r.get("kernel_ms") for r in rows] == [0.0178, 0.0178, None]
    assert "error" in rows[2] and "warps must be" in rows[2]["error"]
    assert profiled == [(float(out.sum()), 50), (float(out.sum()) * 2, 50)]  # each variant's own plan
    assert all("kernel_ms" not in r for r in ab.run_case(*ab.CASES[23], "t", variants, "bfloat16"))

    calls = []

    def fake_run_case(pattern, b, h, kvh, n, d, label, variants=({},), dtype="float16", kernel_time=False):
        calls.append(kernel_time)
        return [{"case": pattern, **({"kernel_ms": 0.0178} if kernel_time else {})} for _ in variants]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ab, "run_case", fake_run_case)
    ab.main("t", str(tmp_path / "ab.json"), [22, 23], [{}], "bfloat16", kernel_time=True)
    assert calls == [False, True, True]
    assert [r["kernel_ms"] for r in json.loads((tmp_path / "ab.json").read_text())] == [0.0178, 0.0178]
