"""Choose a schedule for each attention kernel from the target and the mask geometry."""
from __future__ import annotations

from .row import RowKnobs, row_schedule


def check_knobs(variant: str, knobs):
    """``ValueError`` unless ``knobs`` fit ``variant`` of ``sparse_attention``: ``None``
    (tuned or default knobs) for any variant, a :class:`~tvm_splat.schedules.tiled.TiledKnobs`
    for ``"tiled"``, a :class:`RowKnobs` for ``"row"`` and ``"separate"``. ``"fused"`` takes
    none: it uses the workload's tuned knobs, else the defaults."""
    if knobs is None:
        return
    from .tiled import TiledKnobs

    wanted = {"tiled": TiledKnobs, "row": RowKnobs, "separate": RowKnobs}.get(variant)
    if wanted is None:
        raise ValueError(f"knobs are not taken by variant={variant!r} (it uses the tuned or default "
                         f"knobs); pass TiledKnobs with variant='tiled', got {knobs!r}")
    if not isinstance(knobs, wanted):
        raise ValueError(f"knobs for variant={variant!r} must be {wanted.__name__} or None, "
                         f"got {type(knobs).__name__}: {knobs!r}")


def schedule_attention(name, func, spec, target, knobs=None, geometry=None):
    """Schedule kernel ``name`` (``fused``/``sddmm``/``softmax``/``spmm``) for ``target``."""
    return row_schedule(func, target, knobs if isinstance(knobs, RowKnobs) else RowKnobs())
