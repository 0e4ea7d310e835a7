"""Training on the GPU (skipped without CUDA): gradients of tvm_splat's differentiable op in
fp16 / bf16 / fp32, GQA included, against the float64 dense reference, within ``SDPA_FACTOR``
times the error dense SDPA's own backward gets against the same reference on the same inputs
(measured here, per case; errors relative to the reference's largest magnitude)."""
import numpy as np
import pytest

from tvm_splat.formats import ACSR, DilatedWindow, GlobalTokens, PerHead, Strided, Window
from tvm_splat.reference import masked_attention, masked_attention_grads
from tvm_splat.testing import dense_mask, mask_cases

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
#: cases where every row attends to something (dense SDPA with a boolean mask gives NaN on an
#: empty row, so it could not serve as the yardstick there)
CASES = [c for c in mask_cases() if (np.diff(c[1].row_ptr, axis=1) > 0).all()]
#: our error may be this many times dense SDPA's worst gradient error on the same case. Measured
#: on the CPU (SDPA's CPU kernels as the yardstick, these cases, d=64): ours / SDPA was 0.6-1.1 in
#: bf16, 0.6-1.5 in fp16 and 1.1-2.0 in fp32 (our per-row sequential fp32 sums against SDPA's
#: blocked ones; both ~4e-7 relative), so 3 leaves room for the GPU's different SDPA kernels
SDPA_FACTOR = 3.0
#: half an ulp of each dtype at 1.0: the least error any kernel rounding its output can have
EPS = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}


def _inputs(batch, heads, kv_heads, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, n, d), (batch, kv_heads, n, d), (batch, kv_heads, n, d), (batch, heads, n, d)]
    return [torch.randn(s, generator=g).to(dtype).cuda() for s in shapes]


def _relative_errors(grads, refs):
    return [float((g.double().cpu() - torch.from_numpy(r)).abs().max() / np.abs(r).max()) for g, r in zip(grads, refs)]


def _grads(fn, q, k, v, dout):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    fn(q, k, v).backward(dout)
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("name,acsr,heads", CASES, ids=[c[0] for c in CASES])
def test_gradients_at_dense_sdpa_error(name, acsr, heads, gqa, dtype):
    """GQA: twice the query heads over the same KV heads; per-head masks (one per query head): MQA."""
    from tvm_splat.autograd import sparse_attention

    kv_heads = heads
    if gqa:
        heads, kv_heads = (heads, 1) if acsr.num_heads > 1 else (2 * heads, heads)
    q, k, v, dout = _inputs(2, heads, kv_heads, acsr.n, 64, dtype)
    mask = dense_mask(acsr)
    refs = masked_attention_grads(*(x.double().cpu().numpy() for x in (q, k, v)), mask, dout.double().cpu().numpy())
    ours = _relative_errors(_grads(lambda q, k, v: sparse_attention(q, k, v, acsr), q, k, v, dout), refs)
    bool_mask = torch.from_numpy(mask).cuda()
    sdpa = _relative_errors(_grads(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bool_mask, enable_gqa=gqa), q, k, v, dout), refs)
    tolerance = max(SDPA_FACTOR * max(sdpa), 4 * EPS[dtype])
    for which, a, b in zip(("dq", "dk", "dv"), ours, sdpa):
        assert a <= tolerance, f"{which}: ours {a:.3g}, dense SDPA {b:.3g} (worst SDPA gradient {max(sdpa):.3g})"


def test_nan_in_padded_keys_does_not_leak_on_the_gpu():
    """NaN / inf in padded keys and values: the gradients stay finite and equal the clean run's
    up to rounding (bf16 runs the tensor-core kernels, where a block holding a non-finite
    masked-out row takes the exact CUDA-core path, whose sums run in another order)."""
    from tvm_splat.autograd import register_mask, sparse_attention

    n = 200
    mask = GlobalTokens(2).dense_mask(n) | Window(16, causal=True).dense_mask(n)
    mask[:, n - 8:] = False  # padded keys
    handle = register_mask(ACSR.from_mask(mask))
    q, k, v, dout = _inputs(2, 4, 2, n, 64, torch.bfloat16)
    clean = _grads(lambda q, k, v: sparse_attention(q, k, v, handle), q, k, v, dout)
    k[:, :, n - 8:], v[:, :, n - 8:] = float("nan"), float("inf")
    dirty = _grads(lambda q, k, v: sparse_attention(q, k, v, handle), q, k, v, dout)
    for a, b in zip(clean, dirty):
        assert torch.isfinite(b).all()
        assert float((b.float() - a.float()).abs().max()) <= 4 * EPS[torch.bfloat16] * float(a.float().abs().max())


