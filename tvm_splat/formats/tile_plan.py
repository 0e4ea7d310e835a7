"""Tile plan: the just-in-time geometry analysis that turns an ACSR mask into work tiles.

Pure numpy, plain data (like FlexAttention's ``BlockMask``); no TVM. The tiled kernels
(:mod:`tvm_splat.kernels.tiled`, :mod:`tvm_splat.kernels.tiled_mma`) run one program per
(batch x head, tile) and read only the int32 tables built here.

Vocabulary
----------
* Every affine segment of a row gets an effective step ``sigma`` (``seg_sigma``): its own step,
  except that a one-column segment (whose step means nothing) joins the step of a
  *row-aligned* component when its column fits that component's residue rule, else 1.
* A step ``sigma > 1`` is **row-aligned** in a head when ``(start - row) mod sigma`` is the same
  for every multi-column segment of that step (dilated windows, the strided part of
  Sparse-Transformer masks). Rows of such a component are grouped by ``row mod sigma``, so the
  rows of one tile share one column residue and their columns compress into dense blocks.
* A **component** is a row grouping, identified by its row stride ``rstride``: 1 (contiguous
  rows; holds every non-aligned step, windows, blocks, global tokens) or an aligned ``sigma``.
  The tiles of one component partition all rows of the head.
* A **tile** is ``nrows <= BR`` rows ``row0 + rstride * r`` of one component.
* A **column block** of a tile is ``BC`` columns ``col0 + sigma * u`` (one step, one residue).
  The blocks of a tile cover, for every step, exactly the columns its rows use with that step,
  without overlap (greedy minimum cover of the compressed column intervals), so window + global
  tiles get ``[0, g)`` and the band, not everything between.
* A block is FULL when every valid row of the tile contains all ``BC`` of its columns (no mask
  test needed), else PARTIAL: the kernel then tests, per score, whether the column lies in a
  segment of the row with the block's step (range + residue, computed from the segment
  tables, never loaded per nonzero).

Each nonzero therefore lies in exactly one (component, tile, block). With one component the
kernel writes the output directly; with several it writes per-component partial softmax states
that a merge kernel combines (FlashDecoding-style). Rows with an INDEXED (CSR) segment are left
out of the tiled path entirely (``seg_sigma = 0``) and listed in ``fallback_rows`` for a row
kernel that computes them whole.

**Split-KV.** A tile whose block list is far longer than the typical tile's (the rows of a
global token walk all ``n / BC`` blocks while a window's rows walk ~10) would be the last program
to finish, alone on the GPU. Such a tile is split into *chunks* of consecutive blocks, each its
own program; every chunk writes its partial softmax state ``(O, m, l)`` into its own *slot* and
a split-merge kernel combines the slots of each split *group* (the original tile) into the
tile's output, or into its component's partial state when there are several components.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

__all__ = ["TilePlan", "PlanShape", "plan_tiles", "split_length", "TILE_FIELDS", "BLOCK_FIELDS", "SPLIT_FIELDS"]

#: columns of ``TilePlan.tiles[h, t, :]`` (``slot = -1``: the tile is not split)
TILE_FIELDS = ("row0", "rstride", "nrows", "comp", "blk_lo", "blk_hi", "slot")
#: columns of ``TilePlan.splits[h, g, :]``: the rows of a split tile and its chunks' slots
SPLIT_FIELDS = ("row0", "rstride", "nrows", "comp", "slot_lo", "slot_hi")
#: columns of ``TilePlan.blocks[h, b, :]``
BLOCK_FIELDS = ("col0", "sigma", "full")


@dataclass(frozen=True)
class PlanShape:
    """The static sizes of a plan a compiled kernel is specialised on."""

    num_tiles: int       # T: tiles per head (padded to the max over heads)
    num_blocks: int      # NB: column blocks per head (padded, >= 1)
    num_components: int  # C: max components of a head (1 = direct output, no merge)
    num_fallback: int    # F: max fallback rows of a head (0 = no fallback kernel)
    br: int
    bc: int
    num_slots: int = 0   # NS: split-KV chunks of a head (0 = no split, no split-merge kernel)
    num_groups: int = 0  # NG: split tiles of a head
    step: int = 1        # the step every column block shares (dilated: the dilation), 0: mixed

    @property
    def key(self) -> str:
        split = f"_s{self.num_slots}g{self.num_groups}" if self.num_slots else ""
        step = f"_st{self.step}" if self.step != 1 else ""
        return (f"t{self.num_tiles}_nb{self.num_blocks}_c{self.num_components}"
                f"_f{self.num_fallback}_br{self.br}_bc{self.bc}{split}{step}")


@dataclass(frozen=True, eq=False)
class TilePlan:
    """int32 tables of the tiled kernel, one slab per mask head (``Hm``).

    * ``tiles [Hm, T, 7]``: ``row0, rstride, nrows, comp, blk_lo, blk_hi, slot`` (see
      ``TILE_FIELDS``); padding tiles have ``nrows = 0`` and no blocks; a chunk of a split
      tile has its ``slot >= 0`` (else -1).
    * ``splits [Hm, max(NG, 1), 6]``: per split tile, its rows, component and the slots
      ``slot_lo <= s < slot_hi`` of its chunks (``SPLIT_FIELDS``; padding: ``nrows = 0``).
    * ``blocks [Hm, NB, 3]``: ``col0, sigma, full``; the blocks of tile t are
      ``blk_lo <= b < blk_hi``.
    * ``seg_sigma [Hm, n, S]``: effective step of each segment for the tiled path (0 = not
      in it: unused slot, indexed segment, or any segment of a fallback row).
    * ``comp_rstride [Hm, C]``: row stride of each component (0 = no such component).
    * ``num_comp [Hm]``: components per head.
    * ``fallback_rows [Hm, max(F, 1)]``: rows computed by the row kernel, ``-1`` padded.
    * ``seg_start``, ``seg_count [Hm, n, S]``: the ACSR's tables, which the tiled kernel reads
      beside ``seg_sigma`` for the PARTIAL-block membership test.
    """

    n: int
    br: int
    bc: int
    tiles: np.ndarray = field(repr=False)
    blocks: np.ndarray = field(repr=False)
    seg_sigma: np.ndarray = field(repr=False)
    comp_rstride: np.ndarray = field(repr=False)
    num_comp: np.ndarray = field(repr=False)
    fallback_rows: np.ndarray = field(repr=False)
    seg_start: np.ndarray = field(repr=False)
    seg_count: np.ndarray = field(repr=False)
    num_fallback: int = 0
    splits: np.ndarray = field(default=None, repr=False)
    num_slots: int = 0
    split_blocks: int = 0  # chunk length in blocks (0: nothing split)

    @property
    def num_heads(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def tile_blocks(self) -> np.ndarray:
        """int ``[Hm, T]``: the column blocks each tile walks (``blk_hi - blk_lo``; 0 for a
        padding tile)."""
        return self.tiles[..., 5] - self.tiles[..., 4]

    @cached_property  # read by every launch of the training op (its arrays are never changed)
    def shape(self) -> PlanShape:
        groups = int(self.splits.shape[1]) if self.num_slots else 0  # padded to the most of a head
        return PlanShape(int(self.tiles.shape[1]), int(self.blocks.shape[1]),
                         int(self.comp_rstride.shape[1]), int(self.num_fallback),
                         self.br, self.bc, int(self.num_slots), groups, self.block_step)

    @cached_property
    def block_step(self) -> int:
        """The step every column block the tiles use shares: 1 for windows and blocks, the
        dilation for a dilated mask (whose rows are regrouped by residue), 0 when the steps
        differ (unions such as causal strided); 1 for a plan without blocks. A tensor map can
        load a block of one fixed step (:func:`~tvm_splat.kernels.tiled_mma.encode_row_block_map`)."""
        heads, nb = self.blocks.shape[:2]
        ranges = np.zeros((heads, nb + 1), dtype=np.int64)  # +1 at each tile's first block, -1 past its last
        h = np.broadcast_to(np.arange(heads)[:, None], self.tiles.shape[:2])
        np.add.at(ranges, (h, self.tiles[..., 4]), 1)
        np.add.at(ranges, (h, self.tiles[..., 5]), -1)
        steps = np.unique(self.blocks[..., 1][np.cumsum(ranges, axis=1)[:, :nb] > 0])
        return 1 if steps.size == 0 else int(steps[0]) if steps.size == 1 else 0

    def stats(self) -> dict:
        """Work counters (for tuning and reports): blocks, full blocks, computed scores."""
        lo, hi = self.tiles[..., 4], self.tiles[..., 5]
        nblk = int(self.tile_blocks.sum())
        full = 0
        for h in range(self.num_heads):
            for t in range(self.tiles.shape[1]):
                full += int(self.blocks[h, lo[h, t]:hi[h, t], 2].sum())
        per_tile = self.tile_blocks[self.tiles[..., 2] > 0]
        return {"tiles": int((self.tiles[..., 2] > 0).sum()), "blocks": nblk, "full_blocks": full,
                "scores": nblk * self.br * self.bc, "components": int(self.num_comp.max()),
                "fallback_rows": int(self.num_fallback), "split_slots": int(self.num_slots),
                "max_tile_blocks": int(per_tile.max()) if per_tile.size else 0}

    def covered(self, head: int = 0) -> np.ndarray:
        """int [n, n]: how many times each (row, column) is computed as a nonzero by the tiled
        path, by brute force (tests and debugging, small n only)."""
        n = self.n
        cnt = np.zeros((n, n), dtype=np.int64)
        sig = self.seg_sigma[head]
        for t in range(self.tiles.shape[1]):
            row0, rstride, nrows, _comp, lo, hi, _slot = (int(x) for x in self.tiles[head, t])
            rows = row0 + rstride * np.arange(nrows)
            for b in range(lo, hi):
                col0, sigma, _full = (int(x) for x in self.blocks[head, b])
                cols = col0 + sigma * np.arange(self.bc)
                cols = cols[cols < n]
                for i in rows:
                    inseg = np.zeros(cols.shape, dtype=bool)
                    for s in range(sig.shape[1]):
                        if sig[i, s] != sigma:
                            continue
                        st = self.seg_start[head, i, s]
                        last = st + sigma * (self.seg_count[head, i, s] - 1)
                        inseg |= (cols >= st) & (cols <= last) & ((cols - st) % sigma == 0)
                    cnt[i, cols[inseg]] += 1
        return cnt


def _effective_sigma(rows, start, step, count):
    """(sigma per segment, aligned steps {sigma: offset}) for one head's used affine segments."""
    sigma = step.copy()
    aligned = {}
    multi = count > 1
    for s in np.unique(step[multi]):
        s = int(s)
        if s <= 1:
            continue
        sel = multi & (step == s)
        off = np.unique((start[sel] - rows[sel]) % s)
        if off.size == 1:
            aligned[s] = int(off[0])
    single = count == 1
    sigma[single] = 1
    for s in sorted(aligned, reverse=True):
        fits = single & (sigma == 1) & ((start - rows) % s == aligned[s])
        sigma[fits] = s
    return sigma, aligned


