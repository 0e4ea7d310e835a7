"""The warp-level tiled kernel's persistent warp-specialized form, built for sm_90a on the CPU
machine (its numerics run in tests/gpu; the other forms' compile tests are in
tests/schedules/test_tiled_schedule.py)."""
import re

import pytest
import tvm

from tvm_splat.compile import nvcc_compile, ptxas_report, ptxas_usage, wgmma_serialized
from tvm_splat.formats import ACSR, Window
from tvm_splat.formats.tile_plan import plan_tiles
from tvm_splat.kernels.spec import AttentionSpec
from tvm_splat.kernels.tiled_mma import tiled_mma_func
from tvm_splat.schedules.tiled import TiledKnobs

H100 = "nvidia/nvidia-h100"


def _persistent(d, warps, dtype, persistent, kv_len=False, kv_heads=None, batch=2, heads=4, n=2048):
    """The persistent form's PrimFunc, its CUDA source, and the number of programs it walks."""
    acsr = ACSR.from_pattern(Window(300), n)
    knobs = TiledKnobs(use_tensor_cores=True, br=16 * warps, bc=128, warps=warps, wgmma=True, tma=True,
                       warp_specialized=True)
    shape = plan_tiles(acsr, knobs).shape
    spec = AttentionSpec.from_acsr(acsr, batch, heads, d, dtype, kv_heads=kv_heads, has_kv_len=kv_len)
    func = tiled_mma_func(spec, shape, warps, 1, 2, wgmma=True, tma=True, warp_specialized=True,
                          persistent=persistent).with_attr("global_symbol", "tiled")
    lib = tvm.tirx.build(tvm.IRModule({"tiled": func}), target=H100)
    return func, lib.imports[0].inspect_source(), batch * heads * shape.num_tiles


def _kernel_body(src):
    body = src[src.rindex(" tiled_kernel("):]
    return body[:body.index("\n}\n")]


def _stack_bytes(src):
    report = ptxas_report(src, H100).split("Compiling entry function 'tiled_kernel'")[1]
    return int(re.search(r"(\d+) bytes stack frame", report).group(1))


@pytest.mark.parametrize("d,warps,dtype,persistent,kv_len,kv_heads", [(128, 8, "bfloat16", 5, True, None),
                                                                     (64, 4, "float16", 3, False, 2)])
def test_persistent_form_compiles_with_rounds_and_one_cta_barrier(d, warps, dtype, persistent, kv_len, kv_heads,
                                                                  warp_specialized_spill_bytes):
    """The persistent form: a grid of ``persistent`` thread blocks (blockIdx.y of extent 1), the
    producer thread and the consumers each looping over the ``ceil(programs / P)`` rounds
    (program ``it P + cta``, skipped past the last), the one __syncthreads before the roles
    split (mbarriers set up once), a named barrier before each tile's Q load; nvcc compiles it
    for sm_90a, and ptxas spills no more than the grid form's one register of the epilogue
    (``warp_specialized_spill_bytes``; d=128 bf16, 8 warps, 2 stages) and does not serialize
    the wgmma."""
    func, src, programs = _persistent(d, warps, dtype, persistent, kv_len, kv_heads)
    script = func.script()
    assert f'T.thread_binding({persistent}, thread="blockIdx.x")' in script
    assert 'T.thread_binding(1, thread="blockIdx.y")' in script
    body = _kernel_body(src)
    rounds = -(-programs // persistent)
    assert programs > persistent and len(re.findall(rf"for \(int it\w* = 0; it\w* < {rounds}; \+\+it\w*\)", body)) == 2
    assert len(re.findall(rf"\(\(it\w* \* {persistent}\) \+ \(\(int\)blockIdx\.x\)\) < {programs}\)", body)) == 2
    assert "blockIdx.y" not in body
    assert body.count("__syncthreads()") == 1
    assert body.index("__syncthreads()") < body.index("setmaxnreg") < body.index("for (int it")
    init = "mbarrier_init_init_shared_b64"  # once, 4 mbarriers per stage, before the barrier
    assert body.count(init) == 4 * 2 and body.rindex(init) < body.index("__syncthreads()")
    consumers = body[body.index("setmaxnreg_inc"):]
    # per tile: one named barrier over the consumers before the Q load, one after it
    assert consumers.count(f"bar_sync_count_sync((uint)1, (uint){32 * warps})") == 2
    threads, blocks = 32 * (warps + 4), 8 // warps
    assert f"__launch_bounds__({threads}, {blocks}) tiled_kernel" in src
    registers, spills = ptxas_usage(src, "tiled_kernel", H100)
    assert spills == warp_specialized_spill_bytes(d, warps) and registers <= 65536 // (threads * blocks), registers
    assert _stack_bytes(src) == (8 if spills else 0)  # the spilled register's slot, 8-byte aligned
    assert wgmma_serialized(src, H100) == []
    assert nvcc_compile(src, H100)


def test_persistent_refusals():
    acsr = ACSR.from_pattern(Window(30), 256)
    spec = AttentionSpec.from_acsr(acsr, 1, 2, 64, "float16")
    shape = plan_tiles(acsr, TiledKnobs(use_tensor_cores=True, bc=128)).shape
    with pytest.raises(ValueError, match="warp-specialized"):
        tiled_mma_func(spec, shape, 4, 1, 2, wgmma=True, tma=True, persistent=4)
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="number of thread blocks"):
            tiled_mma_func(spec, shape, 4, 1, 2, wgmma=True, tma=True, warp_specialized=True, persistent=bad)
