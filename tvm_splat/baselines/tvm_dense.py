"""TVM's own dense attention, the "TVM baseline": Relax ``nn.attention`` (optionally masked),
legalised to TIR and scheduled by TVM's default rules (``s_tir.dlight`` on the GPU)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from ..schedules.targets import as_target, is_gpu, target_name


def dense_attention_module(batch, heads, seq_len, head_dim, dtype, scale=None, with_mask=False,
                           decomposed=False):
    """Relax module ``main(q, k, v[, bias]) -> out``, all ``[batch, heads, seq_len, head_dim]``.

    With ``with_mask`` an additive float bias ``[batch, heads, seq_len, seq_len]`` (0 / -inf-like)
    is taken, so the baseline computes the same masked attention as the sparse kernels.
    ``decomposed``: write it as matmul, scale + bias, softmax (fp32), matmul instead of one
    ``nn.attention``. MetaSchedule tunes that form: ``nn.attention`` legalizes to a single
    PrimFunc of 18 blocks on which TVM 0.27's CUDA design space fails (its CrossThreadReduction
    rule raises IndexError; without it no sample built on the H100), while matmul and softmax
    are the workloads its rules are made for.
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
            if decomposed:
                scores = bb.emit(relax.op.astype(relax.op.matmul(q, relax.op.permute_dims(k, [0, 1, 3, 2])), "float32"))
                scores = bb.emit(relax.op.multiply(scores, relax.const(scale, "float32")))
                if bias is not None:
                    scores = bb.emit(relax.op.add(scores, relax.op.astype(bias, "float32")))
                probs = bb.emit(relax.op.astype(relax.op.nn.softmax(scores, axis=-1), dtype))
                res = bb.emit_output(relax.op.matmul(probs, v, out_dtype=dtype))
            else:  # nn.attention takes [batch, seq, heads, dim]
                qt, kt, vt = (bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3])) for x in (q, k, v))
                out = bb.emit(relax.op.nn.attention(qt, kt, vt, bias, scale=scale))
                res = bb.emit_output(relax.op.permute_dims(out, [0, 2, 1, 3]))
        bb.emit_func_output(res)
    return bb.get()


def dense_fits(batch, heads, seq_len, budget_bytes=40 * 2**30) -> bool:
    """Whether the dense scores, probabilities and additive bias (``[batch, heads, seq_len,
    seq_len]`` each, fp32 at most) fit in ``budget_bytes`` of GPU memory."""
    return batch * heads * seq_len * seq_len * 4 * 3 <= budget_bytes


def dense_log_dir(batch, heads, seq_len, head_dim, dtype, target, with_mask=False, root=None) -> Path:
    """Where the MetaSchedule database of one dense-attention workload lives."""
    from ..records import log_root

    name = f"tvm_dense_b{batch}_h{heads}_n{seq_len}_d{head_dim}_{dtype}{'_mask' if with_mask else ''}"
    return Path(root or log_root()) / target_name(as_target(target)) / name


def fused_module(mod):
    """``mod`` legalized and fused the way ``compile_relax`` does before it applies a tuning
    database, so the tuned PrimFuncs are exactly the ones it later looks up."""
    return tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
    ])(mod)


def tune_dense_attention(batch, heads, seq_len, head_dim, dtype, target, *, trials=64,
                         with_mask=False, scale=None, root=None, console=None) -> Path:
    """Tune TVM's dense attention (the ``decomposed`` module, fused by Relax) with MetaSchedule's
    default space and XGBoost cost model: the fair "TVM tuned" baseline. Every task gets at
    least one batch of trials (``trials`` is shared among them); resumable; returns the
    database folder. The progress bar shows the sum of the tasks' best latencies."""
    from tvm.s_tir import meta_schedule as ms

    from ..records import open_database
    from ..tuning.tune import (_progress_callback, alloc_arguments, local_builder, prune_database, run_us,
                               tuning_progress, tuning_target, unnamed_log_handlers_detached)

    target = tuning_target(target)
    mod = fused_module(dense_attention_module(batch, heads, seq_len, head_dim, dtype, scale, with_mask,
                                              decomposed=True))
    tasks = ms.relax_integration.extract_tasks(mod, target)
    path = dense_log_dir(batch, heads, seq_len, head_dim, dtype, target, with_mask, root)
    path.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(path))
    with tempfile.TemporaryDirectory() as work, tuning_progress(console) as progress, \
            unnamed_log_handlers_detached():
        bar = progress.add_task(f"tuning TVM dense attention ({len(tasks)} tasks)", total=trials, best="-")
        ms.relax_integration.tune_relax(
            mod, {}, target, work, max_trials_global=trials,
            num_trials_per_iter=max(1, min(32, trials // max(1, len(tasks)))),
            database=database, builder=local_builder(120),
            runner=ms.runner.LocalRunner(timeout_sec=60, f_alloc_argument=alloc_arguments),
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                               _progress_callback(progress, bar, parts=True)])
    prune_database(path, keep=1)
    # written last: a run cut short leaves its records (a re-run continues from them) but no
    # summary, so ``autotune --suite --dense`` knows to tune this shape again
    db = open_database(path)
    tasks_us = {}
    for task in tasks:
        rec = db.query_tuning_record(task.dispatched[0], target, "main")
        tasks_us[task.task_name] = (round(run_us(rec.run_secs), 2)
                                    if rec is not None and rec.run_secs else None)
    (path / "tuned.json").write_text(json.dumps({"trials": trials, "tasks_us": tasks_us}, indent=1))
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

        from ..records import open_database

        from tvm.s_tir import tensor_intrin  # noqa: F401  tensor-core records name these intrinsics

        path = dense_log_dir(batch, heads, seq_len, head_dim, dtype, target, with_mask)
        db = open_database(path)
        if db is None:
            raise FileNotFoundError(f"no tuning record for TVM dense attention in {path}")
        mod = dense_attention_module(batch, heads, seq_len, head_dim, dtype, scale, with_mask, decomposed=True)
        ex = ms.relax_integration.compile_relax(db, mod, target, None)  # legalizes and fuses like fused_module
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
