"""``tvm_splat.distributed.launch``: ranks of a local process group, their errors and hangs."""
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tvm_splat.distributed.launch import free_port, run_ranks

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root
from tests.distributed import gloo_ranks  # noqa: E402  (the spawned ranks import it by this name)


def test_a_rank_error_reaches_the_caller():
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 of 2 failed on purpose"):
        run_ranks(gloo_ranks.fail_on_rank_one, 2, timeout=120)


def test_the_rank_that_failed_first_is_reported_not_the_first_process_to_end():
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 of 2 failed on purpose") as err:
        run_ranks(gloo_ranks.fail_on_rank_one_exit_late, 2, timeout=120)
    assert err.value.error_index == 1
    assert "Process 1 failed first (then rank 0)" in str(err.value)
    assert "failed after rank 1" not in str(err.value)


def test_a_hang_is_killed_at_the_timeout():
    with pytest.raises(TimeoutError, match="2 ranks did not finish in 20 s"):
        run_ranks(gloo_ranks.hang_on_rank_one, 2, timeout=20)


def test_bad_arguments_are_refused_before_anything_spawns():
    with pytest.raises(ValueError, match="world must be at least 1"):
        run_ranks(gloo_ranks.fail_on_rank_one, 0)
    with pytest.raises(ValueError, match="backend must be 'gloo' or 'nccl'"):
        run_ranks(gloo_ranks.fail_on_rank_one, 2, backend="mpi")


def test_free_port_is_a_usable_port():
    port = free_port()
    assert 0 < port < 65536
    store = dist.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    store.set("k", "v")
    assert store.get("k") == b"v"
