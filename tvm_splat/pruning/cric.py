"""CRIC: Corrective Redundant Identification Cycle (Chen et al. 2024, arXiv 2409.09085).

HESSO's saliency is cheap but can misjudge a group whose removal is catastrophic (e.g. a
small-norm hidden unit that carries a signal the rest of the network cannot rebuild); once
such a group is projected to zero the damage is irreversible. CRIC re-checks the saliency
candidates with a second criterion over a *voting window* before any of them is shrunk:

1. At the start of a pruning period, take a candidate pool: the ``ceil(pool_factor * k) +
   extra`` lowest-saliency active groups (``k`` = groups to prune this period).
2. For each of the ``window`` next mini-batches (normal training steps, no shrinking),
   measure every pool group's sensitivity:

   * removal test (``step(eval_loss=...)`` given): ``L(x with g zeroed) - L(x)`` on the
     batch -- exact, and not blind at a stationary point where gradients vanish;
   * otherwise first-order Taylor ``|<grad_g, x_g>|``.

   A group gets an "indispensable" vote on a batch when its sensitivity exceeds
   ``median_tol`` times the pool median (removal test: and also ``rel_tol * |L(x)|``):
   it stands out from the other low-saliency candidates.

3. The corrective cycle walks the saliency ranking: a candidate with a majority of votes is
   rejected as indispensable and the next candidate takes its place. Rejected groups go to
   the end of the ranking (only used if nothing else can reach the exact target).

``rejected_history`` records the rejected global group indices per period.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .groups import GroupSpace

__all__ = ["CRIC", "make_eval_loss"]


class CRIC:
    """Corrective cycle settings and per-period voting state.

    Args:
        window: mini-batches per voting window (>= 1).
        pool_factor, extra: pool size ``ceil(pool_factor * k) + extra``.
        median_tol: vote threshold relative to the pool's median sensitivity.
        rel_tol: removal test only: the loss increase must also exceed ``rel_tol * |L|``.
    """

    def __init__(self, window: int = 3, pool_factor: float = 2.0, extra: int = 4, median_tol: float = 4.0,
                 rel_tol: float = 0.01):
        if window < 1:
            raise ValueError(f"CRIC window must be >= 1, got {window}")
        if pool_factor < 1 or extra < 0:
            raise ValueError(f"need pool_factor >= 1 and extra >= 0, got {pool_factor}, {extra}")
        if median_tol <= 0 or rel_tol < 0:
            raise ValueError(f"need median_tol > 0 and rel_tol >= 0, got {median_tol}, {rel_tol}")
        self.window = int(window)
        self.pool_factor = float(pool_factor)
        self.extra = int(extra)
        self.rel_tol = float(rel_tol)
        self.median_tol = float(median_tol)
        self.rejected_history: List[List[int]] = []
        self.sensitivity_history: List[Dict[int, float]] = []
        self._pool: Optional[torch.Tensor] = None

    def start(self, space: GroupSpace, order: List[int], k: int) -> torch.Tensor:
        """Begin a voting window; ``order`` = active groups by ascending saliency."""
        size = min(len(order), math.ceil(self.pool_factor * k) + self.extra)
        self._pool = torch.tensor(order[:size], dtype=torch.long)
        self._votes = torch.zeros(size, dtype=torch.long)
        self._sens = torch.zeros(size, dtype=torch.float64)
        self._seen = 0
        return self._pool

    @torch.no_grad()
    def observe(self, space: GroupSpace, grads: Dict[nn.Parameter, torch.Tensor],
                eval_loss: Optional[Callable[[], torch.Tensor]]) -> None:
        """Score the pool on the current batch and record votes."""
        if self._pool is None or self._pool.numel() == 0:
            return
        pool = self._pool
        if eval_loss is not None:
            base = float(eval_loss())
            sens = torch.empty(pool.numel(), dtype=torch.float64)
            originals = {p: p.detach().clone() for p in space.params()}
            for j, g in enumerate(pool.tolist()):
                mask = torch.zeros(space.num_groups, dtype=torch.bool)
                mask[g] = True
                space.zero_(mask)
                sens[j] = float(eval_loss()) - base
                for p, v in originals.items():  # restore exactly
                    p.data.copy_(v)
            floor = self.rel_tol * abs(base)
        else:
            sens = space.stats(grads)["xd"].abs()[pool]
            floor = 0.0
        # median of the clipped values: removal can lower the loss (negative sensitivity)
        ref = self.median_tol * float(sens.clamp_min(0).median())
        votes = sens > max(ref, floor, 1e-12)
        self._votes += votes.long()
        self._sens += sens
        self._seen += 1

    def rerank(self, order: List[int], pool: torch.Tensor) -> List[int]:
        """The corrective cycle: drop majority-voted pool groups to the end of ``order``."""
        seen = max(self._seen, 1)
        rejected = set(int(g) for g, v in zip(pool.tolist(), self._votes.tolist()) if 2 * v > seen)
        self.rejected_history.append(sorted(rejected))
        self.sensitivity_history.append({int(g): float(s) / seen for g, s in zip(pool.tolist(), self._sens.tolist())})
        kept = [g for g in order if g not in rejected]
        # Rejected last, least sensitive first: they are only used if the target needs them.
        sens = {int(g): float(s) for g, s in zip(pool.tolist(), self._sens.tolist())}
        back = sorted((g for g in order if g in rejected), key=lambda g: sens[g])
        self._pool = None
        return kept + back


def make_eval_loss(model: nn.Module, loss_fn: Callable, inputs, targets) -> Callable[[], torch.Tensor]:
    """Side-effect-free batch loss for CRIC's removal test.

    Runs ``loss_fn(model(inputs), targets)`` in eval mode under ``no_grad`` (so BatchNorm
    running statistics are not touched) and restores the model's training flag.
    """

    def f() -> torch.Tensor:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return loss_fn(model(inputs), targets)
        finally:
            model.train(was)

    return f
