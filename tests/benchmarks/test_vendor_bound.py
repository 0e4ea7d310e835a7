"""benchmarks/vendor_bound.py (the runs need a CUDA GPU): its computed work against brute force,
its summary's medians and bound from given rows, and its refusal without a GPU."""
import pytest
import torch

from tvm_splat.formats.acsr import ACSR
from tvm_splat.formats.patterns import parse_pattern
from tvm_splat.formats.tile_plan import plan_tiles

SCRIPT = "benchmarks/vendor_bound.py"


@pytest.mark.parametrize("text,n,br,bc", [("window:100", 700, 128, 128), ("window:33", 300, 64, 32),
                                          ("window:767", 768, 128, 128)])
def test_computed_scores_count_every_score_of_every_walked_block(repo_script, text, n, br, bc):
    vb = repo_script(SCRIPT)
    tile_plan = plan_tiles(ACSR.from_pattern(parse_pattern(text), n), br=br, bc=bc, split_blocks=0)
    blocks = sum(hi - lo for *_, lo, hi, _slot in tile_plan.tiles[0].tolist())
    computed = vb.computed_scores_per_head(tile_plan)
    assert computed == blocks * br * bc
    kept = int(parse_pattern(text).dense_mask(n).sum())
    # whole blocks cover every kept entry; a window narrower than the tiles computes masked ones
    assert computed >= kept
    assert (computed > kept) == (text != "window:767")


def _row(name, rnd, ms, effective, computed):
    return {"round": rnd, "name": name, "effective_flop": effective, "computed_flop": computed,
            "throughput_ms": ms, "ms": 2 * ms, "kernel_ms": ms / 2}


def test_summary_takes_medians_and_scales_the_dense_rate_by_the_windows_kept_share(repo_script):
    vb = repo_script(SCRIPT)
    window = (94.0e9, 100.0e9)  # effective and computed flop: 6% of the computed scores masked
    dense = (50.0e9, 50.0e9)
    rows = []
    for rnd, (w_ms, c_ms) in enumerate([(0.20, 0.090), (0.22, 0.080), (0.30, 0.085)]):
        rows += [_row("ours_window", rnd, w_ms, *window), _row("cudnn_tiles16", rnd, c_ms, *dense),
                 _row("ours_tiles16", rnd, 0.1, *dense), _row("cudnn_dense", rnd, 0.5, 1e12, 1e12)]
    summary = vb.summarize(rows)
    assert summary["window_masked_share"] == pytest.approx(0.06)
    med = summary["medians"]
    assert med["ours_window"]["throughput"]["ms"] == pytest.approx(0.22)
    assert med["ours_window"]["latency"]["ms"] == pytest.approx(0.44)
    assert med["cudnn_tiles16"]["kernel"]["ms"] == pytest.approx(0.0425)
    assert med["ours_window"]["throughput"]["effective_tflops"] == pytest.approx(94.0e9 / 0.22 / 1e9)
    assert med["ours_window"]["throughput"]["computed_tflops"] == pytest.approx(100.0e9 / 0.22 / 1e9)
    bound = summary["bound"]["throughput"]
    cudnn_rate = 50.0e9 / 0.085 / 1e9
    assert bound["bound_effective_tflops"] == pytest.approx(cudnn_rate * 0.94)
    assert bound["ours_of_bound"] == pytest.approx((94.0e9 / 0.22 / 1e9) / (cudnn_rate * 0.94))
    assert bound["target_of_bound"] == pytest.approx(vb.TARGET_TFLOPS / (cudnn_rate * 0.94))
    assert bound["ours_computed_of_cudnn_tiles16"] == pytest.approx((100.0e9 / 0.22) / (50.0e9 / 0.085))
    assert bound["ours_tiles16_of_cudnn_tiles16"] == pytest.approx(0.085 / 0.1)
    assert set(summary["bound"]) == {"throughput", "latency", "kernel"}


