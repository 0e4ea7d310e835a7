"""GETA-style joint structured pruning and quantization-aware training.

After Qu et al. 2025, "Automatic Joint Structured Pruning and Quantization for Efficient
Neural Network Training and Compression" (arXiv 2502.16638). Our own implementation:

* **Quantization-aware groups** (the paper's QADG, restricted to our supported patterns):
  the pruning groups are those of :func:`discover_groups`; every family records the
  :class:`FakeQuantizer` of the layers it touches (``attach_quantizers(..., space=)``).
  The quantizer parameters themselves (``q_m``, ``bits``) are per layer and never pruned;
  because the symmetric grid contains 0, a zeroed group stays exactly 0 after quantization.
* **Partially projected stochastic gradient**: all variables take the HESSO step; then only
  the bit widths are projected onto ``[b_min, b_max]`` (and ``q_m`` onto ``> 0``), so the
  layerwise bit constraints hold after *every* step.
* **Joint schedule**: warm-up (weights + quantizers train, bits projected), the HESSO
  pruning periods (groups shrink to zero while quantizers keep adapting), then cool-down:
  after ``warmup + pruning_steps`` the bit widths are frozen at their integer values and
  only weights / clip ranges fine-tune.
* Compression pressure on bits: an optional ``bit_penalty`` adds the gradient of
  ``bit_penalty * sum_l (n_l / n) * b_l`` (size-weighted mean bit width, ``n_l`` = layer
  weight count) to the bits, before the cool-down; without it the task loss alone decides.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch

from .groups import GroupSpace
from .hesso import HESSO
from .quant import FakeQuantizer

__all__ = ["GETA"]


class GETA(HESSO):
    """HESSO + bounded fake quantization.

    Args:
        params: model parameters (the quantizers' ``q_m``/``bits`` may be included or not:
            they are split off into their own param group with ``quant_lr``).
        space: the group space (discovered before or after attaching quantizers).
        quantizers: module name -> :class:`FakeQuantizer` from :func:`attach_quantizers`.
        quant_lr: learning rate of ``q_m`` and ``bits`` (defaults to ``lr``).
        bit_penalty: weight of the size-weighted mean-bit-width penalty (>= 0).
        **kwargs: everything :class:`HESSO` takes (``lr``, ``target_group_sparsity``, ...).
    """

    def __init__(self, params: Iterable, space: GroupSpace, quantizers: Dict[str, FakeQuantizer], *,
                 quant_lr: float = None, bit_penalty: float = 0.0, **kwargs):
        if not quantizers:
            raise ValueError("GETA needs at least one FakeQuantizer (see attach_quantizers)")
        bad = [n for n, q in quantizers.items() if not isinstance(q, FakeQuantizer)]
        if bad:
            raise ValueError(f"quantizers {bad} are not FakeQuantizer instances")
        if bit_penalty < 0:
            raise ValueError(f"bit_penalty must be >= 0, got {bit_penalty}")
        qparams = [p for q in quantizers.values() for p in (q.q_m, q.bits)]
        qids = {id(p) for p in qparams}
        groups = list(params)
        if groups and isinstance(groups[0], dict):
            groups = [dict(g, params=[p for p in g["params"] if id(p) not in qids]) for g in groups]
        else:
            groups = [{"params": [p for p in groups if id(p) not in qids]}]
        lr = kwargs.get("lr")
        groups.append({"params": qparams, "lr": quant_lr if quant_lr is not None else lr, "weight_decay": 0.0})
        super().__init__(groups, space, **kwargs)
        self.quantizers = dict(quantizers)
        self.bit_penalty = float(bit_penalty)
        sizes = {n: q.weight_numel for n, q in self.quantizers.items()}
        total = float(sum(sizes.values()))
        self._bit_weights = {n: s / total for n, s in sizes.items()}
        for q in self.quantizers.values():
            q.project_()
        self.bits_history: List[Dict[str, float]] = []

    @property
    def bits_frozen(self) -> bool:
        return self.num_steps >= self.pruning_end

    @torch.no_grad()
    def step(self, closure=None, *, eval_loss=None):
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            closure = None
        else:
            loss = None
        if self.bits_frozen:
            for q in self.quantizers.values():
                q.bits.copy_(torch.tensor(float(q.integer_bits())))
                q.bits.grad = None  # cool-down: bit widths fixed
        elif self.bit_penalty:
            for n, q in self.quantizers.items():
                pen = torch.full_like(q.bits, self.bit_penalty * self._bit_weights[n])
                q.bits.grad = pen if q.bits.grad is None else q.bits.grad + pen
        super().step(eval_loss=eval_loss)
        return loss

    def _post_update(self) -> None:
        for q in self.quantizers.values():
            q.project_()
        self.bits_history.append({n: float(q.bits.detach()) for n, q in self.quantizers.items()})

    def bit_widths(self) -> Dict[str, int]:
        """Module name -> deployed integer bit width (always within the bounds)."""
        return {n: q.integer_bits() for n, q in self.quantizers.items()}
