"""Bad input never crashes, hangs or returns plausible wrong numbers (issue 13, on the CPU).

Every case of the issue's bad-input probe that did not give a clear error has a test here, by the
issue's numbering: (1) tables that wrapped int32 and segfaulted, (2) NaN in masked-out keys and
values, (3) a pattern that grew memory without bound, (4) non-finite scores and scale, (5) legal
torch tensors refused, (6) an ACSR with out-of-range tables, (7) the smaller ones.

Cases that could kill or exhaust the process run in one child process (:data:`ISOLATED`) with an
address-space limit and a timeout per case: a segfault, a hang or a runaway allocation fails that
case's test, and the child is started again for the cases after it. Numbers are compared with
:func:`tvm_splat.reference.masked_attention` (float64 numpy; it imports no kernel code).
"""
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import tvm_splat
from tvm_splat import sparse_attention
from tvm_splat.formats import ACSR, DilatedWindow, GlobalTokens, Window, parse_pattern
from tvm_splat.reference import masked_attention
from tvm_splat.schedules.row import RowKnobs
from tvm_splat.schedules.tiled import TiledKnobs

VARIANTS = ("auto", "tiled", "row", "separate")


def _qkv(b=1, h=2, n=64, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, h, n, d)).astype("float32") for _ in range(3)]


def _assert_matches_reference(out, q, k, v, mask, atol=1e-4):
    """``out`` equals the float64 reference: the same NaN positions, close elsewhere."""
    out = np.asarray(out.numpy() if isinstance(out, torch.Tensor) else out, dtype=np.float64)
    ref = masked_attention(*(x.numpy() if isinstance(x, torch.Tensor) else x for x in (q, k, v)), mask)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref), err_msg="NaN where the reference has none, or the reverse")
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0, equal_nan=True)


# ============================================================ cases run in a child process
def _through_every_variant(mask, expected_dense):
    q, k, v = _qkv()
    for variant in VARIANTS:
        _assert_matches_reference(sparse_attention(q, k, v, mask, variant=variant), q, k, v, expected_dense)


def case_dilation_of_2_32_from_text():
    """(1) ``"dilated:1:4294967296"``: the step 2**32 of single-column rows became 0 in int32,
    i.e. a CSR segment, and the kernel read ``indices`` out of bounds (segfault)."""
    _through_every_variant("dilated:1:4294967296", np.eye(64, dtype=bool))


def case_dilated_window_of_2_40():
    """(1) ``DilatedWindow(2**40, 2**40)``: the same through the pattern object."""
    _through_every_variant(DilatedWindow(2**40, 2**40), np.eye(64, dtype=bool))


def case_global_token_count_of_1e10():
    """(3) ``"global:10000000000"`` materialised 10**10 tokens before clipping them to n."""
    _through_every_variant("global:10000000000", np.ones((64, 64), dtype=bool))
    assert GlobalTokens(10**20).dense_mask(8).all()


def case_sequence_length_beyond_int32():
    """Rows and columns are int32 everywhere: n = 2**31 is refused before anything is allocated
    (it used to build [2**31, ...] int64 arrays)."""
    for build in (lambda: ACSR.from_pattern(Window(1), 2**31), lambda: Window(1).row_segments(2**31)):
        with pytest.raises(ValueError, match=r"sequence length must be <= 2147483647 \(int32 tables\)"):
            build()


def case_step_of_2_32_in_hand_built_tables():
    """(1, 6) Tables holding 2**32 were cast to int32 unchecked (0 = CSR segment)."""
    acsr = ACSR.from_pattern(Window(0), 64)
    step = acsr.seg_step.astype(np.int64)
    step[:] = 2**32
    with pytest.raises(ValueError, match="seg_step holds 4294967296, outside the int32 range"):
        ACSR(64, acsr.seg_start, step, acsr.seg_count, acsr.indices)


def _bad_tables(edit):
    def case():
        q, k, v = _qkv()
        for variant in VARIANTS:
            acsr = ACSR.from_pattern(Window(2), 64)
            edit(acsr)
            with pytest.raises(ValueError, match="ACSR"):
                sparse_attention(q, k, v, acsr, variant=variant)
    case.__doc__ = ("(6) An ACSR built with out-of-range tables reached the kernels unchecked, which then "
                    "read outside k, v or indices.")
    return case


def _start_past_n(acsr):
    acsr.seg_start[0, 10, 0] = 1000


def _step_past_n(acsr):
    acsr.seg_step[0, 10, 0] = 40


