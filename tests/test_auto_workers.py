"""fxcompress.auto.search with two worker processes sharing one Optuna journal file."""

from __future__ import annotations

import functools
import warnings

import optuna
import torch

from fxcompress.auto import search
from fxcompress.auto.search import PID_ATTR, SPARSITIES_ATTR
from fxcompress.examples import SmallCNN, accuracy


def test_two_workers_share_a_journal_study_and_agree_on_the_best(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        evaluate = functools.partial(accuracy, x=x, y=model(x).argmax(1))  # picklable for spawned workers
    storage = tmp_path / "study.log"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = search(model, x[:1], evaluate, budget=3.0, n_trials=8, n_workers=2, storage=storage,
                        study_name="shared", progress=False)

    reloaded = optuna.load_study(study_name="shared", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(storage))))
    done = reloaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert 8 <= len(done) <= 9  # a worker may start one trial while the other finishes the eighth
    pids = {t.user_attrs[PID_ATTR] for t in done}
    assert len(pids) == 2 and set(result.trials_by_worker) == pids
    best = reloaded.best_trial
    assert best.value == result.value == max(t.value for t in done)
    assert result.sparsities == best.user_attrs[SPARSITIES_ATTR]
    assert evaluate(result.model) == best.value  # re-evaluating the best sparsities gives the stored value
    assert result.measured_cost <= result.dense_cost / 3