def _cover(lo, hi, bc):
    """Greedy minimum cover of the union of closed integer intervals by blocks of ``bc``:
    block starts (sorted). ``lo``/``hi`` sorted by ``lo``."""
    starts = []
    end = None  # first position not covered by the blocks so far
    for a, b in zip(lo.tolist(), hi.tolist()):
        if end is not None and b < end:
            continue
        pos = a if end is None or a >= end else end
        while pos <= b:
            starts.append(pos)
            pos += bc
        end = pos
    return starts


def _head_plan(n, br, bc, start, step, count):
    """Tiles and blocks of one head: (tiles list, blocks list, seg_sigma [n, S], rstrides,
    fallback rows)."""
    S = start.shape[1]
    used = count > 0
    indexed_row = ((step == 0) & used).any(axis=1)
    fallback = np.flatnonzero(indexed_row)
    take = used & ~indexed_row[:, None]
    rr, ss = np.nonzero(take)
    st, sp, ct = start[rr, ss].astype(np.int64), step[rr, ss].astype(np.int64), count[rr, ss].astype(np.int64)
    sig, aligned = _effective_sigma(rr, st, sp, ct)
    seg_sigma = np.zeros((n, S), dtype=np.int32)
    seg_sigma[rr, ss] = sig

    comp_of_sigma = lambda s: s if s in aligned else 1  # noqa: E731
    rstrides = sorted({comp_of_sigma(int(s)) for s in np.unique(sig)} | {1})
    # a head whose segments are all aligned needs no contiguous component
    if sig.size and all(int(s) in aligned for s in np.unique(sig)):
        rstrides.remove(1)
    seg_comp_rs = np.array([comp_of_sigma(int(s)) for s in sig], dtype=np.int64)

    tiles, blocks = [], []
    for comp, rs in enumerate(rstrides):
        sel = seg_comp_rs == rs
        c_row, c_sig, c_start, c_count = rr[sel], sig[sel], st[sel], ct[sel]
        # tile of every row in this component: rows grouped by row mod rs, BR per tile
        tile_of_row = np.empty(n, dtype=np.int64)
        comp_tiles = []
        for res in range(rs):
            group = np.arange(res, n, rs)
            first = len(comp_tiles)
            for t0 in range(0, group.size, br):
                comp_tiles.append((int(group[t0]), rs, int(min(br, group.size - t0))))
            tile_of_row[group] = first + np.arange(group.size) // br
        # segments -> (tile, sigma, residue, compressed interval)
        seg_tile = tile_of_row[c_row]
        res_ = c_start % c_sig
        lo = c_start // c_sig
        hi = lo + c_count - 1
        order = np.lexsort((lo, res_, c_sig, seg_tile))
        seg_tile, c_sig, res_, lo, hi, c_row2 = (a[order] for a in (seg_tile, c_sig, res_, lo, hi, c_row))
        key = np.stack([seg_tile, c_sig, res_], axis=1)
        if key.shape[0]:
            brk = np.flatnonzero(np.any(key[1:] != key[:-1], axis=1)) + 1
            bounds = np.concatenate(([0], brk, [key.shape[0]]))
        else:
            bounds = np.zeros(1, dtype=np.int64)
        per_tile = [[] for _ in comp_tiles]
        for g in range(bounds.shape[0] - 1):
            a, b = int(bounds[g]), int(bounds[g + 1])
            t, s, r = (int(x) for x in key[a])
            row0, rstr, nrows = comp_tiles[t]
            u0 = np.asarray(_cover(lo[a:b], hi[a:b], bc), dtype=np.int64)
            # coverage of each (tile row, block): segments are disjoint within a row
            ov = np.minimum(hi[a:b, None], u0[None, :] + bc - 1) - np.maximum(lo[a:b, None], u0[None, :]) + 1
            ov = np.maximum(ov, 0)
            local = (c_row2[a:b] - row0) // rstr
            cov = np.zeros((nrows, u0.size), dtype=np.int64)
            np.add.at(cov, local, ov)
            inside = r + s * (u0 + bc - 1) < n
            full = (cov == bc).all(axis=0) & inside
            for u, f in zip(u0.tolist(), full.tolist()):
                per_tile[t].append((r + s * u, s, int(f)))
        for (row0, rstr, nrows), blks in zip(comp_tiles, per_tile):
            tiles.append([row0, rstr, nrows, comp, len(blks)])
            blocks.append(blks)
    return tiles, blocks, seg_sigma, rstrides, fallback


