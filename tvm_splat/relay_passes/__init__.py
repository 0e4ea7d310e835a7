"""Graph passes over Relax IRModules (the design's "Relay passes"; Relay is gone from TVM >= 0.20).

- :class:`CompactPrunedChannels`: turn zeroed channel groups of pruned models into smaller ops.
"""
from ._channel_groups import OP_RULES
from .compact_channels import CompactionReport, CompactPrunedChannels, compact_pruned_channels

__all__ = ["CompactPrunedChannels", "CompactionReport", "OP_RULES", "compact_pruned_channels"]
