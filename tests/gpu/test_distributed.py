"""Sequence-parallel attention over NCCL on 2+ GPUs equals ``tvm_splat.sparse_attention`` on one
(run on a machine of several GPUs; skipped otherwise)."""
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from tests.distributed import gloo_ranks  # noqa: E402  (the spawned ranks import it by this name)

import tvm_splat  # noqa: E402

# (pattern, shard length, heads, kv heads, head_dim, dtype): the tensor-core kernel on bf16/fp16
CASES = [
    ("causal_window:255", 1024, 8, 2, 128, torch.bfloat16),
    ("window:128", 1024, 4, 4, 64, torch.float16),
    ("global:16+window:64", 512, 4, 2, 64, torch.bfloat16),
    ("block:96+dilated:32:3", 512, 2, 2, 64, torch.float16),
]


@pytest.mark.parametrize("world", [2, 4])
def test_nccl_ranks_equal_one_gpu(world, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    gloo_ranks.run_ranks(gloo_ranks.sharded_outputs, world, CASES, str(tmp_path), "cuda", backend="nccl",
                         timeout=600)
    for i, case in enumerate(CASES):
        q, k, v = (x.cuda() for x in gloo_ranks.inputs(case, world))
        single = tvm_splat.sparse_attention(q, k, v, case[0]).float().cpu()
        sharded = torch.cat([torch.load(tmp_path / f"{i}_{r}.pt") for r in range(world)], dim=2).float()
        err = (sharded - single).abs().max().item()
        assert err <= 2e-2, f"{case[0]} on {world} GPUs differs from one GPU by {err}"
