"""GETA: joint structured pruning and mixed-precision quantization-aware training.

After Qu et al. 2025, "Automatic Joint Structured Pruning and Quantization for Efficient
Neural Network Training and Compression" (arXiv 2502.16638, CVPR 2025) and the authors'
QASSO optimizer (``only_train_once/optimizer/geta.py``); our own implementation on top of
:class:`~tvm_splat.pruning.hesso.HESSO`. The quantizers (:mod:`.quant`) have a step ``d``,
clip range ``q_m`` and exponent ``t``; the bit width ``b = log2(q_m**t/d + 1) + 1`` is derived.
Stages, each step projecting every quantizer's ``d`` so that ``b`` is in
``[b_min, min(b_max, cap)]`` (the *partially projected* step: only ``d`` is projected):

1. **Warm-up** (``warmup_steps``): weights and quantizer parameters train (quantizer
   parameters with ``quant_lr``).
2. **Projection** (``projection_steps`` in ``projection_periods`` periods): at the start of
   every period after the first the cap (the maximum bit width, weights and activations) is
   lowered by ``bit_reduction``, never below the widest ``b_min``. This is the stage's only
   compression pressure. With a budget the cap is lowered only while the estimated BOPs
   (current widths under the cap, every grouped dimension shrunk by the target sparsity)
   exceed the budget.
3. **Joint pruning** (HESSO's periods over ``pruning_steps``; the groups are
   :func:`~tvm_splat.pruning.groups.discover_groups`' and quantizer parameters are never
   pruned): a family with redundant groups ``R`` is updated with the published rule instead
   of HESSO's shrink: ``x_R <- x_R - gamma * Q(x_R)`` before the gradient step, with, over
   ``R``'s entries, ``c`` = the clipped values, ``r`` = the rounding residual
   ``round(p/d) - p/d`` and ``g`` = the step direction:

   * forget rate ``gamma = 1/(T - j)`` (HESSO's linear rate) when ``cos(c, g) >= 0``, else
     ``gamma = -(1 - eta) lr |g| / (cos(c, g) |c|)`` so that the step stays a descent step;
   * the producers' quantization step ``d = d(b_min)`` (coarsest) when ``cos(r, g) >= 0``,
     else ``d = -zeta eta lr |g| / (gamma cos(r, g) |r|)``, with ``gamma`` cut by 0.8 (and ``d``
     raised) until ``d >= d(cap)``, then ``d <= d(b_min)``; ``d`` takes no gradient step here.
     ``eta = 0.999``, ``zeta = 0.9`` are the reference's values.

   The redundant groups are exactly zero at the period's end (committed as in HESSO).
4. **Cool-down** (after pruning): the widths are fixed (the rounded derived widths). With a
   budget they are then chosen under it on the current batch (``step(eval_loss=...)``):
   lowered while the achieved BOPs exceed it (each time the quantizer whose one-bit cut
   raises the loss least per BOP saved), then raised, up to the cap, while a one-bit raise
   that still fits lowers the loss (each time the one that lowers it most). Then ``d`` follows the fixed width (``d = q_m**t/(2**(b-1) - 1)``)
   while weights, ``q_m`` and ``t`` train on.

The budget (``target_relative_bops``, relative to the dense model with 8-bit weights and
activations) is ours: the paper controls compression only through the bit range. BOPs count
the quantized layers only (``Linear``/``Conv2d``: MACs x weight bits x activation bits, MACs
shrunk by the pruned rows and columns). Differences from the reference, on purpose: ``gamma``
is 0 when the clipped redundant part has norm ~0 (the reference tests its signed mean); the
family's ``d`` goes to its producer layers (those whose output rows the groups remove) and
is then projected into each layer's own range.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .groups import GroupSpace
from .hesso import HESSO
from .quant import REFERENCE_BITS, QuantizedLayer, Quantizer, bops

__all__ = ["GETA"]

_ETA, _ZETA = 0.999, 0.9  # the reference's descent margins in the joint rule
_GAMMA_CUT = 0.8  # the reference's factor when d(gamma) falls below the finest step


class GETA(HESSO):
    """HESSO + GETA's quantizer schedule, joint rule and (our) BOPs budget.

    Args:
        params: model parameters; the quantizers' ``d``/``q_m``/``t`` go to their own param
            group with ``quant_lr`` and no weight decay.
        space: the group space (from ``discover_groups``, before or after quantizers).
        layers: name -> :class:`QuantizedLayer` from :func:`attach_quantizers`.
        quant_lr: learning rate of the quantizer parameters (> 0).
        warmup_steps, projection_steps, projection_periods, bit_reduction: the stages above.
        target_relative_bops: optional budget in ``(0, inf)``, relative to the dense model at
            8/8 bits; needs ``step(eval_loss=...)`` on the step pruning ends.
        **kwargs: the rest of :class:`HESSO`'s arguments (``lr``, ``target_group_sparsity``,
            ``pruning_steps``, ``pruning_periods``, ``variant``, ...; no ``cric``).
    """

    def __init__(self, params: Iterable, space: GroupSpace, layers: Dict[str, QuantizedLayer], *, quant_lr: float,
                 warmup_steps: int = 0, projection_steps: int = 0, projection_periods: int = 1, bit_reduction: int = 2,
                 target_relative_bops: Optional[float] = None, **kwargs):
        if not layers or not all(isinstance(q, QuantizedLayer) for q in layers.values()):
            raise ValueError("GETA needs the QuantizedLayer dict of attach_quantizers (at least one layer)")
        if kwargs.get("cric") is not None:
            raise ValueError("GETA runs HESSO's periods; CRIC is not part of GETA")
        if not quant_lr > 0 or bit_reduction < 1 or projection_steps < 0 or projection_periods < 1:
            raise ValueError(f"need quant_lr > 0, bit_reduction >= 1, projection_steps >= 0, projection_periods >= 1; "
                             f"got {quant_lr}, {bit_reduction}, {projection_steps}, {projection_periods}")
        if projection_steps and projection_steps < projection_periods:
            raise ValueError(f"projection_steps={projection_steps} < projection_periods={projection_periods}")
        if target_relative_bops is not None and not target_relative_bops > 0:
            raise ValueError(f"target_relative_bops must be > 0, got {target_relative_bops}")
        self.layers = dict(layers)
        self.quantizers: List[Quantizer] = [q for l in self.layers.values() for q in (l.weight, l.act) if q is not None]
        qids = {id(p) for q in self.quantizers for p in q.parameters()}
        groups = list(params)
        if groups and isinstance(groups[0], dict):
            groups = [dict(g, params=[p for p in g["params"] if id(p) not in qids]) for g in groups]
        else:
            groups = [{"params": [p for p in groups if id(p) not in qids]}]
        groups.append({"params": [p for q in self.quantizers for p in q.parameters()], "lr": quant_lr,
                       "weight_decay": 0.0})
        super().__init__(groups, space, warmup_steps=warmup_steps + projection_steps, **kwargs)
        self.geta_warmup_steps = int(warmup_steps)
        self.projection_steps = int(projection_steps)
        self.projection_periods = int(projection_periods)
        self.bit_reduction = int(bit_reduction)
        self.cap = max(q.b_max for q in self.quantizers)
        self._cap_floor = max(q.b_min for q in self.quantizers)
        self.target_relative_bops = target_relative_bops
        self.dense_reference_bops = float(sum(l.macs for l in self.layers.values())) * REFERENCE_BITS ** 2
        self._layer_of = {id(l.weight_param): l for l in self.layers.values()}
        self._grouped_dims = self._grouped_dims_per_layer()
        self.final_bits: Optional[Dict[str, Tuple[int, int]]] = None
        self.cap_history: List[int] = []
        self.bits_history: List[Dict[str, Tuple[float, float]]] = []
        self.joint_history: List[Tuple[int, str, float, float]] = []  # (step, family, gamma, d)
        self._eval_loss = None
        if target_relative_bops is not None:
            floor = self._lowest_reachable_bops()
            if floor > target_relative_bops * self.dense_reference_bops:
                raise ValueError(
                    f"target_relative_bops={target_relative_bops} is unreachable: with every family pruned to its "
                    f"minimum and every width at b_min the quantized layers still need "
                    f"{floor / self.dense_reference_bops:.4f} of the 8/8-bit dense BOPs")
        for q in self.quantizers:
            q.project_(q.b_min, min(q.b_max, self.cap))

    # ------------------------------------------------------------------ bookkeeping
    def _grouped_dims_per_layer(self) -> Dict[str, List[Tuple[int, int]]]:
        """layer -> [(dim, family index)] of the families that remove its rows (0) / columns (1)."""
        out: Dict[str, List[Tuple[int, int]]] = {n: [] for n in self.layers}
        for f, fam in enumerate(self.space.families):
            for m in fam.members:
                layer = self._layer_of.get(id(m.param))
                if layer is not None and m.dim in (0, 1):
                    out[layer.name].append((m.dim, f))
        return out

    def _alive_estimate(self, fraction_of_family) -> Dict[str, float]:
        return {n: math.prod(fraction_of_family(f) for _, f in dims) for n, dims in self._grouped_dims.items()}

    def _lowest_reachable_bops(self) -> float:
        fams = self.space.families
        alive = self._alive_estimate(lambda f: float(self.min_keep[f]) / fams[f].num_groups)
        bits = {n: (l.weight.b_min, l.act.b_min if l.act is not None else 32) for n, l in self.layers.items()}
        return bops(self.layers, bits, alive)

    def _capped_bits(self) -> Dict[str, Tuple[int, int]]:
        def width(q: Optional[Quantizer]) -> int:
            if q is None:
                return 32
            return int(min(max(round(q.bit_width()), q.b_min), q.b_max, self.cap))

        return {n: (width(l.weight), width(l.act)) for n, l in self.layers.items()}

    def estimated_relative_bops(self) -> float:
        """BOPs / 8-bit dense BOPs with the current widths under the cap and every grouped
        dimension shrunk by the target sparsity (the projection stage's estimate)."""
        keep = 1.0 - self.target_num_groups / max(self.space.num_groups, 1)
        return bops(self.layers, self._capped_bits(), self._alive_estimate(lambda f: keep)) / self.dense_reference_bops

    def relative_bops(self) -> float:
        """Achieved BOPs (deployed widths, measured zero structure) / 8-bit dense BOPs."""
        bits = self.final_bits if self.final_bits is not None else self._capped_bits()
        return bops(self.layers, bits) / self.dense_reference_bops

    def report(self) -> dict:
        """Per-layer widths, MACs and BOPs, the totals and the budget (JSON-ready)."""
        bits = self.final_bits if self.final_bits is not None else self._capped_bits()
        rows = {}
        for n, l in self.layers.items():
            alive = l.alive_fraction()
            rows[n] = {"weight_bits": bits[n][0], "activation_bits": bits[n][1], "macs_dense": l.macs,
                       "macs": round(l.macs * alive), "bops": l.macs * alive * bits[n][0] * bits[n][1],
                       "t_weight": round(l.weight.t.item(), 4)}
        return {"layers": rows, "relative_bops": self.relative_bops(), "target_relative_bops": self.target_relative_bops,
                "cap_history": sorted(set(self.cap_history), reverse=True), "bits_fixed": self.final_bits is not None}

    # ------------------------------------------------------------------ stages
    def _projection_period_start(self, k: int) -> Optional[int]:
        r = k - self.geta_warmup_steps - 1
        if not self.projection_steps or not 0 <= r < self.projection_steps:
            return None
        length = self.projection_steps // self.projection_periods
        p = min(r // length, self.projection_periods - 1)
        return p if r == p * length else None

    def _lower_cap(self) -> None:
        if self.cap <= self._cap_floor:
            return
        if self.target_relative_bops is not None and self.estimated_relative_bops() <= self.target_relative_bops:
            return
        self.cap = max(self.cap - self.bit_reduction, self._cap_floor)

    @property
    def bits_fixed(self) -> bool:
        return self.final_bits is not None

    @torch.no_grad()
    def step(self, closure=None, *, eval_loss=None):
        k = self.num_steps + 1
        p = self._projection_period_start(k)
        if p is not None and p > 0:
            self._lower_cap()
        self._eval_loss = eval_loss
        try:
            return super().step(closure, eval_loss=eval_loss)
        finally:
            self._eval_loss = None

    def _before_update(self, directions: Dict[nn.Parameter, torch.Tensor]) -> None:
        if self.bits_fixed:  # cool-down: d follows the fixed widths
            for q in self.quantizers:
                directions.pop(q.d, None)
            return
        if bool(self.active.any()) and self._shrink_commits:
            self._joint_step(directions)

    def _shrink_active(self) -> None:
        # the joint rule did the forgetting before the update; the period still ends at exact 0
        if self._shrink_step() == self._shrink_len - 1:
            self.space.zero_(self.active)

    def _post_update(self) -> None:
        if not self.bits_fixed and self.pruning_end is not None and self.num_steps >= self.pruning_end:
            self._fix_bits()
        if self.bits_fixed:
            self._set_bits(self.final_bits)
        else:
            for q in self.quantizers:
                q.project_(q.b_min, min(q.b_max, self.cap))
        self.cap_history.append(self.cap)
        self.bits_history.append({n: (l.weight.bit_width(), l.act.bit_width() if l.act is not None else 32.0)
                                  for n, l in self.layers.items()})

    def _set_bits(self, bits: Dict[str, Tuple[int, int]]) -> None:
        for n, l in self.layers.items():
            l.weight.fix_bits_(bits[n][0])
            if l.act is not None:
                l.act.fix_bits_(bits[n][1])

    # ------------------------------------------------------------------ the joint rule
    def _family_slices(self, fam, rows: torch.Tensor):
        """[(member, index along its dim, values)] of the groups ``rows`` of ``fam``."""
        out = []
        for m in fam.members:
            idx = (rows[:, None] * m.block + torch.arange(m.block)[None, :]).flatten()
            out.append((m, idx, m.param.detach().index_select(m.dim, idx)))
        return out

    def _joint_step(self, directions: Dict[nn.Parameter, torch.Tensor]) -> None:
        lr = self.defaults["lr"]
        j = self._shrink_step()
        for fam, mask in zip(self.space.families, self.space.split(self.active)):
            rows = torch.nonzero(mask).flatten()
            if rows.numel() == 0:
                continue
            slices = self._family_slices(fam, rows)
            clip, res, grad = [], [], []
            for m, idx, x in slices:
                d = directions.get(m.param)
                grad.append((d.index_select(m.dim, idx) if d is not None else torch.zeros_like(x)).flatten())
                layer = self._layer_of.get(id(m.param))
                if layer is None:
                    clip.append(x.flatten())
                    res.append(torch.zeros_like(x).flatten())
                else:
                    c, r = _clip_and_residual(layer.weight, x)
                    clip.append(c.flatten())
                    res.append(r.flatten())
            c, r, g = torch.cat(clip).double(), torch.cat(res).double(), torch.cat(grad).double()
            gamma, step = self._gamma_and_step(fam, c, r, g, lr, j)
            producers = [self._layer_of[id(m.param)] for m in fam.members
                         if m.dim == 0 and id(m.param) in self._layer_of]
            if step is not None:
                for layer in producers:
                    layer.weight.d.fill_(step)
                    directions.pop(layer.weight.d, None)
            self.joint_history.append((self.num_steps, fam.name, gamma, step if step is not None else float("nan")))
            if gamma == 0.0:
                continue
            for m, idx, x in slices:
                layer = self._layer_of.get(id(m.param))
                q = layer.weight(x) if layer is not None else x
                m.param.index_add_(m.dim, idx, q.to(m.param.dtype), alpha=-gamma)

    def _gamma_and_step(self, fam, c, r, g, lr: float, j: int) -> Tuple[float, Optional[float]]:
        gnorm, cnorm, rnorm = float(g.norm()), float(c.norm()), float(r.norm())
        cos_c = float(c @ g) / (max(cnorm, 1e-8) * gnorm) if gnorm > 0 else 0.0
        cos_r = float(r @ g) / (max(rnorm, 1e-8) * gnorm) if gnorm > 0 else 0.0
        if cnorm < 1e-8:
            gamma = 0.0
        elif cos_c >= 0:
            gamma = 1.0 / (self._shrink_len - j)
        else:
            gamma = -(1 - _ETA) * lr * gnorm / (cos_c * cnorm)
        producers = [self._layer_of[id(m.param)].weight for m in fam.members
                     if m.dim == 0 and id(m.param) in self._layer_of]
        if not producers:
            return gamma, None
        qmt = max(float(q.q_m.abs()) ** float(q.t) for q in producers)
        b_min = max(q.b_min for q in producers)
        d_hi = qmt / (2.0 ** (b_min - 1) - 1)
        d_lo = qmt / (2.0 ** (min(self.cap, max(q.b_max for q in producers)) - 1) - 1)
        if cos_r >= 0 or gamma == 0.0:
            return gamma, d_hi
        step = -_ZETA * _ETA * lr * gnorm / (gamma * cos_r * max(rnorm, 1e-8))
        while step < d_lo:
            gamma *= _GAMMA_CUT
            step /= _GAMMA_CUT
        return gamma, min(step, d_hi)

    # ------------------------------------------------------------------ bits under the budget
    def _fix_bits(self) -> None:
        bits = self._capped_bits()
        if self.target_relative_bops is not None:
            bits = self._fit_budget(bits)
        self.final_bits = bits

    def _fit_budget(self, bits: Dict[str, Tuple[int, int]]) -> Dict[str, Tuple[int, int]]:
        """Lower widths until the achieved BOPs meet the budget, then raise widths (up to the
        cap) while that lowers the batch loss and still fits: each time the quantizer with the
        best loss change per BOP (``step(eval_loss=...)``)."""
        if self._eval_loss is None:
            raise ValueError(f"GETA's budget needs step(eval_loss=...) on the step pruning ends (step {self.num_steps})")
        budget = self.target_relative_bops * self.dense_reference_bops
        alive = {n: l.alive_fraction() for n, l in self.layers.items()}
        bits = dict(bits)
        self._set_bits(bits)
        while bops(self.layers, bits, alive) > budget:
            best = self._best_move(bits, alive, -1, budget)
            if best is None:
                raise RuntimeError(
                    f"GETA cannot meet target_relative_bops={self.target_relative_bops}: every width is at b_min "
                    f"and the pruned model still needs {bops(self.layers, bits, alive) / self.dense_reference_bops:.4f}")
            bits = self._move(bits, best[1], best[2], -1)
        while True:
            best = self._best_move(bits, alive, +1, budget)
            if best is None or best[0] >= 0:
                return bits
            bits = self._move(bits, best[1], best[2], +1)

    def _move(self, bits, name: str, slot: int, delta: int) -> Dict[str, Tuple[int, int]]:
        w, a = bits[name]
        bits = dict(bits)
        bits[name] = (w + delta, a) if slot == 0 else (w, a + delta)
        q = self.layers[name].weight if slot == 0 else self.layers[name].act
        q.fix_bits_(bits[name][slot])
        return bits

    def _best_move(self, bits, alive, delta: int, budget: float):
        """(loss change per BOP, layer, slot) of the best one-bit move, or None if none is allowed."""
        base = float(self._eval_loss())
        total = bops(self.layers, bits, alive)
        best = None
        for n, l in self.layers.items():
            for slot, q in enumerate((l.weight, l.act)):
                if q is None:
                    continue
                b = bits[n][slot] + delta
                if b < q.b_min or b > min(q.b_max, self.cap):
                    continue
                per_bit = l.macs * alive[n] * bits[n][1 - slot]
                if per_bit <= 0 or (delta > 0 and total + per_bit > budget):
                    continue
                q.fix_bits_(b)
                change = float(self._eval_loss()) - base
                q.fix_bits_(bits[n][slot])
                score = change / per_bit if delta < 0 else change
                if best is None or score < best[0]:
                    best = (score, n, slot)
        return best


def _clip_and_residual(q: Quantizer, x: torch.Tensor):
    """GETA's clipped value ``sign(x) min(|x|, q_m)**t`` and residual ``sign(x) (round(p/d) - p/d)``."""
    s = torch.sign(x)
    qm, t, d = q.q_m.detach().abs(), q.t.detach(), q.d.detach().abs()
    p = torch.minimum(x.abs(), qm).clamp_min(1e-30) ** t * (x != 0)
    u = p / d
    return s * p, s * (torch.round(u) - u)
