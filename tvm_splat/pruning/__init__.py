"""Training side of tvm_splat: structured pruning (HESSO + CRIC) and joint pruning +
quantization (GETA) in PyTorch, producing models that ``CompactPrunedChannels`` compacts.

* :mod:`.groups`  -- group discovery (hidden units, conv channels, attention heads)
* :mod:`.hesso`   -- the HESSO optimizer (Chen et al. 2024, arXiv 2409.09085)
* :mod:`.cric`    -- the CRIC corrective cycle (same paper)
* :mod:`.quant`   -- GETA's quantizers (step, clip range, exponent; derived bit width) and
  BOPs; :mod:`.geta` -- GETA (Qu et al. 2025, arXiv 2502.16638)
* :mod:`.compact` -- torch-side physical compaction (reference for the compiler pass)
* :mod:`.export`  -- torch.export -> Relax -> compiled VM helpers
* :mod:`.zoo`, :mod:`.data` -- tiny reference models, synthetic data and the sklearn digits

Importing this package needs torch only; :mod:`.export` imports tvm lazily.
"""
from .compact import compact_model, count_params
from .cric import CRIC, make_eval_loss
from .geta import GETA
from .groups import Group, GroupFamily, GroupSpace, ParamSlice, discover_groups
from .hesso import HESSO
from .quant import QuantizedLayer, Quantizer, attach_quantizers, bops, finalize_quantization, quantizers_of

__all__ = [
    "CRIC",
    "GETA",
    "HESSO",
    "Group",
    "GroupFamily",
    "GroupSpace",
    "ParamSlice",
    "QuantizedLayer",
    "Quantizer",
    "attach_quantizers",
    "bops",
    "compact_model",
    "count_params",
    "discover_groups",
    "finalize_quantization",
    "make_eval_loss",
    "quantizers_of",
]