def _indexed_past_indices(acsr):
    acsr.seg_step[0, 10, 0] = 0  # an indexed segment of 5 columns in indices of length 1


def _index_past_n(acsr):
    acsr.seg_step[0, 10, 0], acsr.seg_count[0, 10, 0], acsr.seg_start[0, 10, 0] = 0, 1, 0
    acsr.indices[0, 0] = 5000
    acsr.row_ptr[0, 11:] -= 4  # consistent, so only the index is wrong


def _negative_count(acsr):
    acsr.seg_count[0, 10, 0] = -7


ISOLATED = {
    "dilation_of_2_32_from_text": case_dilation_of_2_32_from_text,
    "dilated_window_of_2_40": case_dilated_window_of_2_40,
    "global_token_count_of_1e10": case_global_token_count_of_1e10,
    "sequence_length_beyond_int32": case_sequence_length_beyond_int32,
    "step_of_2_32_in_hand_built_tables": case_step_of_2_32_in_hand_built_tables,
    "acsr_start_past_n": _bad_tables(_start_past_n),
    "acsr_step_past_n": _bad_tables(_step_past_n),
    "acsr_indexed_segment_past_indices": _bad_tables(_indexed_past_indices),
    "acsr_index_past_n": _bad_tables(_index_past_n),
    "acsr_negative_count": _bad_tables(_negative_count),
}

# Address space of the child. torch + TVM + a few compiled kernels peak at about 1.1 GB of
# virtual memory (VmPeak, measured on the CPU machine); 6 GB leaves room and still stops a
# runaway allocation long before the 24 GB machine swaps.
CHILD_ADDRESS_SPACE = 6 * 2**30
# Seconds one case may take: importing torch and TVM took 8-9 s on the shared 2-core machine,
# compiling the three kernel variants about 4 s; a case that takes ten times that has hung.
CASE_TIMEOUT_S = 120

_MARK = "@@case"  # the child's report lines; anything else a case prints is ignored
_CHILD = f"""
import json, resource, runpy, sys, traceback
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
cases = runpy.run_path(sys.argv[1])["ISOLATED"]
for name in sys.argv[3:]:
    print("{_MARK} START", name, flush=True)
    try:
        cases[name]()
        print("{_MARK} PASS", name, flush=True)
    except BaseException:
        print("{_MARK} FAIL", name, json.dumps(traceback.format_exc()), flush=True)
"""


