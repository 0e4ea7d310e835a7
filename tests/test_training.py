"""Training plans (tvm_splat/training.py): made once, checked inputs, closed-form transposes."""
import numpy as np
import pytest

from tvm_splat.formats import ACSR, Window

torch = pytest.importorskip("torch")
from tvm_splat.training import plan_training  # noqa: E402


@pytest.mark.parametrize("mask", ["global:1+causal_window:2", Window(3, causal=True),
                                  ACSR.from_pattern(Window(2, causal=True), 9)])
def test_the_plan_holds_the_transposed_mask(mask):
    plan = plan_training(mask, (1, 2, 9, 4), dtype="float32")
    assert (plan.transposed.to_dense() == plan.acsr.to_dense().transpose(0, 2, 1)).all()
    t = plan.transposed.to_dense()[0]
    assert t[1, 3] and not t[5, 1]  # anti-causal: key 1 is seen by query 3, key 5 not by query 1


def test_inputs_are_checked_against_the_plan():
    plan = plan_training("window:2", (1, 2, 9, 4), (1, 1, 9, 4), "float32", "cpu")
    q, k = torch.zeros(1, 2, 9, 4), torch.zeros(1, 1, 9, 4)
    with pytest.raises(ValueError, match=r"k has shape \(1, 2, 9, 4\)"):
        plan.forward(q, q, q)
    with pytest.raises(ValueError, match="q has dtype float64"):
        plan.forward(q.double(), k, k)
    with pytest.raises(TypeError, match="torch tensor"):
        plan.forward(q.numpy(), k, k)
    out, lse = plan.forward(q, k, k)
    with pytest.raises(ValueError, match="lse has dtype float64"):
        plan.backward(q, k, k, out, lse.double(), out)


def test_views_and_tensors_that_require_grad_give_what_contiguous_copies_give():
    """The kernels read aligned contiguous tensors in place and copy the rest: packed-qkv
    views not on 64 bytes, transposed views, tensors that require grad (DLPack refuses those)."""
    b, h, n, d = 1, 1, 5, 4  # 80 bytes a slice: k and v of the packed tensor are misaligned
    plan = plan_training("global:1+window:1", (b, h, n, d), dtype="float32")
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, b, h, n, d, generator=g).unbind(0)
    assert k.data_ptr() % 64 and v.data_ptr() % 64
    dout = torch.randn(b, h, d, n, generator=g).transpose(-1, -2)  # not contiguous
    q.requires_grad_()
    out, lse = plan.forward(q, k, v)
    grads = plan.backward(q, k, v, out, lse, dout)
    copies = [x.detach().clone().contiguous() for x in (q, k, v, dout)]
    out_c, lse_c = plan.forward(*copies[:3])
    grads_c = plan.backward(*copies[:3], out_c, lse_c, copies[3])
    for ours, theirs in zip((out, lse, *grads), (out_c, lse_c, *grads_c)):
        assert torch.equal(ours, theirs)


def test_bad_plans_are_named():
    with pytest.raises(ValueError, match="heads % kv_heads"):
        plan_training("window:2", (1, 3, 9, 4), (1, 2, 9, 4))
    with pytest.raises(ValueError, match="unsupported dtype int8"):
        plan_training("window:2", (1, 2, 9, 4), dtype="int8")
    with pytest.raises(ValueError, match="float64 training kernels are for the CPU"):
        plan_training("window:2", (1, 2, 9, 4), dtype="float64", target="nvidia/nvidia-h100")
    with pytest.raises(ValueError, match="4 positive ints"):
        plan_training("window:2", (1, 2, 9))


