"""The warp-level tiled kernel's persistent warp-specialized form, built for sm_90a on the CPU
machine (its numerics run in tests/gpu; the other forms' compile tests are in
tests/schedules/test_tiled_schedule.py), and its PARTIAL blocks' mask words, run on the CPU."""
import re

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from tvm_splat.compile import nvcc_compile, ptxas_report, ptxas_usage, wgmma_serialized
from tvm_splat.formats import ACSR, Window, parse_pattern
from tvm_splat.formats.tile_plan import plan_tiles
from tvm_splat.kernels.spec import AttentionSpec
from tvm_splat.kernels.tiled_mma import (GROUPED_MIN_HEADS, PROGRAM_ROW_GROUP, WS_CONSUMER_REGS_MAX,
                                         WS_PRODUCER_REGS, busiest_block, consumer_registers, create_l2_policy,
                                         head_group_tile, int_select, persistent_block_loads, persistent_program,
                                         program_block_counts, program_group, program_tile, row_column_bits,
                                         tiled_mma_func)
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
def test_persistent_form_compiles_with_rounds_and_one_cta_barrier(d, warps, dtype, persistent, kv_len, kv_heads):
    """The persistent form: a grid of ``persistent`` thread blocks (blockIdx.y of extent 1), the
    producer thread and the consumers each looping over the ``ceil(programs / P)`` rounds
    (program ``it P + cta``, ``it P + P - 1 - cta`` in odd rounds, skipped past the last), the
    one __syncthreads before the roles split (mbarriers set up once), each consumer
    warpgroup's own named barrier a tile once its Q rows have landed (none over both groups;
    with two, their turns at the tensor cores alternate across tiles: group 1 passes one before
    the rounds and each turn it takes, group 0 takes one after them); the group's Q rows of the
    next tile read ahead (cp.async, every round) into its half of the other of two Q slots after
    that barrier and before the tile's first wgmma, the Q descriptors on the round's slot, the
    first tile's Q loaded before the round loop and the last read-ahead waited for after it,
    Q's chunks copied down the core matrices' rows (conflict-free shared stores), the output
    staged in the group's half of the tile's Q slot and stored by TMA (16 bytes a thread at a
    time where the box is not the group's rows); nvcc compiles
    it for sm_90a, and ptxas spills nothing (the grid form keeps one register of its epilogue on
    the stack at d=128) and does not serialize the wgmma."""
    func, src, programs = _persistent(d, warps, dtype, persistent, kv_len, kv_heads)
    script = func.script()
    assert f'T.thread_binding({persistent}, thread="blockIdx.x")' in script
    assert 'T.thread_binding(1, thread="blockIdx.y")' in script
    body = _kernel_body(src)
    rounds = -(-programs // persistent)
    assert programs > persistent and len(re.findall(rf"for \(int it\w* = 0; it\w* < {rounds}; \+\+it\w*\)", body)) == 2
    # each role's rounds: the program it P + (cta, or P - 1 - cta in odd rounds), walked below the last
    assert len(re.findall(rf"\(\(it\w* \* {persistent}\) \+ condval\w*\) < {programs}\)", body)) == 2
    assert len(re.findall(rf"condval\w* = \({persistent - 1} - \(\(int\)blockIdx\.x\)\);", body)) >= 2
    assert "blockIdx.y" not in body
    assert body.count("__syncthreads()") == 1
    assert body.index("__syncthreads()") < body.index("setmaxnreg") < body.index("for (int it")
    init = "mbarrier_init_init_shared_b64"  # once, 4 mbarriers per stage, before the barrier
    assert body.count(init) == 4 * 2 and body.rindex(init) < body.index("__syncthreads()")
    consumers = body[body.index("setmaxnreg_inc"):]
    # per tile: the warpgroup's own named barrier once its Q rows of the tile have landed; no
    # barrier over both consumer warpgroups (they run on across tiles at their own pace)
    assert f"bar_sync_count_sync((uint)1, (uint){32 * warps})" not in consumers
    q_landed = ("bar_sync_count_sync(((uint)((((int)threadIdx.y) >> 2) + 2)), (uint)128)" if warps == 8
                else "bar_sync_count_sync((uint)2, (uint)128)")
    # two Q slots of br x d elements: the round's, in the Q descriptors; the next round's, written
    # by the read-ahead between the barrier and the tile's first wgmma
    rounds_loop = re.search(rf"for \(int (it\w*) = 0; it\w* < {rounds};", consumers)
    assert consumers.index(q_landed, rounds_loop.start()) > consumers.index("wait_group_0()", rounds_loop.start())
    it, slot = rounds_loop.group(1), 16 * warps * d
    first_wgmma = consumers.index("mma_async", consumers.index(q_landed))
    ahead = consumers.find(f"((({it} + 1) & 1) * {slot})", consumers.index(q_landed))
    assert 0 < ahead < first_wgmma and "cp_async_cg" in consumers[ahead - 300:ahead]
    q_desc = re.findall(r"ptx_wgmma_encode_matrix_descriptor\(\(&\(desc_ptr\[0\]\)\), \(&\(\w+\[(.*?)\]\)\)", consumers)
    assert q_desc and all(f"(({it} & 1) * {slot})" in x and x.startswith("__shfl_sync") for x in q_desc), q_desc
    # this thread's Q chunks waited for: once a tile before the barrier, once after the rounds
    waits = [m.start() for m in re.finditer(r"cp_async_wait_group_async_wait_group_0\(\)", consumers)]
    assert len(waits) == 2 and waits[0] < consumers.index(q_landed) and waits[1] > consumers.rindex("mma_async")
    assert consumers.index("cp_async_cg") < rounds_loop.start()  # the first tile's Q, before the rounds
    # two consumer warpgroups: their turns at the tensor cores alternate across tiles; group 1
    # passes one before the rounds and every turn it takes, group 0 takes one more after them
    arrive, take = "bar_arrive_arrive(", "bar_sync_count_sync(((uint)((((int)threadIdx.y) >> 2) + 4)), (uint)256)"
    if warps == 8:
        before, after = consumers[:rounds_loop.start()], consumers[consumers.rindex("mma_async"):]
        assert before.count(arrive) == 1 and "== 1) {" in before[before.rindex("__shfl_sync"):]
        assert after.count(take) == 1 and "== 0) {" in after[after.rindex("__shfl_sync"):]
        assert "bar_arrive" in after[:after.index(take)] and re.search(r"if \(.*\|\|.*\)\s*\{\s*tvm_builtin_ptx_bar_arrive",
                                                                      consumers) is None
    else:
        assert arrive not in consumers and take not in consumers
    # Q's chunks copied down the core matrices' rows: lane l's 16 bytes right after lane l - 1's,
    # so a shared-memory phase's 8 chunks fill 32 banks (along a row they would share 4)
    q_copies = re.findall(r"cp_async_cg\w*\(tvm_builtin_cuda_cvta_generic_to_shared\(\(&\(qkv_smem_ptr\[(.*?)\]\)", body)
    assert len(q_copies) == 2 and all(x.endswith("(((int)threadIdx.x) * 8))") for x in q_copies), q_copies
    # the output staged in the group's half of the Q slot, then stored by one TMA store of the
    # group's 64 rows, or where that box is not the group's rows, 16 bytes a thread at a time
    # (64 rows of d / 8 chunks over the group's 128 threads), and stored nowhere else; the
    # store's reads waited for before the slot's next Q read-ahead and before the exit
    stores = consumers.count("tvm_builtin_ptx_st_vec_global_v4_b32(")
    assert stores == 64 * (d // 8) // 128 and consumers.count("out_ptr") == stores
    assert consumers.count("tvm_builtin_ptx_cp_async_bulk_tensor_s2g") == 1
    read_waits = [m.start() for m in re.finditer("async_bulk_wait_group_read_0", consumers)]
    assert len(read_waits) == 2 and read_waits[0] < consumers.index(q_landed) < read_waits[1]
    assert read_waits[1] > consumers.index("tvm_builtin_ptx_cp_async_bulk_tensor_s2g")
    threads, blocks = 32 * (warps + 4), 8 // warps
    assert f"__launch_bounds__({threads}, {blocks}) tiled_kernel" in src
    registers, spills = ptxas_usage(src, "tiled_kernel", H100)
    assert spills == 0 and registers <= 65536 // (threads * blocks), registers
    assert _stack_bytes(src) == 0
    assert wgmma_serialized(src, H100) == []
    assert nvcc_compile(src, H100)


def test_consumer_registers_take_only_what_the_producer_gives_back():
    """The consumers' ``setmaxnreg.inc`` asks for at most what the producer's ``.dec`` gave back
    to the thread block: each thread starts with the launch's registers (65536 / (blocks x
    threads), rounded down to 8), and an ``inc`` past the returned pool waits forever (most
    likely why a draft of the forty-fifth session, the producer at 32 registers and the consumers
    at 240, hung on the GPU). The most that fits, a multiple of 8; the forms' own figures: beside a
    producer of 24, two consumer warpgroups (launch 168) take 240, one (launch 128) 232, and the
    kernel asks for them."""
    for threads, blocks in ((256, 1), (128, 2)):
        launch = 65536 // blocks // (threads + 128) // 8 * 8
        for producer in (24, 32, 40, 56):
            consumer = consumer_registers(threads, blocks, producer)
            assert consumer % 8 == 0 and consumer <= WS_CONSUMER_REGS_MAX
            assert threads * (consumer - launch) <= 128 * (launch - producer)
            assert consumer == WS_CONSUMER_REGS_MAX or threads * (consumer + 8 - launch) > 128 * (launch - producer)
    assert (consumer_registers(256, 1, WS_PRODUCER_REGS), consumer_registers(128, 2, WS_PRODUCER_REGS)) == (240, 232)
    assert (consumer_registers(256, 1, 32), consumer_registers(128, 2, 32)) == (232, 224)  # not 240, 224
    for d, warps, consumer in ((128, 8, 240), (64, 4, 232)):
        body = _kernel_body(_persistent(d, warps, "bfloat16", 3)[1])
        assert f"setmaxnreg_inc_sync_aligned_u32_{consumer}()" in body
        assert f"setmaxnreg_dec_sync_aligned_u32_{WS_PRODUCER_REGS}()" in body


#: the forms whose V check the next test reads: head_dim and knobs (the persistent
#: warp-specialized form, the TMA form with one and two warpgroups, the cp.async wgmma form and
#: the mma.sync form)
V_CHECK_FORMS = {
    "ws_persistent": (64, dict(br=64, warps=4, bc=128, wgmma=True, tma=True, warp_specialized=True, persistent=3)),
    "tma": (64, dict(wgmma=True, tma=True)),
    "tma_two_warpgroups": (128, dict(br=128, warps=8, wgmma=True, tma=True)),
    "wgmma": (128, dict(wgmma=True, stages=2)),
    "mma": (64, dict(stages=2)),
}


def _window_source(d, dtype, knobs):
    """The CUDA source of the tiled family's plan of window +-300 (n=2048, 2 x 4 heads) under
    ``knobs`` (sm_90a for the wgmma forms)."""
    from tvm_splat.planner import plan
    from tvm_splat.schedules.targets import arch_specific

    made = plan(parse_pattern("window:300"), (2, 4, 2048, d), None, dtype, None, target=H100, variant="tiled",
                knobs=knobs)
    target = arch_specific(made.target) if knobs.wgmma else made.target
    return tvm.tirx.build(made.module(), target=target).imports[0].inspect_source()


@pytest.mark.parametrize("form", sorted(V_CHECK_FORMS))
@pytest.mark.parametrize("dtype,halves", [("bfloat16", "bf16x2"), ("float16", "f16x2")])
def test_v_check_is_packed_fmas_in_four_chains(dtype, halves, form, packed_fma_check):
    """Every tensor-core form checks a PARTIAL block's V by packed FMAs (x 0 + c, NaN exactly
    for a NaN or inf x) into four independent chains, each the i-th word of the thread's 16-byte
    chunks, joined without their sign bits (a finite x leaves a signed zero) before the flag is
    tagged; none of the integer test's exponent masks is left in the kernel."""
    d, over = V_CHECK_FORMS[form]
    src = _window_source(d, dtype, TiledKnobs(use_tensor_cores=True, **over))
    packed_fma_check(_kernel_body(src), halves)
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


def _tile_lengths(pattern, n, grid_heads):
    """The column blocks of each row tile ``[1, T]`` of the warp-specialized form's 128 x 128
    tile plan (one mask head)."""
    knobs = TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True, warp_specialized=True)
    return plan_tiles(ACSR.from_pattern(parse_pattern(pattern), n), knobs, grid_heads=grid_heads).tile_blocks


def _program_blocks(pattern, n, grid_heads, head_group=0):
    """Each program's column blocks, in the order of the kernel's programs
    (:func:`program_tile`, :func:`program_group`; :func:`head_group_tile` with a
    ``head_group``), one program at a time on Python ints."""
    lengths = _tile_lengths(pattern, n, grid_heads)[0]
    rows = len(lengths)
    if head_group:
        order = [head_group_tile(p, grid_heads, rows, head_group, int_select) for p in range(grid_heads * rows)]
    else:
        order = [program_tile(p, grid_heads, rows, program_group(grid_heads), int_select)
                 for p in range(grid_heads * rows)]
    return [int(lengths[t]) for _, t in order]


@pytest.mark.parametrize("pattern,n,grid_heads,head_group", [
    ("causal_window:4095", 8192, 32, 0), ("causal_window:4095", 8192, 32, 4), ("window:1024", 32768, 16, 1),
    ("window:1024", 8192, 6, 4), ("window:256", 4096, 64, 0), ("causal_strided:128", 8192, 5, 2)])
def test_program_blocks_and_block_loads_follow_the_programs_one_by_one(pattern, n, grid_heads, head_group):
    """``program_block_counts`` (numpy, for the planner) gives the column blocks of the programs in
    the order the kernel takes them (a short last run of heads; row tiles in groups on 64
    heads), and ``persistent_block_loads`` adds them up as the snake order hands them out,
    both as one program at a time on Python ints does."""
    expected = _program_blocks(pattern, n, grid_heads, head_group)
    made = program_block_counts(_tile_lengths(pattern, n, grid_heads), grid_heads, head_group)
    assert made.tolist() == expected
    for blocks in (132, 7):
        loads = [0] * blocks
        for it in range(-(-len(expected) // blocks)):
            for cta in range(blocks):
                program = persistent_program(it, cta, blocks, int_select)
                loads[cta] += expected[program] if program < len(expected) else 0
        assert persistent_block_loads(made, blocks) == loads
        assert busiest_block(_tile_lengths(pattern, n, grid_heads), grid_heads, head_group, blocks) == max(loads)
    assert persistent_block_loads([], 4) == [0, 0, 0, 0]


@pytest.mark.parametrize("programs,blocks", [(2048, 132), (7, 3), (5, 5), (3, 8), (133, 132)])
def test_persistent_programs_each_run_once(programs, blocks):
    """The snake order hands every program to exactly one thread block and round, each round's
    programs to all the blocks (the last round: those below the count)."""
    taken = [persistent_program(it, cta, blocks, int_select)
             for it in range(-(-programs // blocks)) for cta in range(blocks)]
    assert sorted(p for p in taken if p < programs) == list(range(programs))
    assert len(set(taken)) == len(taken)


def test_persistent_snake_order_balances_a_causal_plan():
    """Mistral's causal window (n=8192, 32 heads over 8 KV heads, d=128) on 132 thread blocks:
    the plan's programs are 1 to 33 column blocks long, longest first (32 heads: heads first);
    the snake order leaves the busiest block at the mean, 384 blocks (the round robin it
    replaced: 400)."""
    lengths = _program_blocks("causal_window:4095", 8192, 32)
    assert len(lengths) == 2048 and lengths == sorted(lengths, reverse=True)
    assert (min(lengths), max(lengths)) == (1, 33)
    loads = persistent_block_loads(lengths, 132)
    assert sum(loads) == sum(lengths) and max(loads) == sum(lengths) / 132 == 384
    round_robin = [sum(lengths[cta::132]) for cta in range(132)]
    assert max(round_robin) == 400


@pytest.mark.parametrize("grid_heads,grid_rows,group", [(12, 32, 16), (3, 7, 4), (5, 3, 16), (1, 9, 2), (4, 6, 1),
                                                       (256, 16, 16), (16, 256, 1 << 20), (384, 16, 16)])
def test_program_tile_walks_every_tile_once_a_group_of_rows_a_head_at_a_time(grid_heads, grid_rows, group):
    """Every (head, row tile) is one program's; the programs take the row tiles in groups of
    ``group`` (the plan's order, longest first), a head's tiles of a group one after another;
    group 1 is heads first, a group past the rows is rows first."""
    tiles = [program_tile(p, grid_heads, grid_rows, group, int_select) for p in range(grid_heads * grid_rows)]
    assert sorted(tiles) == [(h, t) for h in range(grid_heads) for t in range(grid_rows)]
    for p, (h, t) in enumerate(tiles):
        first = t // group * group
        rows = min(group, grid_rows - first)
        assert p == first * grid_heads + h * rows + t - first
    if group == 1:
        assert tiles == [(p % grid_heads, p // grid_heads) for p in range(len(tiles))]
    if group >= grid_rows:
        assert tiles == [(p // grid_rows, p % grid_rows) for p in range(len(tiles))]


def test_program_group_keeps_heads_first_below_the_measured_threshold():
    """Groups only where the grid has many heads (the H100 A/B: faster from 64 on, slower on
    Mistral's 32 and window +-1024's 16 heads)."""
    assert program_group(GROUPED_MIN_HEADS - 1) == 1 and program_group(32) == 1
    assert program_group(GROUPED_MIN_HEADS) == PROGRAM_ROW_GROUP == program_group(384)


def test_grouped_programs_build_for_a_union_plan():
    """Causal strided 128 at n=8192, d=128, batch 4 (64 heads: grouped programs) in its mma
    form builds for sm_90a: with the groups' rows divided by their runtime minimum, TVM's build
    failed there on an int32 literal of 2**31."""
    from tvm_splat.planner import plan
    from tvm_splat.schedules.targets import arch_specific, as_target

    target = arch_specific(as_target(H100))
    made = plan("causal_strided:128", (4, 16, 8192, 128), None, "bfloat16", None, target=target)
    assert program_group(4 * 16) > 1 and made.tile_plan.shape.num_components == 2
    assert "tiled_kernel" in tvm.tirx.build(made.module(), target=target).imports[0].inspect_source()


@pytest.mark.parametrize("grid_heads,grid_rows,head_group", [(16, 256, 4), (16, 256, 1), (5, 7, 2), (7, 3, 3),
                                                            (4, 6, 4), (4, 6, 9), (32, 64, 4)])
def test_head_group_tile_walks_every_tile_once_a_run_of_heads_at_a_time(grid_heads, grid_rows, head_group):
    """Every (head, row tile) is one program's; the programs take runs of ``head_group`` heads
    (the last run: the heads left), all of a run's row tiles before the next run, heads first
    within it; a run of every head (or more) is heads first, :func:`program_tile` with group 1."""
    tiles = [head_group_tile(p, grid_heads, grid_rows, head_group, int_select)
             for p in range(grid_heads * grid_rows)]
    assert sorted(tiles) == [(h, t) for h in range(grid_heads) for t in range(grid_rows)]
    for p, (h, t) in enumerate(tiles):
        first = h // head_group * head_group
        heads = min(head_group, grid_heads - first)
        assert p == first * grid_rows + t * heads + h - first
    if head_group >= grid_heads:
        assert tiles == [program_tile(p, grid_heads, grid_rows, 1, int_select) for p in range(len(tiles))]


@pytest.mark.parametrize("mapping,grid_heads,grid_rows,group", [(program_tile, 5, 13, 4), (head_group_tile, 7, 5, 3)],
                         ids=["row_groups", "head_runs"])
def test_program_mappings_in_tir_are_the_python_mappings(mapping, grid_heads, grid_rows, group):
    """The expressions the kernels evaluate (``T.if_then_else``, int32 divisions by constants),
    built for the CPU, give the same tiles as the Python mappings: :func:`program_tile` with a
    last group short of rows, :func:`head_group_tile` with a last run short of heads."""
    @T.prim_func(s_tir=True)
    def tiles_of(out: T.Buffer((grid_heads * grid_rows, 2), "int32")):
        for p in range(grid_heads * grid_rows):
            out[p, 0] = mapping(p, grid_heads, grid_rows, group)[0]
            out[p, 1] = mapping(p, grid_heads, grid_rows, group)[1]

    lib = tvm.tirx.build(tiles_of, target="llvm")
    out = tvm.runtime.tensor(np.zeros((grid_heads * grid_rows, 2), "int32"))
    lib(out)
    assert [tuple(t) for t in out.numpy().tolist()] == [mapping(p, grid_heads, grid_rows, group, int_select)
                                                        for p in range(grid_heads * grid_rows)]


def test_head_group_orders_the_persistent_form_and_nothing_else():
    """``head_group`` changes the programs' (head, tile) arithmetic only: with 0 the source is
    the default order's; with 4 it differs, and both build for sm_90a without spilling, at the
    same registers."""
    acsr = ACSR.from_pattern(Window(300), 2048)
    knobs = TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True, warp_specialized=True)
    shape = plan_tiles(acsr, knobs).shape
    spec = AttentionSpec.from_acsr(acsr, 2, 8, 128, "bfloat16")
    sources = {}
    for head_group in (None, 0, 4):
        extra = {} if head_group is None else {"head_group": head_group}
        func = tiled_mma_func(spec, shape, 8, 1, 2, wgmma=True, tma=True, warp_specialized=True, persistent=7,
                              **extra).with_attr("global_symbol", "tiled")
        sources[head_group] = tvm.tirx.build(tvm.IRModule({"tiled": func}), target=H100).imports[0].inspect_source()
    assert sources[0] == sources[None] != sources[4]
    (registers, spilled), (registers_4, spilled_4) = (ptxas_usage(sources[g], "tiled_kernel", H100) for g in (0, 4))
    assert spilled == spilled_4 == 0 and registers == registers_4
    with pytest.raises(ValueError, match="head_group is a number of heads"):
        tiled_mma_func(spec, shape, 8, 1, 2, wgmma=True, tma=True, warp_specialized=True, head_group=-1)


def _copies(body, family):
    """``(unhinted, hinted)`` calls of a copy family's PTX helpers in a kernel body."""
    calls = re.findall(rf"tvm_builtin_ptx_{family}\w*\(", body)
    return sum("L2__cache_hint" not in c for c in calls), sum("L2__cache_hint" in c for c in calls)


@pytest.mark.parametrize("persistent", [7, 0])
def test_l2_hints_change_only_the_copies_hints(persistent):
    """``kv_evict_last`` and ``out_evict_first`` (L2 cache hints): off, the source is the one
    without the parameters; on, every K/V tensor copy (``evict_last``), or the persistent form's
    TMA store of O (``evict_first``), takes the ``.L2::cache_hint`` form with a ``createpolicy``
    of its own, and no other copy changes (Q's ``cp.async`` never takes one: ptxas 13.0
    miscompiles it); every form builds for sm_90a at the unhinted registers and spill. Refused
    where the hinted copy is not made, or as non-bools."""
    acsr = ACSR.from_pattern(Window(300), 2048)
    knobs = TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True, tma=True, warp_specialized=True)
    shape = plan_tiles(acsr, knobs).shape
    spec = AttentionSpec.from_acsr(acsr, 2, 8, 128, "bfloat16")
    hint_sets = [None, (False, False), (True, False)] + ([(False, True)] if persistent else [])
    sources = {}
    for hints in hint_sets:
        extra = {} if hints is None else {"kv_evict_last": hints[0], "out_evict_first": hints[1]}
        func = tiled_mma_func(spec, shape, 8, 1, 2, wgmma=True, tma=True, warp_specialized=True,
                              persistent=persistent, **extra).with_attr("global_symbol", "tiled")
        sources[hints] = tvm.tirx.build(tvm.IRModule({"tiled": func}), target=H100).imports[0].inspect_source()
    assert sources[None] == sources[False, False] and "cache_hint" not in sources[None]
    families = ("cp_async_bulk_tensor_g2s", "cp_async_bulk_tensor_s2g", "cp_async_cg")
    plain = {family: _copies(_kernel_body(sources[None]), family) for family in families}
    assert plain["cp_async_bulk_tensor_g2s"][0] > 0 and plain["cp_async_cg"][0] > 0
    assert plain["cp_async_bulk_tensor_s2g"][0] == (1 if persistent else 0)  # the staged O store
    usage = ptxas_usage(sources[None], "tiled_kernel", H100)
    hinted = {(True, False): ("cp_async_bulk_tensor_g2s", "evict_last"),
              (False, True): ("cp_async_bulk_tensor_s2g", "evict_first")}
    for hints in hint_sets[2:]:
        hinted_family, priority = hinted[hints]
        body = _kernel_body(sources[hints])
        for family in families:
            unhinted = plain[family][0]
            assert _copies(body, family) == ((0, unhinted) if family == hinted_family else (unhinted, 0)), family
        policies = re.findall(r"tvm_builtin_ptx_createpolicy_fractional_\w*\(", body)
        assert len(policies) == plain[hinted_family][0] and all(f"L2__{priority}" in p for p in policies)
        assert ptxas_usage(sources[hints], "tiled_kernel", H100) == usage
    cp_async_shape = plan_tiles(acsr, TiledKnobs(use_tensor_cores=True, br=128, bc=128, warps=8, wgmma=True)).shape
    with pytest.raises(ValueError, match="kv_evict_last is an L2 hint of the TMA forms' K/V copies"):
        tiled_mma_func(spec, cp_async_shape, 8, 1, 2, wgmma=True, kv_evict_last=True)
    with pytest.raises(ValueError, match="out_evict_first is an L2 hint of the persistent form's TMA store"):
        tiled_mma_func(spec, shape, 8, 1, 2, wgmma=True, tma=True, warp_specialized=True, out_evict_first=True)
    for name in ("kv_evict_last", "out_evict_first"):
        with pytest.raises(ValueError, match=f"{name} must be a bool"):
            tiled_mma_func(spec, shape, 8, 1, 2, wgmma=True, tma=True, **{name: 1})


def test_create_l2_policy_names_its_priority():
    """:func:`create_l2_policy` takes the two priorities the copies hint and names the others."""
    with pytest.raises(ValueError, match="an L2 priority is one of"):
        create_l2_policy(None, "evict_normal")


def _column_bits_func(n_slots, segments, ntl):
    """A CPU function of :func:`row_column_bits`: ``out[r]`` the word of row slot ``r`` from
    ``rng`` (``block_ranges``' layout) for the thread of lane ``lane[0]``."""
    @T.prim_func(s_tir=True)
    def bits(rng: T.Buffer((2 * n_slots * segments,), "int32"), lane: T.Buffer((1,), "int32"),
             out: T.Buffer((n_slots,), "uint32")):
        for r in range(n_slots):
            out[r] = row_column_bits(rng, r, lane[0], segments, ntl)

    return tvm.tirx.build(bits, target="llvm")


@pytest.mark.parametrize("segments,ntl", [(1, 16), (2, 16), (3, 8), (2, 2)])
def test_row_column_bits_hold_exactly_the_columns_in_the_ranges(segments, ntl):
    """The mask of the warp-level kernels' PARTIAL blocks, one word a row slot: bit ``k`` is set
    exactly where the thread's ``k``-th column of the row, ``8 (k // 2) + 2 (lane % 4) + k %
    2``, lies in one of the slot's block ranges, for every lane residue, ranges anywhere in and
    around the block (cut at either edge, past it, empty as ``1 .. 0``, overlapping), one to
    three segments, 4 to 32 columns a thread. Compiled by TVM for the CPU and run, the
    expression the kernels use."""
    rng_gen = np.random.default_rng(7 + segments * 100 + ntl)
    bc = 8 * ntl
    ends = np.arange(-3, bc + 3)
    slots = 64
    func = _column_bits_func(slots, segments, ntl)
    for lane in range(8):
        rng = rng_gen.choice(ends, size=(slots, segments, 2)).astype("int32")
        rng[::5, 0] = (1, 0)  # empty ranges
        out = tvm.runtime.tensor(np.zeros(slots, "uint32"))
        func(tvm.runtime.tensor(rng.reshape(-1)), tvm.runtime.tensor(np.array([lane], "int32")), out)
        columns = np.array([8 * (k // 2) + 2 * (lane % 4) + k % 2 for k in range(2 * ntl)])
        inside = ((columns[None, None, :] >= rng[:, :, :1]) & (columns[None, None, :] <= rng[:, :, 1:])).any(axis=1)
        expected = (inside * (1 << np.arange(2 * ntl, dtype=np.uint64))).sum(axis=1).astype("uint32")
        np.testing.assert_array_equal(out.numpy(), expected)
