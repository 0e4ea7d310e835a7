"""plan → run: what a plan decides once, how it runs, and that every entry point goes through it."""
import dataclasses
import numpy as np
import pytest
import tvm

from tvm_splat import ACSR, Window, plan, parse_pattern
from tvm_splat.planner import Step, choose_knobs
from tvm_splat.reference import masked_attention
from tvm_splat.schedules.row import RowKnobs
from tvm_splat.schedules.tiled import TiledKnobs

H100 = "nvidia/nvidia-h100"


def test_plan_holds_its_decisions_as_data():
    made = plan("global:2+strided:8", (2, 4, 64, 16), (2, 2, 64, 16), "float16", None, target=H100)
    assert made.variant == "tiled" and made.knobs_source == "default" and made.knobs.use_tensor_cores
    assert made.spec.kv_heads == 2 and made.spec.group == 2
    assert made.tile_plan.shape.num_components == 2  # the strided part is a second row grouping
    assert [s.kernel for s in made.steps] == ["tiled", "merge"]
    assert set(made.tables) == {"seg_start", "seg_count", "seg_sigma", "tiles", "blocks", "num_comp"}
    assert all(a.dtype == np.int32 for a in made.tables.values())
    assert made.scratch["o_part"][0] == (2 * 4, 2, 64, 16)
    assert sorted(gv.name_hint for gv in made.module().functions) == ["merge", "tiled"]
    with pytest.raises(ValueError, match="without a device"):
        made.run(*(np.zeros((2, 4, 64, 16), "float16") for _ in range(3)))


def test_steps_name_every_buffer_of_their_kernels():
    """The launch steps wire each kernel parameter by name: what the runtime and the Relax
    rewrite both execute."""
    mask = np.random.default_rng(0).random((40, 40)) < 0.2
    for variant in ("tiled", "row", "separate"):
        made = plan(ACSR.from_mask(mask, max_segments=2), (1, 2, 40, 8), None, "float32", "cpu", variant=variant)
        funcs = {gv.name_hint: f for gv, f in made.module().functions.items()}
        assert set(funcs) == {s.kernel for s in made.steps}
        for step in made.steps:
            assert tuple(p.name for p in funcs[step.kernel].params) == step.args
            assert set(step.outputs) <= set(step.args)
    assert Step("f", ("a", "out"), ("out",), inplace=True).inputs == ("a", "out")
    assert Step("f", ("a", "out"), ("out",)).inputs == ("a",)


@pytest.mark.parametrize("variant", ["tiled", "row", "separate"])
def test_run_numpy_and_torch(variant, rng):
    torch = pytest.importorskip("torch")
    made = plan("global:1+window:4", (2, 2, 30, 8), None, "float32", "cpu", variant=variant)
    q, k, v = (rng.standard_normal((2, 2, 30, 8)).astype("float32") for _ in range(3))
    ref = masked_attention(q, k, v, parse_pattern("global:1+window:4").dense_mask(30))
    np.testing.assert_allclose(made.run(q, k, v), ref, atol=1e-4)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    np.testing.assert_allclose(made.run(tq, tk, tv).numpy(), ref, atol=1e-4)
    with pytest.raises(ValueError, match="this plan expects"):
        made.run(q[:, :1], k, v)
    with pytest.raises(ValueError, match="dtype"):
        made.run(q.astype("float16"), k, v)
    with pytest.raises(TypeError, match="all be torch tensors or all numpy"):
        made.run(tq, k, v)


