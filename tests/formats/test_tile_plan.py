"""Tile plan vs brute force: every nonzero covered exactly once, FULL blocks really full."""
import numpy as np
import pytest

from tvm_splat.formats import (ACSR, BlockLocal, DilatedWindow, GlobalTokens, PerHead, Strided,
                               Window)
from tvm_splat.formats.tile_plan import SPLIT_NEEDLESS_WORK, plan_tiles, split_length

PATTERNS = [
    (Window(5), 37),
    (Window(100), 37),            # window wider than n
    (Window(3, causal=True), 50),
    (DilatedWindow(3, 2), 37),
    (DilatedWindow(4, 3, causal=True), 61),
    (Strided(8), 100),
    (Strided(8, causal=True), 100),
    (Strided(6, 2), 45),
    (Window(4) | GlobalTokens(3), 100),
    (Window(2) | GlobalTokens((5, 40)), 60),
    (BlockLocal(7), 37),
    (PerHead((Window(3), DilatedWindow(2, 4), Strided(5))), 41),
]


def _check_plan(acsr, br, bc, split_blocks="auto"):
    plan = plan_tiles(acsr, br=br, bc=bc, split_blocks=split_blocks)
    dense = acsr.to_dense()
    fallback = plan.fallback_rows
    for h in range(acsr.num_heads):
        expect = dense[h].astype(np.int64)
        fb = fallback[h][fallback[h] >= 0]
        expect[fb] = 0  # fallback rows are the row kernel's
        np.testing.assert_array_equal(plan.covered(h), expect)
        # FULL blocks: every valid row contains every column of the block
        for t in range(plan.tiles.shape[1]):
            row0, rs, nrows, _c, lo, hi, _slot = plan.tiles[h, t]
            rows = row0 + rs * np.arange(nrows)
            assert (rows < acsr.n).all()
            for b in range(lo, hi):
                col0, sigma, full = plan.blocks[h, b]
                if full:
                    cols = col0 + sigma * np.arange(bc)
                    assert cols.max() < acsr.n
                    assert dense[h][np.ix_(rows, cols)].all()
        # the tiles of each component partition the rows (a split tile counts once: its group)
        groups = plan.splits[h][plan.splits[h, :, 2] > 0] if plan.num_slots else np.zeros((0, 6), int)
        for c in range(plan.num_comp[h]):
            sel = (plan.tiles[h, :, 3] == c) & (plan.tiles[h, :, 2] > 0) & (plan.tiles[h, :, 6] < 0)
            whole = [r0 + rs * np.arange(nr) for r0, rs, nr, *_ in plan.tiles[h, sel]]
            whole += [r0 + rs * np.arange(nr) for r0, rs, nr, comp, *_ in groups if comp == c]
            np.testing.assert_array_equal(np.sort(np.concatenate(whole)), np.arange(acsr.n))
        # every chunk of a group has the group's rows and one of its slots, each slot once
        chunks = plan.tiles[h][plan.tiles[h, :, 6] >= 0]
        assert sorted(chunks[:, 6].tolist()) == list(range(int((groups[:, 5] - groups[:, 4]).sum())))
        for r0, rs, nr, comp, s_lo, s_hi in groups:
            mine = chunks[(chunks[:, 6] >= s_lo) & (chunks[:, 6] < s_hi)]
            assert len(mine) == s_hi - s_lo >= 2
            assert (mine[:, :4] == (r0, rs, nr, comp)).all()
            if plan.split_blocks:
                assert ((mine[:, 5] - mine[:, 4]) <= plan.split_blocks).all()
    return plan


@pytest.mark.parametrize("pattern,n", PATTERNS, ids=lambda x: repr(x)[:40])
@pytest.mark.parametrize("br,bc", [(16, 16), (8, 32)])
@pytest.mark.parametrize("split_blocks", ["auto", 0, 1, 2])
def test_plan_covers_every_nonzero_once(pattern, n, br, bc, split_blocks):
    _check_plan(ACSR.from_pattern(pattern, n), br, bc, split_blocks)


