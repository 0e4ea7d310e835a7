"""GPU schedules of the tiled kernel: the CUDA code generates and compiles for the H100
(numerics are checked on CPU in tests/kernels/test_tiled.py; GPU runs happen elsewhere)."""

import dataclasses
import re

import pytest
import tvm

from tvm_splat.compile import ptxas_usage
from tvm_splat.compile import tiled_module as build_module
from tvm_splat.formats import ACSR, GlobalTokens, Strided, Window
from tvm_splat.formats.tile_plan import plan_tiles
from tvm_splat.kernels.spec import AttentionSpec
from tvm_splat.schedules.tiled import TiledKnobs, program_form, tiled_form, tiled_funcs, tiled_program_name

H100 = "nvidia/nvidia-h100"


def _cuda_source(pattern, n, knobs, dtype="float16", heads=12, d=64, kv_heads=None):
    acsr = ACSR.from_pattern(pattern, n)
    plan = plan_tiles(acsr, knobs)
    spec = AttentionSpec.from_acsr(acsr, 1, heads, d, dtype, kv_heads=kv_heads)
    lib = tvm.tirx.build(build_module(spec, plan.shape, H100, knobs), target=H100)
    return lib.imports[0].inspect_source(), plan


def _definition(src, kernel):
    """The body of ``kernel``'s definition in CUDA ``src`` (its last mention: declarations come
    first)."""
    body = src[src.rindex(f" {kernel}("):]
    return body[:body.index("\n}\n")]


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


def test_cuda_core_bf16_gqa_compiles():
    """CUDA cores (tensor cores off) take bfloat16 and grouped KV heads too."""
    from tvm_splat.compile import nvcc_compile

    src, _ = _cuda_source(Window(32), 256, TiledKnobs(), dtype="bfloat16", heads=4, kv_heads=2)
    assert "nv_bfloat16" in src and "mma.sync" not in src
    assert nvcc_compile(src)


def test_knob_errors():
    acsr = ACSR.from_pattern(Window(4), 64)
    spec = AttentionSpec.from_acsr(acsr, 1, 1, 64, "float16")
    plan = plan_tiles(acsr, br=32, bc=32)
    with pytest.raises(ValueError):
        tiled_funcs(spec, plan.shape, TiledKnobs())  # plan made for other tile sizes
    knobs = TiledKnobs(br=16, bc=16, warps=2, use_tensor_cores=True)
    plan = plan_tiles(acsr, knobs)
    with pytest.raises(ValueError, match="16 \\* warps"):  # one 16-row strip cannot feed two warps
        build_module(spec, plan.shape, H100, knobs)
    knobs = TiledKnobs(br=64, bc=64, warps=2, use_tensor_cores=True)
    with pytest.raises(ValueError, match="16 \\* warps \\* m_tiles"):  # mma: 2 warps x 16 rows != 64
        build_module(spec, plan_tiles(acsr, knobs).shape, H100, knobs)
    spec40 = AttentionSpec.from_acsr(acsr, 1, 1, 40, "float16")
    with pytest.raises(ValueError, match="head_dim a multiple of 16"):
        build_module(spec40, plan_tiles(acsr, TiledKnobs()).shape, H100, TiledKnobs(use_tensor_cores=True))