def test_knob_choice_is_one_decision(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    made = plan(Window(3), (1, 2, 32, 8), None, "float32", "cpu", variant="tiled")
    assert made.knobs_source == "default"
    given = TiledKnobs(br=16, bc=16)
    assert choose_knobs(made.spec, made.target, "tiled", given) == (given, "given")
    assert choose_knobs(made.spec, made.target, "row", None) == (None, "records")
    with pytest.raises(ValueError, match="must be TiledKnobs"):
        choose_knobs(made.spec, made.target, "tiled", RowKnobs())
    with pytest.raises(ValueError, match="must be RowKnobs"):
        plan(Window(3), (1, 2, 32, 8), None, "float32", "cpu", variant="row", knobs=given)
    # a record for this workload is picked up
    from tvm_splat.records import best_knobs_path

    path = best_knobs_path(made.spec, made.target)
    path.parent.mkdir(parents=True)
    path.write_text('{"knobs": {"br": 32, "bc": 16, "warps": 2, "tc_kernel": "mma"}, "us": 1.0}')
    again = plan(Window(3), (1, 2, 32, 8), None, "float32", "cpu", variant="tiled")
    assert again.knobs_source == "tuned" and (again.knobs.br, again.knobs.bc) == (32, 16)


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="q_shape must be"):
        plan(Window(1), (4, 8), None, "float32", "cpu")
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        plan(Window(1), (1, 4, 8, 8), (1, 3, 8, 8), "float32", "cpu")
    with pytest.raises(ValueError, match="q's batch, n and head_dim"):
        plan(Window(1), (1, 4, 8, 8), (1, 4, 9, 8), "float32", "cpu")
    with pytest.raises(ValueError, match="unsupported dtype"):
        plan(Window(1), (1, 4, 8, 8), None, "int8", "cpu")
    with pytest.raises(ValueError, match="scale must be"):
        plan(Window(1), (1, 4, 8, 8), None, "float32", "cpu", scale=float("nan"))
    with pytest.raises(ValueError, match="scale must be"):
        plan(Window(1), (1, 4, 8, 8), None, "float32", "cpu", scale="0.25")
    with pytest.raises(ValueError, match="does not match the device"):
        plan(Window(1), (1, 4, 8, 8), None, "float32", "cpu", target=H100)
    with pytest.raises(ValueError, match="unsupported device"):
        plan(Window(1), (1, 4, 8, 8), None, "float32", "tpu")


def test_cache_key_follows_the_generated_code(tmp_path, monkeypatch):
    """A compiled library is found again only while the code that generated it is unchanged."""
    import tvm_splat.compile as c

    monkeypatch.setenv("TVM_SPLAT_CACHE_DIR", str(tmp_path))
    made = plan(Window(2), (1, 1, 12, 4), None, "float32", "cpu", variant="tiled")
    monkeypatch.setattr(c, "_LIBRARIES", {})
    made.compiled()
    monkeypatch.setattr(c, "code_fingerprint", lambda: "another kernel source")
    monkeypatch.setattr(c, "_LIBRARIES", {})
    made.compiled()
    assert len(list(tmp_path.glob("*.so"))) == 2


def test_hopper_default_keeps_mma_for_multi_component_plans(tmp_path, monkeypatch):
    """The wgmma form is the d=128 default on sm_90a only where the tile plan has one component;
    a union merged after the tiles (causal strided) keeps the 64-row mma tiles."""
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    from tvm_splat.formats import Strided
    from tvm_splat.formats.tile_plan import plan_tiles
    from tvm_splat.planner import default_knobs

    h100 = "nvidia/nvidia-h100"
    shape = (1, 2, 512, 128)
    window = plan(Window(64), shape, None, "float16", None, target=h100)
    assert window.knobs_source == "default" and window.knobs.wgmma and window.knobs.br == 128
    strided = Strided(32, causal=True)
    union = plan(strided, shape, None, "float16", None, target=h100)
    wgmma_plan = plan_tiles(union.acsr, dataclasses.replace(union.knobs, br=128, warps=8, wgmma=True))
    assert wgmma_plan.shape.num_components > 1                  # what the rule reads
    assert union.knobs_source == "default" and not union.knobs.wgmma and union.knobs.br == 64
    assert default_knobs(union.spec, union.target, union.acsr) == union.knobs
    assert default_knobs(union.spec, union.target) != union.knobs  # without the ACSR: spec alone


