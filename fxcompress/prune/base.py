"""The pruner protocol and the shared machinery of structured (channel) pruners.

A pruner answers four questions, each in one place:

- *what to score*: weights (the default), activations or gradients; data-aware
  criteria collect their statistics once per call in :meth:`ChannelPruner.group_scores`;
- *how to score a channel*: :meth:`ChannelPruner.channel_scores` (the only
  method a custom criterion must write);
- *how sparsity is allocated*: ``allocation`` (``Allocation.LOCAL``: the same
  fraction in every group; ``Allocation.GLOBAL``: one ranking across groups)
  capped by ``max_sparsity_per_layer``;
- *how masks evolve over steps*: schedules in :mod:`fxcompress.prune.schedule`
  re-run a pruner with growing ``sparsity`` (masks only ever shrink).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import fx, nn

from fxcompress.analysis import ChannelAnalysis, Group
from fxcompress.channels import Role
from fxcompress.errors import ConfigError, build_registered, coerce_enum
from fxcompress.masks import channel_masks, current_masks, kept_components
from fxcompress.modules import HeadPrunedMultiheadAttention
from fxcompress.selection import layer_selected, normalize_selection
from fxcompress.trace import module_type

__all__ = [
    "Pruner",
    "ChannelDecider",
    "ChannelPruner",
    "Allocation",
    "Combined",
    "PRUNERS",
    "make_pruner",
    "DEFAULT_OP_TYPES",
    "ALL_LAYERS",
    "removed_count",
    "layer_selected",
    "register_pruner",
]

DEFAULT_OP_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.MultiheadAttention, HeadPrunedMultiheadAttention,
)

#: Channel pruners select every layer by default: the analysis already knows which can lose channels.
ALL_LAYERS: tuple[type[nn.Module], ...] = (nn.Module,)

PRUNERS: dict[str, type] = {}


@runtime_checkable
class Pruner(Protocol):
    """What ``InsertMasks`` needs from a pruner: masks for parameters, by fully qualified name.

    A mask has the parameter's shape; zeros mark pruned weights.
    """

    def compute_masks(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, torch.Tensor]: ...


class ChannelDecider:
    """A pruner of whole channels: it decides which components of the analysis stay (``decide``), and
    its masks are that decision written out. ``InsertMasks`` records the decision on the graph
    (:mod:`fxcompress.decision`) instead of reading it back from the masks."""

    def decide(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> np.ndarray:
        """Per component of ``analysis``, whether it stays."""
        raise NotImplementedError(f"{type(self).__name__} must implement decide(gm, analysis)")

    def compute_masks(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, torch.Tensor]:
        return channel_masks(gm, analysis, self.decide(gm, analysis))


def register_pruner(cls: type) -> type:
    """Make a pruner class reachable by its ``key`` from :func:`make_pruner` (and text pipelines)."""
    if getattr(cls, "key", ""):
        PRUNERS[cls.key] = cls
    return cls


class Allocation(enum.Enum):
    """How a pruner spreads ``sparsity`` over groups."""

    LOCAL = "local"  #: every selected group loses ``sparsity`` of its channels
    GLOBAL = "global"  #: ``sparsity`` of all selected channels, lowest scores across groups first


def removed_count(n: int, fraction: float) -> int:
    """How many of ``n`` items (channels, weights) a ``fraction`` removes: every pruner rounds this way.

    Rounded down, with a hair of slack for fractions that floats cannot hold
    exactly, so 29 % of 100 removes 29 (``0.29 * 100`` is 28.999…).

    >>> removed_count(100, 0.29), removed_count(10, 0.25)
    (29, 2)
    """
    return math.floor(n * fraction + 1e-9)


def check_fraction(owner: object, field: str, value, upper_inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and 0 <= value and (value <= 1 if upper_inclusive else value < 1)
    if not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ConfigError(f"{type(owner).__name__}: {field} must be in {bound}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ChannelPruner(ChannelDecider):
    """Structured pruning of whole channels, ranked inside each dependency group.

    Subclasses implement :meth:`channel_scores`. For each prunable group whose
    producing layers all pass the layer selection, the ``sparsity`` fraction of
    channels with the lowest score is removed (``round_to`` keeps the number
    of surviving channels a multiple of N; at least one channel always stays).

    Layer selection: ``op_types`` (module types of the producing layers; by
    default every layer whose output channels the analysis can remove, e.g.
    Hugging Face's ``Conv1D`` too),
    ``op_names`` (glob patterns of their module paths; all when empty),
    ``exclude`` (glob patterns whose layers keep all their output channels).

    Allocation: ``Allocation.LOCAL`` removes the same fraction from every
    group; ``Allocation.GLOBAL`` removes ``sparsity`` of all selected channels,
    lowest scores first across groups, so the criterion's scores must be
    comparable between layers (LAMP's are by construction). Either way no
    group loses more than ``max_sparsity_per_layer`` of its channels.
    """

    sparsity: float = 0.5
    op_types: tuple[type[nn.Module], ...] = ALL_LAYERS
    op_names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    round_to: int = 1
    allocation: Allocation = Allocation.LOCAL
    max_sparsity_per_layer: float = 1.0

    key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fraction(self, "sparsity", self.sparsity)
        check_fraction(self, "max_sparsity_per_layer", self.max_sparsity_per_layer, upper_inclusive=True)
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"{type(self).__name__}: round_to must be a positive integer, got {self.round_to!r}")
        coerce_enum(self, "allocation", Allocation)
        normalize_selection(self)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_pruner(cls)

    # -- what subclasses implement

    def channel_scores(self, gm: fx.GraphModule, analysis: ChannelAnalysis, group: Group) -> np.ndarray:
        """Importance of each channel of ``group`` (higher is kept)."""
        raise NotImplementedError(f"{type(self).__name__} must implement channel_scores(gm, analysis, group)")

    def group_scores(self, gm: fx.GraphModule, analysis: ChannelAnalysis, groups: Sequence[Group]) -> list[np.ndarray]:
        """Scores of every group at once. Data-aware criteria override this to collect their data once."""
        return [np.asarray(self.channel_scores(gm, analysis, g), dtype=np.float64) for g in groups]

    def ranked_scores(self, gm: fx.GraphModule, analysis: ChannelAnalysis, groups: Sequence[Group]) -> list[np.ndarray]:
        """:meth:`group_scores`, with channels already masked on ``gm`` scored ``-inf``.

        Gradual pruning masks a model again and again; a channel removed
        earlier must count toward the new sparsity, or a criterion that need
        not score a zeroed channel lowest (random; FPGM ranks by distance to
        the median, not by norm) removes more than asked.
        """
        scores = self.group_scores(gm, analysis, groups)
        masks = current_masks(gm)
        if not masks:
            return scores
        alive = kept_components(analysis, masks)
        return [np.where(alive[g.components], np.asarray(s, dtype=np.float64), -np.inf) for g, s in zip(groups, scores)]

    # -- the shared driver

    def selects(self, gm: fx.GraphModule, analysis: ChannelAnalysis, group: Group) -> bool:
        """Whether every layer producing the group's channels passes the layer selection, under every name
        its weight has (excluding a tied embedding by its own name keeps it, though the graph reads it as
        the output layer's weight)."""
        for k in analysis.slices_of(group, Role.PRODUCER):
            for owner in analysis.owners(analysis.slices[k].target):
                if not layer_selected(owner, module_type(gm, owner), self.op_types, self.op_names, self.exclude):
                    return False
        return True

    def min_kept(self, n: int) -> int:
        """The fewest channels a group of ``n`` may keep (``max_sparsity_per_layer``, at least one)."""
        return max(1, n - removed_count(n, self.max_sparsity_per_layer))

    def round_kept(self, n: int, keep: int) -> int:
        keep = math.ceil(keep / self.round_to) * self.round_to
        return max(self.min_kept(n), 1, min(n, keep))

    def num_kept(self, n: int, sparsity: float | None = None) -> int:
        """Channels a group of ``n`` keeps at ``sparsity`` (the pruner's own by default), rounding and floor
        applied."""
        return self.round_kept(n, n - removed_count(n, self.sparsity if sparsity is None else sparsity))

    def kept_per_group(self, sizes: list[int], scores: list[np.ndarray]) -> list[int]:
        """How many channels each group keeps, by the allocation rule."""
        if self.allocation is Allocation.LOCAL:
            return [self.num_kept(n) for n in sizes]
        return self._global_kept(sizes, scores)

    def _global_kept(self, sizes: list[int], scores: list[np.ndarray]) -> list[int]:
        """Remove the ``sparsity`` fraction of all channels, lowest scores first, honouring the per-group floor."""
        values, owners = [], []  # the score and group of every channel that may go (beyond each group's floor)
        for g, (n, s) in enumerate(zip(sizes, scores)):
            ordered = np.sort(np.asarray(s, dtype=np.float64))[: n - self.min_kept(n)]
            values.append(ordered)
            owners.append(np.full(len(ordered), g, dtype=np.int64))
        if not values:
            return []
        budget = removed_count(sum(sizes), self.sparsity)
        lowest = np.argsort(np.concatenate(values), kind="stable")[:budget]
        removed = np.bincount(np.concatenate(owners)[lowest], minlength=len(sizes))
        return [self.round_kept(n, n - int(r)) for n, r in zip(sizes, removed)]

    def selected_groups(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> list[Group]:
        """The prunable groups this pruner's layer selection picks, in graph order."""
        return [g for g in analysis.prunable_groups() if self.selects(gm, analysis, g)]

    @staticmethod
    def keep_lowest_dropped(
        analysis: ChannelAnalysis, groups: Sequence[Group], scores: Sequence[np.ndarray], kept: Sequence[int]
    ) -> np.ndarray:
        """Per component, whether it stays when each group keeps its ``kept`` highest-scoring channels."""
        keep = np.ones(analysis.solution.num_components, dtype=bool)
        for group, score, n_keep in zip(groups, scores, kept):
            drop = np.argsort(np.asarray(score, dtype=np.float64), kind="stable")[: len(group) - n_keep]
            keep[group.components[drop]] = False
        return keep

    def decide(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> np.ndarray:
        groups = self.selected_groups(gm, analysis)
        if self.sparsity == 0 or not groups:
            return np.ones(analysis.solution.num_components, dtype=bool)
        scores = self.ranked_scores(gm, analysis, groups)
        kept = self.kept_per_group([len(g) for g in groups], scores)
        return self.keep_lowest_dropped(analysis, groups, scores, kept)


@dataclasses.dataclass(frozen=True)
class Combined:
    """Several pruners at once (e.g. one per entry of an NNI ``config_list``): their masks multiply.

    >>> from fxcompress.prune import L1Norm, LevelPruner
    >>> from fxcompress.passes import standard_pruning
    >>> pruner = Combined((L1Norm(0.5, op_names=("conv*",)), LevelPruner(0.9, op_names=("fc*",))))
    >>> small = fxcompress.compile(model, x, standard_pruning(pruner))
    >>> small.conv1.out_channels, small.conv2.out_channels, round(float((small.fc2.weight == 0).float().mean()), 2)
    (16, 32, 0.9)
    """

    pruners: tuple[Pruner, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "pruners", tuple(self.pruners))
        bad = [p for p in self.pruners if not isinstance(p, Pruner)]
        if bad:
            raise ConfigError(f"Combined needs pruners with compute_masks(gm, analysis), got {bad}")

    def compute_masks(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        for pruner in self.pruners:
            for name, mask in pruner.compute_masks(gm, analysis).items():
                masks[name] = mask if name not in masks else masks[name] * mask
        return masks


def make_pruner(name: str, **options) -> Pruner:
    """Build a registered pruner by its short name (``"l1"``, ``"fpgm"``, ``"level"``), e.g. for text pipelines."""
    return build_registered(PRUNERS, name, "pruner", options)