@pytest.mark.parametrize("knobs,d,dtype,kv_heads", [
    (TiledKnobs(use_tensor_cores=True), 64, "float16", None),                                   # default: 2 stages
    (TiledKnobs(use_tensor_cores=True, stages=1), 64, "float16", None),
    (TiledKnobs(use_tensor_cores=True, br=64, bc=32, warps=2, m_tiles=2), 128, "float16", None),
    (TiledKnobs(use_tensor_cores=True), 128, "bfloat16", 1),                                   # bf16, MQA
    (TiledKnobs(use_tensor_cores=True, stages=1, br=32, bc=32, warps=2), 64, "bfloat16", 2),   # bf16, GQA
], ids=["default", "one_stage", "m_tiles2_d128", "bf16_mqa_d128", "bf16_gqa_one_stage"])
def test_tensor_cores_mma_compiles(knobs, d, dtype, kv_heads):
    """The warp-level kernel: ldmatrix + mma.sync (f16 or bf16 operands), scores never in shared
    memory, K/V through cp.async with one barrier per column block (two stages), the exact
    P V path for blocks whose V holds a NaN or inf; compiles with nvcc for sm_90a."""
    from tvm_splat.compile import nvcc_compile

    src, plan = _cuda_source(Window(64) | GlobalTokens(16), 512, knobs, d=d, heads=2, dtype=dtype,
                             kv_heads=kv_heads)
    body = src[src.index("tiled_kernel("):]
    ab = "bf16" if dtype == "bfloat16" else "f16"
    assert body.count(f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32") >= 2
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in body  # V as the B operand
    assert "__shfl_xor_sync" in body  # row max / sum across the 4 lanes of a row
    # the non-finite V check (16-byte shared loads, exponent-bit tests) and its exact P V path
    assert "ptx_ld_vec_shared_v4_b32" in body and "if (vflag_ptr[0] == (j + 1))" in body
    loop = body[body.index("for (int j = 0;"):body.index("if (vflag_ptr[0] == (j + 1))")]
    # one barrier per column block with two stages, two with one: the V check adds none
    if knobs.stages == 2:
        assert "cp_async" in src and loop.count("__syncthreads") == 1
    else:
        assert "cp_async" not in src and loop.count("__syncthreads") == 2
    assert nvcc_compile(src)


def test_knobs_reject_unknown_forms():
    with pytest.raises(ValueError, match="stages"):
        TiledKnobs(stages=3)
    with pytest.raises(ValueError, match="m_tiles"):
        TiledKnobs(m_tiles=3)
    with pytest.raises(ValueError, match="br must be an int"):
        TiledKnobs(br="64")
    with pytest.raises(TypeError):
        TiledKnobs(tc_kernel="wmma")  # the WMMA form is gone
    assert TiledKnobs.from_dict({"br": 32, "bc": 32, "warps": 2, "tc_kernel": "mma"}) == TiledKnobs(32, 32, 2)


def test_tensor_cores_big_tiles_and_in_place_api():
    """A 128 x 128 score tile (too big for static shared memory: falls back to shared.dyn)
    builds on CUDA cores, and the in-place form schedules a Schedule like the wrapper does."""
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


@pytest.mark.parametrize("knobs,d,dtype,kv_heads", [
    (TiledKnobs(use_tensor_cores=True, br=128, warps=8, wgmma=True), 128, "float16", None),     # the Hopper default at d=128
    (TiledKnobs(use_tensor_cores=True, wgmma=True, stages=1), 64, "bfloat16", 2),              # one warpgroup, bf16, GQA
    (TiledKnobs(use_tensor_cores=True, wgmma=True, bc=128, split_blocks=1), 64, "float16", 1),  # bc=128, split-KV, MQA
    (TiledKnobs(use_tensor_cores=True, br=128, warps=8, wgmma=True, stages=4), 128, "bfloat16", 2),  # pipelined
], ids=["two_warpgroups_d128", "bf16_gqa_one_stage", "bc128_split_mqa", "pipelined_two_warpgroups"])
def test_tensor_cores_wgmma_compiles(knobs, d, dtype, kv_heads):
    """The Hopper form: S = Q K^T as wgmma.mma_async with both operands in shared memory (8x8
    core-matrix layout, descriptors), O += P V with P from registers and V read transposed;
    fences between the generic and async proxies; compiles with nvcc for sm_90a. The K/V tiles
    still arrive by cp.async issued by every thread (no TMA, no producer warp: see benchmarks/HISTORY.md,
    "The Hopper wgmma form")."""
    from tvm_splat.compile import nvcc_compile

    src, _ = _cuda_source(Window(64) | GlobalTokens(16), 512, knobs, d=d, heads=2, dtype=dtype, kv_heads=kv_heads)
    body = src[src.index("tiled_kernel("):]
    ab = "bf16" if dtype == "bfloat16" else "f16"
    assert f"wgmma.mma_async.sync.aligned.m64n{knobs.bc}k16.f32.{ab}.{ab}" in src  # S, ss form
    assert f"wgmma.mma_async.sync.aligned.m64n{d}k16.f32.{ab}.{ab}" in src  # O, rs form (4 A registers)
    assert "wgmma_encode_matrix_descriptor" in body and "fence_proxy" in body
    assert "wgmma_commit_group" in body and "wgmma_wait_group" in body
    assert "mma.sync" not in body and "ldmatrix" not in body
    assert nvcc_compile(src)


def test_wgmma_knobs_and_targets():
    from tvm_splat.kernels.spec import AttentionSpec
    from tvm_splat.schedules.tiled import default_tiled_knobs

    with pytest.raises(ValueError, match="wgmma needs"):
        TiledKnobs(use_tensor_cores=True, wgmma=True, warps=2, br=32)
    with pytest.raises(ValueError, match="wgmma needs"):
        TiledKnobs(wgmma=True)  # tensor cores off
    with pytest.raises(ValueError, match="stages"):
        TiledKnobs(use_tensor_cores=True, stages=4)  # the pipelined form is wgmma's
    big = AttentionSpec.from_acsr(ACSR.from_pattern(Window(4), 256), 1, 2, 256, "float16")
    knobs = TiledKnobs(use_tensor_cores=True, br=128, warps=8, bc=128, wgmma=True, stages=4)
    with pytest.raises(ValueError, match="shared memory"):
        tiled_funcs(big, plan_tiles(ACSR.from_pattern(Window(4), 256), knobs).shape, knobs, H100)
    acsr = ACSR.from_pattern(Window(4), 256)
    spec128 = AttentionSpec.from_acsr(acsr, 1, 2, 128, "float16")
    spec64 = AttentionSpec.from_acsr(acsr, 1, 2, 64, "float16")
    assert default_tiled_knobs(spec128, H100).wgmma and default_tiled_knobs(spec128, H100).br == 128
    assert not default_tiled_knobs(spec64, H100).wgmma
    sm90 = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})  # Target.from_device's spelling
    assert not default_tiled_knobs(spec128, sm90).wgmma
    sm80 = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    assert not default_tiled_knobs(spec128, sm80).wgmma
    knobs = TiledKnobs(use_tensor_cores=True, wgmma=True)
    with pytest.raises(ValueError, match="Hopper"):
        tiled_funcs(spec64, plan_tiles(acsr, knobs).shape, knobs, sm80)