def kernel_arrays(acsr, plan: "TilePlan | None" = None) -> dict:
    """int32 inputs of the kernels by parameter name: the ACSR tables, plus the plan's tables
    when a plan is given (what the tiled kernel, its merge and its fallback take). Parameter
    names are the kernels' own, so a caller matches arrays to ``func.params`` by name."""
    arrays = {"seg_start": acsr.seg_start, "seg_step": acsr.seg_step, "seg_count": acsr.seg_count,
              "row_ptr": acsr.row_ptr, "indices": acsr.indices}
    if plan is not None:
        arrays.update(seg_sigma=plan.seg_sigma, tiles=plan.tiles, blocks=plan.blocks,
                      num_comp=plan.num_comp, fallback_rows=plan.fallback_rows, splits=plan.splits)
    return {name: np.ascontiguousarray(a, dtype=np.int32) for name, a in arrays.items()}


#: split-KV rule (:func:`split_length`): a tile is split when it has more than
#: ``SPLIT_RATIO`` times the blocks of the typical tile (the ``SPLIT_QUANTILE`` of the tiles'
#: block counts) and at least ``SPLIT_MIN_BLOCKS`` blocks. A global token's row tile at n=4096,
#: 64x64 tiles walks 64 blocks against ~11 for the window tiles beside it (H200, Longformer
#: shapes: 0.22-0.41x FlexAttention before the split, the critical path being that one tile).
SPLIT_RATIO = 2.0
SPLIT_QUANTILE = 0.9
SPLIT_MIN_BLOCKS = 8
#: ... unless the grid holds this many times the longest tile's work (blocks over all tiles of
#: all ``batch x heads`` programs, over the longest tile's blocks): the kernels start every
#: head's longest tiles first (:func:`~tvm_splat.kernels.common.tile_grid_rows`), so with about
#: as many heavy-tile lengths of work as the GPU runs thread blocks at once (132 SMs x ~4 on the
#: H200) the heavy tiles end with the rest and a split only adds its partial states and merge.
#: Measured on the H200 (forward, d=64, 64x64 tiles, longest-first grid), no split against the
#: split: Longformer ±256 + 4 global, n=4096, batch 1 x 12 heads (126 lengths of work) 0.18 vs
#: 0.10 ms; batch 4 (506) 0.21 vs 0.21; batch 8 x 16 heads (1348) 0.41 vs 0.47; ±128 + 4 global,
#: n=1024, batch 32 x 12 (2400) 0.23 vs 0.30.
SPLIT_NEEDLESS_WORK = 512


