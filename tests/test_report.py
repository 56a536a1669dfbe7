"""fxcompress.report: counts on models with known figures, latency, per-layer tables, JSON."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import fxcompress
from fxcompress import report as R
from fxcompress.passes import standard_pruning
from fxcompress.prune import L1Norm
from fxcompress.sweep import check_pruning


def toy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


X = torch.randn(1, 3, 10, 10)  # conv0 -> 8x8, conv3 -> 6x6


@pytest.fixture(scope="module")
def pruned():
    model = toy()
    masked = fxcompress.compile(model, X, standard_pruning(L1Norm(0.5))[:-1])
    shrunk = fxcompress.compile(model, X, standard_pruning(L1Norm(0.5)))
    return model, masked, shrunk


# ---------------------------------------------------------------- whole-model counts


def test_linear_has_220_params_and_200_macs_per_sample():
    layer = nn.Linear(10, 20)
    assert R.count_params(layer) == 220
    assert R.count_macs(layer, torch.randn(1, 10)) == 200
    assert R.count_macs(layer, torch.randn(3, 10)) == 600


def test_conv_macs_are_out_channels_times_kernel_volume_times_output_pixels():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert R.count_params(conv) == 8 * 3 * 9 + 8
    assert R.count_macs(conv, torch.randn(1, 3, 8, 8)) == 8 * 3 * 9 * 64


def test_counting_macs_keeps_the_models_training_mode():
    model = toy().train()
    R.count_macs(model, X)
    assert all(m.training for m in model.modules())


def test_masked_entries_are_dense_params_but_not_nonzero_params():
    layer = nn.Linear(4, 2)
    torch_prune.custom_from_mask(layer, "weight", torch.tensor([[1.0] * 4, [0.0] * 4]))
    assert R.count_params(layer) == 10
    assert R.count_nonzero_params(layer) == 6


def test_size_on_disk_is_the_serialized_state_dict():
    small, big = R.size_on_disk(nn.Linear(10, 10)), R.size_on_disk(nn.Linear(100, 100))
    assert 4 * 110 <= small < 4 * 110 + 4096
    assert big - small == pytest.approx(4 * (10100 - 110), rel=0.01)


def test_latency_is_a_positive_median_of_the_requested_runs_and_restores_threads():
    threads = torch.get_num_threads()
    latency = R.measure_latency(nn.Linear(64, 64), torch.randn(8, 64), runs=5, warmup=1, threads=1)
    assert len(latency.runs_s) == 5 and all(t > 0 for t in latency.runs_s)
    assert latency.median_ms > 0 and latency.threads == 1
    assert torch.get_num_threads() == threads


def test_latency_rejects_zero_runs():
    with pytest.raises(ValueError, match="runs"):
        R.measure_latency(nn.Linear(2, 2), torch.randn(1, 2), runs=0)


# ---------------------------------------------------------------- compare


def test_compare_reports_before_after_ratios_and_prints_a_table(pruned, capsys):
    model, _, shrunk = pruned
    comparison = R.compare(model, shrunk, X, runs=3, warmup=1, threads=1)
    assert comparison.before.params == R.count_params(model)
    assert comparison.after.macs == R.count_macs(shrunk, X)
    assert comparison.ratios["macs"] == pytest.approx(comparison.before.macs / comparison.after.macs)
    assert comparison.ratios["macs"] > 1.5
    assert comparison.before.latency_ms > 0 and comparison.after.latency_ms > 0
    printed = capsys.readouterr().out
    assert "MACs" in printed and f"{comparison.ratios['params']:.2f}x" in printed


def test_masked_model_reports_fewer_nonzero_than_dense_params(pruned):
    model, masked, shrunk = pruned
    stats = R.model_stats(masked, X)
    assert stats.params == R.count_params(model)
    assert stats.nonzero_params == R.count_params(shrunk)
    assert stats.macs == R.count_macs(model, X)  # a masked model computes densely


# ---------------------------------------------------------------- per-layer table


def _by_name(rows):
    return {row.name: row for row in rows}


def test_layer_table_of_a_masked_model_shows_alive_channels_and_sparsity(pruned):
    _, masked, _ = pruned
    rows = _by_name(R.layer_table(masked, X))
    assert list(rows) == ["0", "1", "3", "4", "8"]
    conv0, conv3, fc = rows["0"], rows["3"], rows["8"]
    assert (conv0.in_before, conv0.in_after, conv0.out_before, conv0.out_after) == (3, 3, 8, 4)
    assert conv0.sparsity == pytest.approx(0.5)
    assert (conv3.in_after, conv3.out_after) == (4, 8)
    assert conv3.sparsity == pytest.approx(1 - (8 * 4) / (16 * 8))
    assert conv3.nonzero_params == 8 * 4 * 9 + 8
    assert (fc.in_before, fc.in_after, fc.out_after) == (16, 8, 10)
    assert conv0.macs == 8 * 3 * 9 * 64  # dense compute


def test_layer_table_against_the_dense_model_shows_shrunk_sizes_and_macs(pruned):
    model, _, shrunk = pruned
    rows = _by_name(R.layer_table(shrunk, X, before=model))
    conv0, bn1, conv3, fc = rows["0"], rows["1"], rows["3"], rows["8"]
    assert (conv0.out_before, conv0.out_after) == (8, 4)
    assert (bn1.in_before, bn1.out_after, bn1.params_before, bn1.params) == (8, 4, 16, 8)
    assert (conv3.params_before, conv3.params) == (16 * 8 * 9 + 16, 8 * 4 * 9 + 8)
    assert (conv3.macs_before, conv3.macs) == (16 * 8 * 9 * 36, 8 * 4 * 9 * 36)
    assert (fc.macs_before, fc.macs) == (160, 80)
    assert conv3.sparsity == 0.0
    text = R.format_layers(list(rows.values()))
    assert "8 → 4" in text and "BatchNorm2d" in text


def test_channels_of_grouped_and_transposed_convs_follow_their_weight_layout():
    depthwise = nn.Conv2d(8, 8, 3, groups=8)
    mask = torch.ones_like(depthwise.weight)
    mask[:4] = 0
    torch_prune.custom_from_mask(depthwise, "weight", mask)
    assert R._channels(depthwise, masked=True) == (4, 4)
    transposed = nn.ConvTranspose2d(4, 6, 3)  # weight [in, out, k, k]
    mask = torch.ones_like(transposed.weight)
    mask[0] = 0
    torch_prune.custom_from_mask(transposed, "weight", mask)
    assert R._channels(transposed, masked=True) == (3, 6)
    assert R._channels(nn.LayerNorm(12, elementwise_affine=False), masked=True) == (12, 12)


# ---------------------------------------------------------------- full report, sections, JSON


@pytest.fixture
def section_builder():
    @R.register_section("test-bits")
    def bits(model):
        rows = [[name, 8] for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        return R.Section("bits", ["layer", "bits"], rows) if rows else None

    yield bits
    R.SECTION_BUILDERS.pop("test-bits")


def test_report_round_trips_through_json_and_includes_registered_sections(pruned, section_builder):
    model, _, shrunk = pruned
    full = R.report(model, shrunk, X, runs=2, warmup=0)
    assert [s.title for s in full.sections] == ["bits"]
    assert full.sections[0].rows == [["0", 8], ["3", 8]]
    again = R.Report.from_json(full.to_json())
    assert again == full
    assert again.comparison.ratios == full.comparison.ratios
    assert "bits" in full.table() and "weight sparsity" in full.table()


def test_sections_with_nothing_to_say_are_left_out(pruned, section_builder):
    model, _, _ = pruned
    linear_only = nn.Sequential(nn.Linear(3, 3))
    full = R.report(linear_only, linear_only, torch.randn(1, 3), latency=False)
    assert full.sections == []
    assert full.comparison.after.latency_ms is None


# ---------------------------------------------------------------- the zoo check


def test_check_pruning_compares_masked_and_shrunk_and_leaves_the_model_alone():
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check = check_pruning(model, X, L1Norm(0.5))
    assert check.error <= 1e-5
    assert check.macs_dense == R.count_macs(model, X)
    assert check.macs_ratio > 1.5 and check.params_ratio > 1.5
    assert check.compile_s > 0
    assert "graph output" in check.why
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_relative_error_is_relative_to_the_reference_scale():
    a = [torch.tensor([10.0, -20.0])]
    assert R.relative_error(a, [torch.tensor([10.0, -19.0])]) == pytest.approx(1 / 20)
    assert R.relative_error(a, [torch.zeros(3)]) == float("inf")


def test_readme_quick_start_reaches_report_from_the_package():
    """The README's quick start calls ``fxcompress.report.compare`` after a bare ``import fxcompress``."""
    import importlib

    import fxcompress

    assert fxcompress.report is importlib.import_module("fxcompress.report")
    assert callable(fxcompress.report.compare)
