"""CPU (llvm) numerics of the tiled fused kernel against the dense float64 reference."""
import numpy as np
import pytest

from tvm_splat.formats import (ACSR, BlockLocal, DilatedWindow, GlobalTokens, PerHead, Strided,
                               Window)
from tvm_splat import sparse_attention
from tvm_splat.reference import masked_attention
from tvm_splat.schedules.tiled import TiledKnobs

SMALL = TiledKnobs(br=16, bc=16)


def _qkv(rng, shape, dtype="float32"):
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


def _check(acsr, rng, batch=2, heads=None, d=16, dtype="float32", knobs=SMALL, tol=1e-3, scale=None):
    heads = heads or max(acsr.num_heads, 2)
    q, k, v = _qkv(rng, (batch, heads, acsr.n, d), dtype)
    out = sparse_attention(q, k, v, acsr, target="llvm", variant="tiled", knobs=knobs, scale=scale)
    assert out.dtype == np.dtype(dtype) and out.shape == q.shape
    ref = masked_attention(q, k, v, acsr.to_dense(), scale=scale)
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=tol, rtol=tol)
    return out


CASES = [
    ("window_n37", Window(5), 37),
    ("window_wider_than_n", Window(100), 37),
    ("causal_window_n100", Window(7, causal=True), 100),
    ("dilated", DilatedWindow(3, 2), 37),
    ("strided", Strided(8), 100),
    ("strided_causal", Strided(6, causal=True), 45),
    ("window_global", Window(4) | GlobalTokens(3), 100),
    ("block_local", BlockLocal(7), 37),
]


@pytest.mark.parametrize("name,pattern,n", CASES, ids=[c[0] for c in CASES])
def test_tiled_matches_reference(name, pattern, n, rng):
    _check(ACSR.from_pattern(pattern, n), rng)


def test_tiled_one_head_batch3_other_tiles(rng):
    acsr = ACSR.from_pattern(Window(9) | GlobalTokens(2), 53)
    _check(acsr, rng, batch=3, heads=1, d=8, knobs=TiledKnobs(br=8, bc=32))


def test_tiled_per_head_masks(rng):
    acsr = ACSR.from_pattern(PerHead((Window(3), DilatedWindow(2, 3), Strided(5))), 41)
    _check(acsr, rng, batch=1, heads=3)


def test_tiled_empty_rows_and_csr_fallback(rng):
    mask = rng.random((2, 29, 29)) < 0.25
    mask[:, 3] = False  # empty rows -> zeros
    mask[0, 10, ::3] = True
    acsr = ACSR.from_mask(mask, max_segments=2)  # irregular rows fall back to CSR segments
    out = _check(acsr, rng, batch=2, heads=2)
    assert not out[:, :, 3].any()


def test_tiled_fully_empty_mask(rng):
    acsr = ACSR.from_mask(np.zeros((10, 10), dtype=bool))
    q, k, v = _qkv(rng, (1, 2, 10, 8))
    assert not sparse_attention(q, k, v, acsr, variant="tiled", knobs=SMALL).any()


def test_tiled_float16_and_scale(rng):
    acsr = ACSR.from_pattern(Strided(8) | GlobalTokens(2), 60)
    _check(acsr, rng, dtype="float16", tol=2e-2)
    _check(acsr, rng, scale=0.3)


SPLIT_CASES = [
    ("window_global", Window(4) | GlobalTokens(3), 100, 2),
    ("global_middle_rows", Window(2) | GlobalTokens((5, 40)), 60, 1),
    ("strided_global_two_components", Strided(8) | GlobalTokens(2), 70, 1),
    ("causal_window", Window(30, causal=True), 90, 1),
    ("per_head", PerHead((Window(3) | GlobalTokens(2), DilatedWindow(2, 3), Strided(5))), 41, 1),
]


@pytest.mark.parametrize("name,pattern,n,chunk", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_tiled_split_kv_matches_reference(name, pattern, n, chunk, rng):
    """Split-KV: long tiles split into chunks of ``chunk`` blocks whose partial states the
    split-merge kernel combines (directly, or into a component's state before the merge)."""
    acsr = ACSR.from_pattern(pattern, n)
    knobs = TiledKnobs(br=16, bc=16, split_blocks=chunk)
    q, k, v = _qkv(rng, (2, 3, n, 16))
    from tvm_splat import plan

    planned = plan(acsr, q.shape, dtype="float32", target="llvm", variant="tiled", knobs=knobs)
    assert planned.tile_plan.num_slots > 0 and "split_merge" in [s.kernel for s in planned.steps]
    _check(acsr, rng, batch=2, heads=3, knobs=knobs)


@pytest.mark.parametrize("d,lanes", [(9, 1), (18, 2), (40, 4)])
def test_merges_combine_runs_of_a_row_at_every_head_dim(d, lanes, rng):
    """The merge kernels take ``merge_lanes(d)`` consecutive elements of a row an iteration (4
    where d allows, else 2 or 1): a union of two components with split chunks (split_merge
    into component states, then merge) at head dims of each run length."""
    from tvm_splat import plan
    from tvm_splat.kernels.tiled import merge_lanes

    assert merge_lanes(d) == lanes
    acsr = ACSR.from_pattern(Strided(8) | GlobalTokens(2), 70)
    knobs = TiledKnobs(br=16, bc=16, split_blocks=1)
    planned = plan(acsr, (2, 3, 70, d), dtype="float32", target="llvm", variant="tiled", knobs=knobs)
    assert {"split_merge", "merge"} <= {s.kernel for s in planned.steps}
    _check(acsr, rng, batch=2, heads=3, d=d, knobs=knobs)


def test_tiled_split_kv_nan_in_masked_keys_does_not_leak(rng):
    """A NaN in a key/value no split chunk's rows attend stays out of every output."""
    acsr = ACSR.from_pattern(Window(3) | GlobalTokens(1), 64)
    q, k, v = _qkv(rng, (1, 2, 64, 16))
    dense = acsr.to_dense()[0]
    unseen = np.flatnonzero(~dense[5])[-1]
    k[:, :, unseen] = np.nan
    v[:, :, unseen] = np.nan
    out = sparse_attention(q, k, v, acsr, target="llvm", variant="tiled",
                           knobs=TiledKnobs(br=16, bc=16, split_blocks=1))
    rows = ~dense[:, unseen]
    assert np.isfinite(out[:, :, rows]).all()


def test_tiled_knobs_validate():
    with pytest.raises(ValueError):
        TiledKnobs(br=48)
    with pytest.raises(ValueError):
        TiledKnobs(br=8, use_tensor_cores=True)
    with pytest.raises(ValueError, match="split_blocks"):
        TiledKnobs(split_blocks=-2)


def test_tensor_core_knobs_on_cpu_run_the_logical_kernel(rng):
    """Tensor cores exist only on the GPU: on the CPU the same knobs build the logical kernel."""
    from tvm_splat.kernels.spec import AttentionSpec
    from tvm_splat.formats.tile_plan import plan_tiles
    from tvm_splat.schedules.tiled import tiled_funcs

    knobs = TiledKnobs(br=16, bc=16, use_tensor_cores=True)
    acsr = ACSR.from_pattern(Window(5) | GlobalTokens(3), 70)
    spec = AttentionSpec.from_acsr(acsr, 1, 2, 16, "float16")
    assert "S_gemm" in tiled_funcs(spec, plan_tiles(acsr, knobs).shape, knobs, "llvm")["tiled"].script()
    _check(acsr, rng, dtype="float16", knobs=knobs, tol=2e-2)
