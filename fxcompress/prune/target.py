"""Prune to a target: a channel criterion whose sparsity is found so that the model meets a budget.

``standard_pruning(L1Norm(), target="macs=2")`` (or ``Targeted(L1Norm(), "macs=2")``
as the pruner of ``InsertMasks``) asks for a model with half the MACs rather
than for a sparsity. :class:`Targeted` is an ordinary pruner: when
``InsertMasks`` consults it, it scores the channels once with its criterion,
predicts the cost of each candidate allocation with
:class:`~fxcompress.prune.budget.ShapeCost` (the cost model ``fxcompress.auto``
searches with; no model is built or run per candidate), and bisects the
criterion's ``sparsity`` (uniform across groups for ``Allocation.LOCAL``, one
global ranking for ``Allocation.GLOBAL``) until the budget is met. The pass
pipeline stays as it was: masks, propagation, shrinking.

>>> from fxcompress.passes import standard_pruning
>>> from fxcompress.prune import L1Norm
>>> from fxcompress.report import count_macs
>>> small = fxcompress.compile(model, x, standard_pruning(L1Norm(), target="macs=2"))
>>> round(count_macs(model, x) / count_macs(small, x), 2)   # SmallCNN: 32, 64, 128 channels, coarse steps
1.98
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np
from torch import fx

from fxcompress.analysis import ChannelAnalysis, Group
from fxcompress.errors import ConfigError
from fxcompress.prune.base import ChannelDecider, ChannelPruner
from fxcompress.prune.budget import Budget, BudgetMetric, ShapeCost

__all__ = ["Targeted", "TargetFit", "TargetWarning"]

_LOG = logging.getLogger("fxcompress")

#: Largest sparsity tried: every selected group down to its floor (one channel, or ``max_sparsity_per_layer``).
_MOST = 1.0 - 1e-9


class TargetWarning(UserWarning):
    """Whole channels are too coarse to land within the tolerance of the target: the nearest step was taken."""


@dataclasses.dataclass(frozen=True)
class TargetFit:
    """What the search found: the criterion's sparsity, its predicted ratio, channels kept per group."""

    sparsity: float
    ratio: float  #: predicted dense cost / pruned cost
    kept: tuple[int, ...]  #: channels kept by each selected group, in graph order
    keep: np.ndarray = dataclasses.field(repr=False, compare=False)  #: per component, whether it stays


