"""Magnitude criteria: L1 and L2 norms of each channel's weights, aggregated over its group."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import fx

from fxcompress.analysis import ChannelAnalysis, Group
from fxcompress.channels import Role
from fxcompress.masks import split_target
from fxcompress.prune.base import ChannelPruner

__all__ = ["L1Norm", "L2Norm", "group_norm_scores"]


def _tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, name = split_target(target)
    return getattr(gm.get_submodule(owner), name).detach()


def group_norm_scores(gm: fx.GraphModule, analysis: ChannelAnalysis, group: Group, p: int) -> np.ndarray:
    """Group-aware ``p``-norm importance of each channel.

    Every parameter slice in the group (producer rows, consumer columns,
    norm weights) contributes the ``p``-norm of each of its channel's
    entries, divided by that slice's mean so that no single layer's scale
    dominates; the contributions are averaged.
    """
    total = np.zeros(len(group))
    count = 0
    for k in group.slices:
        piece = analysis.slices[k]
        if piece.role is Role.BUFFER:
            continue
        tensor = _tensor(gm, piece.target).float()
        other = [d for d in range(tensor.dim()) if d != piece.dim]
        per_index = tensor.abs().pow(p).sum(dim=other) if other else tensor.abs().pow(p)
        positions, local = analysis.positions(k, group)
        scores = np.bincount(local, weights=per_index.numpy()[positions], minlength=len(group)) ** (1.0 / p)
        mean = scores.mean()
        if mean > 0:
            total += scores / mean
            count += 1
    return total / max(count, 1)


@dataclasses.dataclass(frozen=True)
class L1Norm(ChannelPruner):
    """Removes the channels with the smallest L1 norm of their weights (Li et al., 2017).

    >>> L1Norm(sparsity=0.5, exclude=("fc",))
    L1Norm(sparsity=0.5, ...)
    """

    key = "l1"

    def channel_scores(self, gm, analysis, group):
        return group_norm_scores(gm, analysis, group, p=1)


@dataclasses.dataclass(frozen=True)
class L2Norm(ChannelPruner):
    """Removes the channels with the smallest L2 norm of their weights."""

    key = "l2"

    def channel_scores(self, gm, analysis, group):
        return group_norm_scores(gm, analysis, group, p=2)
