"""A compile that prunes (almost) nothing says so once, names the ops that froze the channels, and strict=True refuses.

The timm pattern: a ``BatchNorm2d`` subclass whose ``forward`` calls an op
fxcompress has no rule for freezes every channel it normalises, so a whole
network can compile to a model as large as it was.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.analysis import (
    LOW_COVERAGE,
    Coverage,
    Freezer,
    LowCoverageWarning,
    OpaqueOpWarning,
    analyze,
    collect_coverage,
)
from fxcompress.errors import LowCoverageError
from fxcompress.passes import standard_pruning
from fxcompress.pipeline import run_pipeline
from fxcompress.prune import L1Norm, LevelPruner
from fxcompress.report import count_params

IMAGE = (1, 3, 16, 16)


def mystery_act(x):
    """An activation fxcompress has no channel rule for (a leaf of the trace, like a custom op)."""
    return x * torch.sigmoid(x)


torch.fx.wrap("mystery_act")


class BatchNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` shape: a BatchNorm2d subclass calling ``F.batch_norm``, then an activation."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return mystery_act(x)


class TimmLike(nn.Module):
    """Every conv feeds a ``BatchNormAct``: nothing but the classifier's input could be pruned."""

    def __init__(self, act_norms: int = 3) -> None:
        super().__init__()
        norm = [BatchNormAct if i < act_norms else nn.BatchNorm2d for i in range(3)]
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), norm[0](16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), norm[1](32)
        self.conv3, self.bn3 = nn.Conv2d(32, 64, 3, padding=1), norm[2](64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def _compile(model, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = fxcompress.compile(model.eval(), torch.randn(IMAGE), standard_pruning(L1Norm(0.5)), **options)
    return small, [w for w in caught if issubclass(w.category, (OpaqueOpWarning, LowCoverageWarning))]


def test_timm_like_norm_with_an_unknown_op_warns_once_naming_it():
    model = TimmLike()
    small, caught = _compile(model)
    assert len(caught) == 1, [str(w.message) for w in caught]
    warning = caught[0].message
    assert isinstance(warning, LowCoverageWarning) and isinstance(warning, OpaqueOpWarning)
    text = str(warning)
    assert "removed 0.0% of the prunable parameters where L1Norm asked for 50%" in text
    assert "1.00x fewer parameters" in text
    assert "mystery_act (no channel rule; in bn1, bn2, bn3) froze 112 channels (100%)" in text
    assert warning.coverage.removed == 0 and warning.coverage.frozen == 1
    assert [f.op.rpartition(".")[2] for f in warning.coverage.freezers] == ["mystery_act"]
    assert set(warning.ops) == {op for op in warning.ops if op.endswith("mystery_act")}
    assert count_params(small) == count_params(model)
    assert caught[0].filename == __file__  # points at the caller's compile


def test_strict_compile_raises_naming_the_op():
    with pytest.raises(LowCoverageError, match=r"mystery_act \(no channel rule; in bn1, bn2, bn3\) froze 112 channels"):
        fxcompress.compile(TimmLike().eval(), torch.randn(IMAGE), standard_pruning(L1Norm(0.5)), strict=True)


def test_resnet18_at_half_sparsity_warns_nothing_even_when_strict():
    model = torchvision.models.resnet18().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowCoverageWarning)
        warnings.simplefilter("error", OpaqueOpWarning)
        fxcompress.compile(model, torch.randn(1, 3, 32, 32), standard_pruning(L1Norm(0.5)), verify=False, strict=True)
    gm = fxcompress.trace(model, torch.randn(1, 3, 32, 32))
    with collect_coverage(strict=True) as log:
        run_pipeline(gm, standard_pruning(L1Norm(0.5)))
    (coverage,) = log.coverages
    assert not coverage.low and coverage.frozen == 0 and 0.45 < coverage.removed < 0.55


def test_a_few_frozen_channels_give_one_opaque_warning_and_no_low_coverage():
    """Only the stem's 16 channels are frozen: the rest prunes, so ops are named but coverage is fine."""
    small, caught = _compile(TimmLike(act_norms=1))
    assert len(caught) == 1
    warning = caught[0].message
    assert type(warning) is OpaqueOpWarning
    assert "no channel rule for" in str(warning) and "mystery_act (nodes mystery_act), froze 16 layer channels" in str(warning)
    assert small.conv3.out_channels == 32


def test_analysis_alone_warns_once_for_all_opaque_nodes():
    gm = fxcompress.trace(TimmLike().eval(), torch.randn(IMAGE))
    with pytest.warns(OpaqueOpWarning) as caught:
        analysis = analyze(gm)
    assert len([w for w in caught if issubclass(w.category, OpaqueOpWarning)]) == 1
    assert "(nodes mystery_act, mystery_act_1, mystery_act_2), froze 112 layer channels" in str(caught[0].message)
    (freezer,) = [f for f in analysis.freezers() if f.opaque]
    assert (freezer.channels, freezer.where) == (112, ("bn1", "bn2", "bn3"))


def test_graph_outputs_are_the_contract_not_a_culprit():
    """The classifier's 10 logits are frozen by the graph output; they are neither a candidate nor blamed."""
    gm = fxcompress.trace(torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32))
    analysis = analyze(gm)
    everything = analysis.freezers()
    assert [f.op for f in everything] == ["graph output"] and everything[0].channels == 1000
    assert not analysis.freezers(analysis.candidates())


