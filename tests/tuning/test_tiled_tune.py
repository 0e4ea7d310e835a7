"""Tuning the tiled kernel's knobs on the CPU: every plan measured, the best knobs recorded,
picked up by ``sparse_attention`` for the same workload, results still correct."""
import json

import numpy as np
import pytest

from tvm_splat.formats import ACSR, Window
from tvm_splat.kernels import AttentionSpec
from tvm_splat.reference import masked_attention
from tvm_splat.planner import plan
from tvm_splat.records import best_knobs_path, tuned_tiled_knobs
from tvm_splat.tuning.tiled import schedule_choices, tune_tiled


@pytest.fixture
def log_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    return tmp_path


def test_tiled_tuning_records_best_knobs_and_they_are_used(log_root, rng):
    from tvm_splat import sparse_attention

    from tvm_splat import attention

    acsr = ACSR.from_pattern(Window(5), 50)
    res = tune_tiled(plan(acsr, (1, 2, 50, 8), None, "float32", None, target="llvm"), plans=((16, 16), (32, 16)))
    assert set(res.best_us) == {"tiled_16x16", "tiled_32x16"}
    assert all(us > 0 for us in res.best_us.values())
    spec = AttentionSpec.from_acsr(acsr, 1, 2, 8, "float32")
    path = best_knobs_path(spec, "llvm")
    best = json.loads(path.read_text())
    assert best["us"] == pytest.approx(min(res.best_us.values()))
    knobs = tuned_tiled_knobs(spec, "llvm")
    assert (knobs.br, knobs.bc) in ((16, 16), (32, 16))

    q, k, v = (rng.standard_normal((1, 2, 50, 8)).astype("float32") for _ in range(3))
    out = sparse_attention(q, k, v, acsr, target="llvm", variant="tiled")
    np.testing.assert_allclose(out, masked_attention(q, k, v, acsr.to_dense()[0]), atol=1e-4)
    used = attention.plan_for(q, k, v, acsr, target="llvm", variant="tiled")
    assert used.knobs_source == "tuned" and used.knobs == knobs  # the tuned knobs were used


