"""benchmarks/empty_quarters.py: its counts against brute force over the dense mask (CPU)."""
import numpy as np
import pytest

from tvm_splat.formats.acsr import ACSR
from tvm_splat.formats.patterns import parse_pattern
from tvm_splat.formats.tile_plan import plan_tiles

SCRIPT = "benchmarks/empty_quarters.py"


def _brute_force(text, n, br, bc, rows, cols):
    """``(plan, blocks, kept, empty pieces, pieces)``: the plan of ``text`` (row stride 1, step 1)
    and its counts from the dense mask."""
    dense = parse_pattern(text).dense_mask(n)
    tile_plan = plan_tiles(ACSR.from_pattern(parse_pattern(text), n), br=br, bc=bc, split_blocks=0)
    blocks = kept = empty = pieces = 0
    for row0, rstride, nrows, _c, lo, hi, _s in tile_plan.tiles[0].tolist():
        assert rstride == 1 or nrows == 0
        for col0, sigma, _f in tile_plan.blocks[0, lo:hi].tolist():
            assert sigma == 1
            block = np.zeros((br, bc), dtype=bool)
            part = dense[row0:row0 + nrows, col0:col0 + bc]
            block[:part.shape[0], :part.shape[1]] = part
            blocks += 1
            kept += int(block.sum())
            for r in range(0, br, rows):
                for c in range(0, bc, cols):
                    pieces += 1
                    empty += not block[r:r + rows, c:c + cols].any()
    return tile_plan, blocks, kept, empty, pieces


@pytest.mark.parametrize("text,n", [("window:100", 700), ("causal_window:200", 520), ("global:3+window:40", 384)])
def test_counts_match_the_dense_mask(repo_script, text, n):
    eq = repo_script(SCRIPT)
    tile_plan, blocks, kept, empty, pieces = _brute_force(text, n, 128, 128, 64, 64)
    row = eq.count_pieces(text, tile_plan, 64, 64)
    assert row["blocks"] == blocks and row["tiles"] == int((tile_plan.tiles[0, :, 2] > 0).sum())
    assert kept == parse_pattern(text).nnz(n)  # every nonzero in exactly one block
    assert row["masked_share"] == pytest.approx(1 - kept / (blocks * 128 * 128))
    assert row["empty_quarter_share"] == pytest.approx(empty / pieces)
    assert 0 < row["empty_quarter_share"] < row["masked_share"]


def test_window_edges_leave_one_warpgroup_half_a_block(repo_script):
    # window +-1024 in 128 x 128 tiles: 17 blocks a full tile, two of them edges where one
    # 64-row half of the tile keeps nothing in one 64-column half (1 piece of 4 in each)
    eq = repo_script(SCRIPT)
    n = 8192
    tile_plan = plan_tiles(ACSR.from_pattern(parse_pattern("window:1024"), n), br=128, bc=128, split_blocks=0)
    row = eq.count_pieces("window:1024", tile_plan)
    interior = [hi - lo for _r, _s, nrows, _c, lo, hi, _sl in tile_plan.tiles[0].tolist() if nrows]
    assert max(interior) == 17
    full_tiles = sum(1 for x in interior if x == 17)
    assert row["empty_quarter_share"] * row["blocks"] * 4 >= 2 * full_tiles


def test_pieces_larger_than_the_block_are_not_counted(repo_script):
    eq = repo_script(SCRIPT)
    tile_plan = plan_tiles(ACSR.from_pattern(parse_pattern("window:64"), 512), br=32, bc=32, split_blocks=0)
    row = eq.count_pieces("window:64", tile_plan, 64, 64)
    assert row["empty_quarter_share"] is None and row["blocks"] > 0 and 0 < row["masked_share"] < 1


def test_main_plans_each_case_for_the_target(repo_script, capsys):
    eq = repo_script(SCRIPT)
    rows = eq.main(["--cases", "16", "--target", "nvidia/nvidia-h100"])  # dense n=2048 in 128-row tiles
    assert len(rows) == 1 and rows[0]["case"] == 16 and rows[0]["wgmma"]
    assert rows[0]["masked_share"] == 0 and rows[0]["empty_quarter_share"] == 0
    assert rows[0]["blocks_per_tile"] == 16
    assert '"case": 16' in capsys.readouterr().out


def test_a_case_index_out_of_range_is_refused(repo_script, capsys):
    eq = repo_script(SCRIPT)
    with pytest.raises(SystemExit):
        eq.main(["--cases", "7,999"])
    assert "case indices run from 0 to" in capsys.readouterr().err
