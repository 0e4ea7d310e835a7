"""Tensor helpers at the kernel boundary: zero-copy conversion, ACSR table checks, the scale."""
import gc
import re
import weakref

import numpy as np
import pytest
import torch
import tvm

from tvm_splat.formats import ACSR, GlobalTokens, Window
from tvm_splat.tensors import (_CHECKED_ACSRS, KERNEL_ALIGNMENT, check_acsr_tables, check_scale,
                               is_aligned, to_tvm)


def _shares_memory(tvm_tensor, x) -> bool:
    return np.shares_memory(np.from_dlpack(tvm_tensor), x.numpy() if isinstance(x, torch.Tensor) else x)


# ---------------------------------------------------------------- to_tvm
def test_aligned_contiguous_inputs_are_shared_not_copied():
    x = torch.randn(2, 3, 5, 4)
    assert is_aligned(x)
    assert _shares_memory(to_tvm(x, tvm.cpu()), x)
    a = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype("float32")
    if a.ctypes.data % KERNEL_ALIGNMENT == 0:  # numpy aligns large buffers only
        assert _shares_memory(to_tvm(a, tvm.cpu()), a)


def _packed_qkv(b=1, h=1, n=5, d=4):
    """q, k, v of a packed [3, b, h, n, d] tensor: contiguous views, k and v not 64-byte aligned
    (each slice is b*h*n*d*4 = 80 bytes)."""
    return torch.randn(3, b, h, n, d).unbind(0)


@pytest.mark.parametrize("make_view", [
    lambda: _packed_qkv()[1],
    lambda: torch.randn(1 * 1 * 5 * 4 + 1)[1:].view(1, 1, 5, 4),  # x[1:].view(...): 4 bytes off
], ids=["unbind-of-packed-qkv", "slice-then-view"])
def test_misaligned_contiguous_views_are_copied_once(make_view):
    """These raised ``FromDLPack: Data is not aligned to 64 bytes``: the kernels assume TVM's
    64-byte buffer alignment, so they get an aligned copy with the same values."""
    view = make_view()
    assert view.is_contiguous() and not is_aligned(view)
    converted = to_tvm(view, tvm.cpu())
    assert not _shares_memory(converted, view)
    assert converted.data_ptr() % KERNEL_ALIGNMENT == 0
    np.testing.assert_array_equal(converted.numpy(), view.numpy())


def test_non_contiguous_tensors_become_contiguous_copies():
    x = torch.randn(2, 4, 6, 8).transpose(2, 3)
    converted = to_tvm(x, tvm.cpu())
    assert tuple(converted.shape) == tuple(x.shape)
    np.testing.assert_array_equal(converted.numpy(), x.contiguous().numpy())


def test_numpy_that_dlpack_cannot_share_is_copied():
    a = np.arange(64 * 4 + 1, dtype="float32")
    misaligned = a[1:].reshape(4, 64)
    read_only = np.arange(256, dtype="float32").reshape(4, 64)
    read_only.setflags(write=False)
    for x in (misaligned, read_only):
        np.testing.assert_array_equal(to_tvm(x, tvm.cpu()).numpy(), x)


def test_tensors_that_require_grad_are_read():
    x = torch.randn(2, 3, requires_grad=True)
    np.testing.assert_array_equal(to_tvm(x, tvm.cpu()).numpy(), x.detach().numpy())


# ---------------------------------------------------------------- check_scale
@pytest.mark.parametrize("scale, expected", [(None, None), (0.25, 0.25), (1, 1.0), (np.float32(0.5), 0.5),
                                             (-2.0, -2.0)])
def test_check_scale_accepts_finite_reals(scale, expected):
    assert check_scale(scale) == expected


@pytest.mark.parametrize("scale, message", [
    ("0.25", "scale must be None or a finite real number, got '0.25' (str)"),
    (True, "scale must be None or a finite real number, got True (bool)"),
    (1 + 2j, "scale must be None or a finite real number"),
    (float("nan"), "scale must be finite, got nan"),
    (float("inf"), "scale must be finite, got inf"),
    (np.float16("-inf"), "scale must be finite, got -inf"),
])
def test_check_scale_refuses_everything_else(scale, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_scale(scale)


# ---------------------------------------------------------------- check_acsr_tables
def _broken(edit):
    """A fresh window ACSR (n=6, one head) whose tables ``edit(acsr)`` breaks in place."""
    acsr = ACSR.from_pattern(Window(1), 6)
    edit(acsr)
    return acsr


def _set(name, index, value):
    def edit(acsr):
        getattr(acsr, name)[index] = value
    return edit


def _indexed_segment_past_indices(acsr):
    acsr.seg_step[0, 2, 0] = 0  # row 2 becomes an indexed segment at indices[1 ..], L = 1


@pytest.mark.parametrize("edit, message", [
    (_set("seg_start", (0, 5, 0), 5), r"seg_start\[0, 5, 0\] = 5 starts an affine segment leaving \[0, n=6\)"),
    (_set("seg_start", (0, 0, 0), -1), r"seg_start\[0, 0, 0\] = -1 starts an affine segment leaving"),
    (_set("seg_step", (0, 3, 0), 3), r"seg_start\[0, 3, 0\] = 2 starts an affine segment leaving \[0, n=6\)"),
    (_set("seg_count", (0, 1, 0), -1), r"seg_count\[0, 1, 0\] = -1 is negative"),
    (_set("seg_step", (0, 1, 0), -1), r"seg_step\[0, 1, 0\] = -1 is negative"),
    (_indexed_segment_past_indices, r"seg_start\[0, 2, 0\] = 1 starts an indexed segment leaving indices \[0, L=1\)"),
    (_set("indices", (0, 0), 6), r"indices\[0, 0\] = 6 is outside \[0, n=6\)"),
    (_set("row_ptr", (0, 3), 0), "row_ptr is not the running sum of the segment counts"),
    (lambda acsr: setattr(acsr, "seg_step", acsr.seg_step.astype(np.int64)), "seg_step must be an int32 numpy array"),
    (lambda acsr: setattr(acsr, "indices", acsr.indices[:, :0]), r"indices has shape \(1, 0\)"),
    (lambda acsr: setattr(acsr, "row_ptr", acsr.row_ptr[:, :-1]), r"row_ptr has shape \(1, 6\), expected \(1, 7\)"),
], ids=["start>n", "start<0", "step-runs-past-n", "count<0", "step<0", "indexed-past-indices", "index>=n",
        "row_ptr", "dtype", "indices-shape", "row_ptr-shape"])
def test_tables_that_would_leave_the_inputs_are_refused(edit, message):
    with pytest.raises(ValueError, match=message):
        check_acsr_tables(_broken(edit))


def test_good_tables_pass_and_the_result_is_cached_weakly():
    acsr = ACSR.from_pattern(GlobalTokens([0, 5]) | Window(2), 40)
    irregular = ACSR.from_mask(np.random.default_rng(0).random((30, 30)) < 0.3, max_segments=1)
    for a in (acsr, irregular):
        check_acsr_tables(a)
        assert a in _CHECKED_ACSRS
    # cached: a table broken after the first check is not looked at again (once per object)
    acsr.seg_start[0, 0, 0] = 10**6
    check_acsr_tables(acsr)
    alive = weakref.ref(acsr)
    del acsr, a
    gc.collect()
    assert alive() is None  # the cache does not keep an ACSR alive
