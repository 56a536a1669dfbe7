"""Prune to a target: ``standard_pruning(criterion, target="macs=2")`` lands within 2 % in one call."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxcompress
from fxcompress.analysis import get_analysis
from fxcompress.errors import ConfigError
from fxcompress.passes import InsertMasks, standard_pruning
from fxcompress.pipeline import parse_pipeline
from fxcompress.prune import (
    FPGM, LAMP, Budget, BudgetMetric, Evaluator, L1Norm, L2Norm, RandomPruner, ShapeCost, Targeted, Taylor,
)
from fxcompress.report import count_macs, count_params

TOLERANCE = 0.02


def _ratio(model, small, x, metric: str) -> float:
    if metric == "macs":
        return count_macs(model, x) / count_macs(small, x)
    return count_params(model) / count_params(small)


def _compile(model, x, criterion, target: str, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a missed target nor low coverage
        return fxcompress.compile(model, x, standard_pruning(criterion, target=target), verify=False, **options)


@pytest.mark.parametrize(
    "name, size, metric",
    [("resnet50", 64, "macs"), ("mobilenet_v3_large", 64, "macs"), ("resnet50", 32, "params"),
     ("mobilenet_v3_large", 32, "params")],
)
def test_torchvision_models_land_within_two_percent(name, size, metric):
    model, x = torchvision.models.get_model(name).eval(), torch.randn(1, 3, size, size)
    small = _compile(model, x, L1Norm(), f"{metric}=2")
    assert _ratio(model, small, x, metric) == pytest.approx(2, rel=TOLERANCE)


@pytest.mark.slow
def test_vit_b_16_lands_within_two_percent():
    """10-15 s on two loaded cores (trace, one flop-counted forward, mask, shrink): opt-in."""
    model, x = torchvision.models.vit_b_16().eval(), torch.randn(1, 3, 224, 224)
    small = _compile(model, x, L1Norm(), "macs=2")
    assert _ratio(model, small, x, "macs") == pytest.approx(2, rel=TOLERANCE)


def _batches(n: int = 2):
    torch.manual_seed(1)
    return [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(n)]


def _cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


CRITERIA = {
    "l2": lambda: L2Norm(),
    "fpgm": lambda: FPGM(),
    "lamp-global": lambda: LAMP(),
    "random": lambda: RandomPruner(seed=3),
    "taylor": lambda: Taylor(evaluator=Evaluator(_batches(), _cross_entropy, progress=False), num_batches=2),
    "l1-round-to-8": lambda: L1Norm(round_to=8),
}


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_every_structured_criterion_reaches_the_target(criterion):
    model, x = torchvision.models.mobilenet_v3_small(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    small = _compile(model, x, CRITERIA[criterion](), "macs=3")
    assert _ratio(model, small, x, "macs") == pytest.approx(3, rel=TOLERANCE)


def test_the_fit_is_what_gets_built_and_a_second_run_changes_nothing():
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    pruner = Targeted(L1Norm(), "params=2.5")
    gm = fxcompress.trace(model, x)
    fit = pruner.fit(gm, get_analysis(gm))
    masking = InsertMasks(pruner)
    assert masking(gm).modified and not masking(gm).modified
    small = fxcompress.compile(model, x, standard_pruning(pruner), verify=False)
    assert count_params(model) / count_params(small) == pytest.approx(fit.ratio, rel=1e-9)
    assert 0 < fit.sparsity < 1 and fit.ratio >= 2.5


def test_unreachable_target_names_itself_and_the_best_ratio():
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"target macs=1000 is out of reach: L1Norm makes macs at most \d+\.\d+x smaller"):
        fxcompress.compile(model, x, standard_pruning(L1Norm(), target="macs=1000"), verify=False)


def test_bad_targets_are_config_errors():
    with pytest.raises(ConfigError, match="latency"):
        Targeted(L1Norm(), "latency=2")
    with pytest.raises(ConfigError, match="METRIC=RATIO"):
        Targeted(L1Norm(), "half")
    with pytest.raises(ConfigError, match="above 1"):
        standard_pruning(L1Norm(), target="macs=0.5")
    with pytest.raises(ConfigError, match="structured criterion"):
        Targeted(Budget(), "macs=2")


def test_text_pipelines_take_a_target():
    (masking, *_) = parse_pipeline("insert-masks{pruner=l2,target=params=2},analyze-groups,propagate-channels,shrink")
    assert masking.pruner == Targeted(L2Norm(), Budget("params", 2))


class Block(nn.Module):
    """Functional convs and a matmul: MACs outside any ``nn.Conv2d``/``nn.Linear`` module."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(32, 8, 3, 3) * 0.1)
        self.w2 = nn.Parameter(torch.randn(24, 32, 1, 1) * 0.1)
        self.proj = nn.Parameter(torch.randn(24, 16) * 0.1)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.w1, padding=1))
        h = F.conv2d(h, self.w2).flatten(2).transpose(1, 2)  # (N, positions, 24)
        h = h @ self.proj
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("metric", ["macs", "params"])
def test_cost_model_is_exact_beyond_conv_and_linear_modules(frontend, metric):
    """Functional convs, matmuls and attention, through both frontends: predicted == built."""
    model, x = Block().eval(), torch.randn(2, 8, 6, 6)
    gm = fxcompress.trace(model, x, frontend=frontend)
    analysis = get_analysis(gm)
    groups = {str(g.id): g for g in analysis.prunable_groups()}
    assert len(groups) >= 3  # conv channels, projection columns and heads
    cost = ShapeCost.of_graph(gm, analysis, groups, BudgetMetric(metric))
    pruner = L1Norm(0.5)
    kept = {key: pruner.num_kept(len(g)) / len(g) for key, g in groups.items()}
    small = fxcompress.compile(model, x, standard_pruning(pruner), frontend=frontend, verify=False)
    built = count_macs(small, x) if metric == "macs" else count_params(small)
    assert cost.predict(kept) == pytest.approx(built, rel=1e-9)
    assert cost.predict({}) == cost.dense == (count_macs(model, x) if metric == "macs" else count_params(model))


def test_the_targets_benchmark_measures_what_the_built_model_reaches(helpers):
    row = helpers.load_tool("bench_targets").measure("resnet18", 32, "l1", "params=3")
    model = torchvision.models.resnet18().eval()
    small = _compile(model, torch.randn(1, 3, 32, 32), L1Norm(), "params=3")
    assert row["reached"] == pytest.approx(_ratio(model, small, None, "params"))
    assert row["status"] == "ok" and abs(row["error %"]) <= 100 * TOLERANCE
