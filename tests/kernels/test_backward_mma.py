"""The tensor-core training kernels (kernels/backward_mma.py) on a CPU-only machine: the plans
they run on cover the mask and its transpose exactly once (over all components, every component
covering every row once), they build and nvcc-compile for sm_90a (and sm_80) in fp16/bf16 at
head_dim 64 and 128 (GQA, unions, causal, dilated, strided; plans of one and of several
components), the combining kernels of multi-component plans (the merge with its lse, the sum of
partial gradients) compute the right numbers on the CPU, and they refuse what they cannot run.
The tensor-core kernels' numbers are checked on the GPU (tests/gpu/test_backward.py)."""
import re

import numpy as np
import pytest

from tvm_splat.compile import check_shared_declarations, compile_backward_mma, cuda_source, nvcc_compile, ptxas_usage
from tvm_splat.formats import ACSR, DilatedWindow, GlobalTokens, PerHead, Strided, Window, parse_pattern
from tvm_splat.formats.tile_plan import plan_tiles
from tvm_splat.formats.transpose import transpose_acsr, transposed_acsr
from tvm_splat.kernels.backward_mma import (BACKWARD_MMA_KERNEL_NAMES, backward_dkdv_mma_func, backward_dq_mma_func,
                                            check_backward_mma_plan, check_backward_mma_shape, sum_components_func)
from tvm_splat.kernels.spec import AttentionSpec
from tvm_splat.kernels.tiled import merge_func
from tvm_splat.kernels.tiled_mma import tiled_mma_func
from tvm_splat.testing import mask_cases

H100 = "nvidia/nvidia-h100"  # arch sm_90a
A100 = "nvidia/nvidia-a100"  # arch sm_80


def _training_plan(acsr, br=64, bc=64):
    """The plan the training kernels run on (training._training_tile_plan): the forward's
    row-aligned components, no split-KV."""
    return plan_tiles(acsr, br=br, bc=bc, split_blocks=0)


def _affine_with_empty_rows(n=70):
    mask = Window(6).dense_mask(n)
    mask[10:15] = False  # empty query rows
    mask[:, 30:33] = False  # keys nobody sees
    return ACSR.from_mask(mask)


AFFINE_CASES = [c for c in mask_cases() if not (c[1].seg_step == 0).any()] + [
    ("window + dilated", ACSR.from_pattern(Window(3) | DilatedWindow(2, 4), 60), 1),
    ("causal strided", ACSR.from_pattern(Strided(5, causal=True), 61), 1),
    ("strided + global", ACSR.from_pattern(Strided(6) | GlobalTokens(2), 75), 1),
    ("empty rows, affine", _affine_with_empty_rows(), 1),
]


@pytest.mark.parametrize("br,bc,split", [(16, 16, 0), (64, 32, 0), (16, 16, 2)])
@pytest.mark.parametrize("name,acsr,heads", AFFINE_CASES, ids=[c[0] for c in AFFINE_CASES])
def test_training_plans_cover_the_mask_and_its_transpose_once(name, acsr, heads, br, bc, split):
    """The dq plan computes every nonzero of the mask, the dk/dv plan every nonzero of the
    transposed mask, each exactly once over all components and nothing else; the tiles of each
    component ``c < num_comp`` hold every row exactly once (so every partial slot a head uses
    is written in full, and component 0's tiles, which write ``delta``, reach every row), and
    no tile names a component past its head's ``num_comp``. With split-KV (chunks of 2 blocks)
    a split tile's rows are held by its group instead (``split_sum`` writes them once), each
    chunk naming a slot of that group."""
    dense = acsr.to_dense()
    for ac, want in ((acsr, dense), (transpose_acsr(acsr), dense.transpose(0, 2, 1))):
        plan = plan_tiles(ac, br=br, bc=bc, split_blocks=split)
        check_backward_mma_plan(plan.shape, plan.num_comp)
        for h in range(ac.num_heads):
            np.testing.assert_array_equal(plan.covered(h), want[h].astype(np.int64))
            rows = np.zeros((int(plan.num_comp[h]), ac.n), dtype=np.int64)
            for row0, rstride, nrows, comp, _lo, _hi, slot in plan.tiles[h]:
                if nrows and slot < 0:
                    assert 0 <= comp < plan.num_comp[h]
                    rows[comp, row0 + rstride * np.arange(nrows)] += 1
            groups = plan.splits[h] if plan.shape.num_slots else np.zeros((0, 6), np.int32)
            for row0, rstride, nrows, comp, slot_lo, slot_hi in groups:
                if nrows:
                    rows[comp, row0 + rstride * np.arange(nrows)] += 1
                    chunks = [t for t in plan.tiles[h] if slot_lo <= t[6] < slot_hi]
                    assert len(chunks) == slot_hi - slot_lo and all(tuple(t[:4]) == (row0, rstride, nrows, comp)
                                                                    for t in chunks)
            assert (rows == 1).all()
        if split and name == "strided + global":
            assert plan.shape.num_slots  # global rows / columns: long tiles, split


def test_strided_masks_get_several_components_and_few_scores_per_nonzero():
    """The reason for multi-component training plans (issue #17): on strided:64 at n=4096 with
    the backward's 64-row tiles, the plans of the mask and of its transpose compute at most 2
    scores per nonzero (``nrows x BC`` per block; 22.7 with one contiguous component per head,
    the aligned steps in per-residue blocks of one valid row each); causal strided at most 2.1."""
    n = 4096
    for pattern, bound in (("strided:64", 2.0), ("causal_strided:64", 2.1)):
        acsr = ACSR.from_pattern(parse_pattern(pattern), n)
        nnz = int(np.diff(acsr.row_ptr, axis=1).sum())
        for ac in (acsr, transposed_acsr(parse_pattern(pattern), n, 4)):
            for bc in (64, 32):
                plan = _training_plan(ac, 64, bc)
                assert plan.shape.num_components == 2 and not plan.shape.num_slots
                nrows, lo, hi = plan.tiles[..., 2], plan.tiles[..., 4], plan.tiles[..., 5]
                scores = int((nrows.astype(np.int64) * (hi - lo)).sum()) * bc
                assert scores / nnz <= bound, (pattern, bc, scores / nnz)


@pytest.mark.parametrize("name,acsr,heads", AFFINE_CASES, ids=[c[0] for c in AFFINE_CASES])
def test_full_blocks_need_no_mask_test(name, acsr, heads):
    """A FULL block of the dq or dk/dv plan (where the kernels skip the membership test) lies
    inside the sequence and every valid row of its tile attends all of its columns."""
    dense = acsr.to_dense()
    for ac, want in ((acsr, dense), (transpose_acsr(acsr), dense.transpose(0, 2, 1))):
        plan = _training_plan(ac, 16, 16)
        for h in range(ac.num_heads):
            for row0, rstride, nrows, _comp, lo, hi, _slot in plan.tiles[h]:
                rows = row0 + rstride * np.arange(nrows)
                for col0, sigma, full in plan.blocks[h, lo:hi]:
                    if full:
                        cols = col0 + sigma * np.arange(plan.bc)
                        assert cols[-1] < ac.n and want[h][np.ix_(rows, cols)].all()


def test_csr_rows_are_refused_split_kv_and_components_are_not():
    _, irregular, _ = next(c for c in mask_cases() if c[0] == "irregular -> CSR fallback")
    plan = _training_plan(irregular)
    with pytest.raises(ValueError, match="without CSR fallback rows"):
        check_backward_mma_plan(plan.shape, plan.num_comp)
    split = plan_tiles(ACSR.from_pattern(GlobalTokens(1) | Window(4), 400), br=16, bc=16, split_blocks=4)
    assert split.shape.num_slots > 0
    check_backward_mma_plan(split.shape, split.num_comp)  # accepted: chunks merged (forward) or summed
    components = _training_plan(ACSR.from_pattern(Strided(8), 50), br=16, bc=16)
    assert components.shape.num_components == 2
    check_backward_mma_plan(components.shape, components.num_comp)  # accepted


