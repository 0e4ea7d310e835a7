"""Choose a schedule for each attention kernel from the target and the mask geometry."""
from __future__ import annotations

from .row import RowKnobs, row_schedule


def schedule_attention(name, func, spec, target, knobs=None, geometry=None):
    """Schedule kernel ``name`` (``fused``/``sddmm``/``softmax``/``spmm``) for ``target``."""
    return row_schedule(func, target, knobs if isinstance(knobs, RowKnobs) else RowKnobs())
