"""Auto-tuning of our kernels with MetaSchedule (AutoTVM's successor) and its XGBoost cost model.

Every tuner takes the workload as an :class:`~tvm_splat.planner.AttentionPlan` (its ACSR, shapes,
dtype, scale and target) and measures candidates with that plan's real int32 tables.

- :mod:`.space`: our schedules with their knobs as MetaSchedule design spaces (``ScheduleFn``).
- :mod:`.tune`: the tuning loop for the row kernels (progress, resumable).
- :mod:`.tiled`: the tiled kernel's plans, programs and schedules, best knobs to ``best.json``.
- :mod:`.sites`: every attention workload a ``SparsifyAttention`` run rewrote.

Where records live and how they are read back is :mod:`tvm_splat.records`.
"""
from .tiled import tune_tiled
from .tune import TuneResult, tune_attention

__all__ = ["TuneResult", "tune_attention", "tune_tiled"]