@dataclasses.dataclass(frozen=True)
class Targeted(ChannelDecider):
    """Prune with ``criterion`` at whatever sparsity makes the model ``target`` times smaller.

    ``target`` is a :class:`~fxcompress.prune.budget.Budget` or its text:
    ``"macs=2"`` (half the MACs on the example inputs) or ``"params=2"``.
    The criterion's own ``sparsity`` is replaced by the search; everything
    else (layer selection, ``allocation``, ``round_to``,
    ``max_sparsity_per_layer``, data for data-aware criteria) applies as
    usual. The result meets the budget and lands within ``tolerance``
    (relative) of the requested ratio; when whole channels are too coarse for
    that, the nearest step is taken with a :class:`TargetWarning`. A target
    beyond what pruning every selected group to its floor reaches is a
    :class:`~fxcompress.errors.ConfigError` naming the best reachable ratio.

    Latency targets need models built and timed, which a pruner must not do:
    use :func:`fxcompress.auto.search` with ``Budget("latency", r)``.

    >>> from fxcompress.prune import L1Norm
    >>> Targeted(L1Norm(), "params=2")
    Targeted(criterion=L1Norm(...), target=Budget(metric=<BudgetMetric.PARAMS: 'params'>, ratio=2.0), tolerance=0.02)
    """

    criterion: ChannelPruner
    target: Budget | str = "macs=2"
    tolerance: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.criterion, ChannelPruner):
            raise ConfigError(
                f"a target needs a structured criterion (L1Norm(), Taylor(...), ...), got {type(self.criterion).__name__}"
            )
        object.__setattr__(self, "target", Budget.of(self.target))
        if self.target.metric is BudgetMetric.LATENCY:
            raise ConfigError(
                f"target {self.target}: latency is measured on built models, which a pruner does not build; "
                "use fxcompress.auto.search(..., budget=Budget('latency', ...)) or a macs/params target"
            )
        if not isinstance(self.tolerance, (int, float)) or not 0 < self.tolerance < 1:
            raise ConfigError(f"Targeted: tolerance must be in (0, 1), got {self.tolerance!r}")

    def decide(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> np.ndarray:
        return self.fit(gm, analysis).keep

    def fit(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> TargetFit:
        """Search the criterion's sparsity for the target on ``gm`` (see the class docstring)."""
        name = type(self.criterion).__name__
        groups = self.criterion.selected_groups(gm, analysis)
        if not groups:
            raise ConfigError(
                f"target {self.target}: {name} selects no prunable group of this model, so nothing can shrink; "
                "`python -m fxcompress viz MODEL` shows why each group is frozen"
            )
        search = _Search(self.criterion, gm, analysis, groups, self.target.metric)
        goal = search.cost.dense / self.target.ratio
        most = search.at(_MOST)
        if most.cost > goal:
            raise ConfigError(
                f"target {self.target} is out of reach: {name} makes {self.target.metric.value} at most "
                f"{search.cost.dense / most.cost:.2f}x smaller on this model (every selected group down to its floor; "
                "frozen channels and layers outside the selection stay)"
            )
        low, high = search.at(0.0), most  # low misses the goal, high meets it
        while high.sparsity - low.sparsity > 1e-7:
            middle = search.at(0.5 * (low.sparsity + high.sparsity))
            low, high = (low, middle) if middle.cost <= goal else (middle, high)
        high, low = search.give_back(high, low, goal)
        chosen = self._nearest(high, low, search.cost.dense)
        _LOG.info("target %s: %s at sparsity %.4f, predicted %.3fx", self.target, name, chosen.sparsity,
                  search.cost.dense / chosen.cost)
        return TargetFit(chosen.sparsity, search.cost.dense / chosen.cost, chosen.kept, search.keep(chosen.kept))

    def _nearest(self, meets: _Point, misses: _Point, dense: float) -> _Point:
        """The step that meets the budget when within tolerance, else the one below it, else the closer (warned)."""
        ratio = self.target.ratio

        def error(p: _Point) -> float:
            return abs(dense / p.cost / ratio - 1)

        for point in (meets, misses):
            if error(point) <= self.tolerance:
                return point
        chosen = min((meets, misses), key=error)
        warnings.warn(
            TargetWarning(
                f"target {self.target}: whole channels step from {dense / misses.cost:.3f}x to "
                f"{dense / meets.cost:.3f}x here, farther than the tolerance ({self.tolerance:.0%}); "
                f"took {dense / chosen.cost:.3f}x"
            ),
            stacklevel=4,
        )
        return chosen


@dataclasses.dataclass(frozen=True)
class _Point:
    sparsity: float
    kept: tuple[int, ...]
    cost: float


class _Search:
    """The criterion's scores (computed once) and the cost model of one graph: the cost of any sparsity."""

    def __init__(self, criterion: ChannelPruner, gm: fx.GraphModule, analysis: ChannelAnalysis,
                 groups: list[Group], metric: BudgetMetric) -> None:
        self.criterion, self.analysis, self.groups = criterion, analysis, groups
        self.keys = [str(g.id) for g in groups]
        self.sizes = [len(g) for g in groups]
        self.cost = ShapeCost.of_graph(gm, analysis, dict(zip(self.keys, groups)), metric)
        self.scores = criterion.ranked_scores(gm, analysis, groups)

    def at(self, sparsity: float) -> _Point:
        pruner = dataclasses.replace(self.criterion, sparsity=sparsity)
        return self.of_kept(tuple(pruner.kept_per_group(self.sizes, self.scores)), sparsity)

    def give_back(self, meets: _Point, misses: _Point, goal: float) -> tuple[_Point, _Point]:
        """Between two adjacent sparsities, give groups their channels back one group at a time while the goal holds.

        At the sparsity where the budget is first met, several groups often
        drop a channel (or a ``round_to`` step) at once; giving them back one
        by one (in graph order) keeps every group within one step of the same
        sparsity and lands within one group's step of the goal. Returns the
        last point that meets the goal and the first that misses it.
        """
        current = meets
        for i in [i for i, (a, b) in enumerate(zip(meets.kept, misses.kept)) if a != b]:
            trial = self.of_kept(current.kept[:i] + (misses.kept[i],) + current.kept[i + 1 :], current.sparsity)
            if trial.cost <= goal:
                current = trial
            elif trial.cost < misses.cost:
                misses = trial
        return current, misses

    def of_kept(self, kept: tuple[int, ...], sparsity: float) -> _Point:
        cost = self.cost.predict({k: n_keep / n for k, n_keep, n in zip(self.keys, kept, self.sizes)})
        return _Point(sparsity, kept, cost)

    def keep(self, kept: tuple[int, ...]) -> np.ndarray:
        return self.criterion.keep_lowest_dropped(self.analysis, self.groups, self.scores, kept)
