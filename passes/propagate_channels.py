"""PropagateChannels: turn parameter masks into whole-channel decisions across each group."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import fx

from fxcompress.analysis import get_analysis
from fxcompress.decision import current_decision, record
from fxcompress.masks import apply_masks, channel_masks
from fxcompress.pipeline import Pass, register_pass
from fxcompress.rules import RULES, ShrinkContext

__all__ = ["PropagateChannels"]


@register_pass
@dataclasses.dataclass(frozen=True)
class PropagateChannels(Pass):
    """Extend masks to everything coupled with a removed channel.

    The channels removed are the graph's recorded keep decision (see
    :mod:`fxcompress.decision`; masks set by other means are read back: a
    channel whose producing slices are all masked is removed). Its norm
    parameters and the input columns of every layer that reads it are masked
    too, through residual adds, concatenations, splits and reshapes, and norms
    or means over it compute their statistics over the kept channels only (the
    op rule's ``mask`` step). After this pass the masked model computes
    exactly what the shrunk model will, and the decision is recorded as
    propagated, which is what ``shrink`` requires.
    """

    name: ClassVar[str] = "propagate-channels"
    preserves_outputs: ClassVar[bool] = False
    keeps_analysis: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule) -> bool:
        analysis = get_analysis(gm)
        keep = current_decision(gm, analysis)
        changed = False
        if not keep.all():
            changed = apply_masks(gm, channel_masks(gm, analysis, keep, skip_done=True))
            ctx = ShrinkContext(gm, keep, analysis.labels)
            for node in list(gm.graph.nodes):
                rule = RULES.lookup(gm, node)
                if rule is not None and rule.mask is not None:
                    changed |= rule.mask(ctx, node)
        record(gm, analysis, keep, propagated=True)
        return changed
