"""Key lengths (padding masks, issue 18): every kernel form against the float64 dense reference
with the mask ``mask & (j < kv_lengths[b])``, NaN past the lengths, the API's checks, and the
CUDA source of every form with lengths building for sm_90a and sm_80 (no GPU needed)."""
import numpy as np
import pytest
import tvm

from tvm_splat import ACSR, parse_pattern, plan, sparse_attention
from tvm_splat.formats import BlockLocal
from tvm_splat.kernels.common import KV_LEN
from tvm_splat.planner import KV_LEN_KERNELS
from tvm_splat.reference import masked_attention
from tvm_splat.schedules.tiled import TiledKnobs
from tvm_splat.testing import dense_mask, mask_cases, qkv

CASES = mask_cases()
VARIANTS = ("tiled", "row", "separate")
SMALL = TiledKnobs(br=16, bc=16)


def _knobs(variant):
    return SMALL if variant == "tiled" else None


def padded_reference(q, k, v, mask, lengths, scale=None):
    """Dense float64 attention of each batch with the keys ``j < lengths[b]`` of ``mask`` only."""
    n = q.shape[2]
    return np.stack([masked_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask & (np.arange(n) < length),
                                      scale=scale)[0] for b, length in enumerate(lengths)])


def _lengths(n):
    """Awkward lengths: no key, one key, all keys, and one in the middle of a 16-column block."""
    return np.array([0, 1, n, n // 2 + 3])


def _poison_padding(k, v, lengths):
    """NaN in every key and value past its batch's length."""
    for b, length in enumerate(lengths):
        k[b, :, length:] = np.nan
        v[b, :, length:] = np.nan


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name,acsr,heads", CASES, ids=[c[0] for c in CASES])
def test_every_kernel_matches_the_padded_dense_reference(name, acsr, heads, variant, rng):
    """Window/dilated/strided/block/global unions, per-head masks, CSR fallback rows and empty
    rows, awkward n; lengths 0, 1, n and mid-block; NaN in every padded key and value."""
    lengths = _lengths(acsr.n)
    q, k, v = qkv(rng, len(lengths), heads, acsr.n, 8, "float32")
    _poison_padding(k, v, lengths)
    out = sparse_attention(q, k, v, acsr, variant=variant, knobs=_knobs(variant), kv_lengths=lengths)
    ref = padded_reference(q, k, v, dense_mask(acsr), lengths)
    assert not np.isnan(ref).any() and not np.isnan(out).any()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert not out[0].any()  # length 0: every row gives zeros


@pytest.mark.parametrize("variant", VARIANTS)
def test_grouped_query_attention_and_float16(variant, rng):
    """4 query heads on 2 KV heads, a union with global tokens, fp16 inputs (fp32 accumulation)."""
    n, pattern = 53, parse_pattern("global:3+window:6")
    lengths = np.array([17, 53, 5])
    q = rng.standard_normal((3, 4, n, 16)).astype("float16")
    k, v = (rng.standard_normal((3, 2, n, 16)).astype("float16") for _ in range(2))
    _poison_padding(k, v, lengths)
    out = sparse_attention(q, k, v, pattern, variant=variant, knobs=_knobs(variant), kv_lengths=lengths)
    ref = padded_reference(q, k, v, pattern.dense_mask(n), lengths)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=5e-3, rtol=1e-2)


def test_tiled_full_blocks_crossing_the_length_and_merged_components(rng):
    """Block-local 16 with 16x16 tiles: the blocks of columns 0..15 and 16..31 are FULL, and
    length 20 cuts through the second; global + strided: two row groupings whose partial states are merged."""
    for mask, lengths in ((ACSR.from_pattern(BlockLocal(16), 45), np.array([20, 41])),
                          (ACSR.from_pattern(parse_pattern("global:2+strided:8"), 70), np.array([33, 9]))):
        made = plan(mask, (2, 2, mask.n, 8), None, "float32", "cpu", variant="tiled", knobs=SMALL,
                    kv_lengths=True)
        q, k, v = qkv(rng, 2, 2, mask.n, 8, "float32")
        _poison_padding(k, v, lengths)
        out = made.run(q, k, v, kv_lengths=lengths)
        np.testing.assert_allclose(out, padded_reference(q, k, v, dense_mask(mask), lengths), atol=1e-4)
    assert made.tile_plan.shape.num_components == 2 and [s.kernel for s in made.steps] == ["tiled", "merge"]
    blocks = plan(ACSR.from_pattern(BlockLocal(16), 45), (1, 1, 45, 8), None, "float32", "cpu", variant="tiled",
                  knobs=SMALL).tile_plan.blocks[0]
    assert {tuple(b) for b in blocks} >= {(0, 1, 1), (16, 1, 1)}  # columns 0..15, 16..31: FULL (length 20 cuts the second)


def test_rows_without_keys_match_pytorch_sdpa(rng):
    """Query rows are not dropped: a causal window's rows past the length still attend the valid
    keys inside their window, and the rows whose window holds none give zeros, as PyTorch's SDPA
    does with the same boolean mask."""
    torch = pytest.importorskip("torch")
    n, pattern, lengths = 40, parse_pattern("causal_window:5"), np.array([12, 40])
    q, k, v = (torch.from_numpy(x) for x in qkv(rng, 2, 2, n, 8, "float32"))
    keep = torch.from_numpy(pattern.dense_mask(n))[None, None] \
        & (torch.arange(n)[None, :] < torch.from_numpy(lengths)[:, None])[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    for variant in VARIANTS:
        ours = sparse_attention(q, k, v, pattern, variant=variant, knobs=_knobs(variant),
                                kv_lengths=torch.from_numpy(lengths))
        torch.testing.assert_close(ours, sdpa, atol=1e-5, rtol=1e-5)
        assert ours[0, :, 12:17].abs().sum() > 0  # past the length, the window still reaches keys < 12
        assert not ours[0, :, 17:].any()  # rows 17.. have no key left: zeros


def test_torch_lengths_of_any_int_dtype_and_repeated_calls(rng):
    """int64 and int32 tensors, a list: the same result; the second torch call (fast path)
    still takes the new lengths."""
    torch = pytest.importorskip("torch")
    made = plan("window:4", (2, 2, 30, 8), None, "float32", "cpu", variant="row", kv_lengths=True)
    q, k, v = (torch.from_numpy(x) for x in qkv(rng, 2, 2, 30, 8, "float32"))
    ref = padded_reference(q.numpy(), k.numpy(), v.numpy(), parse_pattern("window:4").dense_mask(30), [30, 11])
    for lengths in (torch.tensor([30, 11]), torch.tensor([30, 11], dtype=torch.int32), [30, 11]):
        np.testing.assert_allclose(made.run(q, k, v, kv_lengths=lengths).numpy(), ref, atol=1e-5)
    full = made.run(q, k, v, kv_lengths=torch.tensor([30, 30]))
    np.testing.assert_allclose(full.numpy(), padded_reference(q.numpy(), k.numpy(), v.numpy(),
                                                              parse_pattern("window:4").dense_mask(30), [30, 30]),
                               atol=1e-5)


@pytest.mark.parametrize("lengths,match", [
    (np.array([3]), r"shape \[batch\] = \(2,\)"),
    (np.array([[3, 4]]), r"shape \[batch\]"),
    (np.array([3.0, 4.0]), "must be integers"),
    (np.array([True, False]), "must be integers"),
    (np.array([3, -1]), r"kv_lengths\[1\] = -1 is outside \[0, n=30\]"),
    (np.array([31, 3]), r"kv_lengths\[0\] = 31 is outside"),
    ("30", "must be integers"),
])
def test_bad_lengths_are_named(lengths, match, rng):
    made = plan("window:4", (2, 2, 30, 8), None, "float32", "cpu", variant="row", kv_lengths=True)
    q, k, v = qkv(rng, 2, 2, 30, 8, "float32")
    with pytest.raises(ValueError, match=match):
        made.run(q, k, v, kv_lengths=lengths)


def test_bad_torch_lengths_are_named(rng):
    torch = pytest.importorskip("torch")
    made = plan("window:4", (2, 2, 30, 8), None, "float32", "cpu", variant="separate", kv_lengths=True)
    q, k, v = qkv(rng, 2, 2, 30, 8, "float32")
    with pytest.raises(ValueError, match="must be integers"):
        made.run(q, k, v, kv_lengths=torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match=r"kv_lengths\[1\] = 99 is outside"):
        made.run(q, k, v, kv_lengths=torch.tensor([3, 99]))
    with pytest.raises(ValueError, match=r"shape \[batch\]"):
        made.run(q, k, v, kv_lengths=torch.tensor(3))


def test_lengths_and_plans_must_agree(rng):
    q, k, v = qkv(rng, 2, 2, 30, 8, "float32")
    with_lengths = plan("window:4", (2, 2, 30, 8), None, "float32", "cpu", variant="row", kv_lengths=True)
    without = plan("window:4", (2, 2, 30, 8), None, "float32", "cpu", variant="row")
    with pytest.raises(ValueError, match="pass kv_lengths"):
        with_lengths.run(q, k, v)
    with pytest.raises(ValueError, match="plan with kv_lengths=True"):
        without.run(q, k, v, kv_lengths=[30, 30])
    with pytest.raises(ValueError, match="pass the lengths themselves to run"):
        plan("window:4", (2, 2, 30, 8), None, "float32", "cpu", kv_lengths=np.array([30, 30]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_steps_name_kv_len_only_in_plans_with_lengths(variant):
    """``kv_len`` is the kernels' parameter right before their first output, in exactly the
    kernels that read keys; a plan without lengths neither names it nor declares it."""
    mask = ACSR.from_mask(np.random.default_rng(0).random((40, 40)) < 0.2, max_segments=2)  # CSR fallback rows
    for lengths in (False, True):
        made = plan(mask, (2, 2, 40, 8), None, "float32", "cpu", variant=variant, kv_lengths=lengths)
        funcs = {gv.name_hint: f for gv, f in made.module().functions.items()}
        assert made.spec.has_kv_len == lengths and made.spec.key.endswith("_kvlen") == lengths
        for step in made.steps:
            params = tuple(p.name for p in funcs[step.kernel].params)
            assert params == step.args
            takes = lengths and step.kernel in KV_LEN_KERNELS
            assert (KV_LEN in params) == takes
            if takes:
                assert params[params.index(KV_LEN) + 1] == step.outputs[0]
    assert "fallback" in funcs or variant != "tiled"


@pytest.mark.parametrize("target", ["nvidia/nvidia-h100", "nvidia/nvidia-a100"], ids=["sm_90a", "sm_80"])
@pytest.mark.parametrize("variant,knobs,dtype", [
    ("tiled", TiledKnobs(use_tensor_cores=True, stages=2), "float16"),
    ("tiled", TiledKnobs(use_tensor_cores=True, stages=1, br=64, warps=2, m_tiles=2), "bfloat16"),
    ("tiled", TiledKnobs(), "float32"),
    ("row", None, "float16"),
    ("separate", None, "bfloat16"),
], ids=["mma_2_stages_fp16", "mma_1_stage_m_tiles2_bf16", "cuda_cores_fp32", "row_fp16", "separate_bf16"])
def test_cuda_source_with_lengths_builds(target, variant, knobs, dtype):
    """CUDA code of every form with key lengths (GQA, merged components, fallback rows) compiles
    with the local nvcc; the tensor-core kernel keeps its shape: mma.sync, cp.async with two
    stages, and the lengths bound the K/V loads."""
    from tvm_splat.compile import cuda_source, nvcc_compile

    mask = parse_pattern("global:2+strided:8").dense_mask(200)
    mask[5, 7:190:11] = True  # an irregular row: CSR fallback
    made = plan(ACSR.from_mask(mask), (2, 4, 200, 64), (2, 2, 200, 64), dtype, None, target=target,
                variant=variant, knobs=knobs, kv_lengths=True)
    src = cuda_source(tvm.tirx.build(made.module(), target=made.target))
    assert "kv_len" in src
    if knobs is not None and knobs.use_tensor_cores:
        assert "mma.sync.aligned.m16n8k16" in src
        assert ("cp_async" in src) == (knobs.stages == 2)
        assert {"tiled", "merge", "fallback"} == {s.kernel for s in made.steps}
    assert nvcc_compile(src, target)