# ---------------------------------------------------------------------------- tensor cores
def _affine_with_empty_rows(n, empty=slice(20, 37)):
    mask = Window(9).dense_mask(n)
    mask[empty] = False  # empty query rows (more than a 16-row m-tile)
    mask[:, 70:75] = False  # keys nobody sees
    return ACSR.from_mask(mask)


#: (name, mask, heads, kv_heads, n): odd lengths, GQA, causal, unions, dilated and strided steps,
#: empty rows, per-head masks. A band with a dilated or strided part runs on tile plans of two
#: components (row-aligned tiles for the aligned steps; partial states merged in the forward,
#: partial gradients summed in the backward): "window+dilated", "causal strided" and the
#: MULTI_COMPONENT_CASES appended below
TC_CASES = [
    ("window n=197", Window(16), 4, 4, 197),
    ("causal window gqa n=333", Window(40, causal=True), 4, 2, 333),
    ("global+window gqa n=300", GlobalTokens(3) | Window(24), 8, 2, 300),
    ("dilated n=257", DilatedWindow(8, 3), 2, 2, 257),
    ("window+dilated mqa n=222", Window(5) | DilatedWindow(4, 6), 2, 1, 222),
    ("causal strided n=181", Strided(16, causal=True), 2, 2, 181),
    ("empty rows n=150", _affine_with_empty_rows(150), 2, 2, 150),
    ("per-head n=129", PerHead((Window(3), DilatedWindow(4, 2), GlobalTokens(2) | Window(7, causal=True))), 3, 3, 129),
]
#: masks of issue #17 (a band with an aligned strided part; two components in all three plans)
MULTI_COMPONENT_CASES = [
    ("strided gqa n=1000", Strided(64), 4, 2, 1000),
    ("causal strided gqa n=1500", Strided(32, causal=True), 4, 2, 1500),
    ("global+strided mqa n=333", GlobalTokens(2) | Strided(16), 4, 1, 333),
]
TC_CASES += MULTI_COMPONENT_CASES


def _tensor_core_plan(mask, heads, kv_heads, n, d, dtype, stages=None, **knobs):
    """The training plan (tensor cores asserted); ``stages``: the backward kernels' K/V stages
    (None: the default); ``knobs``: other :class:`BackwardMmaKnobs` overrides (``wgmma=True``).
    A plan with overrides that name no fused-dQ form runs the two kernels (``bwd_dq`` and
    ``bwd_dkdv``), not the default's fused dQ (head_dim 128, one segment per key row), and with
    overrides that do not name ``dkdv_tma``, bwd_dkdv's cp.async form; with overrides that do not
    name ``dq_wgmma``, both kernels in one form: ``wgmma``'s, or where that is not named either
    and the default is head_dim 64's (a wgmma bwd_dkdv by TMA, with the fused dQ or beside an
    mma.sync bwd_dq), ``mma.sync``."""
    import dataclasses

    from tvm_splat.schedules.backward_mma import WGMMA_BACKWARD_MIN_HEAD_DIM
    from tvm_splat.training import plan_training

    shapes = ((2, heads, n, d), (2, kv_heads, n, d), str(dtype).replace("torch.", ""), "cuda")
    plan = plan_training(mask, *shapes)
    if stages is not None and stages != plan.mma_knobs.stages:
        knobs["stages"] = stages
    if knobs and "fused_dq" not in knobs:
        knobs.update(fused_dq=False, per_query_head=False)
    if knobs:  # bwd_dkdv's cp.async form unless the TMA form is named
        knobs.setdefault("dkdv_tma", False)
    if knobs and "dq_wgmma" not in knobs:
        knobs["dq_wgmma"] = None
        if plan.mma_knobs.wgmma and d < WGMMA_BACKWARD_MIN_HEAD_DIM:
            knobs.setdefault("wgmma", False)
    if knobs:
        plan = plan_training(mask, *shapes, mma_knobs=dataclasses.replace(plan.mma_knobs, **knobs))
    assert plan.kernels == "tensor-cores", repr(plan)
    return plan


