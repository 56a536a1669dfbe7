"""Tests of fxcompress.auto: the per-group pruner, cost models, sensitivity analysis and the search drivers.

The metric throughout is agreement with the dense model: the accuracy of a
candidate on random digits labelled by the dense SmallCNN's own predictions
(deterministic, and it falls as channels go, which is all a search needs).
"""

from __future__ import annotations

import copy
import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.auto import (
    Budget,
    BudgetMetric,
    LatencyTable,
    PerGroupSparsity,
    SearchConfig,
    ShapeCost,
    Workspace,
    fit_to_budget,
    iterative_search,
    measure_cost,
    search,
    sensitivity,
)
from fxcompress.errors import ConfigError
from fxcompress.examples import SmallCNN, accuracy
from fxcompress.passes import InsertMasks
from fxcompress.prune import FPGM, L1Norm

INPUT = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN().eval()


def agreement(model: nn.Module, n: int = 32):
    """``evaluate``: accuracy against ``model``'s own predictions on ``n`` fixed random digits."""
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    return functools.partial(accuracy, x=x, y=y)


class Residual(nn.Module):
    """Two convs whose outputs are added: one coupled group across both producers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + torch.relu(self.a(x))
        return self.head(self.b(x).mean((2, 3)))


# ---------------------------------------------------------------------------- PerGroupSparsity


def test_groups_are_keyed_by_first_producer_and_stable_across_traces(cnn):
    first, second = Workspace.trace(cnn, INPUT), Workspace.trace(cnn, INPUT)
    assert first.sizes == {"conv1.weight[0]": 32, "conv2.weight[0]": 64, "fc1.weight[0]": 128}
    assert first.keys == second.keys


def test_per_group_sparsity_prunes_each_group_by_its_own_fraction(cnn):
    pruner = PerGroupSparsity(L1Norm(), {"conv1.weight[0]": 0.25, "conv2.weight[0]": 0.5})
    small = fxcompress.compile(cnn, INPUT, fxcompress.passes.standard_pruning(pruner))
    assert (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features) == (24, 32, 128)


def test_per_group_sparsity_shrunk_equals_masked_and_insert_is_idempotent(cnn, helpers):
    pruner = PerGroupSparsity(FPGM(), {"conv2.weight[0]": 0.4, "fc1.weight[0]": 0.7})
    masked, shrunk = helpers.compile_pair(cnn, (INPUT,), pruner)
    helpers.outputs_agree(masked, shrunk, [torch.randn(4, 1, 28, 28)])
    assert not InsertMasks(pruner)(masked).modified  # a second run changes nothing


def test_per_group_sparsity_honours_round_to():
    assert PerGroupSparsity(L1Norm(round_to=8)).kept(64, 0.6) == 32


def test_unknown_group_is_an_error_listing_the_known_ones(cnn):
    pruner = PerGroupSparsity(L1Norm(), {"conv9.weight[0]": 0.5})
    with pytest.raises(ConfigError, match=r"no prunable group named 'conv9.weight\[0\]'.*conv1.weight\[0\]"):
        fxcompress.compile(cnn, INPUT, fxcompress.passes.standard_pruning(pruner))


def test_per_group_sparsity_round_trips_through_a_dict():
    pruner = PerGroupSparsity(FPGM(round_to=4), {"a.weight[0]": 0.5})
    assert PerGroupSparsity.from_dict(pruner.to_dict()) == pruner


def test_bad_sparsity_and_criterion_are_config_errors():
    with pytest.raises(ConfigError, match="sparsities"):
        PerGroupSparsity(L1Norm(), {"a": 1.5})
    with pytest.raises(ConfigError, match="criterion must be a ChannelPruner"):
        PerGroupSparsity("l1", {})


# ---------------------------------------------------------------------------- cost models


@pytest.mark.parametrize("metric", [BudgetMetric.MACS, BudgetMetric.PARAMS])
@pytest.mark.parametrize("make, shape", [(SmallCNN, (1, 1, 28, 28)), (Residual, (1, 3, 16, 16))])
def test_shape_cost_predicts_the_built_model_exactly(metric, make, shape):
    torch.manual_seed(0)
    ws = Workspace.trace(make().eval(), torch.randn(shape))
    cost = ShapeCost.build(ws, metric)
    rng = np.random.default_rng(0)
    for _ in range(3):
        sparsities = {k: float(rng.uniform(0, 0.8)) for k in ws.keys}
        built = ws.compile(sparsities, verify=True)
        assert cost.predict(ws.kept_fractions(sparsities)) == measure_cost(built, ws.example_inputs, metric)
    assert cost.predict(ws.kept_fractions({})) == cost.dense


def test_fit_to_budget_spends_the_budget_along_the_preferences():
    def cost(s):
        return 100 * (1 - s["a"]) + 100 * (1 - s["b"])

    fitted = fit_to_budget({"a": 1.0, "b": 0.5}, cost, 120, max_sparsity=0.9)
    assert cost(fitted) <= 120 and cost(fitted) == pytest.approx(120, abs=1e-6)
    assert fitted["a"] == pytest.approx(2 * fitted["b"])
    assert fit_to_budget({"a": 1.0, "b": 0.0}, cost, 50, max_sparsity=0.9) is None  # unreachable


def test_budget_parses_text_and_rejects_nonsense():
    assert Budget.parse("params=2.5") == Budget(BudgetMetric.PARAMS, 2.5)
    with pytest.raises(ConfigError, match="METRIC=RATIO"):
        Budget.parse("macs")
    with pytest.raises(ConfigError, match="unknown budget metric 'flops'"):
        Budget.parse("flops=2")
    with pytest.raises(ConfigError, match="above 1"):
        Budget("macs", 0.5)


def test_latency_table_interpolates_measured_savings(cnn):
    ws = Workspace.trace(cnn, INPUT)
    table = LatencyTable.measure(ws, sparsities=(0.5,), runs=3, warmup=1)
    assert set(table.points) == set(ws.keys)
    for key, points in table.points.items():
        assert points[-1] == (1.0, 0.0) and points[0][0] == 0.5
    half = {k: 0.5 for k in ws.keys}
    expected = table.dense - sum(p[0][1] for p in table.points.values())
    assert table.predict(half) == pytest.approx(expected)
    assert LatencyTable.from_dict(table.to_dict()) == table


# ---------------------------------------------------------------------------- sensitivity


def test_sensitivity_table_plot_and_resume_from_cache(cnn, tmp_path):
    calls = []
    base = agreement(cnn)

    def evaluate(model):
        calls.append(1)
        return base(model)

    cache = tmp_path / "sens.json"
    first = sensitivity(cnn, INPUT, evaluate, (0.5, 0.9), cache=cache, progress=False)
    assert len(calls) == 1 + 3 * 2 and first.evaluated == 6
    assert first.dense == 100.0
    assert first.values["conv2.weight[0]"][1] < first.dense  # pruning 90% of conv2 alone hurts
    assert "conv2.weight[0]" in first.table() and "90%" in first.table()
    calls.clear()
    longer = sensitivity(cnn, INPUT, evaluate, (0.5, 0.75, 0.9), cache=cache, progress=False)
    assert len(calls) == 3 and longer.evaluated == 3  # only the new rung was evaluated
    assert longer.values["conv1.weight[0]"][::2] == first.values["conv1.weight[0]"]
    png = longer.plot(tmp_path / "sens.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_cache_is_keyed_by_the_weights(cnn, tmp_path):
    cache = tmp_path / "sens.json"
    sensitivity(cnn, INPUT, agreement(cnn), (0.5,), cache=cache, progress=False)
    other = copy.deepcopy(cnn)
    with torch.no_grad():
        other.conv1.weight.mul_(2)
    result = sensitivity(other, INPUT, agreement(cnn), (0.5,), cache=cache, progress=False)
    assert result.evaluated == 3


# ---------------------------------------------------------------------------- search


def test_search_meets_the_budget_starts_from_uniform_and_keeps_the_user_model(cnn):
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    result = search(cnn, INPUT, agreement(cnn), budget=3.0, n_trials=5, verify=True, progress=False)
    assert result.measured_cost <= result.dense_cost / 3
    assert result.measured_cost == result.predicted_cost
    assert result.uniform_value is not None and result.value >= result.uniform_value
    assert result.value == max(t.value for t in result.study.trials if t.value is not None)
    assert len(result.study.trials) == 5
    assert result.model.conv2.out_channels < 64
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    assert "uniform at the same budget" in result.table()


def test_candidates_spend_the_budget_that_whole_channels_leave(cnn):
    result = search(cnn, INPUT, agreement(cnn), budget=3.0, n_trials=6, seed=1, progress=False)
    ws = Workspace.trace(cnn, INPUT)
    cost = ShapeCost.build(ws, BudgetMetric.MACS)
    uniform = [t for t in result.study.trials if t.user_attrs.get("baseline") == "uniform"]
    assert len(set(uniform[0].user_attrs["sparsities"].values())) == 1  # the baseline is not topped up
    for trial in result.study.trials:
        if trial.user_attrs.get("baseline"):
            continue
        sparsities = trial.user_attrs["sparsities"]
        assert cost.predict(ws.kept_fractions(sparsities)) <= cost.dense / 3
        for key, n in ws.sizes.items():  # no group has a channel that would still fit
            kept = ws.kept_fractions(sparsities)
            kept[key] += 1 / n
            assert kept[key] > 1 or cost.predict(kept) > cost.dense / 3


def test_search_with_params_budget_and_random_sampler(cnn):
    result = search(cnn, INPUT, agreement(cnn), budget="params=4", n_trials=4, sampler="random", progress=False)
    assert result.measured_cost <= result.dense_cost / 4


def test_search_with_cmaes_sampler(cnn):
    pytest.importorskip("cmaes")
    result = search(cnn, INPUT, agreement(cnn), budget=2.0, n_trials=3, sampler="cmaes", progress=False)
    assert result.measured_cost <= result.dense_cost / 2


def test_latency_budget_uses_the_given_table(cnn):
    ws = Workspace.trace(cnn, INPUT)
    table = LatencyTable(10.0, {k: ((0.1, 9.0 / 3), (1.0, 0.0)) for k in ws.keys}, threads=1)
    result = search(cnn, INPUT, agreement(cnn), budget="latency=2", n_trials=2, latency_table=table, progress=False)
    assert result.predicted_cost <= 5.0 + 1e-9
    assert result.measured_cost > 0  # timed for real


def test_search_resumes_a_study_in_a_journal_file(cnn, tmp_path):
    storage = tmp_path / "study.log"
    first = search(cnn, INPUT, agreement(cnn), 3.0, n_trials=3, storage=storage, study_name="s", progress=False)
    assert len(first.study.trials) == 3
    again = search(cnn, INPUT, agreement(cnn), 3.0, n_trials=5, storage=storage, study_name="s", progress=False)
    assert len(again.study.trials) == 5  # two more, not five more
    with pytest.raises(ConfigError, match="another configuration"):
        search(cnn, INPUT, agreement(cnn), 2.0, n_trials=5, storage=storage, study_name="s", progress=False)


def test_unreachable_budget_is_a_clear_error(cnn):
    with pytest.raises(ConfigError, match="budget may be unreachable"):
        search(cnn, INPUT, agreement(cnn), budget=1000.0, n_trials=2, max_sparsity=0.2, progress=False)


def test_search_config_round_trips():
    config = SearchConfig(Budget("params", 3), FPGM(round_to=2), 0.8, "cmaes", 5, False)
    assert SearchConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_iterative_search_tightens_the_budget_each_round_and_fine_tunes(cnn):
    tuned = []

    def finetune(model):
        tuned.append(measure_cost(model, INPUT, BudgetMetric.MACS))

    result = iterative_search(cnn, INPUT, agreement(cnn), finetune, budget=3.0, rounds=2, trials_per_round=3,
                              progress=False)
    assert len(result.rounds) == 2 and len(tuned) == 2
    assert tuned[0] > tuned[1]
    assert result.final_cost <= result.dense_cost / 3
    assert "round" in result.table()
