"""TVM's own dense attention, the "TVM baseline": Relax ``nn.attention`` (optionally masked),
legalised to TIR and scheduled by TVM's default rules (``s_tir.dlight`` on the GPU)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from ..schedules.targets import as_target, is_gpu, target_name


def dense_attention_module(batch, heads, seq_len, head_dim, dtype, scale=None, with_mask=False):
    """Relax module ``main(q, k, v[, bias]) -> out``, all ``[batch, heads, seq_len, head_dim]``.

    With ``with_mask`` an additive float bias ``[batch, heads, seq_len, seq_len]`` (0 / -inf-like)
    is taken, so the baseline computes the same masked attention as the sparse kernels.
    """
    shape = (batch, heads, seq_len, head_dim)
    scale = float(1.0 / np.sqrt(head_dim) if scale is None else scale)
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType(shape, dtype))
    k = relax.Var("k", relax.TensorType(shape, dtype))
    v = relax.Var("v", relax.TensorType(shape, dtype))
    params = [q, k, v]
    bias = None
    if with_mask:
        bias = relax.Var("bias", relax.TensorType((batch, heads, seq_len, seq_len), dtype))
        params.append(bias)
    with bb.function("main", params):
        with bb.dataflow():
            # nn.attention takes [batch, seq, heads, dim]
            qt, kt, vt = (bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3])) for x in (q, k, v))
            out = bb.emit(relax.op.nn.attention(qt, kt, vt, bias, scale=scale))
            res = bb.emit_output(relax.op.permute_dims(out, [0, 2, 1, 3]))
        bb.emit_func_output(res)
    return bb.get()


def dense_log_dir(batch, heads, seq_len, head_dim, dtype, target, with_mask=False, root=None) -> Path:
    """Where the MetaSchedule database of one dense-attention workload lives."""
    from ..tuning.logs import log_root

    name = f"tvm_dense_b{batch}_h{heads}_n{seq_len}_d{head_dim}_{dtype}{'_mask' if with_mask else ''}"
    return Path(root or log_root()) / target_name(as_target(target)) / name


def tune_dense_attention(batch, heads, seq_len, head_dim, dtype, target, *, trials=64,
                         with_mask=False, scale=None, root=None) -> Path:
    """Tune TVM's dense attention with MetaSchedule's default space and XGBoost cost model (the
    fair "TVM tuned" baseline); resumable; returns the database folder."""
    from tvm.s_tir import meta_schedule as ms

    from ..tuning.tune import prune_database, tuning_target

    target = tuning_target(target)
    # tasks are extracted from legalized TIR (nn.attention itself is not a TIR task)
    mod = relax.transform.LegalizeOps()(
        dense_attention_module(batch, heads, seq_len, head_dim, dtype, scale, with_mask))
    path = dense_log_dir(batch, heads, seq_len, head_dim, dtype, target, with_mask, root)
    path.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(path))
    with tempfile.TemporaryDirectory() as work:
        ms.relax_integration.tune_relax(
            mod, {}, target, work, max_trials_global=trials, num_trials_per_iter=min(32, trials),
            database=database, builder=ms.builder.LocalBuilder(timeout_sec=120, max_workers=1),
            runner=ms.runner.LocalRunner(timeout_sec=60))
    prune_database(path, keep=1)
    return path


def compile_dense_attention(batch, heads, seq_len, head_dim, dtype, target, scale=None,
                            with_mask=False, tuned=False):
    """Compile :func:`dense_attention_module` for ``target``; returns ``(vm, device)`` where
    ``vm["main"](q, k, v[, bias])`` runs it on TVM tensors. ``tuned``: apply the records of
    :func:`tune_dense_attention` (``FileNotFoundError`` when there are none)."""
    target = as_target(target)
    mod = dense_attention_module(batch, heads, seq_len, head_dim, dtype, scale, with_mask)
    dev = tvm.cuda(0) if is_gpu(target) else tvm.cpu()
    if tuned:
        from tvm.s_tir import meta_schedule as ms

        from ..tuning.logs import open_database

        path = dense_log_dir(batch, heads, seq_len, head_dim, dtype, target, with_mask)
        db = open_database(path)
        if db is None:
            raise FileNotFoundError(f"no tuning record for TVM dense attention in {path}")
        ex = ms.relax_integration.compile_relax(db, relax.transform.LegalizeOps()(mod), target, None)
        return relax.VirtualMachine(ex, dev), dev
    if is_gpu(target):
        from tvm.s_tir import dlight as dl

        mod = relax.transform.LegalizeOps()(mod)
        with target:
            mod = dl.ApplyDefaultSchedule(
                dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                dl.gpu.Fallback(),
            )(mod)
    ex = tvm.compile(mod, target=target)
    return relax.VirtualMachine(ex, dev), dev
