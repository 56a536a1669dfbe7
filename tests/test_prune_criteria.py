"""Structured criteria: sparsity reached (per layer and overall), allocation, and rankings on crafted examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import prune as P
from fxcompress.analysis import get_analysis
from fxcompress.errors import ConfigError
from fxcompress.examples import SmallCNN
from fxcompress.passes import standard_pruning

torch.set_num_threads(2)


def tiny_evaluator(shape=(1, 28, 28), n_batches=2, seed=0) -> P.Evaluator:
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(8, *shape, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n_batches)]
    return P.Evaluator(data, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]), progress=False)


def removed_rows(masks: dict, target: str) -> list[int]:
    """Output channels of ``target`` whose mask row is entirely zero."""
    mask = masks.get(target)
    if mask is None:
        return []
    return torch.nonzero(mask.flatten(1).eq(0).all(1)).flatten().tolist()


def masks_of(model: nn.Module, pruner, x: torch.Tensor) -> dict:
    gm = fxcompress.trace(model, x)
    return pruner.compute_masks(gm, get_analysis(gm))


def build(name: str, sparsity: float, **options):
    if name in {"apoz", "mean-activation", "taylor", "obd"}:
        options.setdefault("evaluator", tiny_evaluator())
    return P.make_pruner(name, sparsity=sparsity, **options)


ALL = ["l1", "l2", "fpgm", "slim", "random", "apoz", "mean-activation", "taylor", "obd"]
SIZES = {"conv1": 8, "conv2": 16, "fc1": 32}


def small_cnn() -> nn.Module:
    return SmallCNN(*SIZES.values()).eval()


@pytest.mark.parametrize("name", ALL)
def test_local_sparsity_reached_per_layer_and_overall(name):
    model = small_cnn()
    x = torch.randn(2, 1, 28, 28)
    small = fxcompress.compile(model, x, standard_pruning(build(name, 0.75)), verify=False)
    kept = {layer: getattr(small, layer).weight.shape[0] for layer in SIZES}
    assert kept == {layer: n - math.floor(n * 0.75) for layer, n in SIZES.items()}
    assert small.fc2.weight.shape[0] == 10  # coupled to the graph output: never pruned
    assert sum(kept.values()) / sum(SIZES.values()) == pytest.approx(0.25, abs=0.01)


def test_lamp_global_reaches_total_sparsity_and_keeps_each_layers_largest_channel():
    model = small_cnn()
    x = torch.randn(2, 1, 28, 28)
    small = fxcompress.compile(model, x, standard_pruning(P.LAMP(0.7)))
    kept = {layer: getattr(small, layer).weight.shape[0] for layer in SIZES}
    total = sum(SIZES.values())
    assert sum(kept.values()) == total - math.floor(total * 0.7)
    assert all(k >= 1 for k in kept.values())
    assert len({k / n for k, n in zip(kept.values(), SIZES.values())}) > 1  # LAMP adapts the sparsity per layer


def test_lamp_scores_follow_the_definition():
    squared = np.array([1.0, 4.0, 2.0, 3.0])
    # sorted 1,2,3,4: score = w^2 / sum of w^2 at least as large
    expected = np.array([1 / 10, 4 / 4, 2 / 9, 3 / 7])
    np.testing.assert_allclose(P.magnitude.lamp_scores(squared), expected)


def test_global_allocation_honours_max_sparsity_per_layer():
    model = small_cnn()
    with torch.no_grad():
        model.conv1.weight.mul_(1e-3)  # conv1's channels score lowest everywhere
    x = torch.randn(2, 1, 28, 28)
    pruner = P.L1Norm(0.3, allocation="global", max_sparsity_per_layer=0.5)
    small = fxcompress.compile(model, x, standard_pruning(pruner))
    kept = {layer: getattr(small, layer).weight.shape[0] for layer in SIZES}
    assert all(kept[layer] >= n - math.floor(n * 0.5) for layer, n in SIZES.items())
    assert sum(SIZES.values()) - sum(kept.values()) == math.floor(sum(SIZES.values()) * 0.3)


def test_round_to_keeps_multiples():
    model = small_cnn()
    small = fxcompress.compile(model, torch.randn(2, 1, 28, 28), standard_pruning(P.L2Norm(0.6, round_to=4)))
    assert all(getattr(small, layer).weight.shape[0] % 4 == 0 for layer in SIZES)


def test_bad_allocation_is_a_clear_error():
    with pytest.raises(fxcompress.ConfigError, match="allocation"):
        P.L1Norm(0.5, allocation="everywhere")


def test_data_aware_criterion_without_data_names_what_to_pass():
    with pytest.raises(fxcompress.ConfigError, match="evaluator=fxcompress.prune.Evaluator"):
        P.Taylor(0.5)


# ---------------------------------------------------------------------------- crafted rankings


class TwoConv(nn.Module):
    """conv1 (1x1) -> relu -> conv2 (1x1): conv1's four output channels form one prunable group."""

    def __init__(self, c_in=2, bias=False, relu=True):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, 4, 1, bias=bias)
        self.conv2 = nn.Conv2d(4, 1, 1, bias=False)
        self.relu = relu

    def forward(self, x):
        y = self.conv1(x)
        return self.conv2(torch.relu(y) if self.relu else y)


