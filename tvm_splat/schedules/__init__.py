"""Schedules: plain functions ``(func, target, knobs) -> PrimFunc``, each kernel family's
knobs and their defaults beside it (as dlight keeps a rule's config beside the rule).

- :mod:`.targets`: supported targets and their names;
- :mod:`.row`: rows -> threads (GPU) or parallel tasks (CPU), for the ``row`` and
  ``separate`` kernels (:class:`RowKnobs`);
- :mod:`.tiled`: the tiled kernel (:class:`TiledKnobs`, :func:`default_tiled_knobs`).
"""
from .row import RowKnobs, row_schedule
from .targets import as_target, is_gpu, target_key, target_name
from .tiled import TiledKnobs, default_tiled_knobs, schedule_tiled, tiled_funcs

__all__ = ["RowKnobs", "TiledKnobs", "as_target", "default_tiled_knobs", "is_gpu", "row_schedule",
           "schedule_tiled", "target_key", "target_name", "tiled_funcs"]
