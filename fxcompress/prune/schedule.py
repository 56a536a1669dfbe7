"""Sparsity schedules and the driver that prunes gradually while the user's loop trains.

A schedule maps a training step to the sparsity reached by then. ``ScheduledPruning``
wraps *any* pruner with a ``sparsity`` field (a channel criterion, level
pruning) or a ``sparsities`` mapping (``fxcompress.auto.PerGroupSparsity``:
each group follows the schedule to its own final sparsity) and re-runs it with
the scheduled sparsity every ``every`` steps; masks only ever shrink, channels
removed earlier count toward the next step, and masked weights stay zero
between steps.

With ``model``, its example input ``x`` and an :class:`~fxcompress.prune.Evaluator`
``evaluator`` (two batches per epoch here; real schedules run hundreds of steps):

>>> from fxcompress.prune import L1Norm
>>> gm = fxcompress.trace(model, x)
>>> agp = ScheduledPruning(L1Norm(0.8), AGPSchedule(end_step=6), every=2)
>>> gm = agp.run(gm, evaluator, epochs=4)          # gm is now masked at 80 %
>>> small = fxcompress.shrink(gm)
>>> small.conv1.out_channels, small.conv2.out_channels
(7, 13)
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

from torch import fx

from fxcompress.analysis import get_analysis
from fxcompress.errors import ConfigError
from fxcompress.masks import apply_masks
from fxcompress.prune.base import Pruner
from fxcompress.prune.evaluator import Evaluator

__all__ = ["Schedule", "LinearSchedule", "AGPSchedule", "ScheduledPruning", "prune_step"]


@runtime_checkable
class Schedule(Protocol):
    def sparsity_at(self, step: int, final: float) -> float:
        """Target sparsity after ``step`` optimizer steps, ending at ``final``."""
        ...


def _progress(step: int, start: int, end: int) -> float:
    if step <= start:
        return 0.0
    return min(1.0, (step - start) / max(end - start, 1))


@dataclasses.dataclass(frozen=True)
class LinearSchedule:
    """Sparsity grows linearly from ``initial`` at ``start_step`` to the final value at ``end_step``.

    >>> LinearSchedule(end_step=100).sparsity_at(50, final=0.8)
    0.4
    """

    end_step: int
    start_step: int = 0
    initial: float = 0.0

    def sparsity_at(self, step: int, final: float) -> float:
        return self.initial + (final - self.initial) * _progress(step, self.start_step, self.end_step)


@dataclasses.dataclass(frozen=True)
class AGPSchedule:
    """Automated gradual pruning (Zhu & Gupta, 2017): cubic, fast early and gentle near the end.

    ``s_t = s_f + (s_i - s_f) * (1 - progress)**3``.

    >>> round(AGPSchedule(end_step=100).sparsity_at(50, final=0.8), 6)
    0.7
    """

    end_step: int
    start_step: int = 0
    initial: float = 0.0

    def sparsity_at(self, step: int, final: float) -> float:
        return final + (self.initial - final) * (1.0 - _progress(step, self.start_step, self.end_step)) ** 3


def prune_step(gm: fx.GraphModule, pruner: Pruner, sparsity: float) -> bool:
    """Mask ``gm`` further with ``pruner`` at ``sparsity`` (same pruner type, new ``sparsity`` field)."""
    return _mask_with(gm, dataclasses.replace(pruner, sparsity=sparsity))


def _field_names(pruner: object) -> set[str]:
    return {f.name for f in dataclasses.fields(pruner)} if dataclasses.is_dataclass(pruner) else set()


@dataclasses.dataclass(frozen=True)
class ScheduledPruning:
    """Prune with ``pruner``'s criterion while training, following ``schedule`` up to ``pruner``'s sparsity.

    >>> from fxcompress.prune import L1Norm
    >>> ScheduledPruning(L1Norm(0.8), LinearSchedule(end_step=100)).pruner_at(50).sparsity
    0.4
    """

    pruner: Pruner
    schedule: Schedule
    every: int = 10

    def __post_init__(self) -> None:
        if not _field_names(self.pruner) & {"sparsity", "sparsities"}:
            raise ConfigError(
                f"ScheduledPruning needs a pruner with a sparsity field or a sparsities mapping "
                f"(PerGroupSparsity), got {type(self.pruner).__name__}"
            )
        if not isinstance(self.schedule, Schedule):
            raise ConfigError(f"schedule must have sparsity_at(step, final), got {type(self.schedule).__name__}")
        if not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"every must be a positive integer, got {self.every!r}")

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.schedule.end_step

    def pruner_at(self, step: int) -> Pruner:
        """The pruner with the sparsity (or per-group sparsities) the schedule reaches at ``step``."""
        if "sparsities" in _field_names(self.pruner):
            at = {key: self.schedule.sparsity_at(step, final) for key, final in self.pruner.sparsities.items()}
            return dataclasses.replace(self.pruner, sparsities=at)
        return dataclasses.replace(self.pruner, sparsity=self.schedule.sparsity_at(step, self.pruner.sparsity))

    def run(self, gm: fx.GraphModule, evaluator: Evaluator, epochs: int = 1, max_steps: int | None = None):
        """Train ``gm`` in place with ``evaluator``, pruning on schedule; the final sparsity is always applied."""

        def after_step(model, step):
            if self.due(step) and step <= self.schedule.end_step:
                _mask_with(gm, self.pruner_at(step))

        evaluator.train(gm, epochs, max_steps=max_steps, after_step=after_step, desc=f"prune ({type(self.pruner).__name__})")
        _mask_with(gm, self.pruner)
        return gm


def _mask_with(gm: fx.GraphModule, pruner: Pruner) -> bool:
    return apply_masks(gm, pruner.compute_masks(gm, get_analysis(gm)))
