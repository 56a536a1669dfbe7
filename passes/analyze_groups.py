"""AnalyzeGroups: annotate the graph with its dependency groups (see ``fxcompress.analysis``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import fx

from fxcompress import meta
from fxcompress.analysis import get_analysis
from fxcompress.pipeline import Pass, register_pass

__all__ = ["AnalyzeGroups"]


@register_pass
@dataclasses.dataclass(frozen=True)
class AnalyzeGroups(Pass):
    """Compute channel ids for every node and the dependency groups of the module.

    Adds ``node.meta[CHANNELS]`` and ``gm.meta[ANALYSIS]``; reports a change only
    when the annotation was missing or stale.
    """

    name: ClassVar[str] = "analyze-groups"
    keeps_analysis: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule) -> bool:
        fresh = meta.ANALYSIS not in gm.meta
        get_analysis(gm)
        return fresh
