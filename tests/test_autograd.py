"""The differentiable op (tvm_splat.autograd): gradcheck in float64 for every mask class, fp32 /
bf16 gradients against the float64 dense reference, one op under torch.compile(fullgraph=True)
and torch.export, and no NaN leaking from masked-out keys and values."""
import numpy as np
import pytest

from tvm_splat.formats import ACSR, BlockLocal, DilatedWindow, PerHead, Strided, Window
from tvm_splat.reference import masked_attention, masked_attention_grads

torch = pytest.importorskip("torch")
from tvm_splat.autograd import register_mask, sparse_attention, training_plan_for  # noqa: E402


def _empty_rows_mask(n=11):
    m = np.random.default_rng(7).random((n, n)) < 0.35
    m[[0, 6]] = False
    return m


#: (name, mask, n, heads, kv_heads): every pattern class, unions, per-head, causal, empty rows,
#: the CSR fallback and GQA, on awkward small shapes
GRAD_CASES = [
    ("window", "window:2", 9, 2, 2),
    ("causal window", "causal_window:3", 10, 2, 2),
    ("dilated", "dilated:2:2", 11, 1, 1),
    ("causal dilated", "causal_dilated:2:3", 10, 1, 1),
    ("strided", "strided:3:2", 9, 1, 1),
    ("causal strided", "causal_strided:4", 11, 1, 1),
    ("block-local", "block:4", 10, 2, 2),
    ("global + window", "global:2+window:1", 9, 2, 2),
    ("dense", "dense", 7, 1, 1),
    ("union block + causal strided", "block:3+causal_strided:4:1", 10, 1, 1),
    ("per-head", PerHead((Window(1, causal=True), DilatedWindow(1, 2), Strided(3, causal=True))), 9, 3, 3),
    ("empty rows", ACSR.from_mask(_empty_rows_mask()), 11, 2, 2),
    ("CSR fallback", ACSR.from_mask(np.random.default_rng(8).random((12, 12)) < 0.4, max_segments=1), 12, 2, 2),
    ("GQA causal window", "causal_window:2", 9, 4, 2),
    ("MQA per-head", PerHead((Window(1), BlockLocal(3))), 8, 2, 1),
]


def _qkv(n, heads, kv_heads, d=3, batch=1, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def _dense(mask, n):
    if isinstance(mask, str):
        from tvm_splat.formats import parse_pattern

        mask = parse_pattern(mask)
    m = mask.to_dense() if isinstance(mask, ACSR) else mask.dense_mask(n)
    return m[0] if m.ndim == 3 and m.shape[0] == 1 else m


@pytest.mark.parametrize("name,mask,n,heads,kv_heads", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_float64(name, mask, n, heads, kv_heads):
    q, k, v = _qkv(n, heads, kv_heads)
    assert torch.autograd.gradcheck(lambda q, k, v: sparse_attention(q, k, v, mask), (q, k, v))


def test_gradcheck_of_both_outputs_with_a_given_scale():
    """The raw op's ``lse`` output is differentiable too (a mask without empty rows: lse finite)."""
    q, k, v = _qkv(9, 2, 1, batch=2)
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.tvm_splat.sparse_attention(q, k, v, "global:1+causal_window:2", 0.7), (q, k, v))


def test_gradcheck_where_only_one_output_reaches_the_loss():
    """An output that does not reach the loss gets no gradient made for it: only the lse
    (``dout`` None: zeros for the backward kernels), or only out (``dlse`` None: the plan's
    zeros), each against float64 finite differences."""
    q, k, v = _qkv(9, 2, 1, batch=2)
    for which in (0, 1):
        assert torch.autograd.gradcheck(
            lambda q, k, v: torch.ops.tvm_splat.sparse_attention(q, k, v, "global:1+causal_window:2", None)[which],
            (q, k, v))


def test_a_compiled_backward_makes_no_zeros_for_the_unused_lse():
    """Under ``torch.compile`` the backward graph passes None for the lse's gradient when only
    out reaches the loss (``set_materialize_grads(False)``): no float32 fill a step."""
    from torch._dynamo.backends.common import aot_autograd

    backward_graphs = []

    def keep_backward(gm, example_inputs):
        backward_graphs.append(gm)
        return gm

    torch._dynamo.reset()  # a cached compiled backward would skip the compiler
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, "window:2"), fullgraph=True,
                             backend=aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=keep_backward))
    q, k, v = _qkv(9, 2, 2)
    torch.autograd.grad(compiled(q, k, v).sum(), (q, k, v))
    (graph,) = backward_graphs
    calls = [n for n in graph.graph.nodes if n.target == torch.ops.tvm_splat.sparse_attention_backward.default]
    assert len(calls) == 1 and calls[0].args[6] is None
    assert not [n for n in graph.graph.nodes if n.op == "call_function" and "zeros" in str(n.target)]


def test_opcheck_registration():
    q, k, v = _qkv(9, 2, 2)
    result = torch.library.opcheck(torch.ops.tvm_splat.sparse_attention.default, (q, k, v, "window:2", None))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("name,mask,n,heads,kv_heads", [GRAD_CASES[i] for i in (7, 11, 12, 13)],
                         ids=[GRAD_CASES[i][0] for i in (7, 11, 12, 13)])