@pytest.mark.parametrize("d", [64, 128])
def test_training_forward_takes_the_tma_form_where_inference_does(d):
    """The training forward follows the forward planner's rule, TMA included (one component of
    unit-step blocks, head_dim a multiple of 64, sm_90a), and fwd_lse is then really built in
    the TMA form: K/V by cp.async.bulk.tensor against mbarriers, its registers capped at 128
    without spilling (ptxas), as the inference kernel. Dilated blocks keep the cp.async form
    by default; asked for, the TMA form takes them where the step divides n (the 5-D tensor
    map) and is refused with the reason named where it does not."""
    import dataclasses

    from tvm_splat.planner import default_knobs
    from tvm_splat.training import plan_training

    shape = (1, 4, 512, d)
    plan = plan_training(Window(64), shape, shape, "float16", "cuda", target=H100)
    assert plan.kernels == "tensor-cores" and plan.mma_knobs.forward.tma
    assert plan.mma_knobs.forward == default_knobs(plan.spec.rows, plan.target, plan.acsr)  # inference's knobs
    src = cuda_source(compile_backward_mma(plan.spec, plan.target, plan.mma_knobs, [p.shape for p in plan.tile_plans],
                                           use_disk_cache=False))
    forward = src[src.rindex("fwd_lse_kernel("):].split('extern "C"')[0]
    assert "const __grid_constant__ CUtensorMap kmap" in forward and "lse_ptr" in forward
    assert "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes" in src
    assert "mbarrier.try_wait.parity" in src and len(nvcc_compile(src, H100)) > 1000
    # its 1024-byte-aligned stages are a dynamic shared array of their own: the backward kernels'
    # 64-byte "smem" in the same source once made it misaligned on the H200
    assert "extern __shared__ __align__(1024) half qkv_smem_ptr[]" in forward
    check_shared_declarations(src)
    registers, spills = ptxas_usage(src, "fwd_lse_kernel", H100)
    assert registers <= 128 and spills == 0, (registers, spills)

    # dilated blocks: the cp.async form by default (the backward's form follows the forward's
    # wgmma, unmeasured on stepped plans); the TMA form when asked for and the step divides n
    dilated = plan_training(DilatedWindow(16, 2), shape, shape, "float16", "cuda", target=H100)
    assert dilated.kernels == "tensor-cores" and not dilated.mma_knobs.forward.tma
    assert default_knobs(dilated.spec.rows, dilated.target, dilated.acsr).tma  # inference's default
    tma = dataclasses.replace(dilated.mma_knobs, forward=dataclasses.replace(plan.mma_knobs.forward,
                                                                             split_blocks=0))
    stepped = plan_training(DilatedWindow(16, 2), shape, shape, "float16", "cuda", target=H100, mma_knobs=tma)
    assert stepped.kernels == "tensor-cores" and stepped.tile_plans[0].shape.step == 2  # 512 = 2 x 256
    src = cuda_source(compile_backward_mma(stepped.spec, stepped.target, stepped.mma_knobs,
                                           [p.shape for p in stepped.tile_plans], use_disk_cache=False))
    assert "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes" in src
    odd = (1, 4, 511, d)
    refused = plan_training(DilatedWindow(16, 2), odd, odd, "float16", "cuda", target=H100, mma_knobs=tma)
    assert refused.kernels == "rows" and "n=511: use tma=False" in refused.fallback_reason


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
        backward_dkdv_mma_func(gqa, _training_plan(per_head).shape)


def test_the_forward_lse_output_is_off_by_default():
    """``with_lse`` adds one last parameter and nothing else changes in the signature on a plan of
    one component; on a plan of several the kernel is the plain one (the merge writes the lse),
    with split-KV too (the chunks' merge writes it)."""
    acsr = ACSR.from_pattern(GlobalTokens(2) | Window(8, causal=True), 200)
    spec = AttentionSpec.from_acsr(acsr, 2, 4, 64, "float16", kv_heads=2)
    shape = _training_plan(acsr).shape
    plain = [p.name for p in tiled_mma_func(spec, shape).params]
    with_lse = [p.name for p in tiled_mma_func(spec, shape, with_lse=True).params]
    assert "lse" not in plain and with_lse == plain + ["lse"]
    strided = ACSR.from_pattern(Strided(8), 64)
    strided_spec = AttentionSpec.from_acsr(strided, 1, 2, 64, "float16")
    merged = _training_plan(strided).shape
    assert merged.num_components == 2
    assert [p.name for p in tiled_mma_func(strided_spec, merged, with_lse=True).params] == \
        [p.name for p in tiled_mma_func(strided_spec, merged).params]
    split = plan_tiles(strided, br=64, bc=16, split_blocks=1).shape
    assert split.num_slots > 0  # split chunks write their states, not the lse (split_merge does)
    assert [p.name for p in tiled_mma_func(strided_spec, split, with_lse=True).params] == \
        [p.name for p in tiled_mma_func(strided_spec, split).params]


def test_partial_gradient_parameters_only_with_several_components():
    """One component: bwd_dq and bwd_dkdv keep the direct signature (dq, delta; dk, dv); several:
    a last float32 partial parameter per gradient, ``[C, B, heads, N, D]``."""
    for pattern, several in (("causal_window:8", False), ("strided:8", True)):
        acsr = ACSR.from_pattern(parse_pattern(pattern), 100)
        spec = AttentionSpec.from_acsr(acsr, 2, 4, 64, "float16", kv_heads=2)
        shape = _training_plan(acsr).shape
        assert (shape.num_components > 1) == several
        dq, dkdv = backward_dq_mma_func(spec, shape), backward_dkdv_mma_func(spec, shape)
        assert [p.name for p in dq.params][-2:] == (["delta", "dq_part"] if several else ["dq", "delta"])
        assert [p.name for p in dkdv.params][-2:] == (["dk_part", "dv_part"] if several else ["dk", "dv"])
        if several:
            assert tuple(dq.params[-1].shape) == (2, 2, 4, 100, 64)
            assert tuple(dkdv.params[-1].shape) == (2, 2, 2, 100, 64)


def _build_cpu(func):
    import tvm

    return tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")


def test_merge_with_lse_combines_components_and_writes_the_lse():
    """``merge_func(with_lse=True)`` (the forward's combining step on multi-component training
    plans), built for the CPU on random partial states: out as in the forward's merge, lse the
    natural-log log-sum-exp over the components a head writes, -inf for a row with no key; the
    slots past ``num_comp`` hold NaN and must not be read."""
    import tvm

    acsr = ACSR.from_pattern(PerHead((Strided(4), Window(3))), 12)  # head 0: 2 components, head 1: 1
    spec = AttentionSpec.from_acsr(acsr, 1, 2, 16, "float32")
    C, N, D = 2, 12, 16
    num_comp = np.array([2, 1], dtype=np.int32)
    rng = np.random.default_rng(0)
    o = rng.standard_normal((2, C, N, D)).astype(np.float32)
    ml = np.stack([rng.uniform(-3, 3, (2, C, N)), rng.uniform(0.5, 4, (2, C, N))], -1).astype(np.float32)
    ml[0, :, 5] = (-1.0e30, 0.0)  # head 0, row 5: empty in both components
    o[0, :, 5] = 0
    o[1, 1], ml[1, 1] = np.nan, np.nan  # head 1 writes one slot
    lib = _build_cpu(merge_func(spec, C, with_lse=True))
    out, lse = np.zeros((1, 2, N, D), np.float32), np.zeros((1, 2, N), np.float32)
    args = [tvm.runtime.tensor(a) for a in (o, ml, num_comp, out, lse)]
    lib["main"](*args)
    out, lse = args[3].numpy(), args[4].numpy()
    for h in range(2):
        c = int(num_comp[h])
        m, l = ml[h, :c, :, 0].astype(np.float64), ml[h, :c, :, 1].astype(np.float64)
        big = m.max(0)
        w = np.exp2(m - big)
        total = (w * l).sum(0)
        want_out = np.where(total[:, None] > 0, (w[..., None] * o[h, :c]).sum(0) / np.where(total, total, 1)[:, None], 0)
        with np.errstate(divide="ignore"):
            want_lse = np.where(total > 0, (big + np.log2(total)) * np.log(2.0), -np.inf)
        np.testing.assert_allclose(out[0, h], want_out, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lse[0, h], want_lse, rtol=1e-5, atol=1e-6)
    assert np.isneginf(lse[0, 0, 5]) and (out[0, 0, 5] == 0).all() and np.isfinite(lse[0, 1]).all()


