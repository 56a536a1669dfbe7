"""A channel pruner with one sparsity per dependency group, keyed stably across traces.

Searches and sensitivity analyses decide a sparsity for every group; the
scoring of channels inside a group stays the job of an ordinary criterion
(``L1Norm``, ``FPGM``, ...). Groups are named by their first producer slice,
``"conv2.weight[0]"``, which is the same every time the same model is traced,
so a configuration found in one process (or on another machine) applies in
any other.

>>> import torch, fxcompress
>>> from fxcompress.examples import SmallCNN
>>> from fxcompress.passes import standard_pruning
>>> pruner = PerGroupSparsity(L1Norm(), {"conv1.weight[0]": 0.25, "conv2.weight[0]": 0.5})
>>> small = fxcompress.compile(SmallCNN(), torch.randn(1, 1, 28, 28), standard_pruning(pruner))
>>> small.conv2.out_channels
32
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from torch import fx

from fxcompress.analysis import ChannelAnalysis, Group
from fxcompress.channels import Role
from fxcompress.errors import ConfigError
from fxcompress.prune.base import PRUNERS, ChannelDecider, ChannelPruner, check_fraction
from fxcompress.prune.magnitude import L1Norm

__all__ = ["group_key", "searchable_groups", "PerGroupSparsity"]


def group_key(analysis: ChannelAnalysis, group: Group) -> str:
    """The stable name of a group: its first producer slice, e.g. ``"layer1.0.conv1.weight[0]"``."""
    producers = analysis.slices_of(group, Role.PRODUCER) or list(group.slices)
    first = analysis.slices[producers[0]]
    return f"{first.target}[{first.dim}]"


def searchable_groups(gm: fx.GraphModule, analysis: ChannelAnalysis, criterion: ChannelPruner) -> dict[str, Group]:
    """Prunable groups whose layers ``criterion``'s selection picks, by :func:`group_key`, in graph order."""
    return {group_key(analysis, g): g for g in analysis.prunable_groups() if criterion.selects(gm, analysis, g)}


@dataclasses.dataclass(frozen=True)
class PerGroupSparsity(ChannelDecider):
    """Remove ``sparsities[key]`` of the channels of each named group, ranked by ``criterion``.

    Groups not named keep all their channels. The criterion's ``round_to`` and
    ``max_sparsity_per_layer`` still apply, so the number of channels a group
    keeps is exactly what :meth:`kept` says (the cost models rely on it).
    A key that names no searchable group is an error listing the known keys.

    ``scores`` (by key) are the criterion's scores of the unpruned graph the
    pruner is applied to, when already known: a :class:`~fxcompress.auto.Workspace`
    scores its graph once and hands them to every trial, because a data-aware
    criterion's statistics (a forward pass over the calibration data) would
    otherwise cost more than the trial itself. None: the criterion scores now.
    """

    criterion: ChannelPruner = dataclasses.field(default_factory=L1Norm)
    sparsities: Mapping[str, float] = dataclasses.field(default_factory=dict)
    scores: Mapping[str, np.ndarray] | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.criterion, ChannelPruner):
            raise ConfigError(
                f"PerGroupSparsity: criterion must be a ChannelPruner (L1Norm(), FPGM(), ...), "
                f"got {type(self.criterion).__name__}"
            )
        object.__setattr__(self, "sparsities", dict(self.sparsities))
        for key, value in self.sparsities.items():
            check_fraction(self, f"sparsities[{key!r}]", value)

    def kept(self, n: int, sparsity: float) -> int:
        """Channels a group of ``n`` keeps at ``sparsity`` (the criterion's rounding and floor applied).

        >>> PerGroupSparsity(L1Norm(round_to=8)).kept(64, 0.6)
        32
        """
        return self.criterion.num_kept(n, sparsity)

    def decide(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> np.ndarray:
        groups = searchable_groups(gm, analysis, self.criterion)
        unknown = sorted(set(self.sparsities) - set(groups))
        if unknown:
            raise ConfigError(
                f"PerGroupSparsity: no prunable group named {', '.join(map(repr, unknown))}; "
                f"groups of this model: {', '.join(groups) or 'none'}"
            )
        keep = np.ones(analysis.solution.num_components, dtype=bool)
        chosen = {k: (groups[k], s) for k, s in self.sparsities.items() if s > 0}
        scores = self._scores(gm, analysis, {k: g for k, (g, _) in chosen.items()})
        for (group, sparsity), score in zip(chosen.values(), scores):
            n_drop = len(group) - self.kept(len(group), sparsity)
            drop = np.argsort(np.asarray(score, dtype=np.float64), kind="stable")[:n_drop]
            keep[group.components[drop]] = False
        return keep

    def _scores(self, gm: fx.GraphModule, analysis: ChannelAnalysis, groups: Mapping[str, Group]) -> list[np.ndarray]:
        """The criterion's scores of ``groups`` (by key): the given ``scores``, or computed on ``gm``."""
        if not groups:
            return []
        if self.scores is not None:
            return [self.scores[k] for k in groups]
        return self.criterion.ranked_scores(gm, analysis, list(groups.values()))

    def to_dict(self) -> dict:
        """A JSON-able description (registered criteria only), read back by :meth:`from_dict`.

        >>> PerGroupSparsity(L1Norm(), {"conv1.weight[0]": 0.5}).to_dict()
        {'criterion': 'l1', 'round_to': 1, 'sparsities': {'conv1.weight[0]': 0.5}}
        """
        key = type(self.criterion).key
        if PRUNERS.get(key) is not type(self.criterion):
            raise ConfigError(f"{type(self.criterion).__name__} is not a registered criterion: it has no name to save")
        return {"criterion": key, "round_to": self.criterion.round_to, "sparsities": dict(self.sparsities)}

    @classmethod
    def from_dict(cls, data: Mapping) -> PerGroupSparsity:
        name = data.get("criterion", "l1")
        criterion_cls = PRUNERS.get(name)
        if criterion_cls is None or not issubclass(criterion_cls, ChannelPruner):
            raise ConfigError(f"unknown channel criterion {name!r}; known: {', '.join(sorted(PRUNERS))}")
        return cls(criterion_cls(round_to=int(data.get("round_to", 1))), data.get("sparsities", {}))