@pytest.mark.parametrize("pattern,d,expected,n", [
    (Window(64), 128, dict(wgmma=True, tma=True, br=128, warps=8, stages=2), 384),    # the A/B's window
    (Window(64), 64, dict(wgmma=True, tma=True, br=64, warps=4, stages=2), 384),      # one warpgroup at d=64
    ("global:4+window:32", 64, dict(wgmma=True, tma=True, br=64), 384),              # global tokens: step 1 too
    ("dilated:32:2", 128, dict(wgmma=True, tma=True, br=128, warps=8), 384),         # one step 2: a 5-D map
    ("dilated:32:3", 64, dict(wgmma=True, tma=True, br=64, warps=4), 384),           # ... at d=64 (384 = 3 x 128)
    ("dilated:32:2", 128, dict(wgmma=False, tma=False, br=64), 385),                 # n not a multiple: mma
    ("dilated:32:2", 64, dict(wgmma=False, tma=False, br=64), 385),                  # (cp.async wgmma lost 8-29%)
    ("window:32", 160, dict(wgmma=True, tma=False, br=128), 384),                    # step 1, no TMA (d % 64): wgmma
    ("window:32", 96, dict(wgmma=False, tma=False, br=64), 384),                     # d not a multiple of 64
])
def test_hopper_default_takes_tma_where_the_plan_allows(pattern, d, expected, n, tmp_path, monkeypatch):
    """On sm_90a the untuned default is the TMA form exactly where it runs: one component,
    column blocks of one step that a tensor map loads (1, or a dilation dividing n; read off
    the tile plan), head_dim a multiple of 64; else, with blocks of step 1, the wgmma form from
    d=128; else mma. Without the ACSR the rule never guesses TMA."""
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    from tvm_splat.planner import default_knobs

    made = plan(pattern, (1, 2, n, d), None, "bfloat16", None, target=H100)
    assert made.knobs_source == "default"
    assert {k: getattr(made.knobs, k) for k in expected} == expected
    step = made.tile_plan.shape.step
    assert not made.knobs.tma or (step >= 1 and n % step == 0)
    assert not default_knobs(made.spec, made.target).tma
    sm80 = plan(pattern, (1, 2, n, d), None, "bfloat16", None, target="nvidia/nvidia-a100")
    assert not sm80.knobs.wgmma and not sm80.knobs.tma


def test_a_record_that_never_measured_the_default_program_is_stale(tmp_path, monkeypatch):
    """A tuning record is used only when its search measured a program of the form the workload
    runs untuned: one tuned before the TMA form existed never compared its winner with it."""
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    import json

    from tvm_splat.records import best_knobs_path
    from tvm_splat.schedules.tiled import program_form, tiled_form, tiled_program_name

    shape = (1, 2, 384, 64)
    untuned = plan(Window(40), shape, None, "float16", None, target=H100)
    assert untuned.knobs_source == "default" and untuned.knobs.tma
    default_name = tiled_program_name(untuned.knobs, True)
    assert default_name == "tiled_64x64_w4_m1_s2_wg_tma_fs"  # d=64: fold_scale, its measured variant
    assert program_form(default_name) == tiled_form(untuned.knobs) == "wg_tma"
    path = best_knobs_path(untuned.spec, untuned.target)
    path.parent.mkdir(parents=True)
    knobs = {"br": 32, "bc": 32, "warps": 2, "use_tensor_cores": True, "stages": 1}
    path.write_text(json.dumps({"knobs": knobs, "us": 9.0, "programs_us": {"tiled_32x32_w2_m1_s1": 9.0}}))
    stale = plan(Window(40), shape, None, "float16", None, target=H100)
    assert stale.knobs_source == "default" and stale.knobs == untuned.knobs
    other_tma = "tiled_128x64_w8_m1_s2_wg_tma"  # the form was searched (in another plan): the record stands
    path.write_text(json.dumps({"knobs": knobs, "us": 9.0,
                                "programs_us": {"tiled_32x32_w2_m1_s1": 9.0, other_tma: 11.0}}))
    tuned = plan(Window(40), shape, None, "float16", None, target=H100)
    assert tuned.knobs_source == "tuned" and (tuned.knobs.br, tuned.knobs.bc, tuned.knobs.tma) == (32, 32, False)
    path.write_text(json.dumps({"knobs": knobs, "us": 9.0}))  # no programs listed: cannot tell, kept
    assert plan(Window(40), shape, None, "float16", None, target=H100).knobs_source == "tuned"


