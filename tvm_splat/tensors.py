"""Checks and conversions where user data meets a compiled kernel (the bottom layer: numpy, TVM,
and torch only when the caller passes torch tensors).

* :func:`to_tvm`: a torch tensor (CPU or CUDA) or a numpy array as a TVM tensor, shared without
  a copy whenever the kernels may read it in place;
* :func:`check_acsr_tables`: the cheap O(tables) bounds checks that keep a kernel from reading
  outside k, v or ``indices`` when an ACSR was built by hand with bad tables, run once per ACSR;
* :func:`check_scale`: the softmax scale is ``None`` or a finite real number.
"""
from __future__ import annotations

import numbers
import weakref

import numpy as np
import tvm

__all__ = ["KERNEL_ALIGNMENT", "to_tvm", "kernel_readable", "is_aligned", "is_torch", "check_acsr_tables", "check_scale"]

# Bytes. TVM declares every buffer argument of a compiled PrimFunc 64-byte aligned
# (``tir.Buffer.data_alignment`` defaults to ``kAllocAlignment`` = 64, and the argument binder
# marks the data pointer with that ``storage_alignment``), so generated code may use aligned
# vector loads; ``tvm.runtime.from_dlpack`` refuses less for that reason. A tensor whose data
# pointer is not a multiple of this is copied (torch and TVM allocate on such boundaries).
KERNEL_ALIGNMENT = 64


