"""HESSO: Hybrid Efficient Structured Sparse Optimizer (Chen et al. 2024, arXiv 2409.09085).

Our own implementation of the algorithm described in the paper (the ``only-train-once``
package does not import on torch >= 2.5: it needs ``torch.onnx._globals``, the ``onnx``
package and the legacy ONNX trace passes).

Algorithm, with ``N`` groups (from :func:`~tvm_splat.pruning.groups.discover_groups`) and a
target group sparsity ``s`` (the only real knob):

1. **Warm-up** (``warmup_steps``): plain SGD(momentum) / AdamW steps.
2. **Progressive pruning** over ``pruning_periods`` periods ``P`` spanning ``pruning_steps``
   steps. ``K = round(s * N)`` groups are pruned in total, ``K // P`` per period (the
   remainder in the last). At the start of period ``p`` every still-active group gets a
   *saliency* score, a weighted sum of criteria each normalised by its L2 norm over the
   active groups (the paper's multi-criteria importance):

   * magnitude ``||x_g||``, average magnitude ``||x_g|| / sqrt(|g|)``,
   * cosine similarity ``1 + cos(x_g, -d_g)`` between the group and its step direction
     ``-d_g`` (a group the gradient step grows is important),
   * first-order Taylor ``|<grad_g, x_g>|`` and second-order ``(<grad_g, x_g>)^2 / 2``.

   The lowest-scoring groups (optionally re-checked by :class:`~tvm_splat.pruning.cric.CRIC`)
   become the period's *redundant* set.
3. **Hybrid projection**: during the rest of the period, redundant groups take the normal
   step and are then shrunk by ``(S - j - 1) / (S - j)`` at shrink step ``j`` of ``S``, so
   they reach exactly 0 at the period's last step; a half-space test (HSPG) projects a group
   to 0 early when its trial iterate leaves ``{y : <y, x_g> >= eps ||x_g||^2}``.
4. Committed groups are **hard zero** for good: after every later step they are set to exact
   0 and their optimizer state is cleared, so after ``warmup + pruning_steps`` steps exactly
   ``K`` groups are exactly zero and stay so while training continues (fine-tuning).

The optimizer is a normal ``torch.optim.Optimizer`` over all model parameters; call
``step()`` after ``backward()`` as usual. ``step(eval_loss=f)`` passes a side-effect-free
loss callable used by CRIC's removal test during its voting windows.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from .groups import GroupSpace

__all__ = ["HESSO", "DEFAULT_IMPORTANCE_WEIGHTS"]

DEFAULT_IMPORTANCE_WEIGHTS = {
    "magnitude": 0.2,
    "avg_magnitude": 0.2,
    "cosine_similarity": 0.2,
    "taylor_first_order": 0.2,
    "taylor_second_order": 0.2,
}
_EPS = 1e-12


class HESSO(torch.optim.Optimizer):
    """HESSO optimizer.

    Args:
        params: the model's parameters (iterable of tensors or param-group dicts); must
            include every parameter of ``space``.
        space: the :class:`GroupSpace` to prune.
        lr: learning rate (> 0).
        target_group_sparsity: fraction of groups to prune, in ``[0, 1)``; exactly
            ``round(target * len(space))`` groups end exactly zero.
        warmup_steps: plain steps before pruning starts (>= 0).
        pruning_steps: steps of the progressive pruning phase (>= periods * (1 + window)).
        pruning_periods: number of selection periods ``P`` (>= 1).
        variant: ``"sgd"`` (momentum SGD, L2 weight decay) or ``"adamw"`` (decoupled decay).
        importance_weights: criterion -> weight, keys from ``DEFAULT_IMPORTANCE_WEIGHTS``.
        cric: optional :class:`~tvm_splat.pruning.cric.CRIC` corrective cycle.
        half_space_eps: epsilon of the half-space test (``None`` disables it).
        min_groups_per_family: groups every family keeps (so no layer becomes width 0).
    """

    def __init__(
        self,
        params: Iterable,
        space: GroupSpace,
        *,
        lr: float,
        target_group_sparsity: float,
        pruning_steps: int,
        warmup_steps: int = 0,
        pruning_periods: int = 1,
        variant: str = "sgd",
        momentum: float = 0.9,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        importance_weights: Optional[Dict[str, float]] = None,
        cric=None,
        half_space_eps: Optional[float] = 0.0,
        min_groups_per_family: int = 1,
    ):
        if not isinstance(space, GroupSpace):
            raise ValueError(f"space must be a GroupSpace (from discover_groups), got {type(space).__name__}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= target_group_sparsity < 1.0:
            raise ValueError(f"target_group_sparsity must be in [0, 1), got {target_group_sparsity}")
        if variant not in ("sgd", "adamw"):
            raise ValueError(f"variant must be 'sgd' or 'adamw', got {variant!r}")
        if warmup_steps < 0 or pruning_periods < 1:
            raise ValueError(f"need warmup_steps >= 0 and pruning_periods >= 1, got {warmup_steps}, {pruning_periods}")
        window = cric.window if cric is not None else 0
        if pruning_steps < pruning_periods * (1 + window):
            raise ValueError(
                f"pruning_steps={pruning_steps} too small: each of the {pruning_periods} periods needs "
                f"at least {1 + window} steps ({window} CRIC voting + 1 projection)"
            )
        weights = dict(DEFAULT_IMPORTANCE_WEIGHTS if importance_weights is None else importance_weights)
        unknown = set(weights) - set(DEFAULT_IMPORTANCE_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown importance criteria {sorted(unknown)}; known: {sorted(DEFAULT_IMPORTANCE_WEIGHTS)}")
        if not any(w > 0 for w in weights.values()):
            raise ValueError("importance_weights needs at least one positive weight")

        defaults = dict(lr=lr, momentum=momentum, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        missing = [n for f in space.families for m in f.members if id(m.param) not in owned for n in [m.name]]
        if missing:
            raise ValueError(f"parameters of the group space are not in params: {missing[:4]}")

        self.space = space
        self.variant = variant
        self.importance_weights = weights
        self.cric = cric
        self.half_space_eps = half_space_eps
        self.warmup_steps = int(warmup_steps)
        self.pruning_steps = int(pruning_steps)
        self.pruning_periods = int(pruning_periods)
        self.period_len = self.pruning_steps // self.pruning_periods

        n = space.num_groups
        self.min_keep = torch.tensor([min(min_groups_per_family, f.num_groups) for f in space.families])
        capacity = n - int(self.min_keep.sum())
        self.target_num_groups = int(round(target_group_sparsity * n))
        if self.target_num_groups > capacity:
            raise ValueError(
                f"target_group_sparsity={target_group_sparsity} asks for {self.target_num_groups} of {n} groups, "
                f"but only {capacity} can go while keeping {min_groups_per_family} per family"
            )
        per = self.target_num_groups // self.pruning_periods
        self.period_counts = [per] * self.pruning_periods
        self.period_counts[-1] += self.target_num_groups - per * self.pruning_periods

        self.num_steps = 0
        self.pruned = torch.zeros(n, dtype=torch.bool)  # committed, hard zero
        self.active = torch.zeros(n, dtype=torch.bool)  # selected this period, being shrunk
        self.selections: List[List[int]] = []  # global group indices chosen per period
        self.saliency_history: List[torch.Tensor] = []
        self._pool: Optional[torch.Tensor] = None
        self._directions: Dict[nn.Parameter, torch.Tensor] = {}

    # ------------------------------------------------------------------ schedule
    @property
    def pruning_end(self) -> int:
        return self.warmup_steps + self.pruning_steps

    def _period_position(self, k: int):
        """(period, position in period, period length) for 1-based step k, or None."""
        if not self.warmup_steps < k <= self.pruning_end:
            return None
        r = k - self.warmup_steps - 1
        p = min(r // self.period_len, self.pruning_periods - 1)
        t = r - p * self.period_len
        length = self.period_len if p < self.pruning_periods - 1 else self.pruning_steps - p * self.period_len
        return p, t, length

    @property
    def phase(self) -> str:
        """``"warmup"``, ``"voting"`` (CRIC window), ``"pruning"`` or ``"finetune"`` for the next step."""
        pos = self._period_position(self.num_steps + 1)
        if pos is None:
            return "warmup" if self.num_steps < self.warmup_steps else "finetune"
        window = self.cric.window if self.cric is not None else 0
        return "voting" if pos[1] < window else "pruning"

    # ------------------------------------------------------------------ saliency
    def _grads(self) -> Dict[nn.Parameter, torch.Tensor]:
        return {p: p.grad for g in self.param_groups for p in g["params"] if p.grad is not None}

    def saliency(self) -> torch.Tensor:
        """Importance of every group, float64 ``(N,)`` (lower = more redundant).

        Uses the current params, the last step direction and the current gradients;
        criteria are normalised over the active (not pruned, not selected) groups.
        """
        sd = self.space.stats(self._directions or self._grads())
        sg = self.space.stats(self._grads())
        alive = ~(self.pruned | self.active)
        xnorm = sd["xx"].sqrt()
        raw = {
            "magnitude": xnorm,
            "avg_magnitude": xnorm / sd["numel"].sqrt(),
            # step is -d: cos(x, -d) = -<x, d> / (|x||d|)
            "cosine_similarity": 1.0 - sd["xd"] / (xnorm * sd["gg"].sqrt() + _EPS),
            "taylor_first_order": sg["xd"].abs(),
            "taylor_second_order": 0.5 * sg["xd"] ** 2,
        }
        score = torch.zeros(self.space.num_groups, dtype=torch.float64)
        for name, w in self.importance_weights.items():
            if w == 0:
                continue
            v = raw[name]
            score += w * v / (v[alive].norm() + _EPS)
        return score

    def _choose(self, ranking: List[int], k: int) -> List[int]:
        """First ``k`` of ``ranking`` keeping ``min_keep`` groups alive in every family."""
        alive_per_family = torch.bincount(self.space.family_of[~self.pruned], minlength=len(self.space.families))
        chosen = []
        for g in ranking:
            if len(chosen) == k:
                break
            f = int(self.space.family_of[g])
            if self.pruned[g] or self.active[g] or alive_per_family[f] <= self.min_keep[f]:
                continue
            alive_per_family[f] -= 1
            chosen.append(int(g))
        if len(chosen) < k:  # cannot happen after the capacity check, kept as a guard
            raise RuntimeError(f"HESSO could only select {len(chosen)} of {k} groups")
        return chosen

    def _select(self, period: int, eval_loss) -> None:
        k = self.period_counts[period]
        score = self.saliency()
        self.saliency_history.append(score)
        alive = ~(self.pruned | self.active)
        order = [int(i) for i in torch.argsort(score, stable=True) if alive[i]]
        if self.cric is not None and self._pool is not None:
            order = self.cric.rerank(order, self._pool)
            self._pool = None
        chosen = self._choose(order, k)
        self.active[chosen] = True
        self.selections.append(chosen)

    # ------------------------------------------------------------------ update
    def _state_tensors(self, key: str) -> Dict[nn.Parameter, torch.Tensor]:
        return {p: s[key] for p, s in self.state.items() if key in s}

    @torch.no_grad()
    def _base_update(self) -> None:
        self._directions = {}
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if self.variant == "sgd":
                    if wd and not getattr(p, "_hesso_no_decay", False):
                        g = g.add(p, alpha=wd)
                    mom = group["momentum"]
                    if mom:
                        if "momentum_buffer" not in st:
                            st["momentum_buffer"] = g.detach().clone()
                        else:
                            st["momentum_buffer"].mul_(mom).add_(g)
                        d = st["momentum_buffer"]
                    else:
                        d = g
                    self._directions[p] = d
                    p.add_(d, alpha=-lr)
                else:
                    b1, b2 = group["betas"]
                    if "step" not in st:
                        st["step"] = 0
                        st["exp_avg"] = torch.zeros_like(p)
                        st["exp_avg_sq"] = torch.zeros_like(p)
                    st["step"] += 1
                    st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                    st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                    m_hat = st["exp_avg"] / (1 - b1 ** st["step"])
                    v_hat = st["exp_avg_sq"] / (1 - b2 ** st["step"])
                    d = m_hat / (v_hat.sqrt() + group["eps"])
                    self._directions[p] = d
                    if wd and not getattr(p, "_hesso_no_decay", False):
                        p.mul_(1 - lr * wd)
                    p.add_(d, alpha=-lr)

    def _clear_state(self, mask: torch.Tensor) -> None:
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            tensors = self._state_tensors(key)
            if tensors:
                self.space.zero_(mask, tensors)

    def _post_update(self) -> None:
        """Hook for subclasses (GETA projects bit widths here)."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None, *,
             eval_loss: Optional[Callable[[], torch.Tensor]] = None):
        """One optimisation step; returns ``closure()``'s loss if a closure is given.

        ``eval_loss``: side-effect-free callable returning the current batch's loss (model
        in eval mode, no grad); used by CRIC's removal test in voting steps, ignored else.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.num_steps += 1
        k = self.num_steps
        pos = self._period_position(k)
        window = self.cric.window if self.cric is not None else 0

        if pos is not None:
            period, t, length = pos
            if t == 0 and window > 0:
                alive = ~(self.pruned | self.active)
                score = self.saliency()
                order = [int(i) for i in torch.argsort(score, stable=True) if alive[i]]
                self._pool = self.cric.start(self.space, order, self.period_counts[period])
            if t < window:
                self.cric.observe(self.space, self._grads(), eval_loss)
            if t == window:
                self._select(period, eval_loss)

        snapshot = None
        if pos is not None and pos[1] >= window and self.half_space_eps is not None and bool(self.active.any()):
            snapshot = {p: p.detach().clone() for p in self.space.params()}
        self._base_update()

        if pos is not None and pos[1] >= window and bool(self.active.any()):
            period, t, length = pos
            shrink_len, j = length - window, t - window
            factor = (shrink_len - j - 1) / (shrink_len - j)
            factors = torch.ones(self.space.num_groups, dtype=torch.float64)
            factors[self.active] = factor
            if snapshot is not None:
                # half-space test on the trial iterate: <x_new, x_old> < eps ||x_old||^2 -> 0
                st = self.space.stats(snapshot)
                leave = self.active & (st["xd"] < self.half_space_eps * st["gg"])
                factors[leave] = 0.0
            self.space.scale_(factors)
            self.space.zero_(factors == 0)
            if j == shrink_len - 1:  # end of period: commit
                self.pruned |= self.active
                self.active[:] = False

        if bool(self.pruned.any()):
            self.space.zero_(self.pruned)
            self._clear_state(self.pruned)
        self._post_update()
        return loss

    # ------------------------------------------------------------------ reporting
    def pruned_groups(self) -> List[int]:
        """Global indices of committed (hard-zero) groups."""
        return [int(i) for i in torch.nonzero(self.pruned).flatten()]

    def group_sparsity(self) -> float:
        """Measured fraction of exactly-zero groups in the space."""
        return self.space.group_sparsity()