def test_half_precision_on_a_cuda_target_takes_the_tensor_core_kernels():
    """fp16/bf16 on CUDA: the tensor-core kernels on three tile plans (forward, dq over the mask,
    dk/dv over its transpose) whose tables the plan uploads under the kernels' parameter names;
    float32 and the CPU keep the row kernels."""
    from tvm_splat.formats import PerHead
    from tvm_splat.kernels.backward_mma import check_backward_mma_plan

    plan = plan_training("global:2+causal_window:8", (1, 4, 100, 64), (1, 2, 100, 64), "bfloat16", "cuda",
                         target="nvidia/nvidia-h100")
    assert plan.kernels == "tensor-cores" and plan.fallback_reason is None
    fwd, dq, dkdv = plan.tile_plans
    for p in plan.tile_plans:
        check_backward_mma_plan(p.shape, p.num_comp)
    assert (dkdv.covered(0) == plan.acsr.to_dense()[0].T).all() and (dq.covered(0) == plan.acsr.to_dense()[0]).all()
    tables = plan.tables()
    assert (tables["ttiles"] == dkdv.tiles).all() and (tables["tblocks"] == dkdv.blocks).all()
    assert (tables["fwd_tiles"] == fwd.tiles).all() and (tables["tiles"] == dq.tiles).all()
    assert (tables["tseg_start"] == plan.transposed.seg_start).all()
    for dtype, device, target in (("float32", "cuda", "nvidia/nvidia-h100"), ("float16", "cpu", None)):
        rows = plan_training("window:4", (1, 2, 40, 64), dtype=dtype, device=device, target=target)
        assert rows.kernels == "rows" and rows.fallback_reason is None and rows.tile_plans is None
    # what the tensor-core kernels cannot take runs the row kernels, and the repr says why
    gqa_per_head = plan_training(PerHead((Window(2), Window(3), Window(4), Window(5))), (1, 4, 64, 64),
                                 (1, 2, 64, 64), "float16", "cuda", target="nvidia/nvidia-h100")
    assert gqa_per_head.kernels == "rows" and "share one mask head" in repr(gqa_per_head)
    rng = np.random.default_rng(0)
    csr = plan_training(ACSR.from_mask(rng.random((40, 40)) < 0.3, max_segments=2), (1, 2, 40, 64),
                        dtype="float16", device="cuda", target="nvidia/nvidia-h100")
    assert csr.kernels == "rows" and "CSR fallback rows" in repr(csr)
    odd_dim = plan_training("window:4", (1, 2, 40, 40), dtype="float16", device="cuda", target="nvidia/nvidia-h100")
    assert odd_dim.kernels == "rows" and "head_dim a multiple of 16" in repr(odd_dim)
    off = plan_training("window:4", (1, 2, 40, 64), dtype="float16", device="cuda", target="nvidia/nvidia-h100",
                        tensor_cores=False)
    assert off.kernels == "rows" and "tensor_cores=False" in repr(off)


def test_each_tensor_core_plan_splits_long_tiles_by_its_own_kernels_grid():
    """Split-KV pays where a global token's tile would end a small grid alone, and costs its
    partial sums where the grid holds enough other work (``SPLIT_NEEDLESS_WORK``): the forward
    and ``bwd_dq`` plans see ``batch x heads`` programs per tile, ``bwd_dkdv`` without
    per-query-head sums ``batch x kv_heads``, so with 2 query heads per KV head its plan stays
    split at a batch where the other two are whole."""
    from tvm_splat.formats.tile_plan import SPLIT_NEEDLESS_WORK, plan_tiles, split_length

    def slots(batch):
        plan = plan_training("global:2+window:64", (batch, 4, 2048, 64), (batch, 2, 2048, 64), "float16", "cuda",
                             target="nvidia/nvidia-h100")
        assert plan.kernels == "tensor-cores" and not plan.mma_knobs.per_query_head
        return plan, [p.shape.num_slots for p in plan.tile_plans]

    plan, one = slots(1)
    assert min(one) > 0  # a grid of 4 programs per tile: every plan splits the global tiles
    # the smallest batch whose query-head grid leaves the dq plan whole, by the rule itself
    whole = plan_tiles(plan.acsr, br=plan.mma_knobs.br, bc=plan.mma_knobs.dq_bc, split_blocks=0)
    counts = [int(hi - lo) for lo, hi in whole.tiles[0, :, 4:6] if hi > lo]
    whole_at = next(b for b in range(1, 1 << 12) if split_length(counts, b * 4) == 0)
    assert 4 * whole_at * sum(counts) >= SPLIT_NEEDLESS_WORK * max(counts)
    assert slots(whole_at - 1)[1][1] > 0
    _, at = slots(whole_at)
    assert at[0] == at[1] == 0 and at[2] > 0  # bwd_dkdv runs half as many programs per tile
    assert slots(2 * whole_at)[1] == [0, 0, 0]