def test_a_record_that_beat_the_default_program_by_less_than_the_margin_keeps_the_default(tmp_path, monkeypatch):
    """A record whose winner, another program, measured less than ``TUNED_MIN_GAIN`` faster
    than the default program is not taken (the tuner times the tiled kernel alone and one
    program's time moves by 1-2%); one that beat it by more is, one whose winner is the default
    program itself, and one that never measured that program."""
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    import json

    from tvm_splat.records import TUNED_MIN_GAIN, best_knobs_path
    from tvm_splat.schedules.tiled import TiledKnobs, tiled_program_name

    shape = (1, 2, 384, 64)
    untuned = plan(Window(40), shape, None, "float16", None, target=H100)
    default_name = tiled_program_name(untuned.knobs, True)
    path = best_knobs_path(untuned.spec, untuned.target)
    path.parent.mkdir(parents=True)
    knobs = {"br": 32, "bc": 32, "warps": 2, "use_tensor_cores": True, "stages": 2}

    def planned_with(best_us, default_us):
        path.write_text(json.dumps({"knobs": knobs, "us": best_us, "programs_us": {
            "tiled_32x32_w2_m1_s2": best_us, default_name: default_us, "tiled_128x64_w8_m1_s2_wg_tma": 99.0}}))
        return plan(Window(40), shape, None, "float16", None, target=H100)

    near = planned_with(26.1, 26.3)  # the models suite's global 64 + block 64 + window 32 record
    assert near.knobs_source == "default" and near.knobs == untuned.knobs
    edge = planned_with(100.0 * (1 - TUNED_MIN_GAIN) + 0.01, 100.0)
    assert edge.knobs_source == "default"
    clear = planned_with(158.6, 184.0)  # causal strided 128, d=128
    assert clear.knobs_source == "tuned" and (clear.knobs.br, clear.knobs.bc, clear.knobs.tma) == (32, 32, False)
    same = dict(knobs, br=64, bc=64, warps=4, wgmma=True, tma=True, fold_scale=True)  # the default program won
    assert tiled_program_name(TiledKnobs.from_dict(same), True) == default_name
    path.write_text(json.dumps({"knobs": same, "us": 26.3, "programs_us": {default_name: 26.3, "tiled_32x32_w2_m1_s2": 26.4}}))
    assert plan(Window(40), shape, None, "float16", None, target=H100).knobs_source == "tuned"
    path.write_text(json.dumps({"knobs": knobs, "us": 26.1, "programs_us": {  # the default not measured
        "tiled_32x32_w2_m1_s2": 26.1, "tiled_128x64_w8_m1_s2_wg_tma": 26.3}}))
    assert plan(Window(40), shape, None, "float16", None, target=H100).knobs_source == "tuned"


