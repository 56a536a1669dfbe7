"""Automatic compression: sensitivity analysis and budgeted search for per-group sparsity.

Users rarely know which layers tolerate pruning. This package finds out:

- :func:`sensitivity` prunes each dependency group alone at a ladder of
  sparsities and tabulates/plots the user's metric (cached on disk, resumable);
- :func:`search` finds per-group sparsities that maximise the metric under a
  budget of MACs, parameters or measured latency (:class:`Budget`), with
  Optuna's samplers, in one process or several workers sharing a study;
- :func:`iterative_search` is the schedule-aware variant (AutoCompress):
  search, prune, fine-tune briefly, repeat with a tighter budget.

Every trial is a copy of one traced and analysed model (:class:`Workspace`)
with a :class:`PerGroupSparsity` pruner compiled in: no per-trial retracing.

With ``model`` the network, ``x`` its example input and ``evaluate(model) ->
float`` the user's metric (a real search runs tens of trials):

>>> from fxcompress.auto import Budget, search
>>> result = search(model, x, evaluate, budget=Budget("macs", 3), n_trials=3, progress=False)
>>> result.measured_cost <= result.dense_cost / 3
True
"""

from fxcompress.auto.cost import Budget, BudgetMetric, LatencyTable, ShapeCost, fit_to_budget, measure_cost, spend_leftover
from fxcompress.auto.pergroup import PerGroupSparsity, group_key, searchable_groups
from fxcompress.auto.search import (
    Heartbeat,
    InlineSource,
    IterativeResult,
    ModelSource,
    SamplerKind,
    SearchConfig,
    SearchResult,
    iterative_search,
    open_storage,
    run_worker,
    search,
    searched_parameters,
)
from fxcompress.auto.sensitivity import SensitivityCache, SensitivityResult, sensitivity
from fxcompress.auto.workspace import Workspace

__all__ = [
    "Budget", "BudgetMetric", "LatencyTable", "ShapeCost", "fit_to_budget", "measure_cost", "spend_leftover",
    "PerGroupSparsity", "group_key", "searchable_groups", "Workspace",
    "sensitivity", "SensitivityResult", "SensitivityCache",
    "search", "searched_parameters", "SearchConfig", "SearchResult", "SamplerKind", "run_worker", "open_storage", "Heartbeat",
    "ModelSource", "InlineSource", "iterative_search", "IterativeResult",
]
