"""Tune every attention site a :class:`~tvm_splat.relay_passes.SparsifyAttention` run rewrote.

    sparsify = SparsifyAttention(pattern=Window(256))
    mod = sparsify(mod)
    tune_sites(sparsify)                  # records per distinct workload in tuning_logs/
    mod = sparsify(original_mod)          # re-run: the rewrite now uses the tuned knobs
"""
from __future__ import annotations

from .tiled import tune_tiled
from .tune import tune_attention


def tune_sites(sparsify_pass, *, plans=None, trials=64, root=None, console=None) -> dict:
    """Tune the kernels of each distinct workload among the pass's rewritten sites, for the
    kernel family and target each site's plan chose (tiled: its knobs; ``row``/``separate``:
    MetaSchedule over the row kernels).

    Returns ``{spec.key: TuneResult}``. Raises ``ValueError`` when the pass has not rewritten
    anything yet.
    """
    if not getattr(sparsify_pass, "workloads", ()):
        raise ValueError("the SparsifyAttention pass has no rewritten sites: run it on a module first")
    results = {}
    for _name, plan in sparsify_pass.workloads:
        if plan.spec.key in results:
            continue  # sites with the same workload share one record
        if plan.variant == "tiled":
            results[plan.spec.key] = tune_tiled(plan, plans=plans, root=root, console=console)
        else:
            results[plan.spec.key] = tune_attention(plan, trials=trials, variant=plan.variant, root=root,
                                                    console=console)
    return results