@pytest.mark.parametrize("d,dtype,kv_len", [(128, "float16", False), (64, "bfloat16", True)])
def test_tma_form_compiles_with_tensor_maps(d, dtype, kv_len):
    """The TMA form: K/V tensor maps encoded on the host and passed as __grid_constant__
    CUtensorMap parameters, cp.async.bulk.tensor copies completing on mbarriers, 128-byte
    swizzled wgmma descriptors; nvcc compiles it for sm_90a."""
    from tvm_splat.compile import cuda_source, nvcc_compile

    acsr = ACSR.from_pattern(Window(40), 300)
    spec = AttentionSpec.from_acsr(acsr, 1, 4, d, dtype, kv_heads=2, has_kv_len=kv_len)
    knobs = TiledKnobs(use_tensor_cores=True, br=128, warps=8, wgmma=True, tma=True)
    func = tiled_funcs(spec, plan_tiles(acsr, knobs).shape, knobs, H100)["tiled"]
    lib = tvm.compile(tvm.IRModule({"tiled": func}), target=tvm.target.Target(H100))
    src = cuda_source(lib.mod)
    assert "const __grid_constant__ CUtensorMap kmap" in src and "const __grid_constant__ CUtensorMap vmap" in src
    assert "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes" in src
    assert "mbarrier.arrive.expect_tx" in src and "mbarrier.try_wait.parity" in src
    assert "wgmma.mma_async" in src
    assert nvcc_compile(src, H100)


