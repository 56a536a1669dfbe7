"""PropagateChannels: turn parameter masks into whole-channel decisions across each group."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import fx

from fxcompress.analysis import get_analysis
from fxcompress.masks import apply_masks, channel_masks, current_masks, kept_components
from fxcompress.pipeline import Pass, register_pass
from fxcompress.rules import RULES, ShrinkContext

__all__ = ["PropagateChannels"]


@register_pass
@dataclasses.dataclass(frozen=True)
class PropagateChannels(Pass):
    """Extend masks to everything coupled with a removed channel.

    A channel whose producing slices are all masked is removed: its norm
    parameters and the input columns of every layer that reads it are masked
    too, through residual adds, concatenations, splits and reshapes, and norms
    or means over it compute their statistics over the kept channels only (the
    op rule's ``mask`` step). After this pass the masked model computes
    exactly what the shrunk model will.
    """

    name: ClassVar[str] = "propagate-channels"
    requires: ClassVar[tuple[str, ...]] = ()
    preserves_outputs: ClassVar[bool] = False
    keeps_analysis: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule) -> bool:
        analysis = get_analysis(gm)
        keep = kept_components(analysis, current_masks(gm))
        if keep.all():
            return False
        changed = apply_masks(gm, channel_masks(gm, analysis, keep, skip_done=True))
        ctx = ShrinkContext(gm, keep, analysis.labels)
        for node in list(gm.graph.nodes):
            rule = RULES.lookup(gm, node)
            if rule is not None and rule.mask is not None:
                changed |= rule.mask(ctx, node)
        return changed