def test_schedule_choices_are_valid_for_the_gpu():
    import tvm

    from tvm_splat.schedules.tiled import TiledKnobs

    choices = schedule_choices(TiledKnobs(br=64, bc=64, use_tensor_cores=True), tvm.target.Target("nvidia/nvidia-h100"))
    assert len(choices) > 1
    assert all((c.br // 16) % c.warps == 0 for c in choices)
    assert len({(c.warps, c.vector_bytes, c.row_pad) for c in choices}) == len(choices)


def test_mma_programs_and_batches_for_the_gpu():
    """On the GPU in fp16 every (warps, stages) giving ``br`` rows is its own task; tasks whose
    argument shapes coincide but whose plan tables differ never share a tuning run."""
    import tvm

    from tvm_splat.schedules.tiled import TiledKnobs
    from tvm_splat.tuning.tiled import _batches, program_choices

    h100 = tvm.target.Target("nvidia/nvidia-h100")
    acsr = ACSR.from_pattern(Window(16), 256)
    spec = AttentionSpec.from_acsr(acsr, 1, 2, 64, "float16")
    groups = program_choices(TiledKnobs(br=64, bc=64, use_tensor_cores=True), spec, h100, m_tiles=(1, 2))
    assert sorted((g[0].warps, g[0].m_tiles, g[0].stages, g[0].wgmma) for g in groups) == [
        (2, 2, 1, False), (2, 2, 2, False), (4, 1, 1, False), (4, 1, 1, True), (4, 1, 2, False), (4, 1, 2, True)]
    with_tma = program_choices(TiledKnobs(br=64, bc=64, use_tensor_cores=True), spec, h100, tma_steps=True)
    assert [(g[0].stages, g[0].tma) for g in with_tma if g[0].wgmma] == [(1, False), (2, False), (2, True)]
    assert not any(g[0].tma for g in program_choices(TiledKnobs(br=64, bc=64, use_tensor_cores=True), spec, h100,
                                                     stages=(1,), tma_steps=True))  # TMA is two-stage
    spec96 = AttentionSpec.from_acsr(acsr, 1, 2, 96, "float16")  # not a multiple of 64: no TMA
    assert not any(g[0].tma for g in program_choices(TiledKnobs(br=64, bc=64, use_tensor_cores=True), spec96, h100,
                                                     tma_steps=True))
    sm80 = tvm.target.Target("nvidia/nvidia-a100")  # no wgmma before Hopper
    assert not any(g[0].wgmma for g in program_choices(TiledKnobs(br=64, bc=64, use_tensor_cores=True), spec, sm80))
    assert all(len(g) == 1 for g in groups)
    cpu = program_choices(TiledKnobs(br=64, bc=64), AttentionSpec.from_acsr(acsr, 1, 2, 64, "float32"),
                          tvm.target.Target("llvm"))
    assert len(cpu) == 1  # one program, its schedule variants in one design space

    a, b = np.arange(6, dtype=np.int32), np.arange(6, dtype=np.int32)[::-1].copy()

    import tvm_splat.tuning.tiled as tt

    sigs = {"p": (("int32", (6,)),), "q": (("int32", (6,)),), "r": (("int32", (6,)),)}
    orig = tt._signature
    tt._signature = lambda f: sigs[f.name]  # stand-ins for PrimFuncs: only names and shapes matter
    try:
        tasks = {n: (type("F", (), {"name": n})(), ["k"], [arr]) for n, arr in (("p", a), ("q", b), ("r", a.copy()))}
        batches = _batches(tasks)
    finally:
        tt._signature = orig
    assert [sorted(bt["tasks"]) for bt in batches] == [["p", "r"], ["q"]]


def test_the_tuners_builder_builds_the_tma_program():
    """The TMA task of a Hopper tuning run builds through the tuner's own build function (host
    tensor-map encoding and all) and nvcc takes its source."""
    import tvm

    from tvm_splat.compile import cuda_source, nvcc_compile
    from tvm_splat.planner import plan
    from tvm_splat.schedules.tiled import TiledKnobs, tiled_funcs
    from tvm_splat.schedules.tiled import tiled_program_name
    from tvm_splat.tuning.tiled import program_choices
    from tvm_splat.tuning.tune import build_kernel

    h100 = tvm.target.Target("nvidia/nvidia-h100")
    made = plan(Window(24), (1, 2, 200, 64), None, "float16", None, target=h100,
                knobs=TiledKnobs(br=64, bc=64, use_tensor_cores=True))
    (tma,) = [g[0] for g in program_choices(made.knobs, made.spec, h100, tma_steps=True) if g[0].tma]
    name = tiled_program_name(tma, True)
    assert tma.fold_scale and name.endswith("_s2_wg_tma_fs")  # d=64: the measured variant
    func = tiled_funcs(made.spec, made.tile_plan.shape, tma, h100)["tiled"].with_attr("global_symbol", name)
    src = cuda_source(build_kernel(tvm.IRModule({name: func}), h100))
    assert "cp.async.bulk.tensor" in src and "wgmma.mma_async" in src
    assert nvcc_compile(src, h100)


@pytest.mark.parametrize("n,tma", [(256, True), (257, False)])
def test_the_tuning_space_holds_the_tma_form_of_dilated_masks_where_a_tensor_map_loads_them(n, tma, log_root):
    """On sm_90a the tiled tuning space of a dilated mask holds the TMA programs (a 5-D tensor
    map of the step) exactly where the step divides n, as the default rule takes them; the
    mma and cp.async wgmma programs stay in it either way."""
    import tvm

    from tvm_splat.tuning.tiled import tiled_tasks

    h100 = tvm.target.Target("nvidia/nvidia-h100")
    workload = plan("dilated:16:2", (1, 2, n, 64), None, "float16", None, target=h100)
    tasks = tiled_tasks(workload, h100, plans=((64, 64),))
    assert any(name.endswith("_s2_wg") for name in tasks) and any(not name.endswith(("_wg", "_wg_tma")) for name in tasks)
    assert any(name.endswith("_wg_tma_fs") for name in tasks) == tma  # d=64: with fold_scale
    assert workload.knobs.tma == tma  # the untuned default agrees


@pytest.mark.parametrize("d,n,warp_specialized", [(128, 256, True), (128, 257, False), (64, 256, False)])
def test_the_tuning_space_holds_the_warp_specialized_program_on_its_own_plan(d, n, warp_specialized, log_root):
    """On sm_90a, at head_dim >= 128, the tuning space holds the warp-specialized TMA program, on
    the 128x128 plan and alone there, where a tensor map loads the plan's blocks (a dilated
    mask: n a multiple of the step); never at d=64 (it lost on every shape measured)."""
    import tvm

    from tvm_splat.schedules.tiled import program_form
    from tvm_splat.tuning.tiled import WARP_SPECIALIZED_PLAN, tiled_tasks

    h100 = tvm.target.Target("nvidia/nvidia-h100")
    workload = plan("dilated:16:2", (1, 2, n, d), None, "float16", None, target=h100)
    tasks = tiled_tasks(workload, h100)
    ws = [name for name in tasks if program_form(name) == "wg_tma_ws"]
    assert ws == (["tiled_128x128_w8_m1_s2_wg_tma_ws_er"] if warp_specialized else [])  # with early_rescale
    br, bc = WARP_SPECIALIZED_PLAN
    assert [name for name in tasks if name.startswith(f"tiled_{br}x{bc}_")] == ws


def test_programs_made_in_worker_processes_equal_those_made_here(log_root):
    """The tuning space's PrimFuncs, parsed by worker processes and sent back as TVM JSON, are
    those parsed here, program for program (sm_90a: the mma, cp.async wgmma and TMA programs of a
    dilated mask at d=64 on two plans)."""
    import tvm

    from tvm_splat.tuning.tiled import tiled_tasks

    h100 = tvm.target.Target("nvidia/nvidia-h100")
    workload = plan("dilated:16:2", (1, 2, 256, 64), None, "float16", None, target=h100)
    here = tiled_tasks(workload, h100, plans=((64, 64), (128, 64)), workers=1)
    there = tiled_tasks(workload, h100, plans=((64, 64), (128, 64)), workers=2)
    assert list(here) == list(there) and len(here) >= 4
    for name in here:
        tvm.ir.assert_structural_equal(here[name][0], there[name][0])
        assert here[name][1] == there[name][1]


def test_enumerated_tuning_builds_all_candidates_at_once_and_resumes(log_root, monkeypatch):
    """The tiled space is enumerated: every candidate of a tuning batch goes to the builder in
    one call (its workers build them in parallel; MetaSchedule's task scheduler sent one task's
    candidates at a time, one apiece for the mma programs), and a second run measures nothing
    already in the database: the run keeps each task's best record (``prune_database``), so it
    measures again only the others (a program of the GPU's mma space is a task of one
    candidate: nothing)."""
    import tvm_splat.tuning.tiled as tt

    calls = []
    real = tt.local_builder

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def build(self, inputs):
            calls.append(len(inputs))
            return self.inner.build(inputs)

    monkeypatch.setattr(tt, "local_builder", lambda *a, **k: Counting(real(*a, **k)))
    acsr = ACSR.from_pattern(Window(5), 50)
    workload = plan(acsr, (1, 2, 50, 8), None, "float32", None, target="llvm")
    first = tune_tiled(workload, plans=((16, 16), (32, 16)))
    tasks = tt.tiled_tasks(workload, tt.tuning_target("llvm"), ((16, 16), (32, 16)))
    candidates = sum(len(choices) for _, choices, _ in tasks.values())
    assert len(calls) == len(tt._batches(tasks)) and sum(calls) == candidates > len(tasks)
    calls.clear()
    second = tune_tiled(workload, plans=((16, 16), (32, 16)))
    assert calls == [candidates - len(tasks)] and set(second.best_us) == set(first.best_us)