def _yardstick_mask(mask):
    """The mask with its empty rows attending everything: dense SDPA (the yardstick) gives NaN
    on empty rows, so its error is measured on this mask instead."""
    full = mask.copy()
    empty = ~full.any(-1)
    full[empty] = True
    return full


def _sdpa_errors(q, k, v, dout, mask):
    bool_mask = torch.from_numpy(mask).cuda()
    refs = masked_attention_grads(*(x.double().cpu().numpy() for x in (q, k, v)), mask, dout.double().cpu().numpy())
    return _relative_errors(_grads(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bool_mask, enable_gqa=q.shape[1] != k.shape[1]), q, k, v, dout), refs)


def _check_against_float64(plan, q, k, v, dout, dtype):
    """Runs ``plan`` forward and backward and checks out, dq, dk and dv against the float64
    dense reference, within SDPA_FACTOR times dense SDPA's own error on the same inputs (at
    least 4 ulps of ``dtype``); returns ``(dense mask, lse, (dq, dk, dv))``."""
    dense = plan.acsr.to_dense()
    dense = dense[0] if dense.shape[0] == 1 else dense
    out, lse = plan.forward(q, k, v)
    grads = plan.backward(q, k, v, out, lse, dout)
    q64, k64, v64, do64 = (x.double().cpu().numpy() for x in (q, k, v, dout))
    ref_out = masked_attention(q64, k64, v64, dense)
    refs = masked_attention_grads(q64, k64, v64, dense, do64)
    sdpa = _sdpa_errors(q, k, v, dout, _yardstick_mask(dense))
    tolerance = max(SDPA_FACTOR * max(sdpa), 4 * EPS[dtype])
    out_err = float(np.abs(out.double().cpu().numpy() - ref_out).max() / np.abs(ref_out).max())
    assert out_err <= tolerance, f"out: {out_err:.3g} (tolerance {tolerance:.3g})"
    for which, a, b in zip(("dq", "dk", "dv"), _relative_errors(grads, refs), sdpa):
        assert a <= tolerance, f"{which}: ours {a:.3g}, dense SDPA {b:.3g} (tolerance {tolerance:.3g})"
    return dense, lse, grads


def _one_stage(cases):
    return [pytest.param(*c, 1, id=f"{c[0]} one stage") for c in cases]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,mask,heads,kv_heads,n,stages",
                         [pytest.param(*c, None, id=c[0]) for c in TC_CASES] + _one_stage(TC_CASES[1:3] + TC_CASES[6:7]))
def test_tensor_core_training_matches_float64_at_dense_sdpa_error(name, mask, heads, kv_heads, n, stages, dtype, d):
    """out, lse, dq, dk, dv of the tensor-core path against the float64 dense reference, within
    SDPA_FACTOR times dense SDPA's own error on the same inputs (``test_gradients_at_dense_sdpa_error``'s
    rule); empty rows: out 0, lse -inf, dq 0. Default knobs, and the one-stage form on three cases."""
    plan = _tensor_core_plan(mask, heads, kv_heads, n, d, dtype, stages)
    if name in {c[0] for c in MULTI_COMPONENT_CASES}:
        assert [p.shape.num_components for p in plan.tile_plans] == [2, 2, 2]
    q, k, v, dout = _inputs(2, heads, kv_heads, n, d, dtype, seed=n)
    dense, lse, (dq, dk, dv) = _check_against_float64(plan, q, k, v, dout, dtype)
    empty = ~np.broadcast_to(dense, (heads, n, n)).any(-1)
    lse_cpu = lse.cpu().numpy()
    assert np.isneginf(lse_cpu[:, empty]).all() and np.isfinite(lse_cpu[:, ~empty]).all()
    assert (dq.cpu()[:, torch.from_numpy(empty)] == 0).all()


