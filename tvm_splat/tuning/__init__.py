"""Auto-tuning of our kernels with MetaSchedule (AutoTVM's successor) and its XGBoost cost model.

- :mod:`.space`: our schedules with their knobs as MetaSchedule design spaces (``ScheduleFn``).
- :mod:`.logs`: where tuning databases live (``tuning_logs/<target>/<workload>/``) and how the
  best record is looked up at compile time.
- :mod:`.tune`: the tuning loop (progress, resumable, real ACSR metadata as measurement inputs).
"""
from .logs import apply_best, log_root, workload_dir
from .tune import TuneResult, tune_attention

__all__ = ["TuneResult", "apply_best", "log_root", "tune_attention", "workload_dir"]