@pytest.mark.parametrize("step,d,warps", [(2, 64, 4), (4, 128, 8)])
def test_tma_form_loads_dilated_blocks_by_a_strided_tensor_map(step, d, warps):
    """A dilated mask's column blocks (rows ``r, r + step, ...``, one step for the whole plan)
    arrive by TMA through a 5-D tensor map (residue, row within the residue class): the copies
    are 5-D, their coordinates the block's first row split by the step, and nvcc compiles it;
    the plan's shape carries the step, so it names the compiled kernel."""
    from tvm_splat.compile import nvcc_compile
    from tvm_splat.formats import DilatedWindow

    knobs = TiledKnobs(use_tensor_cores=True, br=16 * warps, warps=warps, wgmma=True, tma=True)
    src, plan = _cuda_source(DilatedWindow(40, step), 512, knobs, heads=4, d=d)
    assert plan.shape.step == step and plan.shape.key.endswith(f"_st{step}")
    assert "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes" in src
    assert "cp.async.bulk.tensor.4d" not in src
    assert nvcc_compile(src, H100)
    # the map's geometry (innermost first): 64 elements, the residue (box 1), n / step rows of
    # the class ``step`` rows apart (box bc), head_dim halves 128 bytes apart, the 4 heads
    acsr = ACSR.from_pattern(DilatedWindow(40, step), 512)
    spec = AttentionSpec.from_acsr(acsr, 1, 4, d, "float16")
    script = tiled_funcs(spec, plan_tiles(acsr, knobs).shape, knobs, H100)["tiled"].script()
    dims, strides = (64, step, 512 // step, d // 64, 4), (2 * d, 2 * d * step, 128, 2 * d * 512)
    box = (64, 1, knobs.bc, d // 64, 1)
    encode = f"T.tensormap_encode_tiled(kmap, k.data, {', '.join(map(str, dims + strides + box + (1,) * 5))},"
    assert encode in script and "rank=5" in script


@pytest.mark.parametrize("pattern,d,warps,blocks", [(Window(256), 128, 8, 2), (GlobalTokens(4) | Window(256), 64, 4, 4),
                                                     (GlobalTokens(4) | Window(256), 128, 8, 0)])
def test_tma_form_fits_its_blocks_per_sm_without_spills(pattern, d, warps, blocks):
    """The TMA form asks for ``blocks`` thread blocks per SM (at most 128 registers a thread,
    ``__launch_bounds__``), as many as its shared memory allows, where ptxas meets that without
    spilling (segments x head_dim <= 128; uncapped, the block-range mask took 129-152
    registers: one block per SM at d=128, three at d=64); two segments at d=128 would spill, so
    that form asks for nothing (0)."""
    knobs = TiledKnobs(use_tensor_cores=True, br=16 * warps, warps=warps, wgmma=True, tma=True)
    src, plan = _cuda_source(pattern, 1024, knobs, heads=4, d=d)
    bounds = f"{32 * warps}, {blocks}" if blocks else f"{32 * warps}"
    assert f"__launch_bounds__({bounds}) tiled_kernel" in src
    registers, spills = ptxas_usage(src, "tiled_kernel", H100)
    assert spills == 0 and (registers <= 128 or not blocks), (registers, spills)


@pytest.mark.parametrize("d,warps,dtype,kv_len", [(128, 8, "float16", False), (128, 8, "bfloat16", True),
                                                   (64, 4, "float16", False)])
def test_warp_specialized_form_compiles_with_roles_and_no_cta_barrier_in_the_loop(d, warps, dtype, kv_len,
                                                                                  warp_specialized_spill_bytes):
    """The warp-specialized TMA form: a producer warpgroup beside the consumer warps (launch
    bounds of one thread block per SM with two consumer warpgroups, two with one), registers
    moved by setmaxnreg, K and V copies on mbarriers of their own, stages released by the
    consumers' mbarrier arrivals, and with two consumer warpgroups their turns at the tensor
    cores by named barriers (bar.sync / bar.arrive). The one __syncthreads precedes the role
    split: past it the producer never reaches a CTA-wide barrier. nvcc compiles it; ptxas
    spills no more than the one register of the epilogue (``warp_specialized_spill_bytes``) and
    does not serialize the wgmma (remark C7515)."""
    from tvm_splat.compile import nvcc_compile, wgmma_serialized

    knobs = TiledKnobs(use_tensor_cores=True, br=16 * warps, bc=128, warps=warps, wgmma=True, tma=True,
                       warp_specialized=True)
    src, plan = _cuda_source(Window(300), 2048, knobs, dtype=dtype, heads=4, d=d)
    body = _definition(src, "tiled_kernel")
    threads, blocks = 32 * (warps + 4), 8 // warps
    assert f"__launch_bounds__({threads}, {blocks}) tiled_kernel" in src
    assert "setmaxnreg.dec.sync.aligned.u32 24;" in src
    assert f"setmaxnreg.inc.sync.aligned.u32 {240 if warps == 8 else 232};" in src
    assert body.count("__syncthreads()") == 1 and body.index("__syncthreads()") < body.index("setmaxnreg")
    assert "mbarrier.arrive.shared.b64" in src and "cp.async.bulk.tensor.4d" in src
    assert ("bar.arrive" in src) == (warps == 8)
    # Q's descriptor: with two consumer warpgroups, from lane 0's warpgroup index (a shuffle),
    # which ptxas keeps in uniform registers; with one, at the start of shared memory
    q_desc = re.findall(r"ptx_wgmma_encode_matrix_descriptor\(\(&\(desc_ptr\[0\]\)\), \(&\(\w+\[(.*?)\]\)\)", body)
    shuffled = "(__shfl_sync((uint)4294967295, (((int)threadIdx.y) >> 2), 0, 32) * "
    assert q_desc and all(x.startswith(shuffled) if warps == 8 else x == "0" for x in q_desc), q_desc
    assert wgmma_serialized(src, H100) == []
    registers, spills = ptxas_usage(src, "tiled_kernel", H100)
    assert spills == warp_specialized_spill_bytes(d, warps) and registers <= 65536 // (threads * blocks)
    assert nvcc_compile(src, H100)


def test_warp_specialized_knobs_it_refuses():
    with pytest.raises(ValueError, match="form of the TMA kernel"):
        TiledKnobs(use_tensor_cores=True, wgmma=True, warp_specialized=True)
    with pytest.raises(ValueError, match="one or two consumer warpgroups"):
        TiledKnobs(use_tensor_cores=True, br=256, warps=16, wgmma=True, tma=True, warp_specialized=True)
    knobs = TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True, warp_specialized=True)
    name = tiled_program_name(knobs, True)
    assert name.endswith("_wg_tma_ws") and program_form(name) == tiled_form(knobs) == "wg_tma_ws"
    assert program_form(tiled_program_name(dataclasses.replace(knobs, warp_specialized=False), True)) == "wg_tma"


def test_persistent_knob_refusals_name_and_kernel():
    """``persistent`` (P thread blocks walking the programs) is a variant of the warp-specialized
    form: refused without it and when negative; its program name adds ``_pP`` and reads back as
    the same form; it reaches the kernel (grid of P blocks); off by default."""
    ws = TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True, warp_specialized=True)
    assert ws.persistent == 0 and TiledKnobs().persistent == 0
    with pytest.raises(ValueError, match="needs warp_specialized"):
        TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True, persistent=132)
    with pytest.raises(ValueError, match="needs warp_specialized"):
        TiledKnobs(persistent=1)
    with pytest.raises(ValueError, match="number of thread blocks"):
        dataclasses.replace(ws, persistent=-1)
    with pytest.raises(ValueError, match="persistent must be an int"):
        dataclasses.replace(ws, persistent=True)
    knobs = dataclasses.replace(ws, persistent=132)
    name = tiled_program_name(knobs, True)
    assert name == "tiled_128x128_w8_m1_s2_wg_tma_ws_p132"
    assert program_form(name) == tiled_form(knobs) == program_form(tiled_program_name(ws, True)) == "wg_tma_ws"
    assert tiled_program_name(ws, True) == "tiled_128x128_w8_m1_s2_wg_tma_ws"  # unchanged when off
    assert TiledKnobs.from_dict(dataclasses.asdict(knobs)) == knobs
    acsr = ACSR.from_pattern(Window(40), 300)
    spec = AttentionSpec.from_acsr(acsr, 1, 4, 128, "float16")
    func = tiled_funcs(spec, plan_tiles(acsr, knobs).shape, dataclasses.replace(knobs, persistent=3), H100)["tiled"]
    assert 'T.thread_binding(3, thread="blockIdx.x")' in func.script()