def _hopper():
    return torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_training_forward_tma_form_on_dilated_blocks(dtype, d):
    """The training forward in its TMA form on a dilated mask whose step divides n (asked for:
    the default keeps the cp.async form there), its blocks through the 5-D tensor map; GQA:
    out, lse and the gradients against float64 at the default-knob test's tolerance."""
    from tvm_splat.schedules.tiled import TiledKnobs

    if not _hopper():
        pytest.skip("the TMA form needs an sm_90 GPU")
    rows = 128 if d >= 128 else 64
    forward = TiledKnobs(br=rows, bc=64, warps=rows // 16, use_tensor_cores=True, wgmma=True, tma=True, stages=2)
    plan = _tensor_core_plan(DilatedWindow(8, 3), 4, 2, 258, d, dtype, forward=forward)
    assert plan.mma_knobs.forward.tma and plan.tile_plans[0].shape.step == 3  # 258 = 3 x 86
    q, k, v, dout = _inputs(2, 4, 2, 258, d, dtype, seed=258)
    _check_against_float64(plan, q, k, v, dout, dtype)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,mask,heads,kv_heads,n", [TC_CASES[2], TC_CASES[5], TC_CASES[6]],
                         ids=[TC_CASES[i][0] for i in (2, 5, 6)])
def test_training_forward_lazy_rescale_and_fold_scale(name, mask, heads, kv_heads, n, dtype, d):
    """The training forward with ``lazy_rescale`` (the running max moves only by more than
    RESCALE_THRESHOLD) and ``fold_scale`` (the scale in the exponent's FFMA), the rest of the
    default plan unchanged: its lse (kept max plus log2 of sums taken against it) drives the
    backward, so out, dq, dk, dv are checked against float64 at the default-knob test's
    tolerance; empty rows keep lse -inf and dq 0."""
    import dataclasses

    from tvm_splat.training import plan_training

    shapes = ((2, heads, n, d), (2, kv_heads, n, d), str(dtype).replace("torch.", ""), "cuda")
    plan = plan_training(mask, *shapes)
    forward = dataclasses.replace(plan.mma_knobs.forward, lazy_rescale=True, fold_scale=True)
    plan = plan_training(mask, *shapes, mma_knobs=dataclasses.replace(plan.mma_knobs, forward=forward))
    assert plan.kernels == "tensor-cores" and plan.mma_knobs.forward.lazy_rescale, repr(plan)
    assert plan.mma_knobs.forward.fold_scale
    q, k, v, dout = _inputs(2, heads, kv_heads, n, d, dtype, seed=n + 1)
    dense, lse, (dq, dk, dv) = _check_against_float64(plan, q, k, v, dout, dtype)
    empty = ~np.broadcast_to(dense, (heads, n, n)).any(-1)
    lse_cpu = lse.cpu().numpy()
    assert np.isneginf(lse_cpu[:, empty]).all() and np.isfinite(lse_cpu[:, ~empty]).all()
    assert (dq.cpu()[:, torch.from_numpy(empty)] == 0).all()


