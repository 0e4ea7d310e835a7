"""GPU schedules of the tiled kernel: the CUDA code generates and compiles for the H100
(numerics are checked on CPU in tests/kernels/test_tiled.py; GPU runs happen elsewhere)."""
import pytest
import tvm

from tvm_splat.formats import ACSR, GlobalTokens, Strided, Window
from tvm_splat.kernels.spec import AttentionSpec
from tvm_splat.schedules.tiled import TiledKnobs, build_module, plan_tiles, tiled_funcs

H100 = "nvidia/nvidia-h100"


def _cuda_source(pattern, n, knobs, dtype="float16", heads=12, d=64):
    acsr = ACSR.from_pattern(pattern, n)
    plan = plan_tiles(acsr, knobs)
    spec = AttentionSpec.from_acsr(acsr, 1, heads, d, dtype)
    lib = tvm.tirx.build(build_module(spec, plan.shape, H100, knobs), target=H100)
    return lib.imports[0].inspect_source(), plan


def test_cuda_core_default_compiles():
    src, plan = _cuda_source(Window(64) | GlobalTokens(16), 512, TiledKnobs())
    assert plan.shape.num_components == 1
    assert "tiled_kernel" in src and "merge_kernel" not in src
    assert "__shared__" in src and "__syncthreads" in src
    assert "uint4" in src  # 16-byte vector loads of Q/K/V
    assert "mma_sync" not in src


def test_cuda_core_multi_component_fp32_other_knobs():
    knobs = TiledKnobs(br=32, bc=32, warps=2)
    src, plan = _cuda_source(Strided(32), 256, knobs, dtype="float32", heads=2)
    assert plan.shape.num_components == 2
    assert "tiled_kernel" in src and "merge_kernel" in src
    assert "float4" in src


def test_tensor_cores_wmma_compiles():
    src, _ = _cuda_source(Strided(64), 512, TiledKnobs(use_tensor_cores=True))
    assert "tiled_kernel" in src
    assert src.count("wmma::mma_sync") >= 2  # S = Q K^T and P V
    assert "load_matrix_sync" in src and "store_matrix_sync" in src


def test_knob_errors():
    acsr = ACSR.from_pattern(Window(4), 64)
    spec = AttentionSpec.from_acsr(acsr, 1, 1, 64, "float16")
    plan = plan_tiles(acsr, br=32, bc=32)
    with pytest.raises(ValueError):
        tiled_funcs(spec, plan.shape, TiledKnobs())  # plan made for other tile sizes
    knobs = TiledKnobs(br=16, bc=16, warps=2, use_tensor_cores=True)
    plan = plan_tiles(acsr, knobs)
    with pytest.raises(ValueError):  # one 16-row strip cannot feed two warps
        build_module(spec, plan.shape, H100, knobs)


def test_tensor_cores_big_tiles_and_in_place_api():
    """A 128 x 128 score tile (too big for static shared memory: falls back to shared.dyn)
    builds on CUDA cores, and the in-place form schedules a Schedule like the wrapper does.
    (WMMA with br or bc > 64 fails in TVM's storage rewrite, before and after this rework.)"""
    from tvm import s_tir

    from tvm_splat.schedules.tiled import apply_tiled_schedule, schedule_tiled

    src, _ = _cuda_source(Window(128), 512, TiledKnobs(br=128, bc=128))
    assert "__shfl" in src  # row reductions on warp shuffles
    acsr = ACSR.from_pattern(Window(8), 64)
    knobs = TiledKnobs(br=16, bc=16)
    spec = AttentionSpec.from_acsr(acsr, 1, 2, 16, "float32")
    func = tiled_funcs(spec, plan_tiles(acsr, knobs).shape, knobs)["tiled"]
    sch = s_tir.Schedule(func)
    apply_tiled_schedule(sch, "tiled", H100, knobs, spec)
    tvm.ir.assert_structural_equal(sch.mod["main"], schedule_tiled("tiled", func, H100, knobs, spec))