def test_split_kv_only_for_outlier_tiles():
    """The auto rule splits a global token's row tile (all n columns) into chunks the length
    of a typical window tile, and leaves masks whose long tiles are the rule alone."""
    acsr = ACSR.from_pattern(Window(256) | GlobalTokens(4), 4096)
    plan = _check_plan(acsr, 64, 64)
    assert plan.num_slots >= 2 and plan.shape.num_groups == 1
    whole = plan_tiles(acsr, br=64, bc=64, split_blocks=0)
    assert whole.stats()["max_tile_blocks"] == 4096 // 64
    assert plan.stats()["max_tile_blocks"] <= plan.split_blocks < 4096 // 64 // 2
    assert plan.stats()["blocks"] == whole.stats()["blocks"]  # split, not duplicated
    for pattern, n in ((Window(4095, causal=True), 8192), (Window(1024), 8192), (Strided(128, causal=True), 4096)):
        assert plan_tiles(ACSR.from_pattern(pattern, n), br=64, bc=64).num_slots == 0, pattern
    with pytest.raises(ValueError, match="split_blocks"):
        plan_tiles(acsr, br=64, bc=64, split_blocks=-2)


def test_split_kv_left_out_when_the_grid_holds_enough_work():
    """With ``batch x heads`` given, the auto rule splits only where the longest tile is a
    large share of the grid's work: Longformer's global row tile at n=4096 (64 of the head's
    672 blocks) is split for 12 grid heads and left whole for 128, where the grid holds
    ``SPLIT_NEEDLESS_WORK`` times its length; the plan with grid heads equal to the mask's is
    the rule without them."""
    acsr = ACSR.from_pattern(Window(256) | GlobalTokens(4), 4096)
    free = plan_tiles(acsr, br=64, bc=64)
    blocks, longest = free.stats()["blocks"], free.stats()["max_tile_blocks"]
    needed = -(-SPLIT_NEEDLESS_WORK * 64 // blocks)  # the fewest grid heads that leave it whole
    assert plan_tiles(acsr, br=64, bc=64, grid_heads=needed - 1).split_blocks == free.split_blocks > 0
    whole = plan_tiles(acsr, br=64, bc=64, grid_heads=needed)
    assert whole.split_blocks == 0 and whole.num_slots == 0
    assert whole.stats()["max_tile_blocks"] == 64 and longest < 64
    _check_plan(acsr, 64, 64)  # and the split plan still covers every nonzero once
    assert split_length([64] + [10] * 63, grid_heads=1) == 10
    assert split_length([64] + [10] * 63, grid_heads=10_000) == 0
    assert split_length([64] + [10] * 63) == 10


def test_plan_from_mask_matches(rng):
    """Masks given densely (single columns get step 1) and random masks with CSR rows."""
    dense = DilatedWindow(3, 2).dense_mask(40)
    _check_plan(ACSR.from_mask(dense), 16, 16)
    mask = rng.random((2, 33, 33)) < 0.3
    mask[0, 5] = False  # an empty row
    plan = _check_plan(ACSR.from_mask(mask, max_segments=2), 16, 16)
    assert plan.num_fallback > 0


def test_plan_geometry_choices():
    # window: one component, contiguous tiles, most blocks of a wide band are FULL
    plan = plan_tiles(ACSR.from_pattern(Window(256), 1024), br=64, bc=64)
    assert plan.shape.num_components == 1 and (plan.tiles[0, :, 1] == 1).all()
    st = plan.stats()
    assert st["full_blocks"] > st["blocks"] // 2
    # dilated: rows grouped by residue (row stride d), blocks of step d, dense in compressed space
    plan = plan_tiles(ACSR.from_pattern(DilatedWindow(128, 2), 1024), br=64, bc=64)
    assert plan.shape.num_components == 1
    assert set(plan.tiles[0, :, 1].tolist()) == {2}
    assert set(plan.blocks[0, :, 1].tolist()) == {2}
    # strided: a contiguous band component plus a residue component of step s
    plan = plan_tiles(ACSR.from_pattern(Strided(128), 4096), br=64, bc=64)
    assert plan.shape.num_components == 2
    assert sorted(plan.comp_rstride[0].tolist()) == [1, 128]
    # window + global: tiles get [0, g) and the band, not everything between
    plan = plan_tiles(ACSR.from_pattern(Window(64) | GlobalTokens(64), 2048), br=64, bc=64, split_blocks=0)
    per_tile = plan.tile_blocks[0]
    assert per_tile.max() == 32  # the tile of the global rows: every column
    assert np.sort(per_tile)[-2] <= 4  # others: [0, 64) + a 192-wide band in <= 3 blocks


def test_plan_empty_and_deterministic():
    acsr = ACSR.from_mask(np.zeros((9, 9), dtype=bool))
    plan = plan_tiles(acsr, br=4, bc=4)
    assert plan.stats()["blocks"] == 0 and plan.shape.num_blocks >= 1
    again = plan_tiles(acsr, br=4, bc=4)
    assert again.shape == plan.shape and np.array_equal(again.tiles, plan.tiles)
    with pytest.raises(ValueError):
        plan_tiles(acsr, br=0, bc=4)