def test_strided_and_dilated_masks_keep_their_row_aligned_components_on_tensor_cores():
    """The training plans are the forward's: a pure dilated window is one aligned component
    (rows grouped by residue, dense blocks); a band plus a strided part two (contiguous rows for
    the band, rows by residue for the strided steps), in all three plans."""
    from tvm_splat.formats import DilatedWindow, Strided

    dilated = plan_training(DilatedWindow(6, 2), (1, 2, 200, 64), dtype="float16", device="cuda",
                            target="nvidia/nvidia-h100")
    strided = plan_training(Strided(16), (1, 2, 200, 64), dtype="float16", device="cuda", target="nvidia/nvidia-h100")
    for plan, rstrides in ((dilated, {2}), (strided, {1, 16})):
        assert plan.kernels == "tensor-cores"
        for p in plan.tile_plans:
            assert set(p.tiles[0, p.tiles[0, :, 2] > 0, 1].tolist()) == rstrides
            assert p.shape.num_components == len(rstrides) and not p.shape.num_slots
        assert (plan.tile_plans[2].covered(0) == plan.acsr.to_dense()[0].T).all()


@pytest.mark.parametrize("mask,heads,kv_heads,n,d,dtype", [
    ("strided:64", 4, 2, 1000, 64, "bfloat16"),
    ("causal_strided:32", 2, 2, 1500, 128, "float16"),
    ("global:2+strided:16", 4, 1, 333, 64, "float16"),
])
def test_multi_component_masks_take_the_tensor_cores(mask, heads, kv_heads, n, d, dtype):
    """Masks that mix a band with a strided part (issue #17) plan the tensor-core kernels on a
    CUDA target (planning only, nothing runs): plans of two components, whose combining kernels
    (``fwd_merge``, ``bwd_dq_sum``, ``bwd_dkdv_sum``) read the plans' ``num_comp`` tables; the
    forward keeps the mma form (several components: no wgmma default on Hopper, as the forward
    planner decides) and its split-KV rule, which splits nothing here."""
    plan = plan_training(mask, (2, heads, n, d), (2, kv_heads, n, d), dtype, "cuda", target="nvidia/nvidia-h100")
    assert plan.kernels == "tensor-cores" and plan.fallback_reason is None, repr(plan)
    assert [p.shape.num_components for p in plan.tile_plans] == [2, 2, 2]
    assert not plan.mma_knobs.forward.wgmma and plan.mma_knobs.forward.split_blocks == -1  # the forward's rule:
    assert not any(p.shape.num_slots for p in plan.tile_plans)  # strided rows are all alike, nothing split
    tables = plan.tables()
    for name, p in zip(("fwd_num_comp", "num_comp", "tnum_comp"), plan.tile_plans):
        assert (tables[name] == p.num_comp).all() and tables[name].dtype == np.int32
    dense = plan.acsr.to_dense()[0]
    fwd, dq, dkdv = plan.tile_plans
    if n <= 400:  # covered() is brute force
        assert (dq.covered(0) == dense).all() and (dkdv.covered(0) == dense.T).all()