def test_a_record_tuned_before_its_form_took_a_variant_runs_with_it(tmp_path, monkeypatch):
    """Loop variants are not searched: a record tuned before its form took the variant that
    won its A/B (``with_measured_variants``) keeps its plan and schedule knobs and runs with the
    variant, and it compares with the default program by name without variant suffixes (a
    winner within the margin of the pre-variant default program still yields to the
    default)."""
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    import json

    from tvm_splat.records import best_knobs_path
    from tvm_splat.schedules.tiled import program_without_variants, tiled_program_name

    ws_shape = (8, 32, 1024, 128)  # 2048 row tiles of 128: the warp-specialized default
    untuned = plan(Window(64), ws_shape, None, "bfloat16", None, target=H100)
    assert untuned.knobs.warp_specialized and untuned.knobs.early_rescale
    default_name = tiled_program_name(untuned.knobs, True)
    assert default_name.endswith("_wg_tma_ws_er") and program_without_variants(default_name).endswith("_wg_tma_ws")
    path = best_knobs_path(untuned.spec, untuned.target)
    path.parent.mkdir(parents=True)
    old = {"br": 128, "bc": 128, "warps": 8, "use_tensor_cores": True, "stages": 2, "wgmma": True, "tma": True,
           "warp_specialized": True, "row_pad": 8}  # a schedule knob the default does not have
    old_name = program_without_variants(default_name)
    path.write_text(json.dumps({"knobs": old, "us": 800.0, "programs_us": {old_name: 800.0,
                                                                           "tiled_128x64_w8_m1_s2_wg_tma": 850.0}}))
    tuned = plan(Window(64), ws_shape, None, "bfloat16", None, target=H100)
    assert tuned.knobs_source == "tuned" and tuned.knobs.row_pad == 8
    assert tuned.knobs.early_rescale and not (tuned.knobs.lazy_rescale or tuned.knobs.softmax_overlap)
    near = dict(old, br=128, bc=64, warp_specialized=False, row_pad=4)  # another program, 0.5% faster
    path.write_text(json.dumps({"knobs": near, "us": 796.0, "programs_us": {old_name: 800.0,
                                                                            "tiled_128x64_w8_m1_s2_wg_tma": 796.0}}))
    kept = plan(Window(64), ws_shape, None, "bfloat16", None, target=H100)
    assert kept.knobs_source == "default" and kept.knobs == untuned.knobs


