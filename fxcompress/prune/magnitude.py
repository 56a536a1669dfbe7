"""Weight-based channel criteria: L1, L2, FPGM, LAMP, Slim (BN scaling factors) and random.

Every criterion is group-aware: it scores each parameter slice of a dependency
group (producer rows, consumer columns, norm weights) and maps the slice's
indices to the group's channels with ``analysis.positions``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import fx, nn

from fxcompress.analysis import ChannelAnalysis, Group
from fxcompress.channels import Role
from fxcompress.errors import ConfigError
from fxcompress.masks import forward_value, split_target
from fxcompress.ops import submodule
from fxcompress.prune.base import Allocation, ChannelPruner, coerce_enum

__all__ = [
    "L1Norm",
    "L2Norm",
    "FPGM",
    "LAMP",
    "Slim",
    "RandomPruner",
    "group_norm_scores",
    "Normalizer",
    "Reduction",
    "normalize",
    "reduce_slices",
    "slice_rows",
    "slim_penalty",
]


def effective_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor as the forward pass sees it (``orig * mask`` when masked), detached."""
    owner, name = split_target(target)
    return forward_value(submodule(gm, owner), name).detach()


def slice_rows(gm: fx.GraphModule, analysis: ChannelAnalysis, group: Group, roles: tuple[Role, ...]) -> Iterator:
    """For each slice of ``group`` with one of ``roles``: ``(slice index, rows, local)``.

    ``rows`` is the tensor moved so that the slice's dim comes first and
    flattened to 2-D (one row per index of the group), ``local`` the group
    channel of each row.
    """
    for k in group.slices:
        piece = analysis.slices[k]
        if piece.role not in roles:
            continue
        positions, local = analysis.positions(k, group)
        tensor = effective_tensor(gm, piece.target).float().movedim(piece.dim, 0)
        yield k, tensor.reshape(tensor.shape[0], -1)[torch.from_numpy(positions).to(tensor.device)].cpu(), local


