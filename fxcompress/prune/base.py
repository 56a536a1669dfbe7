"""The pruner protocol and the shared machinery of structured (channel) pruners."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import fx, nn

from fxcompress.analysis import ChannelAnalysis, Group
from fxcompress.channels import Role
from fxcompress.errors import ConfigError
from fxcompress.masks import channel_masks, split_target

__all__ = ["Pruner", "ChannelPruner", "PRUNERS", "make_pruner", "DEFAULT_OP_TYPES"]

DEFAULT_OP_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
)

PRUNERS: dict[str, type] = {}


@runtime_checkable
class Pruner(Protocol):
    """What ``InsertMasks`` needs from a pruner: masks for parameters, by fully qualified name.

    A mask has the parameter's shape; zeros mark pruned weights.
    """

    def compute_masks(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, torch.Tensor]: ...


@dataclasses.dataclass(frozen=True)
class ChannelPruner:
    """Structured pruning of whole channels, ranked inside each dependency group.

    Subclasses implement :meth:`channel_scores`. For each prunable group whose
    producing layers all pass the layer selection, the ``sparsity`` fraction of
    channels with the lowest score is removed (``round_to`` keeps the number
    of surviving channels a multiple of N; at least one channel always stays).

    Layer selection: ``op_types`` (module types of the producing layers),
    ``op_names`` (glob patterns of their module paths; all when empty),
    ``exclude`` (glob patterns whose layers keep all their output channels).
    """

    sparsity: float = 0.5
    op_types: tuple[type[nn.Module], ...] = DEFAULT_OP_TYPES
    op_names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    round_to: int = 1

    key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ConfigError(f"{type(self).__name__}: sparsity must be in [0, 1), got {self.sparsity!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"{type(self).__name__}: round_to must be a positive integer, got {self.round_to!r}")
        for field in ("op_names", "exclude"):
            value = getattr(self, field)
            if isinstance(value, str):
                object.__setattr__(self, field, (value,))
        bad = [t for t in self.op_types if not (isinstance(t, type) and issubclass(t, nn.Module))]
        if bad:
            raise ConfigError(f"{type(self).__name__}: op_types must be nn.Module classes, got {bad}")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.key:
            PRUNERS[cls.key] = cls

    # -- what subclasses implement

    def channel_scores(self, gm: fx.GraphModule, analysis: ChannelAnalysis, group: Group) -> np.ndarray:
        """Importance of each channel of ``group`` (higher is kept)."""
        raise NotImplementedError

    # -- the shared driver

    def selects(self, gm: fx.GraphModule, analysis: ChannelAnalysis, group: Group) -> bool:
        """Whether every layer producing the group's channels passes the layer selection."""
        for k in analysis.slices_of(group, Role.PRODUCER):
            owner, _ = split_target(analysis.slices[k].target)
            module = gm.get_submodule(owner)
            if not isinstance(module, self.op_types):
                return False
            if self.op_names and not any(fnmatch.fnmatchcase(owner, p) for p in self.op_names):
                return False
            if any(fnmatch.fnmatchcase(owner, p) for p in self.exclude):
                return False
        return True

    def num_kept(self, n: int) -> int:
        keep = n - math.floor(n * self.sparsity)
        keep = math.ceil(keep / self.round_to) * self.round_to
        return max(1, min(n, keep))

    def compute_masks(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, torch.Tensor]:
        keep = np.ones(analysis.solution.num_components, dtype=bool)
        for group in analysis.prunable_groups():
            if not self.selects(gm, analysis, group):
                continue
            n_keep = self.num_kept(len(group))
            if n_keep == len(group):
                continue
            scores = np.asarray(self.channel_scores(gm, analysis, group), dtype=np.float64)
            drop = np.argsort(scores, kind="stable")[: len(group) - n_keep]
            keep[group.components[drop]] = False
        return channel_masks(gm, analysis, keep)


def make_pruner(name: str, **options) -> Pruner:
    """Build a registered pruner by its short name (``"l1"``, ``"l2"``), e.g. for text pipelines."""
    cls = PRUNERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown pruner {name!r}; known pruners: {', '.join(sorted(PRUNERS))}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"pruner {name!r} has no option {', '.join(unknown)}; options: {', '.join(sorted(fields))}")
    return cls(**options)
