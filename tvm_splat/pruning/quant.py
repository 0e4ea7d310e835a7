"""Weight fake-quantization with a learnable clip range and a bounded, learnable bit width.

Quantizer of one layer (the ``(q_m, b)`` parametrisation GETA trains, Qu et al. 2025,
arXiv 2502.16638): symmetric, no zero point, step ``d = q_m / (2^(b-1) - 1)``,

    Q(w) = d * round(clamp(w, -q_m, q_m) / d)

``round`` uses the straight-through estimator, so gradients reach ``w``, ``q_m`` and
``b``. The forward pass always uses the *integer* bit width ``round(clamp(b, b_min,
b_max))`` (straight-through for ``b``), so training sees exactly the grid that is
deployed. The grid contains 0 (``Q(0) = 0``): a pruned group stays exactly zero after
quantization, which is what lets pruning and quantization be trained jointly.

The quantizer is installed with ``torch.nn.utils.parametrize`` on ``module.weight``; the
trainable float weight is then ``module.parametrizations.weight.original`` (the same
``nn.Parameter`` object as before, so an existing ``GroupSpace`` stays valid).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

__all__ = ["FakeQuantizer", "attach_quantizers", "finalize_quantization", "quantizers_of"]

MAX_BITS = 16


def _check_bounds(b_min: int, b_max: int) -> None:
    if int(b_min) != b_min or int(b_max) != b_max:
        raise ValueError(f"bit bounds must be integers, got b_min={b_min}, b_max={b_max}")
    if not 2 <= b_min <= b_max <= MAX_BITS:
        raise ValueError(f"need 2 <= b_min <= b_max <= {MAX_BITS}, got b_min={b_min}, b_max={b_max}")


class FakeQuantizer(nn.Module):
    """Per-layer symmetric weight fake-quantizer (a ``parametrize`` parametrization).

    Parameters: ``q_m`` (scalar float32 clip range, > 0) and ``bits`` (scalar float32,
    continuous; kept in ``[b_min, b_max]`` by the optimizer's projection and clamped in
    forward too). ``forward(w)`` returns a tensor of ``w``'s shape/dtype on the grid.
    """

    def __init__(self, weight: torch.Tensor, b_min: int, b_max: int, b_init: Optional[float] = None):
        super().__init__()
        _check_bounds(b_min, b_max)
        b0 = float(b_max if b_init is None else b_init)
        if not b_min <= b0 <= b_max:
            raise ValueError(f"b_init={b0} outside [{b_min}, {b_max}]")
        self.b_min, self.b_max = int(b_min), int(b_max)
        self.weight_numel = int(weight.numel())  # GETA weighs the bit penalty by layer size
        self.q_m = nn.Parameter(weight.detach().abs().max().clamp_min(1e-8).reshape(()).float())
        self.bits = nn.Parameter(torch.tensor(b0))

    def integer_bits(self) -> int:
        """The deployed bit width: ``round(clamp(bits, b_min, b_max))``."""
        return int(torch.round(self.bits.detach().clamp(self.b_min, self.b_max)))

    def step_size(self) -> torch.Tensor:
        b = self.bits.clamp(self.b_min, self.b_max)
        b = b + (torch.round(b) - b).detach()  # STE: integer grid forward, gradient to bits
        return self.q_m.abs() / (2.0 ** (b - 1) - 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        d = self.step_size()
        qm = self.q_m.abs()
        wc = torch.maximum(torch.minimum(w, qm), -qm)  # clamp with gradient to q_m
        u = wc / d
        return ((u + (torch.round(u) - u).detach()) * d).to(w.dtype)

    def project_(self) -> None:
        """The partial projection: bits onto ``[b_min, b_max]``, ``q_m`` positive."""
        with torch.no_grad():
            self.bits.clamp_(self.b_min, self.b_max)
            self.q_m.abs_().clamp_min_(1e-8)

    def extra_repr(self) -> str:
        return f"b in [{self.b_min}, {self.b_max}], bits={float(self.bits.detach()):.2f}"


def quantizers_of(model: nn.Module) -> Dict[str, FakeQuantizer]:
    """Map module name -> attached :class:`FakeQuantizer` (on its ``weight``)."""
    out = {}
    for name, mod in model.named_modules():
        plist = getattr(mod, "parametrizations", None)
        if plist is not None and "weight" in plist:
            for q in plist["weight"]:
                if isinstance(q, FakeQuantizer):
                    out[name] = q
    return out


def attach_quantizers(model: nn.Module, b_min: int, b_max: int, b_init: Optional[float] = None,
                      space=None, layer_types=(nn.Linear, nn.Conv2d)) -> Dict[str, FakeQuantizer]:
    """Install a :class:`FakeQuantizer` on the weight of every ``layer_types`` module.

    With ``space`` (a :class:`GroupSpace`), every family records the quantizers of the
    layers its groups touch (``family.quantizers``): GETA's quantization-aware groups.
    Returns module name -> quantizer. Raises ``ValueError`` on bad bounds or when the
    model already has quantizers.
    """
    _check_bounds(b_min, b_max)
    if quantizers_of(model):
        raise ValueError("model already has fake quantizers attached")
    out: Dict[str, FakeQuantizer] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, layer_types) and isinstance(getattr(mod, "weight", None), nn.Parameter):
            q = FakeQuantizer(mod.weight, b_min, b_max, b_init)
            parametrize.register_parametrization(mod, "weight", q)
            out[name] = q
    if space is not None:
        by_param = {}
        for name, q in out.items():
            mod = model.get_submodule(name)
            by_param[id(mod.parametrizations.weight.original)] = q
        for fam in space.families:
            fam.quantizers = []
            for m in fam.members:
                q = by_param.get(id(m.param))
                if q is not None and all(q is not x for x in fam.quantizers):
                    fam.quantizers.append(q)
    return out


def finalize_quantization(model: nn.Module) -> Dict[str, int]:
    """Bake the fake-quantized weights into plain parameters and remove the quantizers.

    Returns module name -> integer bit width used. The model then computes exactly what
    the fake-quantized model computed and can go through ``torch.export``.
    """
    bits = {}
    for name, q in quantizers_of(model).items():
        with torch.no_grad():
            q.bits.copy_(torch.tensor(float(q.integer_bits())))
        bits[name] = q.integer_bits()
        parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=True)
    return bits
