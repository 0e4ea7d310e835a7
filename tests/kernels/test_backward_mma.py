"""The tensor-core training kernels (kernels/backward_mma.py) on a CPU-only machine: the plans
they run on cover the mask and its transpose exactly once, they build and nvcc-compile for
sm_90a in fp16/bf16 at head_dim 64 and 128 (GQA, unions, causal, dilated, strided), and they
refuse what they cannot run. Their numbers are checked on the GPU (tests/gpu/test_backward.py)."""
import numpy as np
import pytest

from tvm_splat.compile import compile_backward_mma, cuda_source, nvcc_compile
from tvm_splat.formats import ACSR, DilatedWindow, GlobalTokens, PerHead, Strided, Window
from tvm_splat.formats.tile_plan import plan_tiles
from tvm_splat.formats.transpose import transpose_acsr
from tvm_splat.kernels.backward_mma import (BACKWARD_MMA_KERNEL_NAMES, backward_dkdv_mma_func, check_backward_mma_plan,
                                            check_backward_mma_shape)
from tvm_splat.kernels.spec import AttentionSpec
from tvm_splat.kernels.tiled_mma import tiled_mma_func
from tvm_splat.testing import mask_cases

H100 = "nvidia/nvidia-h100"  # arch sm_90a


def _direct_plan(acsr, br=64, bc=64):
    return plan_tiles(acsr, br=br, bc=bc, split_blocks=0, aligned_components=False)


def _affine_with_empty_rows(n=70):
    mask = Window(6).dense_mask(n)
    mask[10:15] = False  # empty query rows
    mask[:, 30:33] = False  # keys nobody sees
    return ACSR.from_mask(mask)


AFFINE_CASES = [c for c in mask_cases() if not (c[1].seg_step == 0).any()] + [
    ("window + dilated", ACSR.from_pattern(Window(3) | DilatedWindow(2, 4), 60), 1),
    ("causal strided", ACSR.from_pattern(Strided(5, causal=True), 61), 1),
    ("empty rows, affine", _affine_with_empty_rows(), 1),
]


@pytest.mark.parametrize("br,bc", [(16, 16), (64, 32)])
@pytest.mark.parametrize("name,acsr,heads", AFFINE_CASES, ids=[c[0] for c in AFFINE_CASES])
def test_direct_plans_cover_the_mask_and_its_transpose_once(name, acsr, heads, br, bc):
    """The dq plan computes every nonzero of the mask, the dk/dv plan every nonzero of the
    transposed mask, each exactly once and nothing else; both are direct (what the kernels need)."""
    dense = acsr.to_dense()
    for ac, want in ((acsr, dense), (transpose_acsr(acsr), dense.transpose(0, 2, 1))):
        plan = _direct_plan(ac, br, bc)
        check_backward_mma_plan(plan.shape, plan.num_comp)
        for h in range(ac.num_heads):
            np.testing.assert_array_equal(plan.covered(h), want[h].astype(np.int64))
        rows = np.zeros((ac.num_heads, ac.n), dtype=np.int64)  # every row in exactly one tile
        for h in range(ac.num_heads):
            for row0, rstride, nrows, *_ in plan.tiles[h]:
                rows[h, row0 + rstride * np.arange(nrows)] += 1
        assert (rows == 1).all()


@pytest.mark.parametrize("name,acsr,heads", AFFINE_CASES, ids=[c[0] for c in AFFINE_CASES])
def test_full_blocks_need_no_mask_test(name, acsr, heads):
    """A FULL block of the dq or dk/dv plan (where the kernels skip the membership test) lies
    inside the sequence and every valid row of its tile attends all of its columns."""
    dense = acsr.to_dense()
    for ac, want in ((acsr, dense), (transpose_acsr(acsr), dense.transpose(0, 2, 1))):
        plan = _direct_plan(ac, 16, 16)
        for h in range(ac.num_heads):
            for row0, rstride, nrows, _comp, lo, hi, _slot in plan.tiles[h]:
                rows = row0 + rstride * np.arange(nrows)
                for col0, sigma, full in plan.blocks[h, lo:hi]:
                    if full:
                        cols = col0 + sigma * np.arange(plan.bc)
                        assert cols[-1] < ac.n and want[h][np.ix_(rows, cols)].all()


def test_csr_rows_and_components_are_refused():
    _, irregular, _ = next(c for c in mask_cases() if c[0] == "irregular -> CSR fallback")
    plan = _direct_plan(irregular)
    with pytest.raises(ValueError, match="direct tile plan"):
        check_backward_mma_plan(plan.shape, plan.num_comp)
    components = plan_tiles(ACSR.from_pattern(Strided(8), 50), br=16, bc=16, split_blocks=0)
    assert components.shape.num_components == 2
    with pytest.raises(ValueError, match="one component per head"):
        check_backward_mma_plan(components.shape, components.num_comp)