@pytest.mark.parametrize("stages", [2, 3], ids=["two stages", "overlapped"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,mask,heads,kv_heads,n", TC_CASES, ids=[c[0] for c in TC_CASES])
def test_wgmma_training_matches_float64_at_dense_sdpa_error(name, mask, heads, kv_heads, n, dtype, d, stages):
    """The backward kernels' Hopper form (``BackwardMmaKnobs.wgmma``: S, dP by warpgroup MMAs
    from shared memory, dQ / dK / dV from registers) against the float64 dense reference at the
    default-knob test's tolerance, on its cases (GQA, unions, strided and dilated components,
    empty rows, per-head masks); ``stages=3``: its overlapped form (each block's dQ / dK, dV
    products issued behind the next block's S and dP)."""
    if not _hopper():
        pytest.skip("wgmma needs an sm_90 GPU")
    plan = _tensor_core_plan(mask, heads, kv_heads, n, d, dtype, stages, wgmma=True)
    assert plan.mma_knobs.wgmma and plan.mma_knobs.stages == stages
    q, k, v, dout = _inputs(2, heads, kv_heads, n, d, dtype, seed=n)
    dense, lse, (dq, _, _) = _check_against_float64(plan, q, k, v, dout, dtype)
    empty = ~np.broadcast_to(dense, (heads, n, n)).any(-1)
    assert (dq.cpu()[:, torch.from_numpy(empty)] == 0).all()


def _fused_dq_knobs(d, form=True, per_head=False):
    """The fused-dQ form's knobs at head_dim ``d`` (on the default two stages): wgmma, 64 head-dim columns of dQ
    per warpgroup (64-row tiles at d=64, 128 at d=128); ``form``: ``True`` (atomics) or ``"bulk"``;
    ``per_head``: one dK/dV program per query head (``True``: dK, dV added by vector atomics;
    ``"bulk"``: by bulk reductions of staged rows)."""
    return {"wgmma": True, "fused_dq": form, "br": d, "warps": d // 16, "per_query_head": per_head}


#: (id, fused_dq, per_query_head) of the fused-dQ forms
FUSED_FORMS = [("atomics", True, False), ("bulk", "bulk", False), ("atomics per head", True, True),
               ("bulk per head", "bulk", True), ("bulk per head bulk", "bulk", "bulk")]
#: every case in both reductions; one program per query head where KV heads are grouped
FUSED_PARAMS = [pytest.param(*case, form, per_head, id=f"{case[0]}-{form_id}") for case in TC_CASES
                for form_id, form, per_head in FUSED_FORMS if not per_head or case[3] < case[2]]
#: form id -> (fused_dq, per_query_head), for the tests that name a form
FUSED_FORM = {form_id: (form, per_head) for form_id, form, per_head in FUSED_FORMS}


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,mask,heads,kv_heads,n,form,per_head", FUSED_PARAMS)
def test_fused_dq_training_matches_float64_at_dense_sdpa_error(name, mask, heads, kv_heads, n, form, per_head, dtype,
                                                               d):
    """The fused-dQ backward (``BackwardMmaKnobs.fused_dq``: bwd_dkdv computes dQ^T = K^T dS^T per
    step by warpgroup MMAs and adds it into a float32 buffer by atomics, or by one bulk
    reduction per staged row; bwd_delta before it, bwd_dq_cast after) against the float64 dense
    reference at the default-knob test's tolerance, on its cases (GQA: every query head of a
    group adds its own dQ; unions of several components and strided blocks: each component's
    share added; empty rows: dq exactly 0). ``per_head``: one bwd_dkdv program per query head,
    dK and dV added into float32 sums by atomics (every head, component and chunk alike)."""
    if not _hopper():
        pytest.skip("wgmma needs an sm_90 GPU")
    plan = _tensor_core_plan(mask, heads, kv_heads, n, d, dtype, **_fused_dq_knobs(d, form, per_head))
    assert plan.mma_knobs.fused_dq == form and plan.mma_knobs.per_query_head == per_head
    q, k, v, dout = _inputs(2, heads, kv_heads, n, d, dtype, seed=n)
    dense, lse, (dq, _, _) = _check_against_float64(plan, q, k, v, dout, dtype)
    empty = ~np.broadcast_to(dense, (heads, n, n)).any(-1)
    assert (dq.cpu()[:, torch.from_numpy(empty)] == 0).all()


def test_fused_dq_bulk_with_more_block_columns_than_threads():
    """``fused_dq="bulk"`` at head_dim 64 (4 warps, 128 threads) with 144-column dK/dV blocks:
    the staged dQ rows past the thread count are added by the threads' second turn (a window
    wide enough that every block is full of columns), against the float64 reference."""
    if not _hopper():
        pytest.skip("wgmma needs an sm_90 GPU")
    mask, heads, kv_heads, n, d, dtype = Window(100), 4, 2, 700, 64, torch.float16
    plan = _tensor_core_plan(mask, heads, kv_heads, n, d, dtype, **_fused_dq_knobs(d, "bulk"), dkdv_bc=144)
    assert plan.mma_knobs.dkdv_bc == 144 > 32 * plan.mma_knobs.warps
    q, k, v, dout = _inputs(2, heads, kv_heads, n, d, dtype, seed=5)
    _check_against_float64(plan, q, k, v, dout, dtype)


#: the TMA form of bwd_dkdv (``BackwardMmaKnobs.dkdv_tma``): the cases whose transposed plans
#: step rows by one (window, causal window with GQA, global tokens with GQA), in the two-kernel
#: form, the bulk fused dQ (one program per query head where heads are grouped), and split-KV
DKDV_TMA_CASES = [c for c in TC_CASES if c[0] in ("window n=197", "causal window gqa n=333", "global+window gqa n=300")]
DKDV_TMA_FORMS = {"two kernels": {"fused_dq": False, "per_query_head": False}, "fused dq bulk": None,
                  "split": {"fused_dq": False, "per_query_head": False, "split_blocks": 2},
                  "mma bwd_dq": {"fused_dq": False, "per_query_head": False, "dq_wgmma": False}}


@pytest.mark.parametrize("form", list(DKDV_TMA_FORMS))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,mask,heads,kv_heads,n", DKDV_TMA_CASES, ids=[c[0] for c in DKDV_TMA_CASES])
def test_dkdv_tma_training_matches_float64_at_dense_sdpa_error(name, mask, heads, kv_heads, n, dtype, d, form):
    """bwd_dkdv with its Q and dO blocks by TMA (128-byte swizzled, read by the swizzled wgmma
    descriptors, one mbarrier a stage) against the float64 dense reference at the default-knob
    test's tolerance: odd lengths (the last block's rows past n arrive as zeros), GQA (the
    tensor maps' head is the step's query head), global rows (long key tiles; ``split``: cut
    into chunks of 2 blocks, their slots summed; ``mma bwd_dq``: beside bwd_dq in its mma.sync
    form, ``dq_wgmma=False``)."""
    if not _hopper():
        pytest.skip("TMA and wgmma need an sm_90 GPU")
    knobs = DKDV_TMA_FORMS[form] or _fused_dq_knobs(d, "bulk", kv_heads < heads)
    plan = _tensor_core_plan(mask, heads, kv_heads, n, d, dtype, 2, **{**knobs, "wgmma": True, "dkdv_tma": True})
    assert plan.mma_knobs.dkdv_tma
    if form == "split" and "global" in name:
        assert plan.tile_plans[2].shape.num_slots
    q, k, v, dout = _inputs(2, heads, kv_heads, n, d, dtype, seed=n + 3)
    _check_against_float64(plan, q, k, v, dout, dtype)


#: split-KV of the backward plans, forced small (chunks of 2 blocks) so these shapes split:
#: global rows and columns (GQA), with two components (MQA), per-head masks
SPLIT_CASES = [TC_CASES[2], MULTI_COMPONENT_CASES[2],
               ("per-head global n=400", PerHead((GlobalTokens(2) | Window(9), Window(30, causal=True))), 2, 2, 400)]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,mask,heads,kv_heads,n", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
@pytest.mark.parametrize("wgmma,stages,fused", [(False, 2, None), (True, 2, None), (True, 3, None),
                                                (True, 2, "atomics"), (True, 2, "bulk"), (True, 2, "bulk per head")],
                         ids=["mma", "wgmma", "wgmma overlapped", "wgmma fused dq", "wgmma fused dq bulk",
                              "wgmma fused dq bulk per head"])
def test_split_training_matches_float64_at_dense_sdpa_error(name, mask, heads, kv_heads, n, dtype, d, wgmma, stages,
                                                           fused):
    """Forward and backward with long tiles split into chunks in all three plans (the forward's
    chunk states merged with their lse by fwd_split_merge; each backward chunk writes a float32
    slot that split_sum adds, before the component sum where there are several) against the
    float64 dense reference, at the tolerance of the default-knob test; with the backward
    kernels in their mma and wgmma forms (``fused``: a fused-dQ form of ``FUSED_FORM``, whose
    chunks add their dQ by atomics or bulk reductions like whole tiles; per head: their dK and dV
    too)."""
    import dataclasses

    from tvm_splat.training import plan_training

    if wgmma and not _hopper():
        pytest.skip("wgmma needs an sm_90 GPU")
    base = _tensor_core_plan(mask, heads, kv_heads, n, d, dtype)
    forward = dataclasses.replace(base.mma_knobs.forward, split_blocks=2)
    knobs = dataclasses.replace(base.mma_knobs, **{"split_blocks": 2, "wgmma": wgmma, "stages": stages,
                                                   "forward": forward, "dkdv_tma": False, "dq_wgmma": None,
                                                   **(_fused_dq_knobs(d, *FUSED_FORM[fused]) if fused
                                                      else {"fused_dq": False, "per_query_head": False})})
    plan = plan_training(mask, (2, heads, n, d), (2, kv_heads, n, d), str(dtype).replace("torch.", ""), "cuda",
                         mma_knobs=knobs)
    assert plan.kernels == "tensor-cores" and all(p.shape.num_slots for p in plan.tile_plans), repr(plan)
    q, k, v, dout = _inputs(2, heads, kv_heads, n, d, dtype, seed=n + 1)
    dense, lse, _ = _check_against_float64(plan, q, k, v, dout, dtype)
    q64, k64 = (x.double().cpu().numpy() for x in (q, k))
    scores = q64 @ np.repeat(k64, heads // kv_heads, 1).swapaxes(-1, -2) / d ** 0.5
    ref_lse = np.log(np.where(dense, np.exp(scores - scores.max(-1, keepdims=True)), 0).sum(-1)) \
        + scores.max(-1)
    np.testing.assert_allclose(lse.double().cpu().numpy(), ref_lse, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("stages", [2, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,mask,heads,kv_heads,n", [TC_CASES[2], TC_CASES[4]], ids=[TC_CASES[2][0], TC_CASES[4][0]])
def test_tensor_core_kernels_one_by_one_against_the_row_kernels(name, mask, heads, kv_heads, n, dtype, stages):
    """Triage: each tensor-core kernel against the row kernels on the same inputs (the forward;
    then the backward fed the row kernels' own out and lse), so a failure names its kernel. The
    row kernels accumulate in float32 per row; tolerance: 4 half-ulps of the dtype relative to
    the largest magnitude, 8 for the gradients (P and dS are rounded to the dtype on tensor cores)."""
    from tvm_splat.training import plan_training

    d = 64
    tc = _tensor_core_plan(mask, heads, kv_heads, n, d, dtype, stages)
    rows = plan_training(mask, (2, heads, n, d), (2, kv_heads, n, d), str(dtype).replace("torch.", ""), "cuda",
                         tensor_cores=False)
    q, k, v, dout = _inputs(2, heads, kv_heads, n, d, dtype, seed=3)
    out_r, lse_r = rows.forward(q, k, v)
    out_t, lse_t = tc.forward(q, k, v)
    rel = lambda a, b: float((a.double() - b.double()).abs().max() / b.double().abs().max())  # noqa: E731
    assert rel(out_t, out_r) <= 4 * EPS[dtype], "fwd_lse: out"
    assert float((lse_t - lse_r).abs().max()) <= 1e-2, "fwd_lse: lse"
    for which, a, b in zip(("bwd_dq: dq", "bwd_dkdv: dk", "bwd_dkdv: dv"),
                           tc.backward(q, k, v, out_r, lse_r, dout), rows.backward(q, k, v, out_r, lse_r, dout)):
        assert rel(a, b) <= 8 * EPS[dtype], f"{which}: {rel(a, b):.3g}"


@pytest.mark.parametrize("stages,wgmma", [(2, False), (1, False), (2, True), (1, True), (3, True), (2, "atomics"),
                                          (2, "bulk"), (2, "bulk per head"), (2, "dkdv tma")],
                         ids=["2 stages", "1 stage", "2 stages wgmma", "1 stage wgmma", "3 stages wgmma overlapped",
                              "wgmma fused dq", "wgmma fused dq bulk", "wgmma fused dq bulk per head",
                              "wgmma dkdv tma"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tensor_core_nan_in_masked_out_rows_does_not_leak(dtype, d, stages, wgmma):
    """NaN / inf in keys and values nobody sees and in the q and dO rows of empty queries leave
    every output and gradient finite and equal to the clean run's up to rounding (the blocks that
    hold such rows take the exact CUDA-core path, whose float32 sums run in another order than
    the tensor cores'), the lse bit for bit, and the gradients of the unseen keys and empty
    queries exactly zero. ``wgmma``: the backward kernels' Hopper form (their exact path is the
    same CUDA-core code over its core-matrix layout); a form name of ``FUSED_FORM``: that fused-dQ
    form, whose key tiles holding the NaN keys take its exact dQ path (CUDA cores, zero entries
    of dS skipped). ``"dkdv tma"``: bwd_dkdv's Q and dO blocks by TMA, swizzled, so the flags
    and the exact path read them through the swizzle; its plan needs unit steps, so the empty
    query rows are the last 20 (rows in the middle would give the transposed mask steps over
    them), inside a block whose rows past n the copy zero-fills."""
    if wgmma and not _hopper():
        pytest.skip("wgmma needs an sm_90 GPU")
    n, heads, kv_heads = 150, 4, 2
    empty = slice(130, 150) if wgmma == "dkdv tma" else slice(20, 37)
    acsr = _affine_with_empty_rows(n, empty)
    knobs = ({"wgmma": True, "dkdv_tma": True} if wgmma == "dkdv tma" else _fused_dq_knobs(d, *FUSED_FORM[wgmma])
             if isinstance(wgmma, str) else {"wgmma": True} if wgmma else {})
    plan = _tensor_core_plan(acsr, heads, kv_heads, n, d, dtype, stages, **knobs)
    q, k, v, dout = _inputs(2, heads, kv_heads, n, d, dtype, seed=7)
    out, lse = plan.forward(q, k, v)
    clean = plan.backward(q, k, v, out, lse, dout)
    q2, k2, v2, dout2 = (x.clone() for x in (q, k, v, dout))
    k2[:, :, 70:75], v2[:, :, 70:75] = float("nan"), float("inf")
    q2[:, :, empty], dout2[:, :, empty] = float("nan"), float("-inf")
    out2, lse2 = plan.forward(q2, k2, v2)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)
    dirty = plan.backward(q2, k2, v2, out2, lse2, dout2)
    for which, a, b in zip(("out", "dq", "dk", "dv"), (out, *clean), (out2, *dirty)):
        assert torch.isfinite(b).all(), which
        assert float((b.float() - a.float()).abs().max()) <= 4 * EPS[dtype] * float(a.float().abs().max()), which
    assert (dirty[0][:, :, empty] == 0).all() and (dirty[1][:, :, 70:75] == 0).all() and (dirty[2][:, :, 70:75] == 0).all()


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tensor_core_nan_in_masked_out_rows_does_not_leak_multi_component(dtype, d):
    """The NaN test above on a mask of several components (strided:16 with keys nobody sees and
    empty query rows; forward and dq plans of 2 components, the dk/dv plan of 3): NaN / inf in
    the masked-out K, V, Q and dO rows leave out, dq, dk, dv finite and equal to the clean
    run's up to rounding, the lse bit for bit, and the gradients of unseen keys and empty
    queries exactly zero (every component's partial is zero there, and so is their sum)."""
    n, heads, kv_heads = 300, 4, 2
    dense = Strided(16).dense_mask(n)
    dense[:, 280:] = False  # keys nobody sees
    dense[40:60] = False  # empty query rows
    plan = _tensor_core_plan(ACSR.from_mask(dense), heads, kv_heads, n, d, dtype)
    assert [p.shape.num_components for p in plan.tile_plans] == [2, 2, 3]
    q, k, v, dout = _inputs(2, heads, kv_heads, n, d, dtype, seed=11)
    out, lse = plan.forward(q, k, v)
    clean = plan.backward(q, k, v, out, lse, dout)
    q2, k2, v2, dout2 = (x.clone() for x in (q, k, v, dout))
    k2[:, :, 280:], v2[:, :, 280:] = float("nan"), float("inf")
    q2[:, :, 40:60], dout2[:, :, 40:60] = float("nan"), float("-inf")
    out2, lse2 = plan.forward(q2, k2, v2)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)
    assert np.isneginf(lse2[:, :, 40:60].cpu().numpy()).all() and torch.isfinite(lse2[:, :, :40]).all()
    dirty = plan.backward(q2, k2, v2, out2, lse2, dout2)
    for which, a, b in zip(("out", "dq", "dk", "dv"), (out, *clean), (out2, *dirty)):
        assert torch.isfinite(b).all(), which
        assert float((b.float() - a.float()).abs().max()) <= 4 * EPS[dtype] * float(a.float().abs().max()), which
    assert (out2[:, :, 40:60] == 0).all() and (dirty[0][:, :, 40:60] == 0).all()
    assert (dirty[1][:, :, 280:] == 0).all() and (dirty[2][:, :, 280:] == 0).all()
