"""InsertMasks: ask a pruner for parameter masks and install them (the simulated, masked model)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import fx

from fxcompress import decision
from fxcompress.analysis import get_analysis, report_coverage
from fxcompress.errors import ConfigError
from fxcompress.masks import apply_masks, channel_masks, current_masks, kept_components
from fxcompress.pipeline import Pass, changed_fields, register_pass
from fxcompress.prune import PRUNERS, ChannelDecider, ChannelPruner, Pruner, Targeted, make_pruner

__all__ = ["InsertMasks"]


@register_pass
@dataclasses.dataclass(frozen=True)
class InsertMasks(Pass):
    """Install the masks ``pruner`` computes on the graph's parameters.

    The graph itself does not change; masked weights read as zero from now on.
    A pruner of whole channels (:class:`~fxcompress.prune.ChannelDecider`)
    returns its keep decision, which is recorded on the graph (see
    :mod:`fxcompress.decision`) for propagation and shrinking; masks of any
    other pruner are read back into channels once, here.
    Running it again with the same pruner yields the same masks (the masked
    channels score lowest), so the second run reports no change.

    After masking it reports the pruning's coverage (how much of what the
    pruner asked for was removed, and which ops froze the rest) to the
    compile, which warns once when it is low (see
    :class:`fxcompress.analysis.LowCoverageWarning`). A pruner with a target
    (:class:`fxcompress.prune.Targeted`) searches its sparsity inside
    ``compute_masks``; this pass only installs the result.
    """

    pruner: Pruner

    name: ClassVar[str] = "insert-masks"
    preserves_outputs: ClassVar[bool] = False
    keeps_analysis: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.pruner, Pruner):
            raise ConfigError(
                f"InsertMasks needs a pruner with compute_masks(gm, analysis), got {type(self.pruner).__name__}"
            )

    @classmethod
    def from_options(cls, options: dict) -> InsertMasks:
        """``insert-masks{pruner=l1,sparsity=0.5}`` (or ``target=macs=2``) in a textual pipeline."""
        options = dict(options)
        name = options.pop("pruner", None)
        target = options.pop("target", None)
        if name is None:
            raise ConfigError("insert-masks needs a pruner option, e.g. insert-masks{pruner=l1,sparsity=0.5}")
        pruner = make_pruner(str(name), **options)
        return cls(Targeted(pruner, str(target)) if target is not None else pruner)

    def text_options(self) -> dict:
        """``pruner=<key>``, the pruner's own changed fields and, for a target, ``target=<budget>``."""
        pruner, target = self.pruner, {}
        if isinstance(pruner, Targeted):
            if "tolerance" in changed_fields(pruner):
                raise ConfigError(f"pass 'insert-masks': a target tolerance ({pruner.tolerance}) has no text form")
            pruner, target = pruner.criterion, {"target": str(pruner.target)}
        key = getattr(type(pruner), "key", None)
        if PRUNERS.get(key) is not type(pruner):
            raise ConfigError(f"pass 'insert-masks': the pruner {type(pruner).__name__} has no text name")
        return {"pruner": key, **changed_fields(pruner), **target}

    def run(self, gm: fx.GraphModule) -> bool:
        analysis = get_analysis(gm)
        if isinstance(self.pruner, ChannelDecider):
            before = decision.current_decision(gm, analysis)
            chosen = self.pruner.decide(gm, analysis)
            modified = apply_masks(gm, channel_masks(gm, analysis, chosen))
            keep = before & chosen
        else:
            modified = apply_masks(gm, self.pruner.compute_masks(gm, analysis))
            keep = kept_components(analysis, current_masks(gm))
        decision.record(gm, analysis, keep)
        report_coverage(self.coverage(gm), stacklevel=4)
        return modified

    def coverage(self, gm: fx.GraphModule):
        """The pruning's :class:`~fxcompress.analysis.Coverage` on the masked ``gm``."""
        from fxcompress.report import count_nonzero_params, count_params

        analysis = get_analysis(gm)
        keep = decision.current_decision(gm, analysis)
        requested, selected = None, None
        if isinstance(self.pruner, ChannelPruner):
            requested, selected = self.pruner.sparsity, lambda g: self.pruner.selects(gm, analysis, g)
        ratio = count_params(gm) / max(count_nonzero_params(gm), 1)
        return analysis.coverage(keep, requested, selected, type(self.pruner).__name__, ratio)