def _persistent_scripts(*knobs):
    """The TVMScript of the tiled kernel each of ``knobs`` makes with 3 persistent thread blocks,
    window +-40 over n=300, 8 heads, d=128, float16, on the H100 target."""
    acsr = ACSR.from_pattern(Window(40), 300)
    spec = AttentionSpec.from_acsr(acsr, 1, 8, 128, "float16")
    shape = plan_tiles(acsr, knobs[0]).shape
    return [tiled_funcs(spec, shape, dataclasses.replace(k, persistent=3), H100)["tiled"].script() for k in knobs]


def test_head_group_knob_refusals_name_and_kernel():
    """``head_group`` (runs of G heads, all their row tiles; 0: the default order) is an int >= 0
    of the warp-level kernel: refused when negative, a bool, or on CUDA cores; its program name
    adds ``_hgG`` and reads back as the same form; it reaches the kernel's program arithmetic."""
    ws = TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True, warp_specialized=True,
                    persistent=132, early_rescale=True)
    assert ws.head_group == 0 and TiledKnobs().head_group == 0
    with pytest.raises(ValueError, match="number of heads"):
        dataclasses.replace(ws, head_group=-1)
    with pytest.raises(ValueError, match="head_group must be an int"):
        dataclasses.replace(ws, head_group=True)
    with pytest.raises(ValueError, match="warp-level kernel"):
        TiledKnobs(head_group=4)
    knobs = dataclasses.replace(ws, head_group=4)
    name = tiled_program_name(knobs, True)
    assert name == "tiled_128x128_w8_m1_s2_wg_tma_ws_p132_er_hg4"
    assert program_form(name) == tiled_form(knobs) == "wg_tma_ws"
    assert tiled_program_name(ws, True) == "tiled_128x128_w8_m1_s2_wg_tma_ws_p132_er"  # unchanged when 0
    assert TiledKnobs.from_dict(dataclasses.asdict(knobs)) == knobs
    grouped, default = _persistent_scripts(knobs, ws)
    assert grouped != default and 'T.thread_binding(3, thread="blockIdx.x")' in grouped


