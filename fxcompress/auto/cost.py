"""Budgets and the cost models that predict a candidate's cost without building it.

A search proposes per-group sparsities many times per trial (to land exactly
on the budget), so cost must be predicted, not measured:

- :class:`ShapeCost` (defined with :class:`Budget` in
  :mod:`fxcompress.prune.budget`, which targets share) predicts MACs or
  parameters from tensor shapes: every parameter tensor shrinks along each
  channel dimension by the kept fraction of the groups there, and every
  node's MACs (measured once) scale with the channels it touches. For
  convolutional, linear and attention networks the prediction is exact.
- :class:`LatencyTable` is a lookup measured once on this machine: the
  latency of the model with one group shrunk at a few sparsities; a
  candidate's latency is the dense latency plus each group's interpolated
  change. It ignores interactions between groups, so the search reports the
  predicted and the measured latency of its result.

>>> import torch
>>> from fxcompress.auto import BudgetMetric, ShapeCost, Workspace
>>> from fxcompress.examples import SmallCNN
>>> ws = Workspace.trace(SmallCNN(), torch.randn(1, 1, 28, 28))
>>> cost = ShapeCost.build(ws, BudgetMetric.MACS)
>>> cost.dense, cost.predict(ws.kept_fractions({"conv2.weight[0]": 0.5}))
(4241152.0, 2234112.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
from torch import nn

from fxcompress.auto.workspace import Workspace
from fxcompress.prune.budget import Budget, BudgetMetric, ShapeCost
from fxcompress.report import count_macs, count_params, measure_latencies

__all__ = [
    "BudgetMetric",
    "Budget",
    "CostModel",
    "ShapeCost",
    "LatencyTable",
    "cost_model",
    "measure_cost",
    "fit_to_budget",
    "spend_leftover",
]


class CostModel(Protocol):
    """Predicts a cost from per-group kept fractions (``Workspace.kept_fractions``)."""

    metric: BudgetMetric
    dense: float

    def predict(self, kept: Mapping[str, float]) -> float: ...


# ---------------------------------------------------------------------------- latency


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """Per-group latency lookup, measured once on this machine (see the module docstring).

    ``points[key]`` holds ``(kept fraction, milliseconds saved)`` pairs,
    starting at ``(1.0, 0.0)``; predictions interpolate linearly between them.
    """

    dense: float  #: median latency of the dense model, ms
    points: dict[str, tuple[tuple[float, float], ...]]
    threads: int
    metric: BudgetMetric = BudgetMetric.LATENCY

    @classmethod
    def measure(cls, ws: Workspace, sparsities: Sequence[float] = (0.25, 0.5, 0.75), runs: int = 20,
                warmup: int = 3, threads: int | None = None, progress: bool = False) -> LatencyTable:
        """Shrink each group alone at each sparsity and time every model, interleaved run by run."""
        from tqdm.auto import tqdm

        cells = [(k, s) for k in ws.keys for s in sparsities]
        models = [ws.compile({k: s}) for k, s in tqdm(cells, desc="latency table", disable=not progress)]
        timings = measure_latencies([ws.compile({}), *models], ws.example_inputs, runs=runs, warmup=warmup,
                                    threads=threads)
        dense = timings[0].median_ms
        points: dict[str, list[tuple[float, float]]] = {k: [(1.0, 0.0)] for k in ws.keys}
        for (key, s), latency in zip(cells, timings[1:]):
            points[key].append((ws.kept_fractions({key: s})[key], dense - latency.median_ms))
        return cls(dense, {k: tuple(sorted(set(v))) for k, v in points.items()}, timings[0].threads)

    def predict(self, kept: Mapping[str, float]) -> float:
        saved = 0.0
        for key, pts in self.points.items():
            xs, ys = zip(*pts)
            saved += float(np.interp(kept.get(key, 1.0), xs, ys))
        return self.dense - saved

    def to_dict(self) -> dict:
        return {"dense": self.dense, "threads": self.threads, "points": {k: [list(p) for p in v]
                                                                           for k, v in self.points.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> LatencyTable:
        points = {k: tuple((float(a), float(b)) for a, b in v) for k, v in data["points"].items()}
        return cls(float(data["dense"]), points, int(data["threads"]))


def cost_model(ws: Workspace, metric: BudgetMetric, latency_table: LatencyTable | None = None) -> CostModel:
    """The cost model for ``metric``: shapes for MACs/params, the given (or a freshly measured) latency table."""
    if metric is not BudgetMetric.LATENCY:
        return ShapeCost.build(ws, metric)
    return latency_table if latency_table is not None else LatencyTable.measure(ws)


def measure_cost(model: nn.Module, example_inputs, metric: BudgetMetric, runs: int = 20) -> float:
    """The true cost of a built model, to check a prediction against."""
    if metric is BudgetMetric.MACS:
        return float(count_macs(model, example_inputs))
    if metric is BudgetMetric.PARAMS:
        return float(count_params(model))
    return measure_latencies([model], example_inputs, runs=runs)[0].median_ms


# ---------------------------------------------------------------------------- landing on the budget


def fit_to_budget(
    preferences: Mapping[str, float],
    cost: Callable[[Mapping[str, float]], float],
    target: float,
    max_sparsity: float,
    iterations: int = 40,
) -> dict[str, float] | None:
    """Sparsities proportional to ``preferences``, scaled until ``cost(sparsities) <= target``.

    ``s_k = min(max_sparsity, t * preferences[k])`` with the smallest ``t``
    found by bisection, so the search explores the *shape* of the allocation
    and every candidate spends the whole budget. None when even every group at
    ``max_sparsity`` (those with a positive preference) misses the target.

    >>> fit_to_budget({"a": 1.0, "b": 0.5}, lambda s: 100 * (1 - s["a"]) + 100 * (1 - s["b"]), 120, 0.9)
    {'a': 0.5333..., 'b': 0.2666...}
    """
    positive = [p for p in preferences.values() if p > 0]
    if not positive:
        return None

    def at(t: float) -> dict[str, float]:
        return {k: min(max_sparsity, t * p) for k, p in preferences.items()}

    lo, hi = 0.0, max_sparsity / min(positive)
    if cost(at(hi)) > target:
        return None
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if cost(at(mid)) <= target else (mid, hi)
    return at(hi)


def _one_more(ws: Workspace, key: str, sparsity: float) -> float | None:
    """The largest sparsity below ``sparsity`` at which group ``key`` keeps one more channel (None: all kept)."""
    n = ws.sizes[key]
    pruner = ws.pruner({})
    kept = pruner.kept(n, sparsity)
    for fewer in range(n - kept - 1, -1, -1):
        if pruner.kept(n, fewer / n) > kept:
            return fewer / n
    return None


def spend_leftover(
    ws: Workspace, sparsities: Mapping[str, float], cost: Callable[[Mapping[str, float]], float], target: float
) -> dict[str, float]:
    """Give back single channels while the budget still affords them: to the most pruned group whose next
    channel fits, until none fits.

    :func:`fit_to_budget` scales all groups together and stops when the group
    whose next channel would overshoot is reached, while a cheaper group (a
    classifier layer, a few MACs a channel) could still grow: without this an
    allocation can spend a few percent less than its budget. ``cost`` takes
    sparsities, like :func:`fit_to_budget`'s.
    """
    current = {k: sparsities.get(k, 0.0) for k in ws.keys}
    while True:
        fits = {k: s for k in current if (s := _one_more(ws, k, current[k])) is not None
                and cost({**current, k: s}) <= target}
        if not fits:
            return current
        key = max(fits, key=lambda k: (current[k], k))
        current[key] = fits[key]
