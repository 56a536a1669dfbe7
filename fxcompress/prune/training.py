"""Training-aware pruning: movement pruning, ADMM and lottery tickets (iterative magnitude pruning with rewinding).

Each method is a frozen config with ``run(gm, evaluator, ...)``: it trains the
(traced) ``GraphModule`` in place through the user's
:class:`~fxcompress.prune.evaluator.Evaluator` and leaves fine-grained masks
on its ``weight`` tensors. Layer selection works as for every other pruner
(``op_types``, ``op_names``, ``exclude``).

With ``model``, its example input ``x`` and an :class:`~fxcompress.prune.Evaluator` ``evaluator``:

>>> gm = fxcompress.trace(model, x)
>>> gm = MovementPruning(sparsity=0.9).run(gm, evaluator, epochs=2)
>>> round(float((gm.fc1.weight == 0).float().mean()), 3)
0.9
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn

from fxcompress.errors import ConfigError
from fxcompress.masks import apply_masks, mask_of, public_name, refresh, split_target, trainable
from fxcompress.prune.base import DEFAULT_OP_TYPES, Allocation, check_fraction, removed_count
from fxcompress.selection import normalize_selection
from fxcompress.prune.evaluator import Evaluator
from fxcompress.prune.schedule import AGPSchedule, Schedule
from fxcompress.prune.unstructured import LevelPruner, _keep_top, selected_weights

__all__ = ["MovementPruning", "ADMM", "LotteryTicket"]


@dataclasses.dataclass(frozen=True)
class _Selection:
    sparsity: float = 0.5
    op_types: tuple[type[nn.Module], ...] = DEFAULT_OP_TYPES
    op_names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fraction(self, "sparsity", self.sparsity)
        normalize_selection(self)


def _owner(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    owner, name = split_target(target)
    return gm.get_submodule(owner), name


def _parameter(gm: fx.GraphModule, target: str) -> nn.Parameter:
    """The trainable tensor behind ``target`` (its dense values once masked)."""
    return trainable(*_owner(gm, target))


def _total_steps(evaluator: Evaluator, epochs: int, max_steps: int | None) -> int:
    if max_steps is not None:
        return max_steps
    per_epoch = evaluator.steps_per_epoch()
    if per_epoch is None:
        raise ConfigError("the data has no len(): pass max_steps or an explicit schedule")
    return per_epoch * epochs


@dataclasses.dataclass(frozen=True)
class MovementPruning(_Selection):
    """Movement pruning (Sanh et al., 2020): keep the weights that move *away* from zero while fine-tuning.

    The score of a weight accumulates ``-w * dL/dw`` over steps; every
    ``every`` steps each layer keeps the ``1 - s_t`` fraction with the largest
    scores, ``s_t`` following ``schedule`` (cubic AGP over the run by default).
    """

    schedule: Schedule | None = None
    every: int = 10

    def run(self, gm: fx.GraphModule, evaluator: Evaluator, epochs: int = 1, max_steps: int | None = None):
        schedule = self.schedule or AGPSchedule(end_step=max(1, int(0.8 * _total_steps(evaluator, epochs, max_steps))))
        targets = list(selected_weights(gm, self))
        scores = {t: torch.zeros_like(_parameter(gm, t)) for t in targets}

        def before_step(model, step):
            for t in targets:
                param = _parameter(gm, t)
                if param.grad is not None:
                    scores[t] -= param.detach() * param.grad.detach()

        def after_step(model, step):
            if step % self.every == 0 or step == schedule.end_step:
                self._mask(gm, scores, schedule.sparsity_at(step, self.sparsity))

        evaluator.train(gm, epochs, max_steps=max_steps, before_step=before_step, after_step=after_step, desc="movement")
        self._mask(gm, scores, self.sparsity)
        return gm

    @staticmethod
    def _mask(gm: fx.GraphModule, scores: dict[str, torch.Tensor], sparsity: float) -> None:
        masks = {}
        for target, score in scores.items():
            module, name = _owner(gm, target)
            current = mask_of(module, name)
            ranked = score if current is None else score.masked_fill(current == 0, float("-inf"))
            masks[target] = _keep_top(ranked, removed_count(score.numel(), sparsity))
        apply_masks(gm, masks)


def _project(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Euclidean projection onto tensors with at most ``1 - sparsity`` of the entries nonzero."""
    return weight * _keep_top(weight.abs(), removed_count(weight.numel(), sparsity))