def test_l2_hint_knobs_refusals_name_and_kernel():
    """``kv_evict_last`` and ``out_evict_first`` (L2 cache hints of the K/V tensor copies and of
    the persistent form's O store) are off by default, refused without the copy they hint (TMA,
    the persistent form) or as non-bools; the program name adds ``_kl`` / ``_of`` after the
    program order's ``_hgG`` and reads back as the same form; they reach the kernel."""
    ws = TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True, warp_specialized=True,
                    persistent=132, early_rescale=True, head_group=4)
    assert not (ws.kv_evict_last or ws.out_evict_first)
    with pytest.raises(ValueError, match="kv_evict_last is an L2 hint of the TMA forms"):
        TiledKnobs(use_tensor_cores=True, wgmma=True, kv_evict_last=True)
    with pytest.raises(ValueError, match="out_evict_first is an L2 hint of the persistent form"):
        dataclasses.replace(ws, persistent=0, out_evict_first=True)
    with pytest.raises(ValueError, match="out_evict_first must be a bool"):
        dataclasses.replace(ws, out_evict_first="yes")
    both = dataclasses.replace(ws, kv_evict_last=True, out_evict_first=True)
    for knobs, suffix in ((dataclasses.replace(ws, kv_evict_last=True), "_kl"),
                          (dataclasses.replace(ws, out_evict_first=True), "_of"), (both, "_kl_of")):
        name = tiled_program_name(knobs, True)
        assert name == "tiled_128x128_w8_m1_s2_wg_tma_ws_p132_er_hg4" + suffix
        assert program_form(name) == tiled_form(knobs) == "wg_tma_ws"
        assert TiledKnobs.from_dict(dataclasses.asdict(knobs)) == knobs
    hinted, plain = _persistent_scripts(both, ws)
    assert "L2::cache_hint" in hinted and "L2::cache_hint" not in plain


@pytest.mark.parametrize("form,d", [(dict(), 64), (dict(wgmma=True), 64),
                                    (dict(br=128, bc=128, warps=8, wgmma=True, tma=True, warp_specialized=True), 128)],
                         ids=["mma", "wgmma", "tma_ws"])
def test_lazy_rescale_knob_name_and_kernel(form, d):
    """``lazy_rescale`` (the running max moves only by more than RESCALE_THRESHOLD; O rescaled
    only in a warp where a row moved it): a variant of the warp-level kernel, refused without
    tensor cores; its program name adds ``_lr`` and reads back as the same form. In the kernel:
    the max kept unless a block raises it by more than the threshold, and O's multiplies behind
    one warp vote (``__any_sync``) that the knob's absence leaves out; nvcc compiles it, ptxas
    spills no more than without it and does not serialize the wgmma."""
    from tvm_splat.compile import nvcc_compile, wgmma_serialized
    from tvm_splat.kernels.tiled_mma import RESCALE_THRESHOLD

    with pytest.raises(ValueError, match="warp-level kernel"):
        TiledKnobs(lazy_rescale=True)
    with pytest.raises(ValueError, match="lazy_rescale must be a bool"):
        TiledKnobs(use_tensor_cores=True, lazy_rescale=1)
    exact = TiledKnobs(use_tensor_cores=True, **form)
    knobs = dataclasses.replace(exact, lazy_rescale=True)
    assert not exact.lazy_rescale and not TiledKnobs().lazy_rescale
    name = tiled_program_name(knobs, True)
    assert name == tiled_program_name(exact, True) + "_lr" and program_form(name) == tiled_form(exact)
    if exact.warp_specialized:
        persistent = tiled_program_name(dataclasses.replace(knobs, persistent=3), True)
        assert persistent.endswith("_wg_tma_ws_p3_lr") and program_form(persistent) == "wg_tma_ws"
    assert TiledKnobs.from_dict(dataclasses.asdict(knobs)) == knobs
    src, _ = _cuda_source(Window(300), 2048, knobs, heads=4, d=d)
    src_exact, _ = _cuda_source(Window(300), 2048, exact, heads=4, d=d)
    body, body_exact = _definition(src, "tiled_kernel"), _definition(src_exact, "tiled_kernel")
    assert "any_sync(" not in body_exact and "any_sync((uint)4294967295, ((al_ptr[0] != " in body
    kept = re.compile(r"\(ms_ptr\[0\] \+ \w+\.?\w*\+?\w*f" + re.escape(f"/*{RESCALE_THRESHOLD:e}*/) < mb_ptr[0]"))
    assert kept.search(body) and not kept.search(body_exact)
    assert wgmma_serialized(src, H100) == []
    assert ptxas_usage(src, "tiled_kernel", H100)[1] == ptxas_usage(src_exact, "tiled_kernel", H100)[1]
    assert nvcc_compile(src, H100)