def test_fpgm_removes_the_filter_nearest_the_geometric_median_not_the_smallest():
    model = TwoConv()
    with torch.no_grad():
        # filters as points: (6,6) is nearest the median of the others but not the smallest norm
        model.conv1.weight.copy_(torch.tensor([[6.0, 6.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]).view(4, 2, 1, 1))
        model.conv2.weight.fill_(1.0)
    x = torch.randn(1, 2, 3, 3)
    assert removed_rows(masks_of(model, P.FPGM(0.25), x), "conv1.weight") == [0]
    assert removed_rows(masks_of(model, P.L1Norm(0.25), x), "conv1.weight") in ([1], [2])


def test_fpgm_compares_squared_weights_by_default_and_raw_weights_as_the_paper_does():
    model = TwoConv()
    with torch.no_grad():
        # (4, .5) is (-4, 0) again once squared: a duplicate; among raw weights (1, 1) is nearest the median
        model.conv1.weight.copy_(torch.tensor([[-4.0, 0.0], [4.0, 0.5], [1.0, 1.0], [0.0, -3.0]]).view(4, 2, 1, 1))
        model.conv2.weight.fill_(1.0)
    x = torch.randn(1, 2, 3, 3)
    assert removed_rows(masks_of(model, P.FPGM(0.25), x), "conv1.weight") == [1]
    assert removed_rows(masks_of(model, P.FPGM(0.25, vectors="weights"), x), "conv1.weight") == [2]
    with pytest.raises(ConfigError, match="vectors must be"):
        P.FPGM(0.25, vectors="abs")


def test_slim_ranks_by_batchnorm_gamma():
    model = SmallCNN().eval()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.linspace(1, 2, 32))
        model.bn1.weight[5] = 0.01
        model.conv1.weight[5].mul_(100)  # the largest filter: L1 would keep it
    masks = masks_of(model, P.Slim(1 / 32, op_names=("conv1",)), torch.randn(2, 1, 28, 28))
    assert removed_rows(masks, "conv1.weight") == [5]


def test_slim_penalty_is_l1_of_norm_weights():
    model = SmallCNN()
    with torch.no_grad():
        model.bn1.weight.fill_(-2.0)
        model.bn2.weight.fill_(1.0)
    assert P.slim_penalty(0.5)(model).item() == pytest.approx(0.5 * (2 * 32 + 64))


def test_random_is_repeatable_and_seeded():
    model = small_cnn()
    x = torch.randn(2, 1, 28, 28)
    a = removed_rows(masks_of(model, P.RandomPruner(0.5, seed=1), x), "conv2.weight")
    b = removed_rows(masks_of(model, P.RandomPruner(0.5, seed=1), x), "conv2.weight")
    c = removed_rows(masks_of(model, P.RandomPruner(0.5, seed=2), x), "conv2.weight")
    assert a == b and a != c and len(a) == 8


def _ones_evaluator(c_in=1):
    data = [torch.ones(2, c_in, 3, 3)]
    return P.Evaluator(data, loss=lambda m, b: m(b).sum(), inputs=lambda b: (b,), progress=False)


def _linear_two_conv(w1, w2):
    model = TwoConv(c_in=1, relu=False)
    with torch.no_grad():
        model.conv1.weight.copy_(torch.tensor(w1).view(4, 1, 1, 1))
        model.conv2.weight.copy_(torch.tensor(w2).view(1, 4, 1, 1))
    return model


def test_taylor_scores_are_first_order_weight_times_gradient_of_every_slice():
    # loss = sum over 2*9 pixels of sum_c w2_c * w1_c: |w * g| is 18 * |w1_c * w2_c| on conv1's row and on
    # conv2's column alike; raw slices (no normaliser by default), the two averaged.
    w1, w2 = [1.0, 10.0, 2.0, 3.0], [1.0, 0.01, 1.0, 1.0]
    model = _linear_two_conv(w1, w2)
    x = torch.ones(2, 1, 3, 3)
    gm = fxcompress.trace(model, x)
    analysis = get_analysis(gm)
    pruner = P.Taylor(0.25, evaluator=_ones_evaluator())
    group = next(g for g in analysis.prunable_groups() if len(g) == 4)
    product = np.array(w1) * np.array(w2)
    np.testing.assert_allclose(pruner.channel_scores(gm, analysis, group), 18 * product, rtol=1e-5)
    assert removed_rows(masks_of(model, pruner, x), "conv1.weight") == [1]  # smallest product
    assert removed_rows(masks_of(model, P.L1Norm(0.25), x), "conv1.weight") == [0]  # smallest norm