@dataclasses.dataclass(frozen=True)
class ADMM(_Selection):
    """ADMM weight pruning (Zhang et al., 2018): train towards a sparse copy, then cut.

    Adds ``rho/2 * ||W - Z + U||^2`` to the loss; every ``update_every`` steps
    sets ``Z`` to the projection of ``W + U`` onto the ``sparsity`` constraint
    (per layer) and ``U += W - Z``. At the end the weights outside ``Z``'s
    support are masked. Fine-tune afterwards to recover.
    """

    rho: float = 1e-2
    update_every: int = 20

    def run(self, gm: fx.GraphModule, evaluator: Evaluator, epochs: int = 1, max_steps: int | None = None):
        targets = list(selected_weights(gm, self))
        z = {t: _project(_parameter(gm, t).detach(), self.sparsity) for t in targets}
        u = {t: torch.zeros_like(z[t]) for t in targets}

        def penalty(model):
            terms = [(getattr(*_owner(gm, t)) - z[t] + u[t]).pow(2).sum() for t in targets]
            return 0.5 * self.rho * torch.stack(terms).sum()

        def after_step(model, step):
            if step % self.update_every:
                return
            for t in targets:
                w = getattr(*_owner(gm, t)).detach()
                z[t] = _project(w + u[t], self.sparsity)
                u[t] += w - z[t]

        evaluator.train(gm, epochs, max_steps=max_steps, extra_loss=penalty, after_step=after_step, desc="admm")
        apply_masks(gm, {t: (z[t] != 0).float() if self.sparsity else torch.ones_like(z[t]) for t in targets})
        return gm


@dataclasses.dataclass(frozen=True)
class LotteryTicket(_Selection):
    """Iterative magnitude pruning with weight rewinding (Frankle & Carbin, 2019; Frankle et al., 2020).

    Train ``rewind_steps`` steps and remember the weights; then ``rounds``
    times: train ``epochs_per_round``, prune (global magnitude) to the next
    point of a geometric sparsity ladder ending at ``sparsity``, and rewind the
    surviving weights to the remembered ones. The ticket is trained once more.
    """

    rounds: int = 3
    epochs_per_round: int = 1
    rewind_steps: int = 0
    allocation: Allocation = Allocation.GLOBAL

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"LotteryTicket: rounds must be a positive integer, got {self.rounds!r}")

    def ladder(self) -> list[float]:
        """Sparsity after each round: each round removes the same fraction of the surviving weights.

        >>> LotteryTicket(sparsity=0.875, rounds=3).ladder()
        [0.5, 0.75, 0.875]
        """
        return [1.0 - (1.0 - self.sparsity) ** ((r + 1) / self.rounds) for r in range(self.rounds)]

    def run(self, gm: fx.GraphModule, evaluator: Evaluator, max_steps_per_round: int | None = None):
        if self.rewind_steps:
            evaluator.train(gm, 1, max_steps=self.rewind_steps, desc="rewind point")
        saved = _snapshot(gm)
        level = LevelPruner(0.0, self.op_types, self.op_names, self.exclude, allocation=self.allocation)
        for sparsity in self.ladder():
            evaluator.train(gm, self.epochs_per_round, max_steps=max_steps_per_round, desc=f"ticket {sparsity:.0%}")
            apply_masks(gm, dataclasses.replace(level, sparsity=round(sparsity, 12)).compute_masks(gm, None))
            _rewind(gm, saved)
        evaluator.train(gm, self.epochs_per_round, max_steps=max_steps_per_round, desc="ticket")
        return gm


def _snapshot(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Parameters and buffers by the name of the tensor they hold (a masked weight's dense values under
    ``conv.weight``); masks left out."""
    state = {}
    for name, value in [*gm.named_parameters(), *gm.named_buffers()]:
        if (public := public_name(name)) is not None:
            state[public] = value.detach().clone()
    return state


@torch.no_grad()
def _rewind(gm: fx.GraphModule, saved: dict[str, torch.Tensor]) -> None:
    for target, value in saved.items():
        module, name = _owner(gm, target)
        trainable(module, name).copy_(value)
        if mask_of(module, name) is not None:
            refresh(module, name)
