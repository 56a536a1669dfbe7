"""The keep decision: which channel components survive, taken once and stored on the graph.

A pruner that decides whole channels returns a keep-vector over the
analysis' components (``ChannelDecider.decide``). ``insert-masks`` realises it
as masks and records it on ``gm.meta``; ``propagate-channels`` extends the
masks to everything coupled with a removed channel and records the decision
it propagated; ``shrink`` slices by that record and never reads channels back
out of masks. Masks that changed any other way (a pruning schedule, a
training loop, a pruner of single weights, the user's own edits) are read
back once (:func:`fxcompress.masks.kept_components`).

A record is believed only while the graph still holds the masks it was taken
with (the same tensors, not written since) and the same analysis, so a stale
record can never decide a slice.

>>> import torch, fxcompress
>>> from fxcompress.passes import InsertMasks, PropagateChannels
>>> from fxcompress.prune import L1Norm
>>> gm = fxcompress.compile(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), torch.randn(1, 4),
...                         [InsertMasks(L1Norm(0.5))], verify=False)
>>> int((~current_decision(gm)).sum()), is_propagated(gm)  # 4 of the 8 hidden channels go; not propagated yet
(4, False)
"""

from __future__ import annotations

import dataclasses

import numpy as np
from torch import fx

from fxcompress import meta
from fxcompress.analysis import ChannelAnalysis, get_analysis
from fxcompress.masks import MaskStamp, current_masks, kept_components, mask_stamp

__all__ = ["KeepDecision", "record", "record_shrunk", "current_decision", "is_propagated"]


@dataclasses.dataclass(frozen=True, eq=False)
class KeepDecision:
    """Per component of ``analysis``, whether it stays; ``propagated`` once the masks realise it in full.

    After ``shrink`` no channel is pending removal whatever the next analysis
    finds: ``keep`` and ``analysis`` are None then.
    """

    keep: np.ndarray | None
    analysis: ChannelAnalysis | None
    #: the graph's masks when the decision was recorded
    masks: MaskStamp
    propagated: bool = False


def record(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: np.ndarray, propagated: bool = False) -> None:
    """Store ``keep`` as the graph's decision, valid for its current masks."""
    gm.meta[meta.KEEP] = KeepDecision(keep, analysis, mask_stamp(gm), propagated)


def record_shrunk(gm: fx.GraphModule) -> None:
    """Record that every removed channel has been sliced away: nothing is pending until the masks change."""
    gm.meta[meta.KEEP] = KeepDecision(None, None, mask_stamp(gm), propagated=True)


def _valid_record(gm: fx.GraphModule) -> KeepDecision | None:
    decision = gm.meta.get(meta.KEEP)
    if decision is None or not decision.masks.matches(gm):
        return None
    if decision.keep is not None and decision.analysis is not gm.meta.get(meta.ANALYSIS):
        return None
    return decision


def current_decision(gm: fx.GraphModule, analysis: ChannelAnalysis | None = None) -> np.ndarray:
    """Which components survive on ``gm`` now: the recorded decision, or the masks read back when they
    changed since (or nothing was recorded)."""
    analysis = analysis or get_analysis(gm)
    decision = _valid_record(gm)
    if decision is None:
        return kept_components(analysis, current_masks(gm))
    return np.ones(analysis.solution.num_components, dtype=bool) if decision.keep is None else decision.keep


def is_propagated(gm: fx.GraphModule) -> bool:
    """Whether ``propagate-channels`` recorded the decision the graph's masks realise now (what ``shrink`` needs)."""
    decision = _valid_record(gm)
    return decision is not None and decision.propagated
