"""InsertMasks: ask a pruner for parameter masks and install them (the simulated, masked model)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import fx

from fxcompress.analysis import get_analysis
from fxcompress.errors import ConfigError
from fxcompress.masks import apply_masks
from fxcompress.pipeline import Pass, register_pass
from fxcompress.prune import Pruner, make_pruner

__all__ = ["InsertMasks"]


@register_pass
@dataclasses.dataclass(frozen=True)
class InsertMasks(Pass):
    """Install the masks ``pruner`` computes on the graph's parameters.

    The graph itself does not change; masked weights read as zero from now on.
    Running it again with the same pruner yields the same masks (the masked
    channels score lowest), so the second run reports no change.
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
        """``insert-masks{pruner=l1,sparsity=0.5}`` in a textual pipeline."""
        options = dict(options)
        name = options.pop("pruner", None)
        if name is None:
            raise ConfigError("insert-masks needs a pruner option, e.g. insert-masks{pruner=l1,sparsity=0.5}")
        return cls(make_pruner(str(name), **options))

    def run(self, gm: fx.GraphModule) -> bool:
        return apply_masks(gm, self.pruner.compute_masks(gm, get_analysis(gm)))