def test_summary_gives_each_rows_median_clock_where_the_rows_were_sampled(repo_script):
    vb = repo_script(SCRIPT)
    rows = []
    for rnd, clock in enumerate([1590.0, 1695.0, 1620.0]):
        for name in ("ours_window", "cudnn_tiles16", "ours_tiles16", "cudnn_dense"):
            rows.append(_row(name, rnd, 0.2, 1e9, 1e9))
    assert "sm_clock_mhz" not in vb.summarize(rows)  # no --clock-log
    for i, row in enumerate(rows):
        row["clock"] = {"samples": 9, "sm_clock_mhz": 1500.0 + 10 * i} if row["name"] != "cudnn_dense" \
            else {"samples": 0}  # a row too short for a sample
    clocks = vb.summarize(rows)["sm_clock_mhz"]
    assert clocks == {"ours_window": 1540.0, "cudnn_tiles16": 1550.0, "ours_tiles16": 1560.0}


def test_snake_rounds_never_put_the_window_row_after_the_dense_row(repo_script):
    """``--snake``: odd rounds reversed, so across the rounds our window row follows cuDNN's
    16-block row or itself (plain rounds: cuDNN's dense row, from the second round on)."""
    vb = repo_script(SCRIPT)
    for snake, expected in ((False, {"cudnn_dense"}), (True, {"cudnn_tiles16", "ours_window"})):
        order = [name for rnd in range(6) for name, _, _ in vb.round_rows(rnd, snake)]
        assert sorted(order) == sorted([name for name, _, _ in vb.ROWS] * 6)
        before = {order[i - 1] for i in range(1, len(order)) if order[i] == "ours_window"}
        assert before == expected
    assert vb.round_rows(0, True) == vb.round_rows(2, True) == vb.ROWS


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu_and_writes_nothing(repo_script, tmp_path):
    vb = repo_script(SCRIPT)
    out = tmp_path / "bound.json"
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        vb.main(str(out))
    assert not out.exists()


def test_rows_run_the_window_and_the_dense_tiles_of_its_length(repo_script):
    vb = repo_script(SCRIPT)
    cases = {name: vb.CASES[case] for name, case, _ in vb.ROWS}
    assert cases["ours_window"] == ("window:1024", 1, 16, 16, 32768, 128)
    assert cases["cudnn_dense"] == cases["ours_window"]
    pattern, b, h, _, n, d = cases["cudnn_tiles16"]
    assert cases["ours_tiles16"] == cases["cudnn_tiles16"]
    # window +-(n - 1): every key kept, so dense SDPA computes exactly the same work; 16 blocks a tile
    assert parse_pattern(pattern).nnz(n) == n * n and n // 128 == 16 and d == 128
    assert (b, h) == (16, 16)


def test_a_cases_rows_share_its_inputs_and_count_their_work(repo_script):
    # ours and cuDNN's rows of case 16 (dense n=2048 b=16) on one (plan, q, k, v); the plan as
    # the planner makes it for the H100 without a device, q, k, v CPU stand-ins (nothing runs)
    import types

    from tvm_splat.planner import plan

    vb = repo_script(SCRIPT)
    pattern, b, h, kvh, n, d = vb.CASES[16]
    tile_plan = plan(pattern, (b, h, n, d), (b, kvh, n, d), "bfloat16", device=None,
                     target="nvidia/nvidia-h100").tile_plan
    q, k, v = (torch.zeros(1, 1, 1, 1) for _ in range(3))
    calls = []
    workload = types.SimpleNamespace(tile_plan=tile_plan, knobs="knobs", run=lambda *x: calls.append(x))
    fn, effective, computed, knobs = vb.row_callable(16, "ours", (workload, q, k, v))
    dense_flop = 4.0 * b * h * n * n * d
    assert effective == pytest.approx(dense_flop) and computed == pytest.approx(dense_flop) and knobs == "'knobs'"
    fn()
    assert len(calls) == 1 and all(a is e for a, e in zip(calls[0], (q, k, v)))
    fn, effective, computed, knobs = vb.row_callable(16, "cudnn", (workload, q, k, v))
    assert effective == computed == pytest.approx(dense_flop) and knobs is None and callable(fn)