def test_split_merge_with_lse_writes_the_split_rows_lse():
    """``split_merge_func(with_lse=True)`` (the forward's chunk merge on split training plans of
    one component), built for the CPU on random chunk states of a real split plan (global rows
    beside a window, chunks of 2 blocks): out and lse of each split tile's rows from the merge
    of its slots (an empty chunk row, m = -1e30 and l = 0, counts for nothing; a row empty in
    every chunk gets lse -inf and out 0); rows of whole tiles are left alone; slots beyond the
    groups' hold NaN. With several components it writes the component state, and no lse."""
    import tvm

    from tvm_splat.kernels.tiled import split_merge_func, split_shapes

    acsr = ACSR.from_pattern(GlobalTokens(2) | Window(3), 90)
    plan = plan_tiles(acsr, br=16, bc=16, split_blocks=2)
    spec = AttentionSpec.from_acsr(acsr, 1, 2, 16, "float32")
    so_shape, sml_shape = split_shapes(spec, plan.shape)
    rng = np.random.default_rng(4)
    so = rng.standard_normal(so_shape).astype(np.float32)
    sml = np.stack([rng.uniform(-3, 3, sml_shape[:-1]), rng.uniform(0.5, 4, sml_shape[:-1])], -1).astype(np.float32)
    groups = [g for g in plan.splits[0] if g[2]]
    row0, rstride, _, _, lo, hi = groups[0]
    sml[:, lo, 1] = (-1.0e30, 0.0)  # row 1 of the first split tile: empty in its first chunk
    so[:, lo, 1] = 0
    sml[:, lo:hi, 2] = (-1.0e30, 0.0)  # row 2: empty in every chunk
    so[:, lo:hi, 2] = 0
    last = max(int(g[5]) for g in groups)
    so[:, last:], sml[:, last:] = np.nan, np.nan
    out0 = rng.standard_normal((1, 2, 90, 16)).astype(np.float32)
    lse0 = rng.standard_normal((1, 2, 90)).astype(np.float32)
    dummy_o, dummy_ml = np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 2), np.float32)
    lib = _build_cpu(split_merge_func(spec, plan.shape, with_lse=True))
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (so, sml, plan.splits, out0, dummy_o, dummy_ml,
                                                                   lse0)]
    lib["main"](*args)
    out, lse = args[3].numpy(), args[6].numpy()
    want_out, want_lse = out0.copy(), lse0.copy()
    for h in range(2):
        for g0, gstride, nrows, _comp, glo, ghi in groups:
            m, l = sml[h, glo:ghi, :nrows, 0].astype(np.float64), sml[h, glo:ghi, :nrows, 1].astype(np.float64)
            w = np.exp2(m - m.max(0))
            total = (w * l).sum(0)
            rows = g0 + gstride * np.arange(nrows)
            want_out[0, h, rows] = np.where(total[:, None] > 0, (w[..., None] * so[h, glo:ghi, :nrows]).sum(0)
                                            / np.where(total, total, 1)[:, None], 0)
            with np.errstate(divide="ignore"):
                want_lse[0, h, rows] = np.where(total > 0, (m.max(0) + np.log2(total)) * np.log(2.0), -np.inf)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-6)
    assert np.isneginf(lse[0, :, row0 + 2 * rstride]).all()
    several = plan_tiles(ACSR.from_pattern(GlobalTokens(1) | Strided(6), 90), br=16, bc=16, split_blocks=2)
    assert several.shape.num_components == 2 and several.shape.num_slots
    merged = split_merge_func(spec, several.shape, with_lse=True)
    assert "lse" not in [p.name for p in merged.params]  # the components' merge writes it