def test_low_precision_gradients_match_the_float64_reference(name, mask, n, heads, kv_heads, dtype, tol):
    q, k, v = _qkv(n, heads, kv_heads, d=8, batch=2, dtype=dtype)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    out = sparse_attention(q, k, v, mask)
    out.backward(dout)
    as64 = [x.detach().double().numpy() for x in (q, k, v, dout)]
    dense = _dense(mask, n)
    np.testing.assert_allclose(out.detach().double().numpy(), masked_attention(*as64[:3], dense), rtol=tol, atol=tol)
    for got, ref in zip((q.grad, k.grad, v.grad), masked_attention_grads(*as64[:3], dense, as64[3])):
        assert got.dtype == dtype
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=tol, atol=tol)


class _TinyAttention(torch.nn.Module):
    """A projection, our attention over a pattern string, and an output projection."""

    def __init__(self, dim=8, heads=2, mask="global:1+causal_window:2"):
        super().__init__()
        self.heads, self.mask = heads, mask
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(sparse_attention(q, k, v, self.mask).transpose(1, 2).reshape(b, n, dim))


def test_torch_compile_fullgraph_sees_one_op_and_matches_eager():
    torch.manual_seed(0)
    model, x = _TinyAttention(), torch.randn(2, 11, 8)
    eager = model(x)
    eager.square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=recording_inductor)  # fullgraph: a break raises
    got = compiled(x)
    got.square().sum().backward()
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "tvm_splat" in str(n.target)]
    assert len(calls) == 1
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_torch_export_holds_the_op():
    model, x = _TinyAttention(), torch.randn(1, 9, 8)
    program = torch.export.export(model, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.tvm_splat.sparse_attention.default in targets
    torch.testing.assert_close(program.module()(x), model(x))


def test_nan_in_masked_out_keys_and_values_does_not_leak_into_any_gradient():
    n, padding = 14, [11, 12, 13]
    mask = np.random.default_rng(9).random((n, n)) < 0.4
    mask[:, padding] = False  # padded keys no query attends
    handle = register_mask(ACSR.from_mask(mask))
    grads = []
    for poison in (False, True):
        q, k, v = _qkv(n, 2, 1, d=4, batch=2, dtype=torch.float32)
        if poison:
            with torch.no_grad():
                k[:, :, padding] = float("nan")
                v[:, :, padding] = float("inf")
        sparse_attention(q, k, v, handle).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for clean, dirty in zip(*grads):
        assert torch.isfinite(dirty).all()
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    assert (grads[1][1][:, :, padding] == 0).all() and (grads[1][2][:, :, padding] == 0).all()


@pytest.mark.parametrize("mask", ["global:2+window:1", "causal_strided:4"])
def test_eager_calls_skip_the_dispatcher_and_match_the_op(mask):
    """Eager calls on plain tensors run the plan without the custom op and give what the op
    gives, bit for bit (out and all gradients, a non-contiguous dout included); under a torch
    dispatch mode, which must see the op, the call goes through it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    results = []
    for through_op in (False, True):
        q, k, v = _qkv(11, 4, 2, d=5, batch=2, dtype=torch.float32)
        dout = torch.randn(2, 11, 4, 5, generator=torch.Generator().manual_seed(3)).transpose(1, 2)
        if through_op:
            with OpLog() as log:
                out = sparse_attention(q, k, v, mask)
            assert any("tvm_splat.sparse_attention" in op for op in log.ops)
        else:
            out = sparse_attention(q, k, v, mask)
            assert out.grad_fn is not None and "EagerSparseAttention" in type(out.grad_fn).__name__
        out.backward(dout)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for eager, op in zip(*results):
        torch.testing.assert_close(eager, op, rtol=0, atol=0)


def test_plans_are_made_once_per_workload():
    q, k, v = _qkv(9, 2, 2)
    first = training_plan_for(q, k, "window:2", None)
    assert training_plan_for(q, k, "window:2", None) is first
    assert training_plan_for(q, k, "window:3", None) is not first


def test_register_mask_gives_one_handle_per_object():
    acsr = ACSR.from_pattern(Window(2), 9)
    assert register_mask(acsr) == register_mask(acsr) != register_mask(ACSR.from_pattern(Window(2), 9))


def test_bad_input_is_named():
    q, k, v = _qkv(9, 2, 2)
    with pytest.raises(ValueError, match="unknown mask handle"):
        sparse_attention(q, k, v, "@mask999999")
    with pytest.raises(ValueError, match="unknown pattern"):
        sparse_attention(q, k, v, "windowz:2")
    with pytest.raises(ValueError, match="register_mask takes an ACSR or a Pattern"):
        sparse_attention(q, k, v, 3)
    with pytest.raises(ValueError, match="one dtype"):
        sparse_attention(q, k.float(), v, "window:2")
    with pytest.raises(ValueError, match="sequence length 10"):
        sparse_attention(q, k, v, ACSR.from_pattern(Window(2), 10))
    with pytest.raises(ValueError, match="unsupported dtype"):
        sparse_attention(*(x.to(torch.int32) for x in (q, k, v)), "window:2")


def test_exported_from_the_package():
    import tvm_splat

    assert tvm_splat.differentiable_sparse_attention is sparse_attention
    assert tvm_splat.autograd.register_mask is register_mask
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tvm_splat.nope