def split_length(blocks_per_tile, grid_heads: int | None = None) -> int:
    """Chunk length (in blocks) for split-KV over tiles with these block counts (one head's
    tiles, or every mask head's), or 0 when no tile is long enough to be worth splitting (see
    ``SPLIT_RATIO``). Causal and uniform masks, whose long tiles are the common case rather
    than outliers, are not split. ``grid_heads``: the programs per tile in the kernel's grid
    (``batch x heads``) when known; with enough work beside the longest tile
    (``SPLIT_NEEDLESS_WORK``) nothing is split."""
    counts = np.asarray([c for c in blocks_per_tile if c > 0], dtype=np.int64)
    if counts.size == 0:
        return 0
    typical = max(int(np.ceil(np.quantile(counts, SPLIT_QUANTILE))), SPLIT_MIN_BLOCKS // 2)
    if counts.max() < SPLIT_MIN_BLOCKS or counts.max() <= SPLIT_RATIO * typical:
        return 0
    if grid_heads is not None and grid_heads * counts.sum() >= SPLIT_NEEDLESS_WORK * counts.max():
        return 0
    return typical


def _chunks(nb: int, length: int) -> list:
    """``(lo, hi)`` offsets of ``ceil(nb / length)`` balanced chunks of ``nb`` blocks."""
    k = -(-nb // length)
    edges = [round(i * nb / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def plan_tiles(acsr, knobs=None, *, br: int | None = None, bc: int | None = None,
               split_blocks: "int | str | None" = None, grid_heads: int | None = None) -> TilePlan:
    """Build the :class:`TilePlan` of ``acsr`` for row tiles of ``br`` and column blocks of
    ``bc`` (from ``knobs.br``/``knobs.bc`` when given). ``split_blocks``: chunk length of
    split-KV in blocks (``"auto"`` or -1: :func:`split_length` over all heads' tiles; 0: no
    split; default: ``knobs.split_blocks``, else auto). ``grid_heads``: ``batch x heads`` of
    the kernel's grid, for the auto rule (None: the rule without it, as if the grid were small).
    Not cached here: the runtime layer (:mod:`tvm_splat.planner`) keeps the plans it made."""
    br = int(br if br is not None else knobs.br)
    bc = int(bc if bc is not None else knobs.bc)
    if br < 1 or bc < 1:
        raise ValueError(f"tile sizes must be >= 1, got br={br}, bc={bc}")
    n, hm, S = acsr.n, acsr.num_heads, acsr.max_segments
    heads = [_head_plan(n, br, bc, acsr.seg_start[h], acsr.seg_step[h], acsr.seg_count[h]) for h in range(hm)]
    if split_blocks is None:
        split_blocks = getattr(knobs, "split_blocks", "auto")
    if split_blocks == "auto" or (isinstance(split_blocks, int) and split_blocks == -1):
        # the work of every mask head's tiles, once per grid head that runs that mask head
        split_blocks = split_length([t[4] for p in heads for t in p[0]],
                                    None if grid_heads is None else max(1, grid_heads // hm))
    elif isinstance(split_blocks, bool) or not isinstance(split_blocks, int) or split_blocks < 0:
        raise ValueError(f"split_blocks must be 'auto' or an int >= 0, got {split_blocks!r}")
    # per head: program entries (row0, rstride, nrows, comp, blocks, slot) and split groups
    programs, groups = [], []
    for tl, bl, *_ in heads:
        progs, grps, slot = [], [], 0
        for (row0, rstr, nrows, comp, nb), blks in zip(tl, bl):
            if split_blocks and nb > split_blocks:
                parts = _chunks(nb, split_blocks)
                grps.append((row0, rstr, nrows, comp, slot, slot + len(parts)))
                for lo, hi in parts:
                    progs.append((row0, rstr, nrows, comp, blks[lo:hi], slot))
                    slot += 1
            else:
                progs.append((row0, rstr, nrows, comp, blks, -1))
        programs.append(progs)
        groups.append(grps)
    T = max(len(p) for p in programs)
    NB = max(1, max(sum(len(b) for b in p[1]) for p in heads))
    C = max(len(p[3]) for p in heads)
    F = max(p[4].size for p in heads)
    NS = max(max((g[-1] for g in grps), default=0) for grps in groups)
    NG = max(len(grps) for grps in groups)
    tiles = np.zeros((hm, T, 7), dtype=np.int32)
    tiles[..., 6] = -1
    blocks = np.zeros((hm, NB, 3), dtype=np.int32)
    blocks[..., 1] = 1
    seg_sigma = np.zeros((hm, n, S), dtype=np.int32)
    comp_rstride = np.zeros((hm, C), dtype=np.int32)
    num_comp = np.zeros(hm, dtype=np.int32)
    fallback = np.full((hm, max(F, 1)), -1, dtype=np.int32)
    splits = np.zeros((hm, max(NG, 1), 6), dtype=np.int32)
    for h, ((_tl, _bl, sg, rs, fb), progs, grps) in enumerate(zip(heads, programs, groups)):
        # longest programs first: the kernels launch every head's program t before any head's
        # t + 1 (kernels.common.tile_grid_rows), so the heaviest start first (load balance)
        order = sorted(range(len(progs)), key=lambda t: -len(progs[t][4]))
        pos = 0
        for j, t in enumerate(order):
            row0, rstr, nrows, comp, blks, slot = progs[t]
            tiles[h, j] = (row0, rstr, nrows, comp, pos, pos + len(blks), slot)
            if blks:
                blocks[h, pos:pos + len(blks)] = np.asarray(blks, dtype=np.int32)
            pos += len(blks)
        tiles[h, len(progs):, 4:6] = pos
        if grps:
            splits[h, :len(grps)] = np.asarray(grps, dtype=np.int32)
        seg_sigma[h] = sg
        comp_rstride[h, :len(rs)] = rs
        num_comp[h] = len(rs)
        fallback[h, :fb.size] = fb
    return TilePlan(n, br, bc, tiles, blocks, seg_sigma, comp_rstride, num_comp, fallback,
                    acsr.seg_start, acsr.seg_count, F, splits, NS, int(split_blocks) if NS else 0)