def _per_channel(values: torch.Tensor, local: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(local, weights=values.double().cpu().numpy(), minlength=n)


#: elements of one chunk of a column reduction (16 MiB of float32): the temporary ``|w|^p`` stays that small
_CHUNK_ELEMENTS = 1 << 22


def _per_index_norms(tensor: torch.Tensor, dim: int, p: int) -> torch.Tensor:
    """``sum |w|^p`` over every dim but ``dim``, for each index of ``dim``.

    ``vector_norm`` is the fastest L2 over contiguous trailing dims (rows),
    but its L1, and any norm over leading dims (columns), is 3-5x slower than
    ``abs().sum``. That sum runs over chunks of rows, so its temporary
    ``|w|`` never approaches the size of a large weight (a 400 MB classifier
    would otherwise double the compile's peak memory).
    """
    other = [d for d in range(tensor.dim()) if d != dim]
    if not other:
        return tensor.abs() ** p
    if dim == 0 and p == 2:
        return torch.linalg.vector_norm(tensor, ord=2, dim=other) ** 2
    rows = max(1, _CHUNK_ELEMENTS // max(1, tensor[0].numel()))
    parts = [(chunk.abs() if p == 1 else chunk.abs() ** p).sum(dim=other) for chunk in tensor.split(rows, dim=0)]
    return torch.cat(parts) if dim == 0 else torch.stack(parts).sum(0)


class Normalizer(enum.Enum):
    """How one parameter slice's per-channel scores are scaled before the group combines them.

    Slices of one group live on different scales (a wide conv's rows, a
    narrow one's columns, a batch norm's gammas); normalising each slice keeps
    one layer from deciding alone.
    """

    NONE = "none"
    MEAN = "mean"  #: divide by the slice's mean score
    MAX = "max"  #: divide by the slice's largest score
    SUM = "sum"  #: divide by the slice's total
    LAMP = "lamp"  #: LAMP: each score over the sum of the scores not below it (largest is 1)


class Reduction(enum.Enum):
    """How the normalised slice scores of a group become one score per channel."""

    SUM = "sum"
    MEAN = "mean"
    MAX = "max"
    PROD = "prod"


def normalize(scores: np.ndarray, how: Normalizer) -> np.ndarray:
    """One slice's scores scaled by ``how``; an all-zero slice stays zero.

    >>> normalize(np.array([1.0, 3.0]), Normalizer.MEAN)
    array([0.5, 1.5])
    """
    how = Normalizer(how)
    if how is Normalizer.LAMP:
        return lamp_scores(scores**2)
    if how is Normalizer.NONE:
        return scores
    scale = {Normalizer.MEAN: np.mean, Normalizer.MAX: np.max, Normalizer.SUM: np.sum}[how](scores)
    return scores / scale if scale > 0 else scores


def reduce_slices(per_slice: list[np.ndarray], how: Reduction, n: int) -> np.ndarray:
    """The group's channel scores from its slices' normalised scores (zeros without a slice).

    >>> reduce_slices([np.array([1.0, 2.0]), np.array([3.0, 0.5])], Reduction.PROD, 2)
    array([3., 1.])
    """
    if not per_slice:
        return np.zeros(n)
    stacked = np.stack(per_slice)
    ops = {Reduction.SUM: np.sum, Reduction.MEAN: np.mean, Reduction.MAX: np.max, Reduction.PROD: np.prod}
    return ops[Reduction(how)](stacked, axis=0)


def is_bias(analysis: ChannelAnalysis, k: int) -> bool:
    """Whether slice ``k`` is a bias (a conv/linear bias or a norm's beta): one number per channel."""
    return analysis.slices[k].name == "bias"


def group_norm_scores(
    gm: fx.GraphModule,
    analysis: ChannelAnalysis,
    group: Group,
    p: int,
    normalizer: Normalizer = Normalizer.NONE,
    reduction: Reduction = Reduction.MEAN,
    include_bias: bool = False,
) -> np.ndarray:
    """Group-aware ``p``-norm importance of each channel.

    Every weight slice in the group (producer rows, consumer columns, norm
    gammas) gives the ``p``-norm of each channel's entries; each slice is
    scaled by ``normalizer`` and the slices combined by ``reduction``.
    Biases are left out by default: a bias's magnitude says little about a
    channel's use. The defaults (no per-slice normaliser, mean over slices,
    no biases) are those that rank CREPE's pretrained channels best; compare
    settings with ``python tools/bench_real.py --criteria l1,l2 --normalizer
    NAME`` (docs/benchmarks.md, "Criteria on real pretrained weights").
    Norms are reductions over the other dims, so no weight is copied.
    """
    per_slice = []
    for k in group.slices:
        piece = analysis.slices[k]
        if piece.role not in (Role.PRODUCER, Role.CONSUMER, Role.AFFINE) or (is_bias(analysis, k) and not include_bias):
            continue
        per_index = _per_index_norms(effective_tensor(gm, piece.target).float(), piece.dim, p)
        positions, local = analysis.positions(k, group)
        scores = _per_channel(per_index[torch.from_numpy(positions).to(per_index.device)], local, len(group)) ** (1.0 / p)
        if scores.max() > 0:
            per_slice.append(normalize(scores, normalizer))
    return reduce_slices(per_slice, reduction, len(group))


@dataclasses.dataclass(frozen=True)
class GroupAggregation:
    """The per-slice normaliser and group reduction of a criterion, as pruner fields (overridable).

    By default slices keep their raw scale (``Normalizer.NONE``) and the
    group takes their mean: a channel whose weights are large in the layers
    that matter most is kept. Dividing each slice by its mean first lets a
    narrow slice (a consumer column, a batch norm's gammas) weigh as much as
    a wide producer, which ranked CREPE's channels worse; measure with
    ``python tools/bench_real.py --normalizer mean``.
    """

    normalizer: Normalizer = Normalizer.NONE
    reduction: Reduction = Reduction.MEAN
    include_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        coerce_enum(self, "normalizer", Normalizer)
        coerce_enum(self, "reduction", Reduction)


@dataclasses.dataclass(frozen=True)
class L1Norm(GroupAggregation, ChannelPruner):
    """Removes the channels with the smallest L1 norm of their weights (Li et al., 2017).

    >>> L1Norm(sparsity=0.5, exclude=("fc",))
    L1Norm(sparsity=0.5, ...)
    """

    key = "l1"

    def channel_scores(self, gm, analysis, group):
        return group_norm_scores(gm, analysis, group, 1, self.normalizer, self.reduction, self.include_bias)


@dataclasses.dataclass(frozen=True)
class L2Norm(GroupAggregation, ChannelPruner):
    """Removes the channels with the smallest L2 norm of their weights."""

    key = "l2"

    def channel_scores(self, gm, analysis, group):
        return group_norm_scores(gm, analysis, group, 2, self.normalizer, self.reduction, self.include_bias)


def _distance_sums(rows: torch.Tensor, local: np.ndarray, n: int) -> np.ndarray:
    """Per channel: the summed Euclidean distance of its filter to every other filter of the layer."""
    filters = torch.zeros(n, rows.shape[1], dtype=torch.float64)
    filters.index_add_(0, torch.from_numpy(local), rows.double().cpu())
    return torch.cdist(filters, filters).sum(1).numpy()


@dataclasses.dataclass(frozen=True)
class FPGM(ChannelPruner):
    """Filter pruning via the geometric median (He et al., 2019).

    A filter close to the geometric median of its layer's filters is the one
    the others can best stand in for, so it is removed first, whatever its
    norm. The score of a channel is the sum of its filter's distances to all
    other filters of each producing layer (smallest = nearest the median),
    normalised per layer and averaged over the group's producers.

    ``vectors`` says which points are compared: ``"squared"`` (default) the
    filters' element-wise squared weights, as Torch-Pruning does, so filters
    that differ only in signs count as duplicates and small filters sit near
    each other; ``"weights"`` the raw weights, as in the paper. The default
    was chosen on CREPE's pretrained weights at identical channel counts,
    where squared vectors keep more accuracy than raw ones and than
    Torch-Pruning's FPGM (``tools/bench_real.py --criteria fpgm,fpgm-weights``;
    figures in ``docs/benchmarks.md``).
    """

    key = "fpgm"
    vectors: str = "squared"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vectors not in ("squared", "weights"):
            raise ConfigError(f"FPGM: vectors must be 'squared' or 'weights', got {self.vectors!r}")

    def channel_scores(self, gm, analysis, group):
        total = np.zeros(len(group))
        for _, rows, local in slice_rows(gm, analysis, group, (Role.PRODUCER,)):
            if rows.shape[1] == 1:  # biases: a distance between scalars says nothing about the filter
                continue
            sums = _distance_sums(rows if self.vectors == "weights" else rows.square(), local, len(group))
            total += sums / max(sums.mean(), 1e-12)
        return total


def lamp_scores(squared: np.ndarray) -> np.ndarray:
    """LAMP score of each entry: its squared magnitude over the sum of all squared magnitudes not below it.

    >>> lamp_scores(np.array([1.0, 4.0, 2.0])).round(3)
    array([0.143, 1.   , 0.333])
    """
    order = np.argsort(squared, kind="stable")
    ordered = squared[order]
    tail = np.cumsum(ordered[::-1])[::-1]
    out = np.empty_like(squared, dtype=np.float64)
    out[order] = ordered / np.maximum(tail, 1e-30)
    return out


@dataclasses.dataclass(frozen=True)
class LAMP(ChannelPruner):
    """Layer-adaptive magnitude pruning (Lee et al., 2021), applied to channels.

    A channel's squared L2 norm (producer rows) is divided by the sum of the
    squared norms of the channels in its layer that are at least as large.
    The largest channel of every layer scores 1, so under
    ``allocation="global"`` no layer is emptied and the ranking adapts the
    sparsity of each layer to its weight distribution.
    """

    key = "lamp"
    allocation: Allocation = Allocation.GLOBAL

    def channel_scores(self, gm, analysis, group):
        squared = np.zeros(len(group))
        for _, rows, local in slice_rows(gm, analysis, group, (Role.PRODUCER,)):
            squared += _per_channel(rows.pow(2).sum(1), local, len(group))
        return lamp_scores(squared)


def _norm_scales(gm: fx.GraphModule, analysis: ChannelAnalysis, group: Group) -> np.ndarray | None:
    """|gamma| of the group's normalisation layers (AFFINE ``weight`` slices), or None without one."""
    total, found = np.zeros(len(group)), False
    for k, rows, local in slice_rows(gm, analysis, group, (Role.AFFINE,)):
        if analysis.slices[k].name != "weight":
            continue
        total += _per_channel(rows.abs().sum(1), local, len(group))
        found = True
    return total if found else None


@dataclasses.dataclass(frozen=True)
class Slim(ChannelPruner):
    """Network slimming (Liu et al., 2017): rank channels by their batch-norm scaling factor |gamma|.

    Train with :func:`slim_penalty` added to the loss (L1 on every BN gamma) so
    that unimportant channels' gammas go to zero, then prune. Groups without a
    normalisation layer fall back to the L1 norm of their weights.
    """

    key = "slim"

    def channel_scores(self, gm, analysis, group):
        scales = _norm_scales(gm, analysis, group)
        return scales if scales is not None else group_norm_scores(gm, analysis, group, p=1)


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def slim_penalty(strength: float = 1e-4) -> Callable[[nn.Module], torch.Tensor]:
    """The sparsity regulariser of network slimming: ``strength * sum |gamma|`` over all norm layers.

    >>> from fxcompress.examples import SmallCNN
    >>> slim_penalty(1e-4)(SmallCNN())   # batch-norm weights start at 1: 1e-4 * (32 + 64)
    tensor(0.0096, grad_fn=<MulBackward0>)

    Train with it (``evaluator`` an :class:`~fxcompress.prune.Evaluator`), then prune with :class:`Slim`:

    >>> steps = evaluator.train(model, extra_loss=slim_penalty(1e-4))
    """

    def penalty(model: nn.Module) -> torch.Tensor:
        terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, _BN_TYPES) and m.weight is not None]
        return strength * torch.stack(terms).sum() if terms else torch.zeros(())

    return penalty


@dataclasses.dataclass(frozen=True)
class RandomPruner(ChannelPruner):
    """Removes random channels: the baseline every criterion must beat. ``seed`` makes it repeatable."""

    key = "random"
    seed: int = 0

    def channel_scores(self, gm, analysis, group):
        return np.random.default_rng((self.seed, group.id)).random(len(group))
