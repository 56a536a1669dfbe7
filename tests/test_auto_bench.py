"""tools/bench_auto.py (a short run on the real MNIST digits; the acceptance run is made by hand) and the
arithmetic of tools/study_auto_score.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def bench(helpers):
    return helpers.load_tool("bench_auto")


@pytest.mark.slow  # a shortened bench_auto run (search, iterative search, fine-tunes): a benchmark, opt-in
def test_short_bench_reports_every_row_at_the_budget(bench, tmp_path):
    out = tmp_path / "auto.json"
    bench.main(["--trials", "4", "--epochs", "1", "--rounds", "2", "--quiet", "--json", str(out)])
    rows = {r["method"].split(" (")[0]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["dense", "uniform", "searched", "iterative"]
    for name in ("uniform", "searched", "iterative"):
        assert rows["dense"]["macs"] / rows[name]["macs"] >= 2.95, name  # whole channels: within 2% of 3x
        assert 0 <= rows[name]["test_after_ft"] <= 100
    assert rows["iterative"]["test_before_ft"] is None  # it fine-tunes between its rounds
    assert rows["searched"]["test_before_ft"] is not None


def test_constant_schedule_fine_tunes_exactly_as_train_epochs(bench):
    """The rows' fine-tune with ``--finetune-schedule constant`` is the examples' plain training loop."""
    from fxcompress.examples import MnistSplit, SmallCNN, mnist_split, train_epochs

    data = mnist_split(seed=3)
    train = MnistSplit(data.train_x[:256], data.train_y[:256], data.test_x, data.test_y)
    torch.manual_seed(0)
    model = SmallCNN(8, 16, 32)
    plain, tuned = copy.deepcopy(model), copy.deepcopy(model)
    train_epochs(plain, train, 1, seed=5)
    bench.fine_tuner(train, 5, "constant").train(tuned, 1)
    for a, b in zip(plain.state_dict().values(), tuned.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_score_study_summary_measures_noise_rank_and_the_best_scored_allocation(helpers):
    summary = helpers.load_tool("study_auto_score").summary

    def record(uniform, score, constant, cosine):  # (loss, accuracy) after two fine-tuning seeds
        return {"seed": 0, "uniform": uniform, "score": score, "finetuned": {"constant": constant, "cosine": cosine}}

    records = [
        record(True, -0.30, [(0.20, 95.0), (0.10, 96.0)], [(0.10, 96.0), (0.10, 96.0)]),
        record(False, -0.20, [(0.10, 97.0), (0.20, 96.0)], [(0.08, 96.5), (0.06, 96.5)]),
        record(False, -0.40, [(0.30, 94.0), (0.30, 94.0)], [(0.20, 95.0), (0.20, 95.0)]),
    ]
    lines = {line.split()[0]: line.split()[1:] for line in summary(records).splitlines()[2:]}
    # noise: mean |A - B| accuracy and loss; Spearman of score against minus loss (tied ranks under constant);
    # best-scored (score -0.20) minus uniform
    assert lines["constant"] == ["0.67", "0.0667", "+0.87", "+0.0000", "+1.00", "0", "/", "1"]
    assert lines["cosine"] == ["0.00", "0.0067", "+1.00", "-0.0300", "+0.50", "1", "/", "1"]


@pytest.mark.parametrize("epochs, rounds, steps", [(3, 1, 30), (1, 3, 3)])
def test_iterative_rounds_share_the_fine_tuning_epochs(bench, epochs, rounds, steps, monkeypatch):
    """Each round takes its share of ``--finetune-epochs`` in steps, even when the share spans epochs."""
    import argparse

    from fxcompress.examples import MnistSplit, SmallCNN, mnist_split

    data = mnist_split(seed=3)
    train = MnistSplit(data.train_x[:640], data.train_y[:640], data.test_x, data.test_y)  # 10 batches
    taken = []
    original = bench.Evaluator.train
    monkeypatch.setattr(bench.Evaluator, "train", lambda self, *a, **k: taken.append(original(self, *a, **k)))
    args = argparse.Namespace(finetune_epochs=epochs, rounds=rounds, seed=0, finetune_schedule="cosine")
    bench.make_finetune(train, args)(SmallCNN(8, 16, 32))
    assert taken == [steps]