def test_shapes_it_cannot_take_are_named():
    acsr = ACSR.from_pattern(Window(4), 64)
    spec = AttentionSpec.from_acsr(acsr, 1, 2, 64, "float16")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        check_backward_mma_shape(AttentionSpec.from_acsr(acsr, 1, 2, 64, "float32"), 64, 64, 4)
    with pytest.raises(ValueError, match="head_dim a multiple of 16"):
        check_backward_mma_shape(AttentionSpec.from_acsr(acsr, 1, 2, 40, "float16"), 64, 64, 4)
    with pytest.raises(ValueError, match="br == 16 \\* warps"):
        check_backward_mma_shape(spec, 32, 64, 4)
    with pytest.raises(ValueError, match="bc a multiple of 16"):
        check_backward_mma_shape(spec, 64, 24, 4)
    per_head = ACSR.from_pattern(PerHead((Window(2), Window(3), Window(4), Window(5))), 64)
    gqa = AttentionSpec.from_acsr(per_head, 1, 4, 64, "float16", kv_heads=2)
    with pytest.raises(ValueError, match="share one mask head"):
        backward_dkdv_mma_func(gqa, _direct_plan(per_head).shape)


def test_the_forward_lse_output_is_off_by_default():
    """``with_lse`` adds one last parameter and nothing else changes in the signature; plans with
    several components or split-KV are refused (their rows are finished by a merge kernel)."""
    acsr = ACSR.from_pattern(GlobalTokens(2) | Window(8, causal=True), 200)
    spec = AttentionSpec.from_acsr(acsr, 2, 4, 64, "float16", kv_heads=2)
    shape = _direct_plan(acsr).shape
    plain = [p.name for p in tiled_mma_func(spec, shape).params]
    with_lse = [p.name for p in tiled_mma_func(spec, shape, with_lse=True).params]
    assert "lse" not in plain and with_lse == plain + ["lse"]
    merged = plan_tiles(ACSR.from_pattern(Strided(8), 64), br=64, bc=64, split_blocks=0).shape
    with pytest.raises(ValueError, match="direct plan"):
        tiled_mma_func(AttentionSpec.from_acsr(ACSR.from_pattern(Strided(8), 64), 1, 2, 64, "float16"), merged,
                       with_lse=True)


BUILD_CASES = [  # (name, mask, heads, kv_heads, n, head_dim, dtype, stages)
    ("gqa causal window d64 fp16", Window(16, causal=True), 4, 2, 200, 64, "float16", 2),
    ("global+causal window d128 bf16", GlobalTokens(2) | Window(8, causal=True), 4, 4, 300, 128, "bfloat16", 2),
    ("window+dilated d128 fp16 gqa", Window(3) | DilatedWindow(2, 4), 4, 1, 130, 128, "float16", 2),
    ("strided d64 bf16", Strided(8), 2, 2, 97, 64, "bfloat16", 2),
    ("dilated d64 fp16 one stage", DilatedWindow(6, 2), 4, 2, 150, 64, "float16", 1),
]


@pytest.mark.parametrize("name,mask,heads,kv_heads,n,d,dtype,stages", BUILD_CASES, ids=[c[0] for c in BUILD_CASES])
def test_training_plans_pick_and_build_the_tensor_core_kernels_for_sm90a(name, mask, heads, kv_heads, n, d, dtype,
                                                                        stages):
    """fp16/bf16 on a CUDA target: the plan takes the tensor-core kernels, whose CUDA source
    (mma.sync, ldmatrix, cp.async with two stages; the forward with its lse) compiles with nvcc
    for sm_90a."""
    import dataclasses

    from tvm_splat.schedules.backward_mma import default_backward_mma_knobs
    from tvm_splat.training import plan_training

    plan = plan_training(mask, (2, heads, n, d), (2, kv_heads, n, d), dtype, "cuda", target=H100)
    if stages != plan.mma_knobs.stages:
        knobs = dataclasses.replace(default_backward_mma_knobs(plan.spec, plan.target), stages=stages)
        plan = plan_training(mask, (2, heads, n, d), (2, kv_heads, n, d), dtype, "cuda", target=H100,
                             mma_knobs=knobs)
    assert plan.kernels == "tensor-cores" and plan.fallback_reason is None
    assert "kernels=tensor-cores" in repr(plan)
    lib = compile_backward_mma(plan.spec, plan.target, plan.mma_knobs, [p.shape for p in plan.tile_plans],
                               use_disk_cache=False)
    src = cuda_source(lib)
    for kernel in ("fwd_lse", *BACKWARD_MMA_KERNEL_NAMES):
        assert f"{kernel}_kernel(" in src
    assert "mma.sync.aligned.m16n8k16.row.col.f32" in src and "ldmatrix.sync.aligned" in src
    dq_body = src[src.rindex("bwd_dq_kernel("):].split('extern "C"')[0]  # the definition
    assert ("cp_async_wait_group" in dq_body) == (stages == 2)
    assert len(nvcc_compile(src, H100)) > 1000