@pytest.mark.parametrize("warps", [8, 4])
def test_loop_variants_of_the_warp_specialized_form(warps, warp_specialized_spill_bytes):
    """``early_rescale`` (O multiplied while the next block's S runs, before the block's P V is
    issued) and ``softmax_overlap`` (a warp-uniform branch on the row sums before the wait for
    the previous P V, which ptxas would otherwise hoist above the softmax): variants of the
    warp-specialized form, refused elsewhere, named ``_er`` / ``_so`` and read back as the same
    form. In the CUDA of the consumers' block loop: with ``early_rescale`` the multiplies of O
    sit between S's commit and P V's wgmmas (without it, after the wait for everything); with
    ``softmax_overlap`` the vote and its 0 ns sleep come right before that wait. nvcc compiles
    both, ptxas spills no more than the form's one register and serializes no wgmma."""
    from tvm_splat.compile import nvcc_compile, wgmma_serialized

    for name in ("early_rescale", "softmax_overlap"):
        with pytest.raises(ValueError, match=f"{name} is a form of the warp-specialized kernel"):
            TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True, **{name: True})
        with pytest.raises(ValueError, match=f"{name} must be a bool"):
            TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True, warp_specialized=True,
                       **{name: 1})
    ws = TiledKnobs(use_tensor_cores=True, br=16 * warps, bc=128, warps=warps, wgmma=True, tma=True,
                    warp_specialized=True)
    both = dataclasses.replace(ws, early_rescale=True, softmax_overlap=True)
    assert not (ws.early_rescale or ws.softmax_overlap)
    assert tiled_program_name(both, True) == tiled_program_name(ws, True) + "_er_so"
    assert program_form(tiled_program_name(dataclasses.replace(both, lazy_rescale=True, persistent=2), True)) \
        == "wg_tma_ws"
    assert TiledKnobs.from_dict(dataclasses.asdict(both)) == both
    d = 16 * warps
    loops = {}
    for knobs in (ws, both):
        src, _ = _cuda_source(Window(300), 2048, knobs, heads=4, d=d)
        body = _definition(src, "tiled_kernel")
        # the loop's block: from the wait for S (wait_group 1) back to the S wgmmas' commit before it
        wait_s = body.index("wgmma_wait_group_wait_group_sync_aligned_1();")
        start = body.rindex("for (int jj = 0;", 0, wait_s)
        wait_all = body.index("wgmma_wait_group_wait_group_sync_aligned_0();", wait_s)
        loops[knobs.early_rescale] = (body[start:wait_all + 80], src)
        assert wgmma_serialized(src, H100) == []
        registers, spills = ptxas_usage(src, "tiled_kernel", H100)
        assert spills == warp_specialized_spill_bytes(d, warps)
        assert nvcc_compile(src, H100)
    plain, early = loops[False][0], loops[True][0]
    rescale = "oacc_ptr[0] = (oacc_ptr[0] * al_ptr[0]);"
    s_commit = plain.index("wgmma_commit_group_commit_group_sync_aligned();")
    pv = plain.index("_rs_mma_async_sync_aligned_")
    assert rescale not in plain[s_commit:pv]
    s_commit = early.index("wgmma_commit_group_commit_group_sync_aligned();")
    pv = early.index("_rs_mma_async_sync_aligned_")
    assert s_commit < early.index(rescale) < pv
    vote = "any_sync((uint)4294967295, ((ls_ptr[0] < 0x0p+0f/*0.000000e+00*/) || (ls_ptr[1] < 0x0p+0f"
    assert vote not in plain and early.count(vote) == 1
    tail = early[early.index(vote):]
    assert tail.index("nano_sleep(") < tail.index("wgmma_wait_group_wait_group_sync_aligned_0();")


@pytest.mark.parametrize("form,d,spill", [(dict(wgmma=True, tma=True), 64, 0), (dict(), 64, 0),
                                          (dict(br=128, warps=8, wgmma=True), 128, 0),
                                          (dict(br=128, warps=8, wgmma=True, tma=True), 128, 24)],
                         ids=["tma", "mma", "wgmma_two_warpgroups", "tma_two_warpgroups"])
def test_fold_scale_knob_name_and_kernel(form, d, spill):
    """``fold_scale``: the softmax scale in the exponent's FFMA (``2^(s scale - m)``) instead of
    one multiply a score first, in the forms other than the warp-specialized one (which always
    folds it, so the knob refuses it there, and refuses the CUDA-core kernel); named ``_fs``,
    read back as the same form. In the CUDA every exponent multiplies its score by the scale
    and no score is scaled before; nvcc compiles it; ptxas spills nothing but on the d=128
    two-block TMA form (128 registers), 24 bytes."""
    from tvm_splat.compile import nvcc_compile

    with pytest.raises(ValueError, match="always folds"):
        TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True, warp_specialized=True,
                   fold_scale=True)
    with pytest.raises(ValueError, match="fold_scale is a form of the warp-level kernel"):
        TiledKnobs(fold_scale=True)
    with pytest.raises(ValueError, match="fold_scale must be a bool"):
        TiledKnobs(use_tensor_cores=True, fold_scale="yes")
    plain = TiledKnobs(use_tensor_cores=True, **form)
    folded = dataclasses.replace(plain, fold_scale=True)
    assert tiled_program_name(folded, True) == tiled_program_name(plain, True) + "_fs"
    assert program_form(tiled_program_name(folded, True)) == tiled_form(plain)
    exponent = re.compile(r"exp2f\(\(\(sacc_ptr\[\d+\] \* 0x[0-9a-fp.+-]+f/\*[0-9.e+-]+\*/\) - ms_ptr\[\d\]\)\)")
    scaled_first = re.compile(r"sacc_ptr\[(\d+)\] = \(sacc_ptr\[\1\] \* 0x[0-9a-fp.+-]+f")
    for knobs in (plain, folded):
        src, _ = _cuda_source(Window(300), 2048, knobs, heads=4, d=d)
        body = _definition(src, "tiled_kernel")
        assert bool(exponent.search(body)) == knobs.fold_scale
        assert bool(scaled_first.search(body)) != knobs.fold_scale
        if knobs.fold_scale:
            assert ptxas_usage(src, "tiled_kernel", H100)[1] == spill
            assert nvcc_compile(src, H100)


