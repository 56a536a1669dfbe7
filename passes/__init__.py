"""The compiler passes, one per file. Each is also reachable by its kebab-case name in text pipelines."""

from fxcompress.passes.analyze_groups import AnalyzeGroups
from fxcompress.passes.insert_masks import InsertMasks
from fxcompress.passes.propagate_channels import PropagateChannels
from fxcompress.passes.shrink import Shrink

__all__ = ["InsertMasks", "AnalyzeGroups", "PropagateChannels", "Shrink", "standard_pruning"]


def standard_pruning(pruner) -> list:
    """The standard structured-pruning pipeline: mask, analyse, propagate, shrink."""
    return [InsertMasks(pruner), AnalyzeGroups(), PropagateChannels(), Shrink()]
