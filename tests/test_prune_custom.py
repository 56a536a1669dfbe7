"""The README's custom pruner: ~20 lines on the same protocol as the built-in ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

import fxcompress
from fxcompress.channels import Role
from fxcompress.examples import SmallCNN
from fxcompress.passes import standard_pruning
from fxcompress.prune import ChannelPruner
from fxcompress.prune.magnitude import slice_rows

torch.set_num_threads(2)


# --- README example starts
@dataclasses.dataclass(frozen=True)
class FilterVariance(ChannelPruner):
    """Drop the channels whose filters vary least: a nearly constant filter detects little."""

    key = "filter-variance"  # also usable as insert-masks{pruner=filter-variance,sparsity=0.5}

    def channel_scores(self, gm, analysis, group):
        scores = np.zeros(len(group))
        for _, rows, local in slice_rows(gm, analysis, group, roles=(Role.PRODUCER,)):
            if rows.shape[1] > 1:  # skip biases: one number per channel has no variance
                scores += np.bincount(local, weights=rows.var(dim=1).double().numpy(), minlength=len(group))
        return scores


def readme_example():
    model = SmallCNN()
    return fxcompress.compile(model, torch.randn(1, 1, 28, 28), standard_pruning(FilterVariance(sparsity=0.5)))
# --- README example ends


def test_custom_pruner_shrinks_every_group_with_the_shared_driver():
    small = readme_example()
    assert (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features) == (16, 32, 64)


def test_custom_pruner_ranks_by_its_own_definition():
    model = SmallCNN(8, 16, 32).eval()
    with torch.no_grad():
        model.conv1.weight[3] = 5.0  # the largest filter, but constant: zero variance
    small = fxcompress.compile(model, torch.randn(1, 1, 28, 28), standard_pruning(FilterVariance(1 / 8, op_names=("conv1",))))
    assert small.conv1.out_channels == 7
    assert not any(torch.allclose(w, torch.full_like(w, 5.0)) for w in small.conv1.weight)


def test_custom_pruner_gets_global_allocation_and_text_pipelines_for_free():
    model = SmallCNN(8, 16, 32).eval()
    x = torch.randn(1, 1, 28, 28)
    small = fxcompress.compile(model, x, "insert-masks{pruner=filter-variance,sparsity=0.5,allocation=global},"
                                         "analyze-groups,propagate-channels,shrink")
    kept = small.conv1.out_channels + small.conv2.out_channels + small.fc1.out_features
    assert kept == 56 - 28