def test_tma_knobs_and_masks_it_refuses():
    with pytest.raises(ValueError, match="two-stage wgmma"):
        TiledKnobs(use_tensor_cores=True, tma=True)
    with pytest.raises(ValueError, match="two-stage wgmma"):
        TiledKnobs(use_tensor_cores=True, wgmma=True, stages=1, tma=True)
    from tvm_splat import plan
    from tvm_splat.formats import DilatedWindow

    knobs = TiledKnobs(use_tensor_cores=True, wgmma=True, tma=True)
    plan(Window(8), (1, 2, 128, 64), None, "float16", None, target=H100, knobs=knobs)  # step 1: taken
    plan(DilatedWindow(8, 2), (1, 2, 128, 64), None, "float16", None, target=H100, knobs=knobs)  # one step: taken
    with pytest.raises(ValueError, match="multiple of it; this mask has n=129"):
        plan(DilatedWindow(8, 2), (1, 2, 129, 64), None, "float16", None, target=H100, knobs=knobs)
    with pytest.raises(ValueError, match="mixes steps"):
        plan("global:2+dilated:8:2", (1, 2, 128, 64), None, "float16", None, target=H100, knobs=knobs)
    acsr = ACSR.from_pattern(Window(8), 128)
    with pytest.raises(ValueError, match="multiple of 64"):
        tiled_funcs(AttentionSpec.from_acsr(acsr, 1, 2, 32, "float16"), plan_tiles(acsr, knobs).shape, knobs, H100)


def test_tensor_core_grid_runs_heads_first_and_its_merges_vector_widths():
    """The tensor-core forward's grid is (batch x heads, tiles): ``blockIdx.x``, dispatched
    first, picks the head, ``blockIdx.y`` the tile, so every head's longest tile (the plan's
    first) starts in the first wave. Its split-KV merge reads the partial outputs one element
    a thread (``SPLIT_MERGE_LANES``: ``d`` the fastest index, consecutive threads, consecutive
    floats); a union's merge four (``merge_lanes``: one 16-byte load of each component's
    floats, one 8-byte store; consecutive threads, consecutive runs of ``d``). A plan with
    more tiles per head than CUDA's ``gridDim.y`` limit is refused by name."""
    from tvm_splat.kernels.common import GRID_Y_MAX, tile_grid_rows

    knobs = TiledKnobs(use_tensor_cores=True, wgmma=True, split_blocks=2)
    src, plan = _cuda_source(Window(64) | GlobalTokens(16), 512, knobs, heads=3)
    assert plan.num_slots > 0
    body, merge = _definition(src, "tiled_kernel"), _definition(src, "split_merge_kernel")
    assert "tiles_ptr[(((int)blockIdx.y) * 7)]" in body  # row0 of tile blockIdx.y
    assert "(((int)blockIdx.x) * 32768)" in body  # out's (batch x head) offset, n * d = 512 * 64
    assert "for (int d" not in merge  # no loop over d in a thread: d is the thread's own
    assert "(((int)threadIdx.x) & 63))] = ((half)" in merge  # out[..., d], d = threadIdx.x % 64
    assert "float4" not in merge
    src, plan = _cuda_source(Strided(128, causal=True), 1024, TiledKnobs(use_tensor_cores=True), heads=3)
    assert plan.shape.num_components == 2
    merge = _definition(src, "merge_kernel")
    assert "for (int d" not in merge  # its 4 elements are one vector
    assert "= *(float4*)(o_part_ptr + " in merge  # 4 floats of a component's partial O at once
    assert "(((int)threadIdx.x) * 4))) = " in merge  # out's elements 4 t .. 4 t + 3 (rows of d = 64 contiguous)
    assert "*(half4*)(out_ptr + " in merge
    assert tile_grid_rows(GRID_Y_MAX, "tiled") == GRID_Y_MAX
    with pytest.raises(ValueError, match=r"tiled: 65536 row tiles per head exceed CUDA's grid limit"):
        tile_grid_rows(GRID_Y_MAX + 1, "tiled")
