"""The evaluator interface: how fxcompress drives a user's data, loss and training.

Data-aware criteria (activations, gradients) and training-aware methods
(schedules, movement, ADMM, lottery ticket) need data. The user hands over one
:class:`Evaluator` holding a data iterable, a ``loss(model, batch)`` function
(the body of their training step) and optionally an ``evaluate(model)``
function; fxcompress runs the loops, with a progress bar on long ones.

With ``model``, its example input ``x`` and ``data``, a list of ``(images,
labels)`` batches:

>>> ev = Evaluator(data, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]), progress=False)
>>> gm = fxcompress.trace(model, x)
>>> ev.train(gm, epochs=3)   # Adam, masks held fixed; returns the number of optimizer steps
6
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fxcompress.errors import ConfigError, coerce_enum

__all__ = ["Evaluator", "LRSchedule", "recalibrate_batchnorm", "default_inputs"]

Batch = Any
StepHook = Callable[[nn.Module, int], None]


def default_inputs(batch: Batch) -> tuple:
    """The model inputs of a batch: ``batch[0]`` of a ``(inputs, targets)`` pair, or the batch itself."""
    if isinstance(batch, (tuple, list)):
        return (batch[0],)
    return (batch,)


def _adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


class LRSchedule(enum.Enum):
    """The learning rate over one call of :meth:`Evaluator.train`."""

    CONSTANT = "constant"  #: ``lr`` throughout
    COSINE = "cosine"  #: from ``lr`` down to zero along a half cosine; short recovery fine-tunes end better


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """A user's data, loss and (optionally) metric, which fxcompress drives.

    ``data`` is re-iterable (a list, a ``DataLoader``) or a zero-argument
    callable returning a fresh iterator (for reshuffling per epoch).
    ``loss(model, batch)`` returns a scalar tensor; fxcompress calls
    ``backward`` and the optimizer. ``evaluate(model)`` returns a metric
    (higher is better). ``inputs(batch)`` extracts the model's positional
    inputs (default: ``batch[0]``). ``lr_schedule="cosine"`` anneals the
    learning rate to zero over each ``train`` call; it needs to know the
    number of steps, so ``data`` must have a length (or pass ``max_steps``).
    """

    data: Iterable[Batch] | Callable[[], Iterable[Batch]]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module], float] | None = None
    lr: float = 1e-3
    optimizer: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer] = _adam
    inputs: Callable[[Batch], tuple] = default_inputs
    progress: bool = True
    lr_schedule: LRSchedule = LRSchedule.CONSTANT

    def __post_init__(self) -> None:
        coerce_enum(self, "lr_schedule", LRSchedule, "learning-rate schedule")
        if not callable(self.loss):
            raise ConfigError(f"Evaluator.loss must be a callable loss(model, batch), got {type(self.loss).__name__}")
        if self.evaluate is not None and not callable(self.evaluate):
            raise ConfigError("Evaluator.evaluate must be a callable evaluate(model) -> float, or None")

    def batches(self, limit: int | None = None) -> Iterator[Batch]:
        """One pass over the data (at most ``limit`` batches)."""
        source = self.data() if callable(self.data) else self.data
        return iter(source) if limit is None else itertools.islice(source, limit)

    def steps_per_epoch(self) -> int | None:
        source = self.data if not callable(self.data) else None
        try:
            return len(source) if source is not None else None
        except TypeError:
            return None

    def score(self, model: nn.Module) -> float:
        """``evaluate(model)`` in eval mode; raises when no ``evaluate`` was given."""
        if self.evaluate is None:
            raise ConfigError("this method needs Evaluator(evaluate=...) to measure the model")
        training = model.training
        model.eval()
        try:
            return float(self.evaluate(model))
        finally:
            model.train(training)

    def train(
        self,
        model: nn.Module,
        epochs: int = 1,
        *,
        max_steps: int | None = None,
        before_step: StepHook | None = None,
        after_step: StepHook | None = None,
        extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
        desc: str = "train",
    ) -> int:
        """Train ``model`` in place; return the number of optimizer steps taken.

        ``before_step(model, step)`` runs after ``backward`` and before the
        optimizer step (gradients are available); ``after_step`` after it.
        Masked weights stay zero: masks are re-applied by every forward.
        """
        optimizer = self.optimizer([p for p in model.parameters() if p.requires_grad], self.lr)
        total = self._total(epochs)
        if max_steps is not None:  # the schedule ends where training does: the step cap or the data, first
            total = max_steps if total is None else min(max_steps, total)
        scheduler = self._scheduler(optimizer, total)
        model.train()
        step = 0
        bar = tqdm(total=total, desc=desc, disable=not self.progress, leave=False)
        for _ in range(epochs):
            for batch in self.batches():
                if max_steps is not None and step >= max_steps:
                    break
                optimizer.zero_grad()
                loss = self.loss(model, batch)
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
                loss.backward()
                if before_step is not None:
                    before_step(model, step)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                bar.update(1)
                if after_step is not None:
                    after_step(model, step)
        bar.close()
        model.eval()
        return step

    def _scheduler(self, optimizer: torch.optim.Optimizer, total: int | None):
        if self.lr_schedule is LRSchedule.CONSTANT:
            return None
        if total is None:
            raise ConfigError(
                "Evaluator(lr_schedule='cosine') needs the number of training steps: give data a length "
                "(a list or a DataLoader rather than a generator function) or pass max_steps"
            )
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))

    def _total(self, epochs: int) -> int | None:
        per_epoch = self.steps_per_epoch()
        return None if per_epoch is None else per_epoch * epochs


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, evaluator: Evaluator, num_batches: int = 20) -> nn.Module:
    """Re-estimate every batch-norm layer's running statistics on a few batches (cumulative average).

    Pruning changes the statistics of the activations that follow a removed
    channel; re-estimating them recovers much of the accuracy lost before any
    fine-tuning. Only the statistics change; no parameter is trained.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    training = model.training
    model.train()
    for batch in evaluator.batches(num_batches):
        model(*evaluator.inputs(batch))
    model.train(training)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model
