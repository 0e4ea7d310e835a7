"""Sharded sparse attention over gloo equals single-process ``tvm_splat.sparse_attention``."""
import sys
from pathlib import Path

import pytest
import torch

import tvm_splat
from tvm_splat import distributed as tsd

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root
from tests.distributed import gloo_ranks  # noqa: E402  (the spawned ranks import it by this name)

# (pattern, shard length, heads, kv heads, head_dim, dtype): every windowed family, unions with
# global tokens, shards that do not align with blocks or dilations, grouped heads, 16-bit inputs
CASES_2 = [
    ("window:5", 24, 2, 2, 16, torch.float32),
    ("causal_window:9", 24, 2, 1, 16, torch.float32),
    ("dilated:3:4", 24, 2, 2, 8, torch.float32),
    ("causal_dilated:4:3", 24, 1, 1, 8, torch.float32),
    ("block:10", 24, 2, 2, 8, torch.float32),
    ("global:3+window:4", 24, 4, 2, 16, torch.float32),
    ("global:2+block:8+dilated:2:3", 24, 2, 2, 8, torch.float32),
    ("window:6", 32, 2, 2, 16, torch.bfloat16),
]
# four ranks: interior ranks get both halos; tokens lie outside most ranks' regions
CASES_4 = [
    ("window:7", 16, 2, 2, 8, torch.float32),
    ("global:2+causal_window:5", 16, 2, 1, 8, torch.float32),
    ("block:6+dilated:2:4", 16, 2, 2, 8, torch.float32),
]


def _tolerance(dtype):
    return 2e-2 if dtype == torch.bfloat16 else 2e-5


def _check_against_single_process(cases, world, tmp_path):
    gloo_ranks.run_ranks(gloo_ranks.sharded_outputs, world, cases, str(tmp_path))
    for i, case in enumerate(cases):
        q, k, v = gloo_ranks.inputs(case, world)
        single = tvm_splat.sparse_attention(q, k, v, case[0])
        sharded = torch.cat([torch.load(tmp_path / f"{i}_{r}.pt") for r in range(world)], dim=2)
        assert sharded.shape == single.shape and sharded.dtype == single.dtype
        err = (sharded.float() - single.float()).abs().max().item()
        assert err <= _tolerance(case[5]), f"{case[0]}: sharded differs from single-process by {err}"


def test_two_ranks_equal_single_process(tmp_path):
    _check_against_single_process(CASES_2, 2, tmp_path)


def test_four_ranks_equal_single_process(tmp_path):
    _check_against_single_process(CASES_4, 4, tmp_path)


def test_bad_input_fails_on_every_rank_alike(tmp_path):
    gloo_ranks.run_ranks(gloo_ranks.refused, 3, str(tmp_path))
    messages = [(tmp_path / f"refused_{r}.txt").read_text() for r in range(3)]
    assert messages[0] == messages[1] == messages[2] and "20 rows to the" in messages[0]


def test_needs_a_process_group():
    q = torch.randn(1, 1, 8, 8)
    with pytest.raises(RuntimeError, match="process group"):
        tsd.sparse_attention(q, q, q, "window:2")