def test_obd_scores_are_half_fisher_times_squared_weights():
    w1, w2 = [1.0, 10.0, 2.0, 3.0], [1.0, 0.01, 1.0, 1.0]
    model = _linear_two_conv(w1, w2)
    x = torch.ones(2, 1, 3, 3)
    gm = fxcompress.trace(model, x)
    analysis = get_analysis(gm)
    group = next(g for g in analysis.prunable_groups() if len(g) == 4)
    scores = P.OBD(0.25, evaluator=_ones_evaluator()).channel_scores(gm, analysis, group)
    a, b = np.array(w1), np.array(w2)
    # g(w1_c) = 18 w2_c and g(w2_c) = 18 w1_c: 0.5 * (g1^2 w1^2 + g2^2 w2^2) = 324 * w1^2 * w2^2
    np.testing.assert_allclose(scores, 324 * a**2 * b**2, rtol=1e-5)


def test_apoz_removes_the_channel_that_is_most_often_zero():
    model = TwoConv(c_in=1, bias=True)
    with torch.no_grad():
        model.conv1.weight.fill_(1.0)
        model.conv1.bias.copy_(torch.tensor([0.0, -1.5, 1.0, 5.0]))
        model.conv2.weight.fill_(1.0)
    data = [torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ev = P.Evaluator(data, loss=lambda m, b: m(b).sum(), inputs=lambda b: (b,), progress=False)
    masks = masks_of(model, P.APoZ(0.25, evaluator=ev), data[0])
    assert removed_rows(masks, "conv1.weight") == [1]


def test_mean_activation_removes_the_weakest_channel():
    model = TwoConv(c_in=1, bias=False)
    with torch.no_grad():
        model.conv1.weight.copy_(torch.tensor([1.0, 0.01, 2.0, -3.0]).view(4, 1, 1, 1))
        model.conv2.weight.copy_(torch.tensor([1.0, 100.0, 1.0, 1.0]).view(1, 4, 1, 1))  # L1 would keep channel 1
    data = [torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ev = P.Evaluator(data, loss=lambda m, b: m(b).sum(), inputs=lambda b: (b,), progress=False)
    assert removed_rows(masks_of(model, P.MeanActivation(0.25, evaluator=ev), data[0]), "conv1.weight") == [1]


def test_data_aware_scoring_leaves_batchnorm_statistics_and_gradients_alone():
    model = small_cnn()
    x = torch.randn(2, 1, 28, 28)
    gm = fxcompress.trace(model, x)
    before = gm.bn1.running_mean.clone()
    P.Taylor(0.5, evaluator=tiny_evaluator()).compute_masks(gm, get_analysis(gm))
    P.APoZ(0.5, evaluator=tiny_evaluator()).compute_masks(gm, get_analysis(gm))
    assert torch.equal(gm.bn1.running_mean, before)
    assert all(p.grad is None for p in gm.parameters())



@pytest.mark.parametrize("name", ["taylor", "obd", "apoz"])
def test_data_aware_criteria_score_an_export_captured_graph_as_a_traced_one(name):
    # torch.export graphs refuse .eval(): the criteria set the training flags directly
    model = small_cnn()
    x = torch.randn(2, 1, 28, 28)
    pruner = build(name, 0.5)
    traced, exported = fxcompress.trace(model, x, frontend="fx"), fxcompress.trace(model, x, frontend="export")
    by_frontend = [pruner.compute_masks(gm, get_analysis(gm)) for gm in (traced, exported)]
    assert removed_rows(by_frontend[0], "conv1.weight") == removed_rows(by_frontend[1], "conv1.weight")
    assert len(removed_rows(by_frontend[1], "conv1.weight")) == SIZES["conv1"] // 2
    assert all(p.grad is None for p in exported.parameters())

# ---------------------------------------------------------------------------- group aggregation


def test_normalizers_scale_one_slice_as_documented():
    s = np.array([1.0, 2.0, 5.0])
    np.testing.assert_allclose(P.magnitude.normalize(s, "none"), s)
    np.testing.assert_allclose(P.magnitude.normalize(s, "mean"), s / (8 / 3))
    np.testing.assert_allclose(P.magnitude.normalize(s, "max"), s / 5)
    np.testing.assert_allclose(P.magnitude.normalize(s, "sum"), s / 8)
    np.testing.assert_allclose(P.magnitude.normalize(s, "lamp"), [1 / 30, 4 / 29, 1.0])
    np.testing.assert_allclose(P.magnitude.normalize(np.zeros(2), "mean"), [0.0, 0.0])


def test_reductions_combine_slices_per_channel():
    slices = [np.array([1.0, 4.0]), np.array([3.0, 0.5])]
    reduce = P.magnitude.reduce_slices
    np.testing.assert_allclose(reduce(slices, "sum", 2), [4.0, 4.5])
    np.testing.assert_allclose(reduce(slices, "mean", 2), [2.0, 2.25])
    np.testing.assert_allclose(reduce(slices, "max", 2), [3.0, 4.0])
    np.testing.assert_allclose(reduce(slices, "prod", 2), [3.0, 2.0])
    np.testing.assert_allclose(reduce([], "mean", 3), [0.0, 0.0, 0.0])


def _biased_two_conv():
    model = TwoConv(c_in=1, bias=True, relu=False)
    with torch.no_grad():
        model.conv1.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1))
        model.conv2.weight.copy_(torch.tensor([4.0, 1.0, 2.0, 1.0]).view(1, 4, 1, 1))
        model.conv1.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
    return model