def test_the_float64_cpu_path_of_multi_component_masks_is_the_row_kernels():
    """float64 on the CPU (what gradcheck runs) never asks for tensor cores: a strided mask
    plans the row kernels there exactly as before, no tile plans."""
    plan = plan_training("strided:4", (1, 2, 17, 8), dtype="float64")
    assert plan.kernels == "rows" and plan.tile_plans is None and plan.fallback_reason is None
    q, k, v = (torch.randn(1, 2, 17, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    out, lse = plan.forward(q, k, v)
    mask = torch.from_numpy(plan.acsr.to_dense()[0])
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=8 ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def _stubbed_tensor_core_plan(mask, q_shape, kv_shape, dtype="float16", knobs=None):
    """A tensor-core plan (sm_90a) whose kernels are stubs that check each launch's arguments
    against the kernel's own parameters (count, shapes, dtypes; tensors contiguous, 64-byte
    aligned, not requiring grad), run on CPU tensors: what the
    host path hands the kernels, without a GPU. Returns ``(plan, launched, built)``: ``launched``
    records ``(name, args)`` per launch (tensors copied as they were at the launch), ``built``
    the names of the kernels the plan compiles. ``knobs``: overrides of the default knobs."""
    import contextlib
    import dataclasses

    import tvm

    from tvm_splat.schedules.backward_mma import backward_mma_funcs

    plan = plan_training(mask, q_shape, kv_shape, dtype, "cuda", target="nvidia/nvidia-h100")
    if knobs:
        plan = plan_training(mask, q_shape, kv_shape, dtype, "cuda", target="nvidia/nvidia-h100",
                             mma_knobs=dataclasses.replace(plan.mma_knobs, **knobs))
    assert plan.kernels == "tensor-cores"
    funcs = backward_mma_funcs(plan.spec, plan.mma_knobs, [p.shape for p in plan.tile_plans])
    launched = []

    def stub(name):
        params = funcs[name].params

        def check(*args):
            assert len(args) == len(params), (name, len(args), [p.name for p in params])
            for p, a in zip(params, args):
                shape = tuple(a.shape)
                dtype = str(a.dtype).removeprefix("torch.")
                assert shape == tuple(int(s) for s in p.shape) and dtype == p.dtype, (name, p.name, shape, dtype)
                if isinstance(a, torch.Tensor):  # what DLPack hands the kernel as it is
                    assert a.is_contiguous() and a.data_ptr() % 64 == 0 and not a.requires_grad, (name, p.name)
            launched.append((name, [a.clone() if isinstance(a, torch.Tensor) else a for a in args],
                             [a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args]))
        return check

    plan._lib, plan._tables = {name: stub(name) for name in funcs}, plan.device_tables(tvm.cpu())
    plan._torch().device = torch.device("cpu")
    plan._on_stream = contextlib.nullcontext
    return plan, launched, set(funcs)


_TWO_KERNELS = {"fused_dq": False, "per_query_head": False, "dq_wgmma": False}


@pytest.mark.parametrize("mask,q_shape,kv_shape,knobs,extra", [
    ("global:2+window:16", (1, 2, 1024, 64), None, _TWO_KERNELS,  # split-KV in all three plans
     {"bwd_dq", "fwd_split_merge", "bwd_dq_split_sum", "bwd_dkdv_split_sum"}),
    ("global:2+window:16", (1, 2, 1024, 64), None, None,  # the d=64 default: fused dQ, split dK/dV
     {"bwd_delta", "bwd_dq_cast", "fwd_split_merge", "bwd_dkdv_split_sum"}),
    ("causal_strided:32", (1, 2, 256, 64), None, None,  # two components: partials and their sums
     {"bwd_dq", "fwd_merge", "bwd_dq_sum", "bwd_dkdv_sum"}),
    ("causal_window:64", (2, 4, 200, 128), (2, 2, 200, 128), None,  # fused dQ, per-query-head dK/dV sums
     {"bwd_delta", "bwd_dq_cast", "bwd_kv_cast"}),
    ("window:24", (1, 2, 160, 128), None, None, {"bwd_delta", "bwd_dq_cast"}),  # fused dQ
], ids=["split", "split-fused", "components", "fused-gqa", "fused"])
def test_the_tensor_core_host_path_hands_each_kernel_its_own_parameters(mask, q_shape, kv_shape, knobs, extra):
    """Every launch of the tensor-core forward and backward passes the kernel's parameters in
    number, shape and dtype (the stubs check them against the PrimFuncs), each kernel the plan
    built runs, the lse gradient defaults to zeros (``zero_dlse``), and the float32 sums the
    fused ``bwd_dkdv`` adds into are the buffers ``bwd_delta`` zeroes (the same memory, passed
    in the same order), which ``bwd_dq_cast`` and ``bwd_kv_cast`` then read."""
    plan, launched, built = _stubbed_tensor_core_plan(mask, q_shape, kv_shape, knobs=knobs)
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(q_shape, generator=g).half() for _ in range(2))
    k, v = (torch.randn(kv_shape or q_shape, generator=g).half() for _ in range(2))
    q.requires_grad_()  # read through detach()
    dout = dout.transpose(-1, -2).contiguous().transpose(-1, -2)  # not contiguous: copied once
    out, lse = plan.forward(q, k, v)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    dq, dk, dv = plan.backward(q, k, v, out, lse, dout)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert {name for name, _, _ in launched} == built == {"fwd_lse", "bwd_dkdv"} | extra
    knobs = plan.mma_knobs
    pointers = {name: ptrs for name, _, ptrs in launched}
    if knobs.fused_dq:  # dq_accum (then dk_accum, dv_accum): zeroed by bwd_delta, added into by bwd_dkdv
        sums = 3 if "dk_accum" in plan._scratch_shapes else 1
        zeroed = pointers["bwd_delta"][4:]
        assert len(zeroed) == sums and None not in zeroed and len(set(zeroed)) == sums
        assert pointers["bwd_dkdv"][-sums:] == zeroed
        assert pointers["bwd_dq_cast"][0] == zeroed[0]
        if sums == 3:
            assert pointers["bwd_kv_cast"][:2] == zeroed[1:]
    for name, args, _ in launched:
        if name in ("bwd_dq", "bwd_delta"):  # dlse: the plan's zeros, a table
            dlse = args[6] if name == "bwd_dq" else args[2]
            assert not isinstance(dlse, torch.Tensor) and not dlse.numpy().any()
    if mask.startswith("causal_window"):
        assert knobs.fused_dq and "dk_accum" in plan._scratch_shapes
    launched.clear()
    plan.backward(q, k, v, out, lse, dout, torch.ones(q.shape[:3]))  # a given dlse goes as it is
    given = next(args for name, args, _ in launched if name in ("bwd_dq", "bwd_delta"))
    assert any(isinstance(a, torch.Tensor) and a.shape == q.shape[:3] and bool((a == 1).all()) for a in given)


def test_the_training_forward_takes_lazy_rescale_and_fold_scale_from_its_knobs():
    """``lazy_rescale`` and ``fold_scale`` on the forward's knobs reach the training forward
    (``fwd_lse``: the warp vote before O's rescale; the scale in the exponent), and the default
    leaves them out."""
    import dataclasses

    from tvm_splat.schedules.backward_mma import backward_mma_funcs

    plan = plan_training("causal_window:64", (1, 2, 256, 128), None, "float16", "cuda", target="nvidia/nvidia-h100")
    shapes = [p.shape for p in plan.tile_plans]
    lazy = dataclasses.replace(plan.mma_knobs, forward=dataclasses.replace(plan.mma_knobs.forward, lazy_rescale=True,
                                                                            fold_scale=True))
    default, changed = (backward_mma_funcs(plan.spec, k, shapes)["fwd_lse"].script() for k in (plan.mma_knobs, lazy))
    assert "any_sync" not in default and "T.cuda.any_sync" in changed
    # the scale: a multiply of each score before the exponent, or inside it
    unscaled = "T.exp2(sacc[(mt * 8 + kc * 2 + hn) * 4 + r2 * 2] - ms[mt * 2 + r2])"
    assert unscaled in default and unscaled not in changed
    assert "T.exp2(sacc[(mt * 8 + kc * 2 + hn) * 4 + r2 * 2] * T.float32(" in changed


def test_the_lse_gradient_defaults_to_zeros():
    """``backward`` without ``dlse`` reads the plan's zeros: the same gradients as given zeros."""
    plan = plan_training("global:1+window:3", (1, 2, 17, 8), (1, 1, 17, 8), "float32")
    g = torch.Generator().manual_seed(1)
    q, dout = torch.randn(1, 2, 17, 8, generator=g), torch.randn(1, 2, 17, 8, generator=g)
    k, v = torch.randn(1, 1, 17, 8, generator=g), torch.randn(1, 1, 17, 8, generator=g)
    out, lse = plan.forward(q, k, v)
    for ours, given in zip(plan.backward(q, k, v, out, lse, dout),
                           plan.backward(q, k, v, out, lse, dout, torch.zeros(1, 2, 17))):
        assert torch.equal(ours, given)


def test_training_scratch_past_int32_indexing_is_refused_when_planned():
    """The tensor-core kernels' float32 partials (components x q's size) are sized when the plan
    is made, so a plan whose partials the kernels' int32 offsets cannot reach is refused then,
    naming the buffer, not on its first call."""
    with pytest.raises(ValueError, match=r"the training scratch buffer o_part \[128, 2, 65536, 128\] would hold"):
        plan_training("causal_strided:128", (1, 128, 65536, 128), dtype="float16", device="cuda",
                      target="nvidia/nvidia-h100")


def test_a_default_whose_load_form_changes_the_tiles_is_refused(monkeypatch):
    """The default knobs are chosen twice: for the tile plans, then with ``bwd_dkdv``'s blocks
    for its load form (TMA); a second choice with other tile shapes would run kernels built for
    plans that were not made, so the plan refuses it."""
    import dataclasses

    import tvm_splat.training as training

    chosen = training.default_backward_mma_knobs

    def wider_with_blocks(spec, target, forward=None, dkdv_blocks=None):
        knobs = chosen(spec, target, forward, dkdv_blocks)
        return knobs if dkdv_blocks is None else dataclasses.replace(knobs, dkdv_bc=2 * knobs.dkdv_bc)

    args = ("window:24", (1, 2, 160, 64), None, "float16", "cuda")
    assert plan_training(*args, target="nvidia/nvidia-h100").kernels == "tensor-cores"
    monkeypatch.setattr(training, "default_backward_mma_knobs", wider_with_blocks)
    with pytest.raises(RuntimeError, match="changed their tile shapes with the load form"):
        plan_training(*args, target="nvidia/nvidia-h100")