def test_unstructured_pruners_are_never_low_coverage():
    """Level pruning removes no channel by design: only the ops without a rule are reported."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxcompress.compile(TimmLike().eval(), torch.randn(IMAGE), standard_pruning(LevelPruner(0.5)), verify=False)
    relevant = [w for w in caught if issubclass(w.category, (OpaqueOpWarning, LowCoverageWarning))]
    assert [w.category for w in relevant] == [OpaqueOpWarning]


def test_pruning_outside_compile_warns_at_the_masking_pass():
    gm = fxcompress.trace(TimmLike().eval(), torch.randn(IMAGE))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_pipeline(gm, standard_pruning(L1Norm(0.5)))
    low = [w for w in caught if issubclass(w.category, LowCoverageWarning)]
    assert len(low) == 1 and "mystery_act" in str(low[0].message)


def test_layer_selection_bounds_the_candidates():
    """A pruner that selects only conv3 (not frozen in this model) is not blamed for frozen conv1 and conv2."""
    model = TimmLike(act_norms=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpaqueOpWarning)
        warnings.simplefilter("error", LowCoverageWarning)
        fxcompress.compile(model, torch.randn(IMAGE), standard_pruning(L1Norm(0.5, op_names=("conv3",))), verify=False)


@pytest.mark.parametrize("removed, low", [(0.24, True), (0.26, False)])
def test_threshold_is_half_the_requested_share(removed, low):
    coverage = Coverage(requested=0.5, removed=removed, frozen=0.5, channels=100,
                        freezers=(Freezer("LayerNorm", False, 50, 0.5, ("norm",)),), pruner="L1Norm")
    assert LOW_COVERAGE == 0.5 and coverage.low is low
    assert "LayerNorm (in norm) froze 50 channels (50%)" in coverage.message()
    assert not Coverage(requested=None, removed=0, frozen=1, channels=100, freezers=()).low
    assert not Coverage(requested=0.5, removed=0, frozen=0, channels=0, freezers=()).low


@pytest.mark.parametrize("sparsity", [0.0, 0.001])
def test_a_request_for_less_than_one_channel_is_not_low_coverage(sparsity):
    """Pruning 0.1% of 16 channels rounds to none: nothing froze them, so nothing is blamed."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowCoverageWarning)
        fxcompress.compile(model, torch.randn(IMAGE), standard_pruning(L1Norm(sparsity)), verify=False, strict=True)
