"""Pruners: the algorithms that decide *what* to prune. Passes decide *how*.

A pruner is any object with ``compute_masks(gm, analysis) -> {tensor name: mask}``
(the :class:`Pruner` protocol). Structured pruners derive from
:class:`ChannelPruner` and only implement ``channel_scores``.
"""

from fxcompress.prune.base import PRUNERS, ChannelPruner, Pruner, make_pruner
from fxcompress.prune.magnitude import L1Norm, L2Norm

__all__ = ["Pruner", "ChannelPruner", "L1Norm", "L2Norm", "PRUNERS", "make_pruner"]