@pytest.mark.parametrize("shape,d,warp_specialized", [
    ((8, 32, 1024), 128, True),     # 8 x 32 x 8 = 2048 tiles of 128 rows: the rule's threshold
    ((8, 32, 896), 128, False),     # 1792 tiles: the two-block-per-SM TMA form
    ((8, 32, 1024), 64, False),     # d=64: it lost on every shape measured
])
def test_hopper_default_warp_specialized_from_its_tile_count(shape, d, warp_specialized, tmp_path, monkeypatch):
    """At d >= 128 on sm_90a the inference default is the TMA form's warp-specialized variant
    (128x128 tiles) from WARP_SPECIALIZED_MIN_TILES row tiles of 128; the training forward never
    takes it (its backward was measured with the other form). Each form carries the loop
    variant that won its A/B: early_rescale in the warp-specialized form, fold_scale in the
    TMA form at d=64 (inference and training), neither in the d=128 two-block TMA form."""
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    from tvm_splat.planner import default_knobs
    from tvm_splat.schedules.tiled import WARP_SPECIALIZED_MIN_TILES

    b, h, n = shape
    assert (b * h * -(-n // 128) >= WARP_SPECIALIZED_MIN_TILES) == (warp_specialized or d == 64)
    made = plan(Window(64), (b, h, n, d), None, "bfloat16", None, target=H100)
    assert made.knobs_source == "default" and made.knobs.tma
    assert made.knobs.warp_specialized == warp_specialized
    if warp_specialized:
        assert (made.knobs.br, made.knobs.bc, made.knobs.warps) == (128, 128, 8)
    training = default_knobs(made.spec, made.target, made.acsr, stepped_tma=False, warp_specialized=False)
    assert training.tma and not training.warp_specialized
    assert made.knobs.early_rescale == warp_specialized and not training.early_rescale
    assert made.knobs.fold_scale == training.fold_scale == (d == 64)
    assert not (made.knobs.lazy_rescale or made.knobs.softmax_overlap)


def test_warp_specialized_form_runs_persistent_over_the_devices_sms(tmp_path, monkeypatch):
    """Where the plan has a GPU, the warp-specialized form's default (and tuned) knobs become its
    persistent form over the thread blocks the device runs at once: the SM count with two
    consumer warpgroups, twice it with one; other forms, knobs already persistent and a count
    the device does not give stay as they are. A compile-only plan (a target, no device) keeps
    the grid form, and so do knobs the caller gave."""
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    from tvm_splat.planner import PERSISTENT_WARP_SPECIALIZED, persistent_default

    assert PERSISTENT_WARP_SPECIALIZED
    compile_only = plan(Window(64), (8, 32, 1024, 128), None, "bfloat16", None, target=H100)
    ws = compile_only.knobs
    assert ws.warp_specialized and ws.warps == 8 and ws.persistent == 0
    assert persistent_default(ws, 132).persistent == 132 and persistent_default(ws, 114).persistent == 114
    assert dataclasses.replace(persistent_default(ws, 132), persistent=0) == ws  # nothing else moves
    one_group = dataclasses.replace(ws, br=64, warps=4)
    assert persistent_default(one_group, 132).persistent == 264
    assert persistent_default(ws, None) == ws and persistent_default(ws, 0) == ws
    assert persistent_default(dataclasses.replace(ws, persistent=7), 132).persistent == 7
    grid_tma = plan(Window(64), (8, 32, 896, 128), None, "bfloat16", None, target=H100).knobs
    assert not grid_tma.warp_specialized and persistent_default(grid_tma, 132) == grid_tma
    given = plan(Window(64), (8, 32, 1024, 128), None, "bfloat16", None, target=H100, knobs=ws)
    assert given.knobs_source == "given" and given.knobs.persistent == 0


class _FakeH100:
    """A GPU device as the planner reads one: the DLPack device type of CUDA and an H100's SM count."""
    multi_processor_count = 132

    def dlpack_device_type(self):
        return 2


@pytest.mark.parametrize("pattern,b,h,kvh,n,expected", [
    ("window:4096", 1, 16, 16, 32768, 4),    # 65 blocks a tile: runs of 4 measured faster
    ("window:32767", 1, 16, 16, 32768, 4),   # every key: 256 blocks, every tile
    ("window:1024", 1, 16, 16, 32768, 1),    # 17 blocks: runs of 1 read 30% less from DRAM
    ("window:2048", 1, 16, 16, 32768, 1),    # 33 blocks, runs of 1 within the balance (1.5% over)
    ("window:1024", 2, 8, 8, 32768, 1),      # batch x heads is the grid's heads
    ("causal_window:4095", 1, 32, 8, 8192, 0),    # 1-33 blocks: runs lost 8-20% (3.1% over)
    ("causal_window:4095", 1, 32, 8, 16384, 0),   # the same ramp, 75% of the tiles at 33 blocks
    ("causal_window:4095", 1, 32, 8, 32768, 0),   # 88%: a sliding window's share, 3.1% over
    ("causal_window:8191", 1, 32, 8, 32768, 4),   # 65 blocks in 75% of the tiles: 0.4% over
    ("causal_window:32767", 1, 16, 16, 32768, 0),  # 256 blocks in one tile only (causal)
    ("window:8191", 4, 16, 16, 8192, 0),     # 64 heads: row tiles in groups already
    ("window:32767", 1, 4, 4, 32768, 0),     # no more heads than a run
    ("window:1024", 1, 1, 1, 32768, 0),      # one head: a run is heads first
])
def test_head_group_default_takes_runs_of_heads_that_keep_the_balance(pattern, b, h, kvh, n, expected):
    """``head_group_default``: the persistent form takes runs of :data:`HEAD_GROUP` heads on
    tiles of 64 blocks or more and of :data:`HEAD_GROUP_SHORT` below, where heads first is the
    order and the runs keep the busiest thread block within :data:`HEAD_GROUP_MAX_IMBALANCE` of
    heads first's; otherwise, for the grid form, and for knobs that set a ``head_group``, the
    knobs stay as they are. A device stand-in (an H100's SM count) gives the same through
    ``knobs_on_device``."""
    from tvm_splat.kernels.tiled_mma import busiest_block
    from tvm_splat.planner import (HEAD_GROUP, HEAD_GROUP_MAX_IMBALANCE, HEAD_GROUP_SHORT, head_group_default,
                                   knobs_on_device, persistent_default, tile_plan_of)

    made = plan(pattern, (b, h, n, 128), (b, kvh, n, 128), "bfloat16", None, target=H100)
    persistent = persistent_default(made.knobs, 132)
    tile_plan = tile_plan_of(made.acsr, persistent, b * h)
    grouped = head_group_default(persistent, tile_plan, b * h)
    assert grouped == dataclasses.replace(persistent, head_group=expected)
    assert expected in (0, HEAD_GROUP, HEAD_GROUP_SHORT)
    if expected:  # the busiest thread block within the measured tolerance of heads first's
        busiest = [busiest_block(tile_plan.tile_blocks, b * h, group, 132) for group in (0, expected)]
        assert busiest[1] <= busiest[0] * (1 + HEAD_GROUP_MAX_IMBALANCE)
    assert head_group_default(made.knobs, made.tile_plan, b * h) == made.knobs  # the grid form

    assert knobs_on_device(made.knobs, "tiled", _FakeH100(), made.acsr, b * h) == grouped
    assert knobs_on_device(made.knobs, "tiled", _FakeH100()) == persistent
    chosen = dataclasses.replace(persistent, head_group=2)
    assert head_group_default(chosen, tile_plan_of(made.acsr, chosen, b * h), b * h) == chosen


def test_head_group_default_refuses_runs_that_unbalance_the_thread_blocks():
    """Mistral's causal window at n=8192 (32 heads on 8 KV heads): its tiles are 1 to 33 blocks,
    longest first; in runs of one head its busiest thread block walks 396 blocks against heads
    first's 384 (3.1% over), and the planner keeps heads first. With a tolerance past that the
    same plan takes the runs, so the balance, not the tile lengths, decides."""
    import tvm_splat.planner as planner

    made = plan("causal_window:4095", (1, 32, 8192, 128), (1, 8, 8192, 128), "bfloat16", None, target=H100)
    persistent = planner.persistent_default(made.knobs, 132)
    tile_plan = planner.tile_plan_of(made.acsr, persistent, 32)
    assert planner.head_group_default(persistent, tile_plan, 32).head_group == 0
    busiest = [planner.busiest_block(tile_plan.tile_blocks, 32, group, 132) for group in (0, 1)]
    assert busiest == [384, 396]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(planner, "HEAD_GROUP_MAX_IMBALANCE", 0.04)
        assert planner.head_group_default(persistent, tile_plan, 32).head_group == planner.HEAD_GROUP_SHORT


def test_untuned_knobs_are_the_defaults_as_the_device_runs_them(tmp_path, monkeypatch):
    """``untuned_knobs`` (the bench's ``splat_fused_untuned``) gives the plan's default knobs as
    its device runs them: a compile-only plan or a CPU device keeps them; a GPU device (a
    stand-in with the DLPack type and SM count of an H100) makes the warp-specialized form
    persistent over its SMs, as ``plan`` does, whatever the tuning logs hold."""
    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    from tvm_splat.planner import knobs_on_device, untuned_knobs

    compile_only = plan(Window(64), (8, 32, 1024, 128), None, "bfloat16", None, target=H100)
    assert untuned_knobs(compile_only) == compile_only.knobs and compile_only.knobs_source == "default"

    on_gpu = knobs_on_device(compile_only.knobs, "tiled", _FakeH100())
    assert on_gpu == dataclasses.replace(compile_only.knobs, persistent=132)
    assert knobs_on_device(compile_only.knobs, "tiled", tvm.cpu()) == compile_only.knobs
    assert knobs_on_device(compile_only.knobs, "tiled", None) == compile_only.knobs
    compile_only.device = _FakeH100()
    assert untuned_knobs(compile_only) == on_gpu
    row = plan(Window(64), (1, 2, 256, 64), None, "float32", "cpu", variant="row")
    with pytest.raises(ValueError, match="only the tiled variant has default knobs"):
        untuned_knobs(row)
