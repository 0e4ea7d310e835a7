"""Halo sizes, local masks and exchanged bytes of sequence-parallel attention (numpy only)."""
import numpy as np
import pytest

from tvm_splat import ACSR, GlobalTokens, PerHead, Window, parse_pattern
from tvm_splat.distributed import halo_bytes, local_acsr, shard_layouts, split_pattern

PATTERNS = ["window:5", "causal_window:7", "dilated:3:2", "causal_dilated:2:5", "block:6", "block:8",
            "global:2+window:3", "global:3+block:4+dilated:2:3", "window:0", "global:5"]


def _expected_halos(pattern, n, world):
    """(left, right) of every rank from the dense mask of the non-global parts."""
    local, _ = split_pattern(pattern)
    shard = n // world
    if local is None:
        return [(0, 0)] * world
    mask = local.dense_mask(n)
    halos = []
    for r in range(world):
        cols = np.flatnonzero(mask[r * shard:(r + 1) * shard].any(axis=0))
        halos.append((max(0, r * shard - cols.min()), max(0, cols.max() - ((r + 1) * shard - 1))))
    return halos


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n,world", [(48, 3), (48, 4), (40, 2), (16, 1)])
def test_halos_are_the_reach_of_each_shard(pattern, n, world):
    layouts = shard_layouts(pattern, n, world)
    assert [(lay.left, lay.right) for lay in layouts] == _expected_halos(pattern, n, world)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n,world", [(48, 3), (48, 4)])
def test_local_mask_is_the_shard_of_the_global_mask(pattern, n, world):
    dense = parse_pattern(pattern).dense_mask(n)
    for lay in shard_layouts(pattern, n, world):
        acsr = local_acsr(pattern, lay)
        acsr.validate()
        assert acsr.n == lay.length == len(lay.outside) + lay.left + lay.shard + lay.right
        local = acsr.to_dense()[0]
        buffer_rows = np.concatenate([lay.outside, np.arange(lay.region_start, lay.region_stop)])
        got = np.zeros((lay.shard, n), dtype=bool)
        rows, cols = np.nonzero(local[lay.query_offset:lay.query_offset + lay.shard])
        got[rows, buffer_rows[cols]] = True
        want = dense[lay.first:lay.first + lay.shard].copy()
        want[lay.own_tokens - lay.first] = False  # global rows are computed apart
        np.testing.assert_array_equal(got, want)
        others = np.ones(lay.length, dtype=bool)
        others[lay.query_offset:lay.query_offset + lay.shard] = False
        assert not local[others].any()  # halo and token rows are keys only


def test_tokens_outside_the_region_sit_at_the_front():
    layouts = shard_layouts("global:2+window:3", 64, 4)
    assert layouts[0].outside.tolist() == [] and layouts[0].own_tokens.tolist() == [0, 1]
    assert [lay.outside.tolist() for lay in layouts[1:]] == [[0, 1]] * 3
    assert layouts[2].query_offset == 2 + 3 and layouts[2].length == 2 + 3 + 16 + 3


def test_halo_bytes_against_a_ring():
    # window ±1024 on 4 ranks of 64k rows, bf16, 8 kv heads of 128: an interior rank receives
    # 2 x 1024 rows of k and v; a ring brings it the 3 other shards
    vol = halo_bytes("window:1024", (1, 32, 65536, 128), (1, 8, 65536, 128), "bfloat16", 4)
    row = 2 * 8 * 128 * 2
    assert vol.halo_rows == ((0, 1024), (1024, 1024), (1024, 1024), (1024, 0))
    assert vol.halo == (1024 * row, 2048 * row, 2048 * row, 1024 * row)
    assert vol.ring == (3 * 65536 * row,) * 4
    assert vol.tokens == vol.global_rows == (0,) * 4
    assert vol.ratio_to_ring == pytest.approx(2048 / (3 * 65536))
    assert vol.ratio_to_ring <= 1024 / 65536  # the bound: reach / shard length
    causal = halo_bytes("causal_window:4095", (1, 32, 65536, 128), (1, 8, 65536, 128), "bfloat16", 2)
    assert causal.halo_rows == ((0, 0), (4095, 0))


def test_halo_bytes_count_global_tokens():
    vol = halo_bytes("global:4+window:8", (2, 4, 32, 16), (2, 2, 32, 16), "float32", 2)
    # rank 0 holds all 4 tokens: the all-gather pads every rank's part to 4 rows of q, k, v
    assert vol.tokens == (4 * 2 * (4 + 2 * 2) * 16 * 4,) * 2
    assert vol.global_rows == (2 * 4 * 4 * (16 + 2) * 4,) * 2
    assert vol.total[0] == vol.halo[0] + vol.tokens[0] + vol.global_rows[0]


def test_bad_patterns_and_lengths_are_refused():
    with pytest.raises(ValueError, match="not divisible by the 3 ranks"):
        shard_layouts("window:2", 50, 3)
    with pytest.raises(ValueError, match="too wide for 4 shards of 8 rows: rank 0's rows reach 9 rows to the right"):
        shard_layouts("window:9", 32, 4)
    with pytest.raises(ValueError, match="too wide"):
        shard_layouts("strided:8", 64, 4)  # strided columns span the whole sequence
    with pytest.raises(ValueError, match="closed-form pattern"):
        shard_layouts(ACSR.from_pattern(Window(2), 32), 32, 2)
    with pytest.raises(ValueError, match="closed-form pattern"):
        split_pattern(np.eye(8, dtype=bool))
    with pytest.raises(ValueError, match="PerHead"):
        split_pattern(PerHead((Window(1), Window(2))))
    with pytest.raises(ValueError, match="must be few"):
        split_pattern(GlobalTokens(1 << 25))
    with pytest.raises(ValueError, match="dtype"):
        halo_bytes("window:2", (1, 1, 8, 8), dtype="int8")