def _start_child(names):
    """The child running ``names`` in order (with this module's ``tvm_splat``), a queue of its
    stdout lines (None at the end) and a list collecting its stderr."""
    env = dict(os.environ)
    root = str(Path(tvm_splat.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, __file__, str(CHILD_ADDRESS_SPACE), *names],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    stderr: list = []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    return proc, lines, stderr


def _collect(names, results: dict) -> None:
    """Run ``names`` in one child and record what became of each into ``results`` until the
    child ends, crashes or hangs in a case."""
    proc, lines, stderr = _start_child(names)
    current = None
    while True:
        try:
            line = lines.get(timeout=CASE_TIMEOUT_S)
        except queue.Empty:
            proc.kill()
            proc.wait()
            results[current or names[0]] = ("TIMEOUT", f"no answer after {CASE_TIMEOUT_S} s")
            return
        if line is None:  # the child ended
            proc.wait()
            why = f"exit status {proc.returncode}\n" + "".join(stderr)[-3000:]
            if current is not None:
                results[current] = ("CRASH", why)
            elif proc.returncode != 0:  # before its first case (an import error): none can run
                results.update({n: ("CRASH", why) for n in names if n not in results})
            return
        if not line.startswith(_MARK + " "):
            continue
        status, name, *detail = line[len(_MARK) + 1:].rstrip("\n").split(" ", 2)
        if status == "START":
            current = name
        else:
            results[name] = (status, json.loads(detail[0]) if detail else "")
            current = None


def _run_isolated(names) -> dict:
    """Run the cases ``names`` in children: ``{name: (status, detail)}``, status ``PASS``,
    ``FAIL``, ``CRASH`` (the child died in it) or ``TIMEOUT``; after a crash or a hang a new
    child runs the cases that are left."""
    results: dict = {}
    remaining = list(names)
    while remaining:
        _collect(remaining, results)
        left = [n for n in remaining if n not in results]
        if len(left) == len(remaining):  # no progress: never loop
            results.update({n: ("CRASH", "the child ran none of its cases") for n in left})
            left = []
        remaining = left
    return results


@pytest.fixture(scope="module")
def isolated_results():
    return _run_isolated(list(ISOLATED))


@pytest.mark.parametrize("name", list(ISOLATED))
def test_isolated_case(name, isolated_results):
    status, detail = isolated_results[name]
    assert status == "PASS", f"{name}: {status}\n{detail}"


# ============================================================ (2) NaN in masked-out keys and values
def _mask_without_tail(n=64, tail=16):
    mask = Window(4).dense_mask(n)
    mask[:, n - tail:] = False
    return mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_in_masked_out_keys_and_values_contributes_nothing(variant):
    """Padding garbage: k and v columns 48..63 are NaN and no row attends to them. The tiled
    kernel multiplied them by a zero probability (1664 of 2048 outputs NaN)."""
    q, k, v = _qkv()
    k[:, :, 48:] = np.nan
    v[:, :, 48:] = np.nan
    mask = _mask_without_tail()
    _assert_matches_reference(sparse_attention(q, k, v, ACSR.from_mask(mask), variant=variant), q, k, v, mask)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_nan_value_reaches_only_the_rows_that_attend_it(variant):
    """A NaN at v[0, 0, 20, 3] belongs in the 9 rows of window ±4 around row 20, not in all 64
    rows of its head."""
    q, k, v = _qkv()
    v[0, 0, 20, 3] = np.nan
    _assert_matches_reference(sparse_attention(q, k, v, Window(4), variant=variant), q, k, v, Window(4).dense_mask(64))


# ============================================================ (4) non-finite scores, scale
# The tiled and row kernels turned a row of non-finite scores into zeros; separate was right.
NON_FINITE_SCORE_VARIANTS = VARIANTS


@pytest.mark.parametrize("variant", NON_FINITE_SCORE_VARIANTS)
def test_inf_in_q_gives_nan_like_dense_attention_not_zeros(variant):
    """+inf in q makes the row's scores infinite; dense softmax gives NaN there, never a
    plausible all-zero row."""
    q, k, v = _qkv()
    q[0, 0, 10, 0] = np.inf
    _assert_matches_reference(sparse_attention(q, k, v, Window(4), variant=variant), q, k, v, Window(4).dense_mask(64))


@pytest.mark.parametrize("variant", NON_FINITE_SCORE_VARIANTS)
def test_nan_in_q_propagates_to_its_row(variant):
    q, k, v = _qkv()
    q[0, 1, 33, 2] = np.nan
    _assert_matches_reference(sparse_attention(q, k, v, Window(4), variant=variant), q, k, v, Window(4).dense_mask(64))


@pytest.mark.parametrize("scale, message", [
    (float("nan"), "scale must be finite, got nan"),  # gave all zeros
    (float("inf"), "scale must be finite, got inf"),
    ("0.25", "scale must be None or a finite real number, got '0.25'"),  # was silently float()ed
    (True, "scale must be None or a finite real number, got True"),
])
def test_non_finite_or_non_numeric_scale_is_refused(scale, message):
    q, k, v = _qkv(n=16)
    for inputs in ((q, k, v), tuple(torch.from_numpy(x) for x in (q, k, v))):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            sparse_attention(*inputs, Window(2), scale=scale)


# ============================================================ (5) legal torch tensors
def _packed_qkv(b=1, h=1, n=5, d=4, seed=0):
    """``q, k, v = qkv.unbind(0)`` of a packed [3, b, h, n, d] projection: contiguous views;
    with b*h*n*d*4 = 80 bytes per slice, k and v do not start on 64 bytes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, b, h, n, d, generator=g).unbind(0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_qkv_views_are_accepted(variant):
    """These failed with ``FromDLPack: Data is not aligned to 64 bytes``."""
    q, k, v = _packed_qkv()
    assert all(x.is_contiguous() for x in (q, k, v)) and k.data_ptr() % 64
    _assert_matches_reference(sparse_attention(q, k, v, Window(1), variant=variant), q, k, v, Window(1).dense_mask(5))


def test_packed_qkv_after_aligned_inputs_of_the_same_shape():
    """The torch fast path (second call of a workload) must not hand the kernel a misaligned
    view either: it falls back to the checked path."""
    aligned = [torch.randn(1, 1, 5, 4) for _ in range(3)]
    sparse_attention(*aligned, "window:1")
    q, k, v = _packed_qkv(seed=1)
    _assert_matches_reference(sparse_attention(q, k, v, "window:1"), q, k, v, Window(1).dense_mask(5))


def test_slice_view_and_from_numpy_inputs_are_accepted():
    """``x[1:].view(...)`` (4 bytes off) and ``torch.from_numpy`` of a numpy buffer that is not
    64-byte aligned."""
    b, h, n, d = 1, 2, 7, 4
    size = b * h * n * d
    flat = torch.randn(3 * size + 1)
    q, k, v = (flat[1 + i * size:1 + (i + 1) * size].view(b, h, n, d) for i in range(3))
    _assert_matches_reference(sparse_attention(q, k, v, "window:2"), q, k, v, Window(2).dense_mask(n))
    buffer = np.random.default_rng(0).standard_normal(3 * size + 1).astype("float32")
    q, k, v = (torch.from_numpy(buffer[1 + i * size:1 + (i + 1) * size].reshape(b, h, n, d)) for i in range(3))
    _assert_matches_reference(sparse_attention(q, k, v, "window:2"), q, k, v, Window(2).dense_mask(n))


# ============================================================ (6) the ACSR boundary, elsewhere
def test_sparsify_attention_refuses_an_acsr_with_bad_tables():
    from tvm.relax.frontend.torch import from_exported_program

    from tvm_splat.relay_passes import SparsifyAttention

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    args = tuple(torch.randn(1, 2, 16, 8) for _ in range(3))
    mod = from_exported_program(torch.export.export(Attention().eval(), args))
    acsr = ACSR.from_pattern(Window(2), 16)
    acsr.seg_start[0, 3, 0] = 100
    with pytest.raises(ValueError, match=r"ACSR seg_start\[0, 3, 0\] = 100 starts an affine segment leaving"):
        SparsifyAttention(acsr)(mod)


def test_tuning_refuses_an_acsr_with_bad_tables(tmp_path, monkeypatch):
    from tvm_splat.planner import plan

    monkeypatch.setenv("TVM_SPLAT_TUNING_LOGS", str(tmp_path))
    acsr = ACSR.from_pattern(Window(2), 16)
    acsr.indices[0, 0] = -3
    # every tuner takes its workload as a plan, and planning checks the tables
    for variant in ("row", "tiled"):
        with pytest.raises(ValueError, match=r"ACSR indices\[0, 0\] = -3 is outside"):
            plan(acsr, (1, 1, 16, 8), None, "float32", None, target="llvm", variant=variant)


# ============================================================ (7) smaller ones
def test_window_of_2_63_is_a_dense_window_not_an_overflow():
    """``Window(2**63)`` raised ``OverflowError: Python int too large to convert to C long``."""
    q, k, v = _qkv(n=16)
    _assert_matches_reference(sparse_attention(q, k, v, Window(2**63)), q, k, v, np.ones((16, 16), dtype=bool))
    _assert_matches_reference(sparse_attention(q, k, v, parse_pattern(f"window:{2**63}")), q, k, v,
                              np.ones((16, 16), dtype=bool))


@pytest.mark.parametrize("variant, knobs, message", [
    ("tiled", {"br": 32}, "knobs of the 'tiled' variant must be TiledKnobs or None, got dict"),
    ("tiled", RowKnobs(), "knobs of the 'tiled' variant must be TiledKnobs or None, got RowKnobs"),
    ("row", TiledKnobs(), "knobs of the 'row' variant must be RowKnobs or None, got TiledKnobs"),
    ("separate", 7, "knobs of the 'separate' variant must be RowKnobs or None, got int"),
    ("fused", TiledKnobs(), "variant 'fused' is now called 'tiled'"),
], ids=["tiled-dict", "tiled-RowKnobs", "row-TiledKnobs", "separate-int", "fused-renamed"])
def test_junk_knobs_are_refused(variant, knobs, message):
    """Knobs that a variant cannot use were silently replaced by the defaults (and a dict made
    the torch fast path's cache key unhashable)."""
    q, k, v = _qkv(n=16)
    for inputs in ((q, k, v), tuple(torch.from_numpy(x) for x in (q, k, v))):
        with pytest.raises(ValueError, match=message):
            sparse_attention(*inputs, Window(2), variant=variant, knobs=knobs)


@pytest.mark.parametrize("tol", [-1, float("nan"), float("inf"), "0", True])
def test_compaction_tolerance_must_be_finite_and_non_negative(tol):
    """``tol=-1`` was accepted and counted no weight as zero."""
    import tvm

    from tvm_splat.relay_passes import CompactPrunedChannels
    from tvm_splat.relay_passes.compact_channels import compact_pruned_channels

    with pytest.raises(ValueError, match="tol must be a finite real number >= 0"):
        CompactPrunedChannels(tol=tol)
    with pytest.raises(ValueError, match="tol must be a finite real number >= 0"):
        compact_pruned_channels(tvm.IRModule(), tol=tol)


@pytest.mark.parametrize("argument", [42, "mod", None])
def test_sparsify_attention_called_on_a_non_module(argument):
    """Was TVM's ``Mismatched type on argument #1 when calling transform.RunPass``."""
    from tvm_splat.relay_passes import SparsifyAttention

    with pytest.raises(TypeError, match=f"SparsifyAttention runs on a tvm.IRModule .*, got {type(argument).__name__}"):
        SparsifyAttention("window:2")(argument)


@pytest.mark.parametrize("argv, message", [
    (["demo", "--repeats", "0"], "argument --repeats: must be an integer >= 1, got '0'"),  # "no median for empty data"
    (["demo", "--seq", "-4"], "argument --seq: must be an integer >= 1, got '-4'"),
    (["autotune", "--stages", "abc"], "stages must be a comma-separated list of 1 and 2 (e.g. 1,2), got 'abc'"),
    (["autotune", "--stages", "1,3"], "stages must be a comma-separated list of 1 and 2"),
    (["autotune", "--trials", "0"], "argument --trials: must be an integer >= 1, got '0'"),
])
def test_cli_arguments_are_checked_before_any_work(argv, message, capsys):
    """``--stages abc`` read ``invalid <lambda> value``."""
    from tvm_splat.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_run_demo_refuses_zero_repeats():
    from tvm_splat.demo import run_demo

    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        run_demo(seq_len=16, heads=1, head_dim=4, repeats=0)


# ============================================================ the reference itself
def test_reference_matches_torch_and_ignores_masked_out_garbage():
    """The reference is checked against PyTorch's SDPA (float64, a boolean mask), and garbage
    in masked-out keys and values does not change it."""
    q, k, v = _qkv(b=2, h=2, n=24, d=8)
    mask = _mask_without_tail(24, 5)
    mask[3] = False  # an empty row: zeros by our convention (SDPA gives NaN there)
    ref = masked_attention(q, k, v, mask)
    torch_mask = torch.from_numpy(mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x).double() for x in (q, k, v)), attn_mask=torch_mask).numpy()
    rows = mask.any(axis=1)
    np.testing.assert_allclose(ref[:, :, rows], sdpa[:, :, rows], atol=1e-12)
    assert (ref[:, :, ~rows] == 0).all()
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 19:] = np.nan
    v2[:, :, 19:] = np.inf
    np.testing.assert_array_equal(masked_attention(q, k2, v2, mask), ref)
    q2 = q.copy()
    q2[0, 0, 7, 1], q2[1, 1, 9, 0] = np.nan, np.inf  # non-finite scores: NaN rows, as SDPA
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x).double() for x in (q2, k, v)), attn_mask=torch_mask).numpy()
    np.testing.assert_array_equal(np.isnan(masked_attention(q2, k, v, mask))[:, :, rows], np.isnan(sdpa)[:, :, rows])
    assert np.isnan(sdpa[0, 0, 7]).all() and np.isnan(sdpa[1, 1, 9]).all()


