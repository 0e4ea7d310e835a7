"""Graph passes over Relax IRModules (the design's "Relay passes"; Relay is gone from TVM >= 0.20).

- :class:`SparsifyAttention`: rewrite attention sites into ACSR sparse-attention kernels.
- :class:`CompactPrunedChannels`: turn zeroed channel groups of pruned models into smaller ops.
- :class:`LegalizeBoolArithmetic`: the importer's bool-typed ``cumsum`` computes in int64
  (transformers 5.x masks; ``SparsifyAttention`` applies it itself).
- :class:`LegalizeIntegerPower`: ``x ** 2`` (RMSNorm) as ``x * x``, not CUDA fast-math ``powf``,
  which is NaN for negative x (``SparsifyAttention`` applies it itself).
"""
from ..channel_rules import OP_RULES
from ._pattern_choice import SiteInfo
from .attention_names import attention_layer_names
from .compact_channels import CompactionReport, CompactPrunedChannels, compact_pruned_channels
from .legalize_bool import LegalizeBoolArithmetic
from .legalize_power import LegalizeIntegerPower
from .sparsify_attention import SparsifyAttention
from .sparsify_report import SiteReport, SparsifyReport

__all__ = [
    "CompactPrunedChannels", "CompactionReport", "LegalizeBoolArithmetic", "LegalizeIntegerPower", "OP_RULES", "SiteInfo",
    "SiteReport",
    "SparsifyAttention", "SparsifyReport", "attention_layer_names", "compact_pruned_channels",
]