def is_torch(x) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch)."""
    return type(x).__module__.startswith("torch")


def is_aligned(x) -> bool:
    """Whether the data of torch tensor ``x`` starts on a :data:`KERNEL_ALIGNMENT` boundary."""
    return x.data_ptr() % KERNEL_ALIGNMENT == 0


def to_tvm(x, dev):
    """``x`` as a TVM tensor on ``dev``, without a copy when possible.

    ``x``: a torch tensor (its own device; ``dev`` is not used) or a numpy array / array-like
    (CPU ``dev``: shared; another device: copied there). Shared through DLPack when ``x`` is
    C-contiguous and its data is 64-byte aligned; otherwise copied once into a fresh contiguous
    buffer: a non-contiguous view, or a contiguous view whose data pointer is not aligned
    (``q, k, v = qkv.unbind(0)`` of a packed ``[3, b, h, n, d]`` tensor, ``x[1:].view(...)``,
    a read-only numpy array, which DLPack cannot export). A tensor that requires grad is
    read through ``detach()``: the kernels are inference-only.
    """
    if is_torch(x):
        return tvm.runtime.from_dlpack(kernel_readable(x))
    array = np.ascontiguousarray(x)
    if (dev.dlpack_device_type() == tvm.cpu().dlpack_device_type() and array.flags.writeable
            and array.ctypes.data % KERNEL_ALIGNMENT == 0):
        return tvm.runtime.from_dlpack(array)
    return tvm.runtime.tensor(array, dev)


def kernel_readable(x):
    """Torch tensor ``x`` as the kernels read it in place: ``x`` itself when it is contiguous,
    64-byte aligned and does not require grad (the common case, checked first: the training op
    calls this for every input of every call), ``x.detach()`` (no copy: DLPack refuses tensors
    that require grad) when only that differs, else a contiguous copy, or a clone on an aligned
    boundary (see :func:`to_tvm`)."""
    if not x.requires_grad and x.is_contiguous() and is_aligned(x):
        return x
    x = x.detach()
    if not x.is_contiguous():
        return x.contiguous()
    return x if is_aligned(x) else x.clone()


def check_scale(scale):
    """``scale`` as given (``None``: the kernels use ``1/sqrt(head_dim)``) or as a float;
    ``ValueError`` for anything but a finite real number (a string such as ``"0.25"``, a bool,
    NaN or inf would otherwise turn every score into garbage or zeros)."""
    if scale is None:
        return None
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be None or a finite real number, got {scale!r} "
                         f"({type(scale).__name__})")
    scale = float(scale)
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


# ACSR objects whose tables passed check_acsr_tables (weak: a checked ACSR is not kept alive).
_CHECKED_ACSRS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

_TABLES = ("seg_start", "seg_step", "seg_count", "row_ptr", "indices")


def check_acsr_tables(acsr) -> None:
    """Raise ``ValueError`` unless the kernels can read ``acsr`` without leaving k, v,
    ``indices`` or the score buffers: O(size of the tables), vectorised, once per ACSR object.

    Checks that the five tables are int32 of consistent shapes (``seg_*`` [Hm, n, S],
    ``row_ptr`` [Hm, n + 1], ``indices`` [Hm, L]); counts and steps are >= 0; every affine
    segment (step > 0) keeps ``start + step * k`` in [0, n); every indexed segment (step 0)
    lies inside ``indices``; every entry of ``indices`` is in [0, n); ``row_ptr`` is the
    running sum of the row counts. Not checked (O(nnz)): disjoint segments, sorted rows;
    :meth:`ACSR.validate` does that.
    """
    if acsr in _CHECKED_ACSRS:
        return
    tables = {name: getattr(acsr, name) for name in _TABLES}
    _check_table_shapes(acsr, tables)
    start, step, count = (tables[name].astype(np.int64) for name in ("seg_start", "seg_step", "seg_count"))
    n, index_len = acsr.n, tables["indices"].shape[1]
    _first_bad("seg_count", count < 0, "is negative", count)
    _first_bad("seg_step", step < 0, "is negative", step)
    used = count > 0
    affine, indexed = used & (step > 0), used & (step == 0)
    last = start + step * (count - 1)
    _first_bad("seg_start", affine & ((start < 0) | (last >= n)),
               f"starts an affine segment leaving [0, n={n})", start)
    _first_bad("seg_start", indexed & ((start < 0) | (start + count > index_len)),
               f"starts an indexed segment leaving indices [0, L={index_len})", start)
    indices = tables["indices"]
    bad = (indices < 0) | (indices >= n)
    if bad.any():
        h, p = np.argwhere(bad)[0]
        raise ValueError(f"ACSR indices[{h}, {p}] = {indices[h, p]} is outside [0, n={n})")
    ptr = np.zeros((count.shape[0], n + 1), dtype=np.int64)
    np.cumsum(count.sum(axis=2), axis=1, out=ptr[:, 1:])
    if not np.array_equal(ptr, tables["row_ptr"]):
        raise ValueError("ACSR row_ptr is not the running sum of the segment counts")
    if int(ptr[:, -1].max()) > max(int(acsr.max_nnz), 1):
        raise ValueError(f"ACSR max_nnz={acsr.max_nnz} is below a head's {int(ptr[:, -1].max())} nonzeros")
    _CHECKED_ACSRS[acsr] = True


def _check_table_shapes(acsr, tables) -> None:
    for name, table in tables.items():
        if not isinstance(table, np.ndarray) or table.dtype != np.int32:
            raise ValueError(f"ACSR {name} must be an int32 numpy array, got "
                             f"{getattr(table, 'dtype', type(table).__name__)}")
    shape = (acsr.num_heads, acsr.n, acsr.max_segments)
    for name in ("seg_start", "seg_step", "seg_count"):
        if tables[name].shape != shape:
            raise ValueError(f"ACSR {name} has shape {tables[name].shape}, expected {shape} "
                             "[num_heads, n, max_segments]")
    if tables["row_ptr"].shape != (acsr.num_heads, acsr.n + 1):
        raise ValueError(f"ACSR row_ptr has shape {tables['row_ptr'].shape}, expected "
                         f"{(acsr.num_heads, acsr.n + 1)}")
    if tables["indices"].ndim != 2 or tables["indices"].shape[0] != acsr.num_heads \
            or tables["indices"].shape[1] < 1:
        raise ValueError(f"ACSR indices has shape {tables['indices'].shape}, expected "
                         f"[{acsr.num_heads}, L >= 1]")


def _first_bad(name: str, bad: np.ndarray, what: str, values: np.ndarray) -> None:
    """Raise naming the first [head, row, slot] where ``bad`` holds."""
    if bad.any():
        h, i, s = np.argwhere(bad)[0]
        raise ValueError(f"ACSR {name}[{h}, {i}, {s}] = {values[h, i, s]} {what}")
