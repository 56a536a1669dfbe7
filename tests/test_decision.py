"""The keep decision stored on the graph: recorded once, believed only while the masks are the ones it describes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import fxcompress
from fxcompress import decision
from fxcompress.analysis import get_analysis
from fxcompress.errors import PipelineError
from fxcompress.masks import current_masks, kept_components
from fxcompress.passes import AnalyzeGroups, InsertMasks, PropagateChannels, Shrink
from fxcompress.pipeline import run_pipeline
from fxcompress.prune import L1Norm, LevelPruner


def _masked(model: nn.Module, x: torch.Tensor, *pruners) -> torch.fx.GraphModule:
    gm = fxcompress.trace(model.eval(), x)
    return run_pipeline(gm, [*(InsertMasks(p) for p in pruners), AnalyzeGroups(), PropagateChannels()])


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


@pytest.mark.parametrize("build", [_small_cnn, lambda: torchvision.models.resnet18()], ids=["cnn", "resnet18"])
def test_the_recorded_decision_is_what_the_masks_say(build):
    gm = _masked(build(), torch.randn(1, 3, 32, 32), L1Norm(0.5))
    recorded = decision.current_decision(gm)
    assert decision.is_propagated(gm)
    assert np.array_equal(recorded, kept_components(get_analysis(gm), current_masks(gm)))
    assert 0 < recorded.sum() < len(recorded)


def test_a_pruner_of_single_weights_is_read_back_from_its_masks():
    gm = _masked(_small_cnn(), torch.randn(1, 3, 32, 32), LevelPruner(0.5), L1Norm(0.5))
    assert np.array_equal(decision.current_decision(gm), kept_components(get_analysis(gm), current_masks(gm)))


def test_a_mask_edited_after_propagation_must_be_propagated_again():
    model, x = _small_cnn().eval(), torch.randn(1, 3, 32, 32)
    gm = _masked(model, x, L1Norm(0.5))
    masks = current_masks(gm)
    alive = int(np.flatnonzero(masks["0.weight"].flatten(1).amax(1).numpy() != 0)[0])
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        masks[name][alive] = 0  # the user removes one more filter (and its batch-norm channel) by hand
    assert not decision.is_propagated(gm)
    with pytest.raises(PipelineError, match="'shrink' needs 'propagate-channels'"):
        Shrink()(gm)
    small = fxcompress.shrink(gm)  # propagates again, then shrinks, verified
    assert small.get_submodule("0").out_channels == 3


def test_a_deep_copy_carries_the_decision_and_each_copy_checks_its_own_masks():
    gm = _masked(_small_cnn(), torch.randn(1, 3, 32, 32), L1Norm(0.5))
    twin = copy.deepcopy(gm)
    assert decision.is_propagated(twin)
    current_masks(twin)["3.weight"].zero_()
    assert not decision.is_propagated(twin) and decision.is_propagated(gm)


def test_after_shrinking_nothing_is_pending_until_the_masks_change():
    gm = _masked(_small_cnn(), torch.randn(1, 3, 32, 32), L1Norm(0.5))
    assert Shrink()(gm).modified
    assert decision.is_propagated(gm) and decision.current_decision(gm).all()
    assert not Shrink()(gm).modified