def test_buffers_past_int32_indexing_are_refused_by_name():
    """The kernels index every buffer with int32 arithmetic: a q of 2**31 elements, or a
    multi-component plan's float32 partial outputs (components x q's size) past 2**31 - 1, would
    be read and written at wrapped offsets. Both are refused when planned, naming the buffer;
    one element fewer plans."""
    from tvm_splat.kernels.spec import MAX_BUFFER_ELEMENTS
    from tvm_splat.planner import plan

    h100 = "nvidia/nvidia-h100"
    with pytest.raises(ValueError, match=r"q \(and the output\) \[1, 256, 65536, 128\] would hold 2,147,483,648 "
                                         r"elements, more than the kernels' int32 indexing reaches"):
        plan("window:4", (1, 256, 65536, 128), None, "float16", None, target=h100)
    # causal strided: two components, so o_part is [batch x heads, 2, n, head_dim] float32
    planned = plan("causal_strided:128", (1, 64, 65536, 128), None, "float16", None, target=h100)
    assert planned.tile_plan.shape.num_components == 2  # o_part: 2**30 elements, within reach
    with pytest.raises(ValueError, match=r"the scratch buffer o_part \[128, 2, 65536, 128\]"):
        plan("causal_strided:128", (1, 128, 65536, 128), None, "float16", None, target=h100)
    assert 1 * 128 * 65536 * 128 <= MAX_BUFFER_ELEMENTS  # q itself was within reach there
