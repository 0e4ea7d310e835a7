"""Tune every attention site a :class:`~tvm_splat.relay_passes.SparsifyAttention` run rewrote.

    sparsify = SparsifyAttention(pattern=Window(256))
    mod = sparsify(mod)
    tune_sites(sparsify, target)          # records per distinct workload in tuning_logs/
    mod = sparsify(original_mod)          # re-run: the rewrite now uses the tuned knobs
"""
from __future__ import annotations

from .tiled import tune_tiled
from .tune import tune_attention


def tune_sites(sparsify_pass, target, *, variant="fused", plans=None, trials=64,
               root=None, console=None) -> dict:
    """Tune the kernels of each distinct workload among the pass's rewritten sites.

    Returns ``{spec.key: TuneResult}``. ``variant`` is the pass's kernel variant (``fused``:
    the tiled kernel's knobs; ``row``/``separate``: MetaSchedule over the row kernels).
    Raises ``ValueError`` when the pass has not rewritten anything yet.
    """
    if not getattr(sparsify_pass, "workloads", ()):
        raise ValueError("the SparsifyAttention pass has no rewritten sites: run it on a module first")
    results = {}
    for _name, acsr, spec in sparsify_pass.workloads:
        if spec.key in results:
            continue  # sites with the same workload share one record
        if variant == "fused":
            results[spec.key] = tune_tiled(acsr, spec.batch, spec.heads, spec.head_dim, spec.dtype,
                                           target, plans=plans, root=root, console=console,
                                           scale=spec.scale)
        else:
            results[spec.key] = tune_attention(acsr, spec.batch, spec.heads, spec.head_dim, spec.dtype,
                                               target, trials=trials, variant=variant, root=root,
                                               console=console, scale=spec.scale)
    return results
