"""The partial softmax state of the global rows (single process: no messages)."""
import torch

from tvm_splat.distributed import exchange


def test_partial_states_of_key_chunks_combine_to_softmax(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=gen)
    k, v = torch.randn(2, 2, 37, 8, generator=gen), torch.randn(2, 2, 37, 8, generator=gen)
    expected = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.5, -1) @ v.repeat_interleave(2, 1)
    monkeypatch.setattr(exchange, "CHUNK_SCORES", 2 * 4 * 3 * 5)  # chunks of 5 keys: 8 chunks
    m, l, o = exchange.partial_state(q, k, v, 0.5)
    assert m.shape == l.shape == (2, 4, 3) and o.shape == (2, 4, 3, 8)
    torch.testing.assert_close(o / l[..., None], expected, rtol=1e-5, atol=1e-5)
    # two halves of the keys, combined as global_rows does across ranks
    halves = [exchange.partial_state(q, k[:, :, s], v[:, :, s], 0.5) for s in (slice(0, 20), slice(20, 37))]
    top = torch.maximum(halves[0][0], halves[1][0])
    l_sum = sum(h[1] * torch.exp(h[0] - top) for h in halves)
    o_sum = sum(h[2] * torch.exp(h[0] - top)[..., None] for h in halves)
    torch.testing.assert_close(o_sum / l_sum[..., None], expected, rtol=1e-5, atol=1e-5)