@pytest.mark.parametrize(
    "options, expected",
    [
        # default: conv1 rows and conv2 columns at their own scale, averaged; the bias is left out
        ({}, (np.array([1, 2, 3, 4]) + np.array([4, 1, 2, 1])) / 2),
        # mean normaliser: conv1 rows / 2.5 and conv2 columns / 2
        ({"normalizer": "mean"}, (np.array([1, 2, 3, 4]) / 2.5 + np.array([4, 1, 2, 1]) / 2) / 2),
        ({"normalizer": "mean", "reduction": "sum"}, np.array([1, 2, 3, 4]) / 2.5 + np.array([4, 1, 2, 1]) / 2),
        ({"normalizer": "none", "reduction": "max"}, np.array([4.0, 2.0, 3.0, 4.0])),
        ({"normalizer": "max", "reduction": "prod"}, np.array([1, 2, 3, 4]) / 4 * np.array([4, 1, 2, 1]) / 4),
        # the bias joins as a third slice: 100 / 25 = 4 for channel 3 (mean-normalised), zero elsewhere
        ({"normalizer": "mean", "include_bias": True},
         (np.array([1, 2, 3, 4]) / 2.5 + np.array([4, 1, 2, 1]) / 2 + [0, 0, 0, 4]) / 3),
        ({"include_bias": True}, (np.array([1, 2, 3, 4]) + np.array([4, 1, 2, 1]) + [0, 0, 0, 100]) / 3),
    ],
)
def test_l1_group_aggregation(options, expected):
    model = _biased_two_conv()
    x = torch.ones(1, 1, 2, 2)
    gm = fxcompress.trace(model, x)
    analysis = get_analysis(gm)
    group = next(g for g in analysis.prunable_groups() if len(g) == 4)
    np.testing.assert_allclose(P.L1Norm(0.25, **options).channel_scores(gm, analysis, group), expected, rtol=1e-6)


def test_bias_decides_only_when_included():
    # mean-normalised scores without the bias (1.2, 0.65, 1.1, 1.05); with it (2.4, 1.3, 2.2, 6.1) / 3
    x = torch.ones(1, 1, 2, 2)
    mean = {"normalizer": "mean"}
    assert removed_rows(masks_of(_biased_two_conv(), P.L1Norm(0.5, **mean), x), "conv1.weight") == [1, 3]
    with_bias = P.L1Norm(0.5, include_bias=True, **mean)
    assert removed_rows(masks_of(_biased_two_conv(), with_bias, x), "conv1.weight") == [1, 2]


def test_taylor_aggregation_fields_apply():
    w1, w2 = [1.0, 10.0, 2.0, 3.0], [1.0, 0.01, 1.0, 1.0]
    model = _linear_two_conv(w1, w2)
    gm = fxcompress.trace(model, torch.ones(2, 1, 3, 3))
    analysis = get_analysis(gm)
    group = next(g for g in analysis.prunable_groups() if len(g) == 4)
    pruner = P.Taylor(0.25, evaluator=_ones_evaluator(), normalizer="none", reduction="sum")
    np.testing.assert_allclose(pruner.channel_scores(gm, analysis, group), 2 * 18 * np.array(w1) * np.array(w2), rtol=1e-5)