@pytest.mark.parametrize("kv", [False, True], ids=["dq", "dkdv"])
def test_sum_components_adds_only_the_slots_a_head_writes(kv):
    """``sum_components`` built for the CPU: the float32 sum of the first ``num_comp[hm]`` slots
    cast to the input dtype; slots past it hold NaN and never reach the result. dq: query head
    h reads mask head h % HM; dk/dv (GQA, one mask head): every KV head mask head 0."""
    import tvm

    if kv:  # 4 query heads over 2 KV heads, one mask head of 3 components
        acsr = ACSR.from_pattern(Window(2), 10)
        spec = AttentionSpec.from_acsr(acsr, 2, 4, 16, "float32", kv_heads=2)
        heads, num_comp, C = 2, np.array([3], np.int32), 3
    else:  # per-head masks: head 0 two components, head 1 one, head 2 three
        acsr = ACSR.from_pattern(PerHead((Window(2), Window(3), Window(4))), 10)
        spec = AttentionSpec.from_acsr(acsr, 2, 3, 16, "float32")
        heads, num_comp, C = 3, np.array([2, 1, 3], np.int32), 3
    rng = np.random.default_rng(1)
    part = rng.standard_normal((C, 2, heads, 10, 16)).astype(np.float32)
    hm = (np.arange(heads) * (spec.group if kv else 1)) % spec.mask_heads
    used = np.arange(C)[:, None] < num_comp[hm][None, :]  # [C, heads]
    part[~np.broadcast_to(used[:, None, :], (C, 2, heads))] = np.nan
    lib = _build_cpu(sum_components_func(spec, C, kv=kv))
    dst = tvm.runtime.tensor(np.zeros((2, heads, 10, 16), np.float32))
    lib["main"](tvm.runtime.tensor(part), tvm.runtime.tensor(num_comp), dst)
    want = np.where(used[:, None, :, None, None], part, 0).sum(0)
    np.testing.assert_allclose(dst.numpy(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="two or more components"):
        sum_components_func(spec, 1)


@pytest.mark.parametrize("kv,components", [(False, 1), (True, 1), (False, 2)], ids=["dq", "dkdv", "dq-components"])
def test_split_sum_adds_each_split_tiles_chunks_into_its_rows(kv, components):
    """``split_sum`` built for the CPU on a real split plan (global rows / columns beside a
    window, chunks of 2 blocks): each row of a split tile gets the float32 sum of its chunks'
    slots (tile-local rows), cast into the gradient, or with several components written to
    its component's partial slot; rows of whole tiles are left alone, and slots beyond a
    group's are never read (NaN there)."""
    import tvm

    from tvm_splat.kernels.backward_mma import part_shape, split_part_shape, split_sum_func

    pattern = (GlobalTokens(2) | Window(3)) if components == 1 else (GlobalTokens(1) | Strided(6))
    acsr = ACSR.from_pattern(pattern, 90)
    plan = plan_tiles(acsr if not kv else transpose_acsr(acsr), br=16, bc=16, split_blocks=2)
    assert plan.shape.num_slots and plan.shape.num_components == components
    heads, kv_heads = (4, 2) if kv else (2, 2)
    spec = AttentionSpec.from_acsr(acsr, 2, heads, 16, "float32", kv_heads=kv_heads)
    X = kv_heads if kv else heads
    rng = np.random.default_rng(3)
    split = rng.standard_normal(split_part_shape(spec, plan.shape, X)).astype(np.float32)
    groups = plan.splits[0]
    used = np.zeros(split.shape[1], bool)
    for _, _, nrows, _, lo, hi in groups:
        if nrows:
            used[lo:hi] = True
    split[:, ~used] = np.nan
    dst0 = rng.standard_normal((2, X, 90, 16)).astype(np.float32)
    part0 = rng.standard_normal(part_shape(spec, components, X)).astype(np.float32)
    dst, part = tvm.runtime.tensor(dst0.copy()), tvm.runtime.tensor(part0.copy())
    lib = _build_cpu(split_sum_func(spec, plan.shape, kv=kv))
    lib["main"](tvm.runtime.tensor(split), tvm.runtime.tensor(np.ascontiguousarray(plan.splits, np.int32)), dst, part)
    want_dst, want_part = dst0.copy(), part0.copy()
    for bx in range(2 * X):
        b, x = divmod(bx, X)
        for row0, rstride, nrows, comp, lo, hi in groups:
            for r in range(nrows):
                total = split[bx, lo:hi, r].sum(0)
                if components == 1:
                    want_dst[b, x, row0 + rstride * r] = total
                else:
                    want_part[comp, b, x, row0 + rstride * r] = total
    np.testing.assert_allclose(dst.numpy(), want_dst, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(part.numpy(), want_part, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="split-KV chunks"):
        split_sum_func(spec, _training_plan(acsr).shape)


#: the combining kernels of plans of several components (forward, dq, dk/dv)
COMBINING = ("fwd_merge", "bwd_dq_sum", "bwd_dkdv_sum")

#: overrides that turn head_dim 64's default (a wgmma bwd_dkdv by TMA beside an mma.sync
#: bwd_dq) into the mma.sync form of both kernels
MMA_SYNC_FORM = {"wgmma": False, "dkdv_tma": False, "dq_wgmma": None}

BUILD_CASES = [  # (name, mask, heads, kv_heads, n, head_dim, dtype, stages, target, several components)
    ("gqa causal window d64 fp16", Window(16, causal=True), 4, 2, 200, 64, "float16", 2, H100, False),
    ("global+causal window d128 bf16", GlobalTokens(2) | Window(8, causal=True), 4, 4, 300, 128, "bfloat16", 2, H100,
     False),
    ("window+dilated d128 fp16 gqa", Window(3) | DilatedWindow(2, 4), 4, 1, 130, 128, "float16", 2, H100, True),
    ("causal strided d128 fp16 gqa", Strided(16, causal=True), 4, 2, 181, 128, "float16", 2, H100, True),
    ("strided d64 bf16 gqa sm80", Strided(8), 4, 2, 97, 64, "bfloat16", 2, A100, True),
    ("dilated d64 fp16 one stage", DilatedWindow(6, 2), 4, 2, 150, 64, "float16", 1, H100, False),
    ("global+window n=2000 d64 fp16 gqa split", GlobalTokens(4) | Window(64), 4, 2, 2000, 64, "float16", 2, H100,
     False),
]


@pytest.mark.parametrize("name,mask,heads,kv_heads,n,d,dtype,stages,target,several", BUILD_CASES,
                         ids=[c[0] for c in BUILD_CASES])
def test_training_plans_pick_and_build_the_tensor_core_kernels(name, mask, heads, kv_heads, n, d, dtype, stages,
                                                               target, several):
    """fp16/bf16 on a CUDA target: the plan takes the tensor-core kernels, whose CUDA source
    (mma.sync, ldmatrix, cp.async with two stages; the forward with its lse) compiles with nvcc
    for sm_90a (sm_80 for one case). Plans of several components add the forward's merge and
    the two sums, and their backward kernels write float32 partials instead of dq, dk, dv;
    plans of one have none of that."""
    import dataclasses

    from tvm_splat.schedules.backward_mma import default_backward_mma_knobs, dq_wgmma_form
    from tvm_splat.training import plan_training

    plan = plan_training(mask, (2, heads, n, d), (2, kv_heads, n, d), dtype, "cuda", target=target)
    if stages != plan.mma_knobs.stages:
        knobs = dataclasses.replace(default_backward_mma_knobs(plan.spec, plan.target), stages=stages)
        plan = plan_training(mask, (2, heads, n, d), (2, kv_heads, n, d), dtype, "cuda", target=target,
                             mma_knobs=knobs)
    if plan.mma_knobs.fused_dq:  # head_dim 64 with global tokens (WGMMA_FUSED_DQ_NARROW_HEADS): bwd_dq
        # does not run; this test reads the two kernels, so it builds them (the fused form's sources:
        # test_dkdv_tma_builds_for_sm90a, test_the_fused_backward_prologue_and_casts_move_vectors)
        assert d == 64 and plan.spec.columns.max_segments > 1
        knobs = dataclasses.replace(plan.mma_knobs, fused_dq=False, dq_wgmma=False)
        plan = plan_training(mask, (2, heads, n, d), (2, kv_heads, n, d), dtype, "cuda", target=target,
                             mma_knobs=knobs)
    assert plan.kernels == "tensor-cores" and plan.fallback_reason is None
    assert "kernels=tensor-cores" in repr(plan)
    assert all((p.shape.num_components > 1) == several for p in plan.tile_plans)
    lib = compile_backward_mma(plan.spec, plan.target, plan.mma_knobs, [p.shape for p in plan.tile_plans],
                               use_disk_cache=False)
    src = cuda_source(lib)
    for kernel in ("fwd_lse", *BACKWARD_MMA_KERNEL_NAMES):
        assert f"{kernel}_kernel(" in src
    for kernel in COMBINING:
        assert (f"{kernel}_kernel(" in src) == several
    dq_body = src[src.rindex("bwd_dq_kernel("):].split('extern "C"')[0]  # the definition
    dkdv_body = src[src.rindex("bwd_dkdv_kernel("):].split('extern "C"')[0]
    # the backward's form: wgmma from head_dim 128 on sm_90a for plans of one component
    # (WGMMA_BACKWARD_WIDE_HEADS); at head_dim 64 there, bwd_dkdv alone, its Q and dO by TMA,
    # where its plan steps rows by one (WGMMA_DKDV_TMA_NARROW_HEADS); else mma.sync
    unit_steps = bool((plan.tile_plans[2].blocks[..., 1] == 1).all())
    assert plan.mma_knobs.wgmma == (target == H100 and not several and (d >= 128 or unit_steps and stages == 2))
    assert dq_wgmma_form(plan.mma_knobs) == (plan.mma_knobs.wgmma and d >= 128)
    assert plan.mma_knobs.dkdv_tma == (plan.mma_knobs.wgmma and d == 64)
    for body, wgmma in ((dq_body, dq_wgmma_form(plan.mma_knobs)), (dkdv_body, plan.mma_knobs.wgmma)):
        if wgmma:
            assert "_ss_mma_async_sync_aligned_m64n" in body and "ldmatrix" not in body
        else:
            assert "mma.sync.aligned.m16n8k16.row.col.f32" in body
            assert "ldmatrix" in body
    assert ("cp_async_bulk_tensor" in dkdv_body) == plan.mma_knobs.dkdv_tma
    assert ("cp_async_wait_group" in dq_body) == (stages == 2)
    assert ("dq_part_ptr" in dq_body, "dq_ptr" in dq_body) == (several, not several)
    assert ("dk_part_ptr" in dkdv_body, "dk_ptr" in dkdv_body, "dv_ptr" in dkdv_body) == (several, not several,
                                                                                           not several)
    # the mask test is per block (block ranges), not per score: no score's P reads the lse
    # from global memory (bwd_dkdv brings each block's lse and delta into shared memory, by
    # 4-byte cp.async in the block's group with two stages) and no exp2f sits in a branch
    assert not any("lse_ptr" in line for line in dkdv_body.splitlines() if "exp2f" in line)
    assert ("cp_async_ca" in dkdv_body) == (stages == 2) and "cp_async_ca" not in dq_body
    assert "condval" not in "".join(line for line in dq_body.splitlines() if "exp2f" in line)
    # long tiles (the rows of global tokens; over the transpose, their columns) are split: each
    # backward plan with chunks adds its split_sum, and its kernel its chunk-result parameter(s)
    for kernel, plan_ in (("bwd_dq", plan.tile_plans[1]), ("bwd_dkdv", plan.tile_plans[2])):
        assert (f"{kernel}_split_sum_kernel(" in src) == bool(plan_.shape.num_slots)
    assert ("dq_split_ptr" in dq_body) == bool(plan.tile_plans[1].shape.num_slots)
    assert ("dk_split_ptr" in dkdv_body) == bool(plan.tile_plans[2].shape.num_slots)
    assert bool(plan.tile_plans[1].shape.num_slots) == ("global+window n=2000" in name)
    # the forward's chunks are merged with their lse
    assert ("fwd_split_merge_kernel(" in src) == bool(plan.tile_plans[0].shape.num_slots)
    assert len(nvcc_compile(src, target)) > 1000


WGMMA_BUILD_CASES = [  # (name, mask, heads, kv_heads, n, head_dim, dtype)
    ("global+causal window d64 fp16 gqa", GlobalTokens(2) | Window(8, causal=True), 4, 2, 300, 64, "float16"),
    ("window d128 bf16", Window(16), 4, 4, 200, 128, "bfloat16"),
    ("causal strided d64 bf16 (components)", Strided(16, causal=True), 2, 2, 181, 64, "bfloat16"),
    ("global+window n=2000 d128 fp16 split", GlobalTokens(4) | Window(64), 4, 2, 2000, 128, "float16"),
]


@pytest.mark.parametrize("stages", [2, 3], ids=["two stages", "overlapped"])
@pytest.mark.parametrize("name,mask,heads,kv_heads,n,d,dtype", WGMMA_BUILD_CASES, ids=[c[0] for c in WGMMA_BUILD_CASES])
def test_wgmma_backward_builds_for_sm90a(name, mask, heads, kv_heads, n, d, dtype, stages):
    """The backward kernels' Hopper form (``BackwardMmaKnobs.wgmma``): S and dP (S^T and dP^T)
    as ss warpgroup MMAs of m64 n=bc, KD = head_dim / 16 k-steps each; dQ (dK and dV) as rs
    warpgroup MMAs of m64 n=head_dim from the registers of dS (and P), bc / 16 k-steps each;
    no ldmatrix left; the proxy fence before the barriers that publish shared writes to wgmma.
    The CUDA source compiles with nvcc for sm_90a without spilling (bwd_dkdv at d=128 holds
    dK and dV, 2 x 64 float32 a thread, beside the two score tiles), and ptxas keeps the
    warpgroup MMAs asynchronous (no C7515). ``stages=3``, the overlapped form: the accumulating
    products are issued twice in the code (behind the next block's S and dP, and for the last
    block after the loop), and S and dP are retired by ``wait_group 1`` while they run."""
    import dataclasses

    from tvm_splat.compile import wgmma_serialized
    from tvm_splat.training import plan_training

    shapes = ((2, heads, n, d), (2, kv_heads, n, d), dtype, "cuda")
    base = plan_training(mask, *shapes, target=H100)
    # the two kernels (at d=128 on one segment per key row the default fuses dQ into bwd_dkdv)
    # (and at d=64 the default's mma.sync bwd_dq beside a TMA bwd_dkdv: both in the wgmma form here)
    knobs = dataclasses.replace(base.mma_knobs, wgmma=True, stages=stages, fused_dq=False, per_query_head=False,
                                dkdv_tma=False, dq_wgmma=None)
    plan = plan_training(mask, *shapes, target=H100, mma_knobs=knobs)
    assert plan.kernels == "tensor-cores" and plan.mma_knobs.wgmma, repr(plan)
    lib = compile_backward_mma(plan.spec, plan.target, plan.mma_knobs, [p.shape for p in plan.tile_plans],
                               use_disk_cache=False)
    src = cuda_source(lib)
    ab = {"float16": "f16", "bfloat16": "bf16"}[dtype]
    issued = 2 if stages == 3 else 1
    for kernel, bc, products in (("bwd_dq", plan.mma_knobs.dq_bc, 1), ("bwd_dkdv", plan.mma_knobs.dkdv_bc, 2)):
        body = src[src.rindex(f"{kernel}_kernel("):].split('extern "C"')[0]
        assert body.count(f"{ab}_ss_mma_async_sync_aligned_m64n{bc}k16") == 2 * (d // 16), kernel
        assert body.count(f"{ab}_rs_mma_async_sync_aligned_m64n{d}k16") == issued * products * (bc // 16), kernel
        assert "ldmatrix" not in body and "fence_proxy" in body, kernel
        assert ("wgmma_wait_group_wait_group_sync_aligned_1(" in body) == (stages == 3), kernel
        registers, spills = ptxas_usage(src, f"{kernel}_kernel", H100)
        assert spills == 0 and registers <= 255, (kernel, registers, spills)
    assert wgmma_serialized(src, H100) == []
    assert "fence.proxy.async.shared::cta" in src and len(nvcc_compile(src, H100)) > 1000


def test_wgmma_backward_is_refused_where_it_cannot_run():
    """The wgmma form asks for a Hopper target and whole warpgroups; elsewhere the plan says why
    (and runs the row kernels)."""
    import dataclasses

    from tvm_splat.training import plan_training

    shapes = ((1, 2, 100, 64), (1, 2, 100, 64), "float16", "cuda")
    base = plan_training(Window(8), *shapes, target=A100)
    plan = plan_training(Window(8), *shapes, target=A100, mma_knobs=dataclasses.replace(base.mma_knobs, wgmma=True))
    assert plan.kernels != "tensor-cores" and "needs a Hopper target" in plan.fallback_reason
    plan = plan_training(Window(8), *shapes, target=A100, mma_knobs=dataclasses.replace(base.mma_knobs, dq_wgmma=True))
    assert plan.kernels != "tensor-cores" and "needs a Hopper target" in plan.fallback_reason
    base = plan_training(Window(8), *shapes, target=H100)
    assert base.mma_knobs.dkdv_tma and not base.mma_knobs.dq_wgmma  # head_dim 64's mixed default
    mma = dataclasses.replace(base.mma_knobs, **MMA_SYNC_FORM)
    narrow = dataclasses.replace(mma, wgmma=True, br=32, warps=2)
    plan = plan_training(Window(8), *shapes, target=H100, mma_knobs=narrow)
    assert "whole warpgroups" in plan.fallback_reason
    # three stages are the overlapped wgmma form only
    plan = plan_training(Window(8), *shapes, target=H100, mma_knobs=dataclasses.replace(mma, stages=3))
    assert "stages=3 is the wgmma backward's overlapped form" in plan.fallback_reason
    plan = plan_training(Window(8), *shapes, target=H100,
                         mma_knobs=dataclasses.replace(mma, wgmma=True, stages=4))
    assert "stages must be 1, 2 or 3" in plan.fallback_reason
    # the fused dQ: the two-stage wgmma form, 64 head-dim columns of dQ per warpgroup
    for knobs in (dict(fused_dq=True), dict(fused_dq=True, wgmma=True, stages=3),
                  dict(fused_dq=True, wgmma=True, br=128, warps=8)):
        plan = plan_training(Window(8), *shapes, target=H100, mma_knobs=dataclasses.replace(mma, **knobs))
        assert "the fused dQ (fused_dq=True: bwd_dkdv adding dQ by atomics)" in plan.fallback_reason, knobs
    # at head_dim 128 the default fuses dQ (bulk): changing its stages alone is refused, the
    # reason naming the knob that turns the fused form off
    wide = ((1, 2, 100, 128), (1, 2, 100, 128), "float16", "cuda")
    default = plan_training(Window(8), *wide, target=H100).mma_knobs
    assert default.fused_dq == "bulk"
    plan = plan_training(Window(8), *wide, target=H100, mma_knobs=dataclasses.replace(default, stages=3))
    assert "fused_dq='bulk': bwd_dkdv adding dQ by bulk" in plan.fallback_reason
    assert "fused_dq=False (with per_query_head=False, and dkdv_tma=False" in plan.fallback_reason
    assert default.dkdv_tma  # and its bwd_dkdv takes Q and dO by TMA, a form of the two-stage kernel too
    plan = plan_training(Window(8), *wide, target=H100,
                         mma_knobs=dataclasses.replace(default, stages=3, fused_dq=False, per_query_head=False))
    assert "dkdv_tma=False runs its cp.async form" in plan.fallback_reason
    plan = plan_training(Window(8), *wide, target=H100,
                         mma_knobs=dataclasses.replace(default, stages=3, fused_dq=False, per_query_head=False,
                                                       dkdv_tma=False))
    assert plan.kernels == "tensor-cores", plan.fallback_reason
    plan = plan_training(Window(8), *shapes, target=H100,
                         mma_knobs=dataclasses.replace(mma, wgmma=True, fused_dq="tma"))
    assert "fused_dq must be False, True (\"atomics\") or \"bulk\", got 'tma'" in plan.fallback_reason
    plan = plan_training(Window(8), *shapes, target=H100,
                         mma_knobs=dataclasses.replace(mma, wgmma=True, per_query_head=True))
    assert "per_query_head is a form of the fused dQ backward" in plan.fallback_reason
    # the bulk dK/dV sums stage in the bulk dQ's staging: with the atomics dQ they are refused
    gqa = ((1, 4, 100, 128), (1, 2, 100, 128), "float16", "cuda")
    fused = plan_training(Window(8), *gqa, target=H100).mma_knobs
    assert fused.fused_dq == "bulk" and fused.per_query_head is True
    plan = plan_training(Window(8), *gqa, target=H100,
                         mma_knobs=dataclasses.replace(fused, fused_dq=True, per_query_head="bulk"))
    assert "per_query_head=\"bulk\" stages dK and dV rows where fused_dq=\"bulk\" stages dQ rows; got fused_dq=True" \
        in plan.fallback_reason
    plan = plan_training(Window(8), *gqa, target=H100, mma_knobs=dataclasses.replace(fused, per_query_head="tma"))
    assert "per_query_head must be False, True (\"atomics\") or \"bulk\", got 'tma'" in plan.fallback_reason
    plan = plan_training(Window(8), *gqa, target=H100, mma_knobs=dataclasses.replace(fused, per_query_head="bulk"))
    assert plan.kernels == "tensor-cores", plan.fallback_reason


#: the fused-dQ forms built: (fused_dq, per_query_head) per case; one program per query head
#: only where KV heads are grouped (elsewhere the knob changes nothing)
FUSED_DQ_BUILDS = [(case, form, per_head) for case in WGMMA_BUILD_CASES
                   for form, per_head in ((True, False), ("bulk", False), ("bulk", True), (True, True), ("bulk", "bulk"))
                   if not per_head or case[3] < case[2]]


@pytest.mark.parametrize("name,mask,heads,kv_heads,n,d,dtype,form,per_head",
                         [(*case, form, per_head) for case, form, per_head in FUSED_DQ_BUILDS],
                         ids=[f"{case[0]}-{'bulk' if form == 'bulk' else 'atomics'}"
                              f"{'-per head bulk' if per_head == 'bulk' else '-per head' * bool(per_head)}"
                              for case, form, per_head in FUSED_DQ_BUILDS])
def test_fused_dq_backward_builds_for_sm90a(name, mask, heads, kv_heads, n, d, dtype, form, per_head):
    """The fused-dQ form (``BackwardMmaKnobs.fused_dq``): no ``bwd_dq`` kernel; ``bwd_dkdv``
    issues, besides its S^T, dP^T, dK and dV products, dQ^T = K^T dS^T as ss warpgroup MMAs of
    m64 n=bc with both operands transposed (MN-major: K^T from the tile operand, dS^T from its
    staging), br / 16 k-steps, and adds the result by ``red.global.add.f32`` per element
    (``True``) or, staged as float32 rows in shared memory, by one ``cp.reduce.async.bulk``
    .add.f32 of head_dim x 4 bytes per row (``"bulk"``: the threads of every warp issue the
    rows, wait for the read before the next staging and for completion at the end); ``bwd_delta`` and
    ``bwd_dq_cast`` around it. ``per_query_head`` (grouped KV heads): ``bwd_dkdv`` takes float32
    ``dk_accum``, ``dv_accum`` and adds each pair of adjacent dK, dV columns by ``red.global.add.v2.f32``;
    ``bwd_kv_cast`` casts them, and no split or component sum of dk/dv runs. It compiles for
    sm_90a without spilling, and ptxas keeps its warpgroup MMAs asynchronous (no C7515: the
    exact dQ path of a tile whose K holds a NaN waits for every group before it writes the
    accumulators)."""
    import dataclasses

    from tvm_splat.compile import wgmma_serialized
    from tvm_splat.training import plan_training

    shapes = ((2, heads, n, d), (2, kv_heads, n, d), dtype, "cuda")
    base = plan_training(mask, *shapes, target=H100)
    knobs = dataclasses.replace(base.mma_knobs, wgmma=True, fused_dq=form, stages=2, br=d, warps=d // 16,
                                per_query_head=per_head, dkdv_tma=False)  # the cp.async form (TMA: below)
    plan = plan_training(mask, *shapes, target=H100, mma_knobs=knobs)
    assert plan.kernels == "tensor-cores" and plan.mma_knobs.fused_dq == form, repr(plan)
    src = cuda_source(compile_backward_mma(plan.spec, plan.target, plan.mma_knobs, [p.shape for p in plan.tile_plans],
                                           use_disk_cache=False))
    assert "bwd_dq_kernel(" not in src and "bwd_delta_kernel(" in src and "bwd_dq_cast_kernel(" in src
    body = src[src.rindex("bwd_dkdv_kernel("):].split('extern "C"')[0]
    ab, bc = {"float16": "f16", "bfloat16": "bf16"}[dtype], plan.mma_knobs.dkdv_bc
    ss = f"{ab}_ss_mma_async_sync_aligned_m64n{bc}k16"
    assert body.count(ss) == 2 * (d // 16) + d // 16, "S^T, dP^T: head_dim / 16 k-steps each; dQ^T: br / 16"
    bulk_add = "cp_reduce_async_bulk_s2g_reduce_async_bulk_global_shared__cta_bulk_group_add_f32("
    dkdv_adds = (body.count("red_vec_f32_global_add_v2_f32((&(dk_accum_ptr[")
                 + body.count("red_vec_f32_global_add_v2_f32((&(dv_accum_ptr["))
    signature = body[:body.index(")")]
    rounds = -(-plan.mma_knobs.br // bc)  # per_query_head="bulk": BC staged rows a round
    kv_bulk_adds = 2 * rounds if per_head == "bulk" else 0
    if per_head:
        assert "dk_accum_ptr" in signature and "dk_part" not in signature and "dk_split" not in signature
        # atomics: dK and dV, 2 row slots x head_dim / 8 pairs of adjacent columns each per
        # thread, one vector reduction per pair (red.global.add.v2.f32), no scalar reduction
        # into them; bulk: none, one bulk reduction per staged row instead
        assert dkdv_adds == (0 if per_head == "bulk" else 2 * 2 * d // 8)
        assert "red_global_add_f32((&(dk_accum_ptr[" not in body and "red_global_add_f32((&(dv_accum_ptr[" not in body
        assert "bwd_kv_cast_kernel(" in src and "bwd_dkdv_split_sum_kernel(" not in src
    else:
        assert "dk_accum" not in signature and dkdv_adds == 0 and "bwd_kv_cast_kernel(" not in src
    if form == "bulk":
        assert body.count("red_global_add_f32((") == 0 and body.count(bulk_add) == 1 + kv_bulk_adds
        # rows padded by 4 words: the staging holds bc rows of d + 4 floats (TVM may drop the
        # last row's unused padding)
        staged = int(re.search(r"float dqstage_ptr\[(\d+)\]", body).group(1))
        assert (bc - 1) * (d + 4) + d <= staged <= bc * (d + 4)
        # every warp issues an equal share of the rows: row 32 / spread w + lane / spread by the
        # lanes that are a multiple of spread (a warp issues bulk copies one lane at a time)
        spread = 32 * plan.mma_knobs.warps // bc
        if spread > 1:
            assert (f"(((int)threadIdx.y) * {32 // spread}) + (((int)threadIdx.x) >> {spread.bit_length() - 1}))"
                    in body)
        # dQ: a read wait per step, a completion wait at the end; dK/dV staged: one read wait a
        # round, one completion wait after them
        assert body.count("async_bulk_wait_group_read_0()") == 1 + kv_bulk_adds
        assert body.count("async_bulk_wait_group_0()") == 1 + (per_head == "bulk")
    else:
        assert body.count("red_global_add_f32((") == bc // 2  # the thread's dQ^T accumulators
        assert bulk_add not in body and "dqstage" not in body
    registers, spills = ptxas_usage(src, "bwd_dkdv_kernel", H100)
    assert spills == 0 and registers <= 255, (registers, spills)
    assert wgmma_serialized(src, H100) == []


@pytest.mark.parametrize("mask,heads,kv_heads,n,d,kv_sums", [
    (GlobalTokens(2) | Window(24), 4, 4, 300, 64, False),  # head_dim 64's fused default (two segments)
    (Window(40, causal=True), 4, 2, 333, 128, True),  # head_dim 128's, with per-query-head dK/dV sums
], ids=["d64 global+window", "d128 gqa causal window"])
def test_the_fused_backward_prologue_and_casts_move_vectors(mask, heads, kv_heads, n, d, kv_sums):
    """The default fused-dQ backward's small kernels (``delta_func``, the casts): ``bwd_delta``
    reads dout and out in 16-byte vectors, head_dim / 8 lanes a row whose partial sums meet by
    log2(head_dim / 8) shuffles, and zeroes the float32 sums ``bwd_dkdv`` adds into (dq_accum;
    dk_accum and dv_accum with per-query-head programs, for the rows of the first KV-head-count
    query heads) by 16-byte stores; the casts load 4 floats and store 4 halves a thread; no
    ``zero_()`` is left to the host (the plan's scratch is allocated, not filled). nvcc builds
    it. A head_dim that 8-element vectors cannot cut in a power of two per row is refused."""
    from tvm_splat.kernels.backward_mma import delta_func
    from tvm_splat.training import plan_training

    plan = plan_training(mask, (2, heads, n, d), (2, kv_heads, n, d), "float16", "cuda", target=H100)
    assert plan.mma_knobs.fused_dq == "bulk" and ("dk_accum" in plan._scratch_shapes) == kv_sums
    src = cuda_source(compile_backward_mma(plan.spec, plan.target, plan.mma_knobs, [p.shape for p in plan.tile_plans],
                                           use_disk_cache=False))
    body = src[src.rindex("bwd_delta_kernel("):].split('extern "C"')[0]
    assert body.count("*(uint4*)(xo_ptr + 0) = *(uint4*)(out_ptr") == 1
    assert body.count("*(uint4*)(xd_ptr + 0) = *(uint4*)(dout_ptr") == 1
    assert body.count("__shfl_xor_sync") == (d // 8).bit_length() - 1
    zeroing = [name for name in ("dq_accum", "dk_accum", "dv_accum") if f"*(float4*)({name}_ptr" in body]
    assert zeroing == ["dq_accum", "dk_accum", "dv_accum"][:1 + 2 * kv_sums]
    assert all(body.count(f"*(float4*)({name}_ptr") == 2 for name in zeroing)  # 8 floats a lane
    casts = ["bwd_dq_cast"] + ["bwd_kv_cast"] * kv_sums
    for cast in casts:
        cast_body = src[src.rindex(f"{cast}_kernel("):].split('extern "C"')[0]
        assert "= *(float4*)(" in cast_body and "*(half4*)(" in cast_body
    assert len(nvcc_compile(src, H100)) > 1000
    with pytest.raises(ValueError, match="head_dim 48"):
        delta_func(AttentionSpec(1, 2, 64, 48, "float16", 1, 1, 3, 1, False, 48 ** -0.5))


#: the TMA form of bwd_dkdv, built: the unit-step cases of WGMMA_BUILD_CASES in the two-kernel
#: form, beside an mma.sync bwd_dq (``dq_wgmma=False``), and in the default's fused dQ (bulk; one
#: program per query head where heads are grouped)
DKDV_TMA_BUILDS = [(case, form) for case in WGMMA_BUILD_CASES if "strided" not in case[0]
                   for form in ("two kernels", "mma bwd_dq", "fused dq bulk")]


@pytest.mark.parametrize("name,mask,heads,kv_heads,n,d,dtype,form", [(*case, form) for case, form in DKDV_TMA_BUILDS],
                         ids=[f"{case[0]}-{form}" for case, form in DKDV_TMA_BUILDS])
def test_dkdv_tma_builds_for_sm90a(name, mask, heads, kv_heads, n, d, dtype, form):
    """``BackwardMmaKnobs.dkdv_tma``: bwd_dkdv takes the tensor maps of Q and dO instead of their
    pointers, thread 0 issues two ``cp.async.bulk.tensor`` copies a block (the first block, and
    each next one) against an mbarrier every thread waits on, and no 16-byte ``cp.async`` is left
    (the lse and delta stay 4-byte copies); the wgmma descriptors of the block operands are the
    128-byte swizzled ones (mode 3: K-major S^T and dP^T, 2 x head_dim / 16 k-steps; MN-major dK
    and dV, 2 x bc / 16); its dynamic shared array is 1024-byte aligned under a name of its own,
    so bwd_dq's 64-byte one may share the module. ptxas: no spill, wgmma not serialized.
    ``mma bwd_dq``: bwd_dq in its mma.sync form (ldmatrix, no warpgroup MMA) in the same module."""
    import dataclasses

    from tvm_splat.compile import wgmma_serialized
    from tvm_splat.training import plan_training

    shapes = ((2, heads, n, d), (2, kv_heads, n, d), dtype, "cuda")
    base = plan_training(mask, *shapes, target=H100)
    fused = "bulk" if form == "fused dq bulk" else False
    knobs = dataclasses.replace(base.mma_knobs, wgmma=True, stages=2, dkdv_tma=True, fused_dq=fused,
                                per_query_head=bool(fused) and kv_heads < heads,
                                dq_wgmma=False if form == "mma bwd_dq" else None,
                                **(dict(br=d, warps=d // 16) if fused else {}))
    plan = plan_training(mask, *shapes, target=H100, mma_knobs=knobs)
    assert plan.kernels == "tensor-cores" and plan.mma_knobs.dkdv_tma, plan.fallback_reason
    src = cuda_source(compile_backward_mma(plan.spec, plan.target, plan.mma_knobs, [p.shape for p in plan.tile_plans],
                                           use_disk_cache=False))
    body = src[src.rindex("bwd_dkdv_kernel("):].split('extern "C"')[0]
    signature = body[:body.index(")")]
    assert "CUtensorMap qmap" in signature and "CUtensorMap dmap" in signature
    assert "q_ptr" not in signature and "dout_ptr" not in signature
    tensor_copy = "cp_async_bulk_tensor_g2s_cluster_async_bulk_tensor_4d_shared__cluster_global_mbarrier__complete_tx__bytes("
    assert body.count(tensor_copy) == 4 and "tvm_builtin_cuda_mbarrier_wait(" in body
    assert "async_cg_shared_global_16" not in body and body.count("async_ca_shared_global_4(") == 4
    bc = plan.mma_knobs.dkdv_bc
    # the swizzled descriptors: encoded once per product (S^T and dP^T read K-major, dV and dK
    # MN-major), each later k-step's advanced from it (16-byte units: 2 along a swizzled row)
    assert body.count(", 1, 64, 3);") == 2 and body.count(f", {bc * 8}, 64, 3);") == 2
    assert body.count("(desc_ptr[1] + (uint64_t)2ULL)") == 2
    assert re.search(r"extern __shared__ __align__\(1024\) \w+ dkdv_smem_ptr\[\]", body)
    assert ("bwd_dq_kernel(" in src) == (not fused)
    if not fused:
        dq_body = src[src.rindex("bwd_dq_kernel("):].split('extern "C"')[0]
        mma_form = form == "mma bwd_dq"
        assert ("ldmatrix" in dq_body) == mma_form and ("mma_async" in dq_body) != mma_form
    check_shared_declarations(src)
    registers, spills = ptxas_usage(src, "bwd_dkdv_kernel", H100)
    assert spills == 0 and registers <= 255, (registers, spills)
    assert wgmma_serialized(src, H100) == []
    assert len(nvcc_compile(src, H100)) > 1000


def test_dkdv_tma_is_refused_where_it_cannot_run():
    """The TMA form of bwd_dkdv is a form of the two-stage wgmma kernel at a head_dim multiple of
    64, on plans whose bwd_dkdv blocks step rows by one; elsewhere the plan names the reason and
    the knob (and runs the row kernels)."""
    import dataclasses

    from tvm_splat.training import plan_training

    shapes = ((1, 2, 300, 64), (1, 2, 300, 64), "float16", "cuda")
    base = plan_training(Window(8), *shapes, target=H100).mma_knobs
    # (head_dim 64's default takes it, beside an mma.sync bwd_dq): from the mma.sync form
    base = dataclasses.replace(base, **MMA_SYNC_FORM)
    for knobs in (dict(dkdv_tma=True), dict(dkdv_tma=True, wgmma=True, stages=1)):
        plan = plan_training(Window(8), *shapes, target=H100, mma_knobs=dataclasses.replace(base, **knobs))
        assert plan.kernels == "rows" and "the TMA form of bwd_dkdv (dkdv_tma)" in plan.fallback_reason, knobs
    narrow = ((1, 2, 300, 32), (1, 2, 300, 32), "float16", "cuda")
    plan = plan_training(Window(8), *narrow, target=H100,
                         mma_knobs=dataclasses.replace(plan_training(Window(8), *narrow, target=H100).mma_knobs,
                                                       wgmma=True, dkdv_tma=True))
    assert "head_dim a multiple of 64" in plan.fallback_reason
    # dilated: the transposed mask's blocks step rows by 2
    dilated = plan_training(DilatedWindow(16, 2), *shapes, target=H100)
    assert (dilated.tile_plans[2].blocks[..., 1] == 2).any()
    plan = plan_training(DilatedWindow(16, 2), *shapes, target=H100,
                         mma_knobs=dataclasses.replace(dilated.mma_knobs, wgmma=True, dkdv_tma=True))
    assert plan.kernels == "rows"
    assert "bwd_dkdv's plan (the transposed mask's) has blocks of step 2" in plan.fallback_reason
    assert "use dkdv_tma=False" in plan.fallback_reason
    plan = plan_training(Window(8), *shapes, target=H100, mma_knobs=dataclasses.replace(base, wgmma=True,
                                                                                        dkdv_tma=True))
    assert plan.kernels == "tensor-cores", plan.fallback_reason
    # by default (head_dim 128, the fused dQ): where the transposed mask steps over 17 empty query
    # rows (a key column's rows are one segment of step 18), the cp.async form, and the plan runs
    mask = Window(9).dense_mask(150)
    mask[20:37] = False
    wide = ((1, 2, 150, 128), (1, 2, 150, 128), "float16", "cuda")
    plan = plan_training(ACSR.from_mask(mask), *wide, target=H100)
    assert (plan.tile_plans[2].blocks[..., 1] > 1).any() and plan.kernels == "tensor-cores"
    assert plan.mma_knobs.fused_dq == "bulk" and not plan.mma_knobs.dkdv_tma


@pytest.mark.parametrize("d", [64, 128])
def test_chunk_order_fills_core_matrices_without_bank_conflicts(d):
    """Every 16-byte chunk of a [rows, d] operand is copied exactly once in either order; in the
    wgmma layout (8x8 core matrices of 128 contiguous bytes) the core-rows-first order gives each
    8-thread phase of a 16-byte shared store one whole core matrix, all 32 banks, where the
    along-the-row order puts the phase's 8 chunks 128 B apart, in the same 4 banks."""
    from tvm_splat.kernels.tiled_mma import chunk_position, core_matrix_elem

    rows, ch = 64, d // 8

    def core_matrix_byte(row, col):  # the wgmma layout's byte offset of element (row, col), 2-byte elements
        return 2 * core_matrix_elem(0, row, col, d)

    for core_rows_first in (False, True):
        cells = [chunk_position(i, ch, core_rows_first) for i in range(rows * ch)]
        assert sorted(cells) == [(r, c) for r in range(rows) for c in range(0, d, 8)]
    for core_rows_first, banks_per_phase in ((True, 32), (False, 4)):
        for phase in range(rows * ch // 8):
            starts = [core_matrix_byte(*chunk_position(8 * phase + t, ch, core_rows_first)) for t in range(8)]
            banks = {(start // 4 + word) % 32 for start in starts for word in range(4)}
            assert len(banks) == banks_per_phase, (core_rows_first, phase, sorted(starts))


@pytest.mark.parametrize("target,d,mask,expected", [
    (H100, 128, "window:8", "wgmma"),  # measured 8% faster at head_dim 128 (WGMMA_BACKWARD_WIDE_HEADS)
    (H100, 128, "global:2+window:8", "wgmma"),  # two segments per key row: bwd_dkdv keeps 32-column blocks
    (H100, 64, "window:8", "wgmma dkdv"),  # bwd_dkdv by TMA; bwd_dq in mma.sync, its wgmma forms slower at 64
    (H100, 64, "global:2+window:8", "wgmma dkdv"),  # global rows and columns too: blocks of step 1
    (H100, 64, "dilated:16:2", "mma"),  # the forward's mma form on blocks of step 2
    (A100, 128, "window:8", "mma"),  # no wgmma before sm_90
    (H100, 256, "window:8", "mma"),  # the wgmma tiles do not fit a block's shared memory: the mma form
    (H100, 128, "causal_strided:16", "mma"),  # two components (as the forward): 38% slower
    (H100, 128, "dilated:16:2", "mma"),  # the forward's mma form on blocks of step 2; the backward measured the same
], ids=["h100-d128", "h100-d128-global", "h100-d64", "h100-d64-global", "h100-d64-dilated", "a100-d128", "h100-d256",
        "h100-d128-causal-strided", "h100-d128-dilated"])
def test_default_backward_knobs_take_wgmma_where_measured_faster(target, d, mask, expected):
    from tvm_splat.schedules.backward_mma import (BACKWARD_BR, WGMMA_BACKWARD_WIDE_HEADS, WGMMA_DKDV_BC_ONE_SEGMENT,
                                                  WGMMA_DKDV_TMA_NARROW_HEADS, WGMMA_FUSED_DQ_NARROW_HEADS,
                                                  WGMMA_FUSED_DQ_ONE_SEGMENT,
                                                  default_backward_mma_knobs, dq_wgmma_form,
                                                  tensor_core_training_refusal)
    from tvm_splat.training import plan_training

    plan = plan_training(parse_pattern(mask), (1, 2, 300, d), (1, 2, 300, d), "float16", "cuda", target=target)
    assert (plan.tile_plans[0].shape.num_components > 1) == mask.startswith("causal_strided")
    knobs = default_backward_mma_knobs(plan.spec, plan.target, plan.mma_knobs.forward, plan.tile_plans[2].blocks)
    if expected == "wgmma":
        # bwd_dkdv's blocks: 64 columns where each key row is one segment (22% faster, no spill),
        # else the 32 of WGMMA_BACKWARD_WIDE_HEADS (64 spills there)
        one_segment = plan.spec.columns.max_segments == 1
        assert one_segment == (mask == "window:8")
        assert {k: getattr(knobs, k) for k in WGMMA_BACKWARD_WIDE_HEADS} == {
            **WGMMA_BACKWARD_WIDE_HEADS, **({"dkdv_bc": WGMMA_DKDV_BC_ONE_SEGMENT} if one_segment else {})}
        # and there bwd_dkdv computes dQ too, by bulk reductions (8-9% faster at head_dim 128);
        # with two segments per key row (32-column blocks) the two kernels
        assert {k: getattr(knobs, k) for k in WGMMA_FUSED_DQ_ONE_SEGMENT} == (
            WGMMA_FUSED_DQ_ONE_SEGMENT if one_segment else {"fused_dq": False, "per_query_head": False})
        # its Q and dO blocks by TMA (18% faster backward at head_dim 128), a window's transpose
        # stepping rows by one; without the plan's blocks, the cp.async form
        assert knobs.dkdv_tma == one_segment
        assert not default_backward_mma_knobs(plan.spec, plan.target, plan.mma_knobs.forward).dkdv_tma
    elif expected == "wgmma dkdv":
        # at head_dim 64, bwd_dkdv in its wgmma form, Q and dO by TMA, at the mma form's tiles
        # (bwd_dkdv 14% faster): with two segments per key row (global tokens) computing dQ too
        # (12-15% faster backward: that bwd_dkdv's registers allow two blocks per SM, as many as
        # the fused form's shared memory), with one beside an mma.sync bwd_dq (its wgmma form 8%
        # slower there; the fused form's shared memory would cost a third block per SM);
        # without the plan's blocks, the mma form
        two_segments = plan.spec.columns.max_segments > 1
        assert two_segments == mask.startswith("global")
        fused = {**WGMMA_DKDV_TMA_NARROW_HEADS, **WGMMA_FUSED_DQ_NARROW_HEADS}
        expected_knobs = fused if two_segments else {**WGMMA_DKDV_TMA_NARROW_HEADS, "fused_dq": False,
                                                     "per_query_head": False}
        assert {k: getattr(knobs, k) for k in expected_knobs} == expected_knobs
        assert knobs.br == BACKWARD_BR and dq_wgmma_form(knobs) == two_segments
        assert not default_backward_mma_knobs(plan.spec, plan.target, plan.mma_knobs.forward).wgmma
    else:
        assert not knobs.wgmma and knobs.br == BACKWARD_BR and not knobs.fused_dq and not knobs.dkdv_tma
    assert plan.mma_knobs == knobs and plan.kernels == "tensor-cores"
    assert tensor_core_training_refusal(plan.spec, plan.target, knobs, plan.tile_plans) is None


def test_training_refuses_a_warp_specialized_forward():
    """The training forward (fwd_lse) has no warp-specialized form: forward knobs asking for it
    are refused, with the reason, and the default training forward never takes it (its
    inference default does, from WARP_SPECIALIZED_MIN_TILES tiles of 128 rows)."""
    import dataclasses

    from tvm_splat.schedules.backward_mma import tensor_core_training_refusal
    from tvm_splat.training import plan_training

    shape = (8, 32, 1024, 128)  # 2048 tiles: the inference default is warp-specialized here
    made = plan_training(parse_pattern("window:64"), shape, shape, "bfloat16", "cuda", target=H100)
    assert made.mma_knobs.forward.tma and not made.mma_knobs.forward.warp_specialized
    forward = dataclasses.replace(made.mma_knobs.forward, warp_specialized=True)
    knobs = dataclasses.replace(made.mma_knobs, forward=forward)
    why = tensor_core_training_refusal(made.spec, made.target, knobs, made.tile_plans)
    assert why is not None and "no warp-specialized form" in why


#: both backward kernels in mma.sync at head_dim 64 (two kernels: the fused dQ is a wgmma form)
_MMA_SYNC_TWO_KERNELS = {"wgmma": False, "dkdv_tma": False, "dq_wgmma": None, "fused_dq": False,
                         "per_query_head": False}


@pytest.mark.parametrize("d,over", [(64, {}), (64, _MMA_SYNC_TWO_KERNELS), (128, {})],
                         ids=["d64", "d64 mma.sync", "d128"])
@pytest.mark.parametrize("dtype,halves", [("bfloat16", "bf16x2"), ("float16", "f16x2")])
def test_training_kernels_check_blocks_by_packed_fmas_in_four_chains(dtype, halves, d, over, packed_fma_check):
    """fwd_lse, bwd_dq and bwd_dkdv test a block's rows for NaN and inf as the forward does
    (``common.nonfinite_fma``): one packed FMA a word of a thread's 16-byte chunks, word i into
    chain i, the four chains joined without their sign bits before the flag is tagged; none of
    the integer test's exponent masks is left."""
    import dataclasses

    from tvm_splat.training import plan_training

    shapes = ((2, 4, 300, d), (2, 2, 300, d), dtype, "cuda")
    plan = plan_training(GlobalTokens(2) | Window(24), *shapes, target=H100)
    if over:
        plan = plan_training(GlobalTokens(2) | Window(24), *shapes, target=H100,
                             mma_knobs=dataclasses.replace(plan.mma_knobs, **over))
    assert plan.kernels == "tensor-cores", plan.fallback_reason
    src = cuda_source(compile_backward_mma(plan.spec, plan.target, plan.mma_knobs, [p.shape for p in plan.tile_plans],
                                           use_disk_cache=False))
    kernels = [k for k in ("fwd_lse", "bwd_dq", "bwd_dkdv") if f" {k}_kernel(" in src]
    assert "bwd_dkdv" in kernels and "fwd_lse" in kernels
    for kernel in kernels:
        packed_fma_check(src[src.rindex(f" {kernel}_kernel("):].split('extern "C"')[0], halves, kernel)
