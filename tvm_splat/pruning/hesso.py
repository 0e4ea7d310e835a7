"""HESSO: Hybrid Efficient Structured Sparse Optimizer (Chen et al. 2024, arXiv 2409.09085).

Our own implementation of the algorithm of the paper and of the authors' reference optimizer
(``only_train_once/optimizer/hesso.py``; that package does not import on torch >= 2.5: it
needs ``torch.onnx._globals``, the ``onnx`` package and the legacy ONNX trace passes).

Algorithm, with ``N`` groups (from :func:`~tvm_splat.pruning.groups.discover_groups`) and a
target group sparsity ``s`` (the only real knob):

1. **Warm-up** (``warmup_steps``): plain SGD(momentum) / AdamW steps.
2. **Progressive pruning** over ``pruning_periods`` periods ``P`` spanning ``pruning_steps``
   steps. ``K = round(s * N)`` groups are pruned in total, ``K // P`` per period (the
   remainder in the last). At the first step of period ``p`` every still-alive group gets
   a *saliency* score: the weighted sum of five criteria, each divided by its L2 norm over
   all groups (as the reference does). With ``x_g`` the group's entries and ``d_g`` the
   optimizer's step direction this step (the update is ``x <- x - lr * d``: the momentum
   buffer for SGD, ``m_hat / (sqrt(v_hat) + eps)`` for AdamW -- the reference's
   ``grad_variant``):

   * magnitude ``||x_g||``, average magnitude ``||x_g|| / |g|`` (``|g|`` = entries),
   * cosine ``1 + cos(x_g, d_g)`` (the reference's sign),
   * first-order Taylor ``|<x_g, d_g>|`` and second-order ``<x_g, d_g>^2 / 2``.

   The lowest-scoring groups become the period's *redundant* set (keeping
   ``min_groups_per_family`` alive in every family, so no layer loses all its width).
3. **Hybrid projection**: during the period, redundant groups take the normal step and are
   then multiplied by ``(T - j - 1) / (T - j)`` at step ``j`` of ``T``, so they reach exactly
   0 at the period's last step.
4. Committed groups are **hard zero** for good: after every later step they are set to exact
   0 and their optimizer state is cleared, so after ``warmup + pruning_steps`` steps exactly
   ``K`` groups are exactly zero and stay so while training continues (fine-tuning).

With a :class:`~tvm_splat.pruning.cric.CRIC`, step 2 is the published HESSO-CRIC schedule
instead: after warm-up CRIC runs its trial-sparsity test and violating-set cycles (its
length depends on when its stopping test fires, at most ``cric.max_steps``), restores the
parameters to where it started, and hands back all ``K`` groups at once; they are then
shrunk over one period of ``pruning_steps`` steps (``pruning_periods`` must be 1).

The cosine sign and the step-direction Taylor score follow the reference. An earlier
half-space test (project a redundant group to 0 once its trial iterate left
``{y : <y, x_g> >= 0}``) never fired in 20,800 redundant group-steps (digits MLP and CNN of
``benchmarks/pruning_eval.py``, SGD and AdamW, 30% and 70% sparsity, 400 steps) while it
copied every parameter on each pruning step, so it is gone (the reference HESSO has none).

The optimizer is a normal ``torch.optim.Optimizer`` over all model parameters; call
``step()`` after ``backward()`` as usual. ``step(eval_loss=f)`` passes a side-effect-free
loss callable for the current batch (:func:`~tvm_splat.pruning.cric.make_eval_loss`); CRIC
needs it, plain HESSO ignores it.
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
_EPS = 1e-8  # the reference's safe-guard in the criteria and their normalisation


def _copy_state(state) -> dict:
    """Per-param optimizer state with its tensors cloned (the params themselves stay the keys)."""
    return {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in state.items()}


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
        pruning_steps: steps of the progressive pruning phase (>= 2 per period).
        pruning_periods: number of selection periods ``P`` (>= 1; 1 with ``cric``).
        variant: ``"sgd"`` (momentum SGD, L2 weight decay) or ``"adamw"`` (decoupled decay).
        importance_weights: criterion -> weight, keys from ``DEFAULT_IMPORTANCE_WEIGHTS``.
        cric: optional :class:`~tvm_splat.pruning.cric.CRIC` (HESSO-CRIC).
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
        if pruning_steps < 2 * pruning_periods:
            raise ValueError(f"pruning_steps={pruning_steps} too small: each of the {pruning_periods} periods needs "
                             "at least 2 steps")
        if cric is not None and pruning_periods != 1:
            raise ValueError("with cric, pruning_periods must be 1: CRIC selects all groups at once, as published")
        weights = dict(DEFAULT_IMPORTANCE_WEIGHTS if importance_weights is None else importance_weights)
        unknown = set(weights) - set(DEFAULT_IMPORTANCE_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown importance criteria {sorted(unknown)}; known: {sorted(DEFAULT_IMPORTANCE_WEIGHTS)}")
        if not any(w > 0 for w in weights.values()):
            raise ValueError("importance_weights needs at least one positive weight")

        defaults = dict(lr=lr, momentum=momentum, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        missing = [m.name for f in space.families for m in f.members if id(m.param) not in owned]
        if missing:
            raise ValueError(f"parameters of the group space are not in params: {missing[:4]}")

        self.space = space
        self.variant = variant
        self.importance_weights = weights
        self.cric = cric
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
        self.active = torch.zeros(n, dtype=torch.bool)  # being shrunk (redundant, or CRIC's violating set)
        self._shrink_start = 0  # first step of the current shrink
        self._shrink_len = 0
        self._shrink_commits = False  # commit at the end (pruning) or not (a CRIC cycle)
        self.selections: List[List[int]] = []  # global group indices chosen per period
        self.saliency_history: List[torch.Tensor] = []
        # Start of the pruning periods: known now without CRIC, set when CRIC stops with it.
        self.pruning_start: Optional[int] = None if cric is not None else self.warmup_steps + 1

    # ------------------------------------------------------------------ schedule
    @property
    def pruning_end(self) -> Optional[int]:
        """Last step of pruning (``None`` while CRIC has not stopped yet)."""
        return None if self.pruning_start is None else self.pruning_start + self.pruning_steps - 1

    @property
    def max_pruning_end(self) -> int:
        """Last step of pruning at the latest (CRIC running its maximum length)."""
        extra = self.cric.max_steps if self.cric is not None else 0
        return self.warmup_steps + extra + self.pruning_steps

    def _period_position(self, k: int):
        """(period, position in period, period length) for 1-based step k, or None."""
        if self.pruning_start is None or not self.pruning_start <= k <= self.pruning_end:
            return None
        r = k - self.pruning_start
        p = min(r // self.period_len, self.pruning_periods - 1)
        t = r - p * self.period_len
        length = self.period_len if p < self.pruning_periods - 1 else self.pruning_steps - p * self.period_len
        return p, t, length

    @property
    def phase(self) -> str:
        """``"warmup"``, ``"cric"``, ``"pruning"`` or ``"finetune"`` for the next step."""
        k = self.num_steps + 1
        if k <= self.warmup_steps:
            return "warmup"
        if self.pruning_start is None or k < self.pruning_start:
            return "cric"
        return "pruning" if k <= self.pruning_end else "finetune"

    # ------------------------------------------------------------------ saliency
    def saliency(self, directions: Dict[nn.Parameter, torch.Tensor]) -> torch.Tensor:
        """Importance of every group, float64 ``(N,)`` (lower = more redundant).

        ``directions``: param -> this step's direction ``d`` (the update is ``x - lr * d``).
        Each criterion is divided by its L2 norm over all groups, then weighted and summed.
        """
        st = self.space.stats(directions)
        xnorm, dnorm = st["xx"].sqrt(), st["gg"].sqrt()
        raw = {
            "magnitude": xnorm,
            "avg_magnitude": xnorm / st["numel"],
            "cosine_similarity": 1.0 + st["xd"] / ((xnorm + _EPS) * (dnorm + _EPS)),
            "taylor_first_order": st["xd"].abs(),
            "taylor_second_order": 0.5 * st["xd"] ** 2,
        }
        score = torch.zeros(self.space.num_groups, dtype=torch.float64)
        for name, w in self.importance_weights.items():
            if w:
                v = raw[name]
                score += w * v / (v.norm() + _EPS)
        return score

    def choose(self, score: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None) -> List[int]:
        """The ``k`` lowest-``score`` groups that are alive, not being shrunk and not in
        ``exclude`` (bool ``(N,)``), keeping ``min_keep`` groups alive in every family."""
        blocked = self.pruned | self.active
        if exclude is not None:
            blocked = blocked | exclude
        alive_per_family = torch.bincount(self.space.family_of[~self.pruned], minlength=len(self.space.families))
        chosen = []
        for g in torch.argsort(score, stable=True).tolist():
            if len(chosen) == k:
                break
            f = int(self.space.family_of[g])
            if blocked[g] or alive_per_family[f] <= self.min_keep[f]:
                continue
            alive_per_family[f] -= 1
            chosen.append(int(g))
        return chosen

    def start_shrink(self, groups: List[int], length: int, commit: bool) -> None:
        """Shrink ``groups`` linearly to exact zero over ``length`` steps, this step first;
        ``commit``: then hold them at zero for good (else they stay at zero until reset)."""
        self.active[:] = False
        self.active[groups] = True
        self._shrink_start, self._shrink_len, self._shrink_commits = self.num_steps, int(length), commit

    def _select(self, period: int, directions) -> None:
        score = self.saliency(directions)
        self.saliency_history.append(score)
        chosen = self.choose(score, self.period_counts[period])
        if len(chosen) < self.period_counts[period]:  # cannot happen after the capacity check
            raise RuntimeError(f"HESSO could only select {len(chosen)} of {self.period_counts[period]} groups")
        self.selections.append(chosen)
        _, _, length = self._period_position(self.num_steps)
        self.start_shrink(chosen, length, commit=True)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def _directions(self) -> Dict[nn.Parameter, torch.Tensor]:
        """This step's direction ``d`` of every param with a gradient (updates the momentum /
        Adam state, not the params): the update is ``x <- x - lr * d``."""
        out = {}
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, st = p.grad, self.state[p]
                if self.variant == "sgd":
                    if wd:
                        g = g.add(p, alpha=wd)
                    mom = group["momentum"]
                    if mom:
                        if "momentum_buffer" not in st:
                            st["momentum_buffer"] = g.detach().clone()
                        else:
                            st["momentum_buffer"].mul_(mom).add_(g)
                        g = st["momentum_buffer"]
                    out[p] = g
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
                    out[p] = m_hat / (v_hat.sqrt() + group["eps"])
        return out

    @torch.no_grad()
    def _apply_update(self, directions: Dict[nn.Parameter, torch.Tensor]) -> None:
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                d = directions.get(p)
                if d is None:
                    continue
                if self.variant == "adamw" and wd:
                    p.mul_(1 - lr * wd)
                p.add_(d, alpha=-lr)

    def _shrink_step(self) -> int:
        """Position ``j`` of this step in the current shrink (0-based)."""
        return self.num_steps - self._shrink_start

    def _shrink_active(self) -> None:
        """HESSO's projection: active groups times ``(T - j - 1) / (T - j)`` (GETA overrides)."""
        j, length = self._shrink_step(), self._shrink_len
        factors = torch.ones(self.space.num_groups, dtype=torch.float64)
        factors[self.active] = (length - j - 1) / (length - j)
        self.space.scale_(factors)
        if j == length - 1:
            self.space.zero_(self.active)  # exact zeros, whatever the rounding

    def snapshot(self) -> dict:
        """Copies of every parameter and the optimizer state (CRIC's reset point)."""
        params = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        return {"params": params, "state": _copy_state(self.state)}

    @torch.no_grad()
    def restore(self, snap: dict) -> None:
        """Return every parameter and the optimizer state to ``snap`` (from :meth:`snapshot`)."""
        for p, v in zip((p for g in self.param_groups for p in g["params"]), snap["params"]):
            p.copy_(v)
        self.state.clear()
        self.state.update(_copy_state(snap["state"]))

    def _clear_state(self, mask: torch.Tensor) -> None:
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            tensors = {p: s[key] for p, s in self.state.items() if key in s}
            if tensors:
                self.space.zero_(mask, tensors)

    def _before_update(self, directions: Dict[nn.Parameter, torch.Tensor]) -> None:
        """Hook for subclasses, after the schedule and before the update (GETA's joint rule)."""

    def _post_update(self) -> None:
        """Hook for subclasses, at the end of every step (GETA projects its quantizers)."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None, *,
             eval_loss: Optional[Callable[[], torch.Tensor]] = None):
        """One optimisation step; returns ``closure()``'s loss if a closure is given.

        ``eval_loss``: side-effect-free callable returning the current batch's loss (model
        in eval mode, no grad); needed by CRIC while it runs, ignored otherwise.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.num_steps += 1
        k = self.num_steps
        directions = self._directions()
        if self.cric is not None and self.pruning_start is None and k > self.warmup_steps:
            chosen = self.cric.step(self, directions, eval_loss)  # may restore the params
            if chosen is not None:  # CRIC stopped: prune its selection over one period, from now
                self.pruning_start = k
                self.selections.append(chosen)
                self.start_shrink(chosen, self.pruning_steps, commit=True)
        else:
            pos = self._period_position(k)
            if pos is not None and pos[1] == 0 and self.cric is None:
                self._select(pos[0], directions)
        self._before_update(directions)
        self._apply_update(directions)
        if bool(self.active.any()):
            self._shrink_active()
            if self._shrink_step() == self._shrink_len - 1:
                if self._shrink_commits:
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
