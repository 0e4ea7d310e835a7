"""How much of the tiled kernel's computed work a finer skip could drop (CPU, no GPU needed).

    python benchmarks/empty_quarters.py [--cases 7,6,5] [--dtype bfloat16] [--target nvidia/nvidia-h100]
                                        [--rows 64] [--cols 64]

For each case of :data:`forward_kernels_ab.CASES` it makes the plan the kernel would run on
``--target`` (:func:`tvm_splat.planner.plan` without a device: the case's tuning record, else the
default knobs; the grid form's tiles, which the persistent form walks too) and counts, from the
pattern's own ``mask_mod`` at each tile's real rows and each block's real columns:

* ``blocks_per_tile``: the blocks a tile computes, on average (split chunks count as tiles);
* ``masked_share``: the share of computed scores (``br`` x ``bc`` a block) the mask drops, so
  that effective TFLOP/s = computed TFLOP/s x (1 - masked_share);
* ``empty_quarter_share``: the share of computed ``rows`` x ``cols`` pieces of a block that hold
  no kept entry at all. With ``rows = 64`` a piece is one consumer warpgroup's rows (the wgmma
  form's two warpgroups of 64 rows) and ``cols = 64`` half a block: a warpgroup could skip such
  a piece with an n=64 S and half of P V's k-steps, and nothing else of the block.

Rows of the plan that take the row kernel (``fallback_rows``) are not counted.

The window ±1024 case (7) prints 16.72 blocks a tile, 5.75% masked, 2.90% in empty quarters:
the edge blocks of each tile, where one warpgroup's rows reach only half the block.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forward_kernels_ab import CASES, _indices
from tvm_splat.formats.patterns import parse_pattern
from tvm_splat.planner import plan


def count_pieces(pattern_text: str, tile_plan, rows: int = 64, cols: int = 64) -> dict:
    """Counters of ``tile_plan`` (a :class:`~tvm_splat.formats.tile_plan.TilePlan` of the
    pattern ``pattern_text``; its mask heads summed): see the module docstring. ``rows`` must
    divide the plan's ``br`` and ``cols`` its ``bc`` (else ``empty_quarter_share`` is None: a
    block that small has no such pieces to skip)."""
    n, br, bc = tile_plan.n, tile_plan.br, tile_plan.bc
    pieces_fit = br % rows == 0 and bc % cols == 0
    pattern = parse_pattern(pattern_text)
    mask_mod = pattern.mask_mod(n)
    kept = pieces = empty = 0
    for h in range(tile_plan.num_heads):
        for row0, rstride, nrows, _comp, lo, hi, _slot in tile_plan.tiles[h].tolist():
            if nrows == 0:
                continue
            r = row0 + rstride * np.arange(br, dtype=np.int64)
            row_ok = np.arange(br) < nrows
            for col0, sigma, _full in tile_plan.blocks[h, lo:hi].tolist():
                c = col0 + sigma * np.arange(bc, dtype=np.int64)
                ok = row_ok[:, None] & (c < n)[None, :]
                inside = np.asarray(mask_mod(0, h, np.minimum(r, n - 1)[:, None], np.minimum(c, n - 1)[None, :]))
                keep = np.broadcast_to(inside, ok.shape) & ok
                kept += int(keep.sum())
                if pieces_fit:
                    quarters = keep.reshape(br // rows, rows, bc // cols, cols).any(axis=(1, 3))
                    pieces += quarters.size
                    empty += int((~quarters).sum())
    stats = tile_plan.stats()  # tiles with rows, their blocks and the scores those compute
    return {"pattern": pattern_text, "n": n, "br": br, "bc": bc, "rows": rows, "cols": cols,
            "tiles": stats["tiles"], "blocks": stats["blocks"],
            "blocks_per_tile": stats["blocks"] / max(stats["tiles"], 1),
            "masked_share": 1.0 - kept / max(stats["scores"], 1),
            "empty_quarter_share": empty / max(pieces, 1) if pieces_fit else None}


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=_indices, default=None,
                    help="comma-separated indices of forward_kernels_ab.CASES (default: all)")
    ap.add_argument("--dtype", default="bfloat16", help="the dtype the knobs are chosen for (default bfloat16)")
    ap.add_argument("--target", default="nvidia/nvidia-h100", help="the target the knobs are chosen for")
    ap.add_argument("--rows", type=int, default=64, help="rows of a piece (a consumer warpgroup's: 64)")
    ap.add_argument("--cols", type=int, default=64, help="columns of a piece (half a block: 64)")
    args = ap.parse_args(argv)
    picked = range(len(CASES)) if args.cases is None else args.cases
    seen, rows = set(), []
    for i in picked:
        pattern, b, h, kvh, n, d = CASES[i]
        workload = plan(pattern, (b, h, n, d), (b, kvh, n, d), args.dtype, device=None, target=args.target)
        if workload.tile_plan is None:
            print(json.dumps({"case": i, "pattern": pattern, "variant": workload.variant}))
            continue
        key = (pattern, n, workload.tile_plan.br, workload.tile_plan.bc)
        if key in seen:
            continue
        seen.add(key)
        row = {"case": i, "knobs": workload.knobs_source, "wgmma": bool(getattr(workload.knobs, "wgmma", False)),
               **count_pieces(pattern, workload.tile_plan, args.rows, args.cols)}
        rows.append(row)
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
