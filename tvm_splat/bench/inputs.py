"""The inputs of one bench case, shared by every implementation, and the reference output.

Every implementation of a case gets the same :class:`CaseInputs`: q ``[batch, heads, n, d]``,
k and v ``[batch, kv_heads, n, d]`` (grouped-query attention when ``kv_heads < heads``), of the
case's dtype on one torch device, the pattern, its ACSR and, built on first use, the boolean mask
on the device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..devices import dtype_name
from ..formats import ACSR, Pattern, PerHead, parse_pattern

# Rows of the boolean mask built per step on the device: a chunk's int32 index arithmetic stays
# under 4096 * n * 4 bytes (512 MiB at n = 32768).
MASK_ROWS_PER_STEP = 4096
# Float64 scores (and their probabilities) the reference keeps alive per step: 1 GiB, under 1% of
# an H200's memory, with steps long enough to keep the GPU busy.
REFERENCE_STEP_BYTES = 2**30


@dataclass(eq=False)
class CaseInputs:
    """One case's tensors and mask. ``pattern`` is None for an ACSR built from a mask or CSR
    (FlexAttention then has only the gather form of the mask, ``flex_gather``)."""

    q: "object"
    k: "object"
    v: "object"
    acsr: ACSR
    pattern: Pattern | None

    @property
    def n(self) -> int:
        return int(self.q.shape[2])

    @property
    def device(self) -> str:
        return self.q.device.type

    @property
    def dtype(self) -> str:
        return dtype_name(self.q)

    @property
    def gqa(self) -> bool:
        return self.k.shape[1] != self.q.shape[1]

    @property
    def mask_heads(self) -> int:
        """Heads the mask distinguishes: 1 (shared) or the number of query heads."""
        return self.acsr.num_heads

    @functools.cached_property
    def causal(self) -> bool:
        """Whether no query attends to a later key (then dense SDPA runs ``is_causal=True``)."""
        return is_causal(self.acsr)

    @functools.cached_property
    def mask(self):
        """bool ``[n, n]`` (shared) or ``[heads, n, n]`` (per head) on the inputs' device."""
        return device_mask(self)

    def fresh_acsr(self) -> ACSR:
        """A new ACSR object for the same mask (no per-object caches of earlier runs)."""
        if self.pattern is None:
            return self.acsr
        return ACSR.from_pattern(self.pattern, self.n)


def make_inputs(case, device: str = "cuda", seed: int = 0) -> CaseInputs:
    """Random normal q, k, v of ``case`` (a :class:`~tvm_splat.bench.suite.BenchCase`) on
    ``device``, seeded, with the case's pattern and ACSR."""
    import torch

    pattern = parse_pattern(case.pattern)
    acsr = ACSR.from_pattern(pattern, case.seq_len)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, case.dtype)

    def randn(heads):
        return torch.randn(case.batch, heads, case.seq_len, case.head_dim, device=device, dtype=dtype,
                           generator=gen)

    return CaseInputs(randn(case.heads), randn(case.kv_heads), randn(case.kv_heads), acsr, pattern)


def is_causal(acsr: ACSR) -> bool:
    """No row has a column after itself: every used affine segment ends at or before its row
    and every indexed (CSR) column is at or before its row. O(tables), no n x n mask."""
    rows = np.arange(acsr.n, dtype=np.int64)[None, :, None]
    count = acsr.seg_count.astype(np.int64)
    affine = (acsr.seg_step > 0) & (count > 0)
    last = acsr.seg_start.astype(np.int64) + acsr.seg_step.astype(np.int64) * (count - 1)
    if (affine & (last > rows)).any():
        return False
    indexed = (acsr.seg_step == 0) & (count > 0)
    for head in np.unique(np.nonzero(indexed)[0]):
        row, col = acsr.value_columns(int(head))
        if (col > row).any():
            return False
    return True


def device_mask(inputs: CaseInputs):
    """The boolean mask on the inputs' device: the pattern's ``mask_mod`` evaluated on index
    grids, :data:`MASK_ROWS_PER_STEP` rows at a time (no n x n table on the host); an ACSR
    without a pattern is expanded on the host (``ACSR.to_dense``)."""
    import torch

    n, dev = inputs.n, inputs.q.device
    if inputs.pattern is None:
        dense = torch.from_numpy(inputs.acsr.to_dense()).to(dev)
        return dense[0] if inputs.mask_heads == 1 else dense
    mod = inputs.pattern.mask_mod(n)
    per_head = isinstance(inputs.pattern, PerHead)
    heads = torch.arange(inputs.mask_heads, device=dev, dtype=torch.int32)[:, None, None]
    kv_idx = torch.arange(n, device=dev, dtype=torch.int32)[None, :]
    zero = torch.zeros((), device=dev, dtype=torch.int32)
    shape = (inputs.mask_heads, n, n) if per_head else (n, n)
    mask = torch.empty(shape, device=dev, dtype=torch.bool)
    for lo in range(0, n, MASK_ROWS_PER_STEP):
        hi = min(n, lo + MASK_ROWS_PER_STEP)
        q_idx = torch.arange(lo, hi, device=dev, dtype=torch.int32)[:, None]
        mask[..., lo:hi, :] = mod(zero, heads if per_head else zero, q_idx, kv_idx)
    return mask


def reference_output(inputs: CaseInputs):
    """Masked attention in float64 from the same inputs, ``[batch, heads, n, d]`` float64 on the
    inputs' device: GQA-aware (query head h reads KV head ``h // (heads // kv_heads)``, as SDPA's
    ``enable_gqa`` does), softmax scale ``1/sqrt(d)``, rows without a key give zeros (our
    kernels' convention). Row blocks are sized by :data:`REFERENCE_STEP_BYTES` and each reads only
    the key range its rows use, so a window at n = 32k costs a band, not n x n."""
    import torch

    q, mask = inputs.q, inputs.mask
    b, h, n, _ = q.shape
    group = h // inputs.k.shape[1]
    k = inputs.k.to(torch.float64).repeat_interleave(group, dim=1)
    v = inputs.v.to(torch.float64).repeat_interleave(group, dim=1)
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    rows = max(1, min(n, REFERENCE_STEP_BYTES // (2 * 8 * b * h * n)))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        block = mask[..., lo:hi, :]
        used = block.reshape(-1, n).any(dim=0).nonzero()
        if used.numel() == 0:
            continue  # no key for any of these rows: zeros
        c0, c1 = int(used[0]), int(used[-1]) + 1
        out[:, :, lo:hi] = masked_attention_rows(q[:, :, lo:hi].to(torch.float64), k[..., c0:c1, :], v[..., c0:c1, :],
                                                 block[..., c0:c1])
    return out


def masked_attention_rows(q, k, v, mask):
    """``softmax(q k^T / sqrt(d))`` over the keys ``mask`` allows, times ``v`` (torch, any
    leading dims that broadcast; ``q [.., R, d]``, ``k``, ``v [.., C, d]``, ``mask [.., R, C]``
    bool): rows without a key give zeros (a row of -inf alone gives NaN, replaced by 0). The
    float64 references of the forward and backward benches, differentiable by torch autograd."""
    import torch

    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v
