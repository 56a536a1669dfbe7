"""Data-aware channel criteria: activations (APoZ, mean activation, activation norm) and gradients (Taylor, OBD).

Each criterion collects its statistics once per ``compute_masks`` call, in one
pass over ``num_batches`` calibration batches of the user's
:class:`~fxcompress.prune.evaluator.Evaluator`: activations through an
``fx.Interpreter`` over the traced graph (never by re-tracing per layer),
gradients through ``loss(model, batch).backward()``. Running statistics of
batch norms are not touched (the model runs in eval mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxcompress import meta
from fxcompress.analysis import ChannelAnalysis, Group
from fxcompress.channels import Role
from fxcompress.errors import ConfigError
from fxcompress.masks import split_target, trainable
from fxcompress.oneshot.engine import LINEAR_OPS, linear_site
from fxcompress.ops import runs_one_of
from fxcompress.prune.base import ChannelPruner
from fxcompress.prune.evaluator import Evaluator
from fxcompress.prune.magnitude import (
    GroupAggregation,
    effective_tensor,
    group_norm_scores,
    is_bias,
    normalize,
    reduce_slices,
)

__all__ = ["APoZ", "MeanActivation", "ActivationNorm", "Fluctuation", "Taylor", "OBD", "DataAwarePruner",
           "ACTIVATION_OPS", "LINEAR_CONSUMERS", "ColumnStatistics", "ConsumerColumns", "consumer_columns",
           "linear_input_statistics", "linear_input_norms", "record_input_statistics", "standardized"]

#: Ops whose output is a post-nonlinearity activation: where APoZ and mean activation are measured.
ACTIVATION_OPS: tuple = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish,
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu, F.mish,
    ".relu",
)


@dataclasses.dataclass(frozen=True)
class DataAwarePruner(ChannelPruner):
    """A channel criterion that needs calibration data: ``evaluator`` and ``num_batches`` batches of it."""

    evaluator: Evaluator | None = None
    num_batches: int = 8

    needs: ClassVar[str] = "calibration batches"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.evaluator, Evaluator):
            raise ConfigError(
                f"{type(self).__name__} needs {self.needs}: pass evaluator=fxcompress.prune.Evaluator(data, loss)"
            )
        if not isinstance(self.num_batches, int) or self.num_batches < 1:
            raise ConfigError(f"{type(self).__name__}: num_batches must be a positive integer")

    def channel_scores(self, gm, analysis, group):
        return self.group_scores(gm, analysis, [group])[0]


@contextlib.contextmanager
def eval_flags(gm: nn.Module):
    """Every module's ``training`` flag off for the duration, then restored; gradients stay on.

    Sets the flags directly: a ``torch.export``-captured graph refuses
    ``.eval()`` (its batch norms' mode was fixed at capture), a
    symbolic-traced one reads them.
    """
    modules = list(gm.modules())
    was_training = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, flag in zip(modules, was_training):
            m.training = flag


# ---------------------------------------------------------------------------- activations


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a group's channels appear in a node's output: the dim, the indices, and their group channels."""

    node: str
    dim: int
    positions: np.ndarray
    local: np.ndarray


def _node_sites(node: fx.Node, analysis: ChannelAnalysis, wanted: set[int]) -> list[tuple[int, Site]]:
    channels = node.meta.get(meta.CHANNELS)
    if not isinstance(channels, tuple) or not all(isinstance(c, np.ndarray) for c in channels):
        return []
    found = []
    for dim, ids in enumerate(channels):
        components = analysis.labels[ids]
        owners = analysis.group_of[components]
        for gid in set(np.unique(owners).tolist()) & wanted:
            positions = np.flatnonzero(owners == gid)
            found.append((gid, Site(node.name, dim, positions, analysis.local_index[components[positions]])))
    return found


def activation_sites(gm: fx.GraphModule, analysis: ChannelAnalysis, groups: Sequence[Group]) -> dict[int, list[Site]]:
    """Per group: the activation outputs carrying its channels, or else the last node that carries them."""
    wanted = {g.id for g in groups}
    active: dict[int, list[Site]] = defaultdict(list)
    last: dict[int, Site] = {}
    for node in gm.graph.nodes:
        for gid, site in _node_sites(node, analysis, wanted):
            last[gid] = site
            if runs_one_of(ACTIVATION_OPS, gm, node):
                active[gid].append(site)
    return {gid: active.get(gid) or [last[gid]] for gid in last}


class _Recorder(fx.Interpreter):
    """Runs the graph once and accumulates, per watched node and dim, per-index statistics of its output."""

    def __init__(self, gm: fx.GraphModule, watch: dict[str, set[int]]) -> None:
        super().__init__(gm)
        self.watch = watch
        self.zeros: dict[tuple[str, int], torch.Tensor] = {}
        self.magnitude: dict[tuple[str, int], torch.Tensor] = {}
        self.count: dict[tuple[str, int], int] = defaultdict(int)

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        for dim in self.watch.get(n.name, ()):
            self._record((n.name, dim), result.detach().float().movedim(dim, 0))
        return result

    def _record(self, key: tuple[str, int], value: torch.Tensor) -> None:
        rows = value.reshape(value.shape[0], -1)
        zeros, magnitude = (rows == 0).double().sum(1), rows.abs().double().sum(1)
        self.zeros[key] = self.zeros.get(key, 0) + zeros
        self.magnitude[key] = self.magnitude.get(key, 0) + magnitude
        self.count[key] += rows.shape[1]


@torch.no_grad()
def record_activations(gm: fx.GraphModule, evaluator: Evaluator, sites: dict[int, list[Site]], num_batches: int):
    watch: dict[str, set[int]] = defaultdict(set)
    for group_sites in sites.values():
        for site in group_sites:
            watch[site.node].add(site.dim)
    recorder = _Recorder(gm, watch)
    with eval_flags(gm):
        for batch in evaluator.batches(num_batches):
            recorder.run(*evaluator.inputs(batch))
    return recorder


def _site_statistic(recorder: _Recorder, sites: list[Site], n: int, statistic: str) -> np.ndarray:
    """Mean over the group's sites of the per-channel fraction of zeros or mean magnitude."""
    total = np.zeros(n)
    for site in sites:
        key = (site.node, site.dim)
        values = getattr(recorder, statistic)[key].cpu().numpy()[site.positions] / max(recorder.count[key], 1)
        per_channel = np.bincount(site.local, weights=values, minlength=n)
        total += per_channel / np.maximum(np.bincount(site.local, minlength=n), 1)
    return total / max(len(sites), 1)


@dataclasses.dataclass(frozen=True)
class APoZ(DataAwarePruner):
    """Average percentage of zeros (Hu et al., 2016): channels whose activations are most often zero go first.

    Measured at the activation (ReLU-like) outputs that carry the group's
    channels, over ``num_batches`` calibration batches.
    """

    key = "apoz"

    def group_scores(self, gm, analysis, groups):
        sites = activation_sites(gm, analysis, groups)
        recorder = record_activations(gm, self.evaluator, sites, self.num_batches)
        return [1.0 - _site_statistic(recorder, sites.get(g.id, []), len(g), "zeros") for g in groups]


@dataclasses.dataclass(frozen=True)
class MeanActivation(DataAwarePruner):
    """Channels with the smallest mean absolute activation go first (Molchanov et al., 2017's baseline)."""

    key = "mean-activation"

    def group_scores(self, gm, analysis, groups):
        sites = activation_sites(gm, analysis, groups)
        recorder = record_activations(gm, self.evaluator, sites, self.num_batches)
        return [_site_statistic(recorder, sites.get(g.id, []), len(g), "magnitude") for g in groups]


# ---------------------------------------------------------------------------- activation norms (Wanda-style)

#: Ops whose weight (``out x in``) reads its input's last dim: the consumers :class:`ActivationNorm` measures
#: (``nn.Linear`` of symbolic traces, ``linear`` calls with a ``get_attr`` weight of ``torch.export`` graphs).
LINEAR_CONSUMERS: frozenset = LINEAR_OPS


def _linear_reads(gm: fx.GraphModule, node: fx.Node) -> tuple[str, fx.Node] | None:
    """``(weight target, input node)`` of a linear node, or None (not a linear, or a computed weight)."""
    site = linear_site(gm, node)
    if site is None or not isinstance(site.source, fx.Node):
        return None
    return site.target, site.source


@dataclasses.dataclass(frozen=True, eq=False)
class ColumnStatistics:
    """One linear layer's calibration input ``X`` (``tokens x in``) per column, float64 on the CPU: the token
    count, ``squares = Σ x_c²``, ``mean`` and ``deviations = Σ (x_c - mean_c)²``.

    Deviations are merged batch by batch (Chan, Golub and LeVeque's pairwise
    update) rather than derived from ``Σx² - n·mean²``, which cancels
    catastrophically for a column with a large mean and a small spread:
    exactly the columns FLAP's fluctuation metric is meant to find.

    >>> x = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    >>> s = ColumnStatistics.of(x[:1]).merged(ColumnStatistics.of(x[1:]))
    >>> s.mean.tolist(), s.variance.tolist(), s.norms.tolist()
    ([2.0, 5.0], [2.0, 0.0], [3.1622776601683795, 7.0710678118654755])
    """

    tokens: int
    squares: torch.Tensor
    mean: torch.Tensor
    deviations: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor) -> ColumnStatistics:
        """The statistics of ``x``'s last dim over every other dim (all tokens of a batch)."""
        rows = x.detach().reshape(-1, x.shape[-1]).double()
        mean = rows.mean(0)
        return cls(rows.shape[0], rows.pow(2).sum(0).cpu(), mean.cpu(), (rows - mean).pow(2).sum(0).cpu())

    def merged(self, other: ColumnStatistics) -> ColumnStatistics:
        """The statistics of both token sets together."""
        n = self.tokens + other.tokens
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.tokens / n)
        deviations = self.deviations + other.deviations + delta.pow(2) * (self.tokens * other.tokens / n)
        return ColumnStatistics(n, self.squares + other.squares, mean, deviations)

    def select(self, index: torch.Tensor) -> ColumnStatistics:
        """The statistics of the columns ``index`` only."""
        return ColumnStatistics(self.tokens, self.squares[index], self.mean[index], self.deviations[index])

    @property
    def norms(self) -> torch.Tensor:
        """``||X_c||₂`` over every calibration token."""
        return self.squares.sqrt()

    @property
    def variance(self) -> torch.Tensor:
        """The sample variance of each column over the calibration tokens (``n - 1`` in the denominator)."""
        return self.deviations / max(self.tokens - 1, 1)


class _InputStatistics(fx.Interpreter):
    """Runs the graph and accumulates, per watched linear weight, the :class:`ColumnStatistics` of its input."""

    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, tuple[str, fx.Node]]) -> None:
        super().__init__(gm)
        self.watch = watch
        self.columns: dict[str, ColumnStatistics] = {}

    def run_node(self, n: fx.Node):
        read = self.watch.get(n)
        if read is not None:
            target, source = read
            x = self.env[source]
            if isinstance(x, torch.Tensor) and x.dim() >= 1:
                batch = ColumnStatistics.of(x)
                seen = self.columns.get(target)
                self.columns[target] = batch if seen is None else seen.merged(batch)
        return super().run_node(n)


@torch.no_grad()
def linear_input_statistics(gm: fx.GraphModule, evaluator: Evaluator, targets: set[str], num_batches: int) -> dict:
    """:class:`ColumnStatistics` of the input of each linear weight in ``targets``, over ``num_batches``
    calibration batches in one pass; a weight the graph's linears never read is absent."""
    watch = {}
    for node in gm.graph.nodes:
        read = _linear_reads(gm, node)
        if read is not None and read[0] in targets:
            watch[node] = read
    if not watch:
        return {}
    interpreter = _InputStatistics(gm, watch)
    with eval_flags(gm):
        for batch in evaluator.batches(num_batches):
            interpreter.run(*evaluator.inputs(batch))
    return interpreter.columns


def linear_input_norms(gm: fx.GraphModule, evaluator: Evaluator, targets: set[str], num_batches: int) -> dict:
    """``||X_c||₂`` per input column of each linear weight in ``targets`` (CPU float64), over ``num_batches``
    calibration batches in one pass; a weight the graph's linears never read is absent."""
    return {t: s.norms for t, s in linear_input_statistics(gm, evaluator, targets, num_batches).items()}


def record_input_statistics(gm: fx.GraphModule, columns: dict[str, ColumnStatistics]) -> None:
    """Keep the measured statistics on the graph (:data:`fxcompress.meta.INPUT_STATISTICS`) for
    ``compensate-bias``; columns compensated with earlier statistics are forgotten with them."""
    gm.meta[meta.INPUT_STATISTICS] = dict(columns)
    gm.meta.pop(meta.COMPENSATED, None)


@dataclasses.dataclass(frozen=True, eq=False)
class ConsumerColumns:
    """The input columns of one linear layer that carry a group's channels: the group channel of each
    (``local``), the column norms of the weight ``||W[:, c]||₂`` and the input's statistics there."""

    local: np.ndarray
    weight_norms: torch.Tensor
    inputs: ColumnStatistics


def consumer_columns(gm: fx.GraphModule, analysis: ChannelAnalysis, groups: Sequence[Group], evaluator: Evaluator,
                     num_batches: int) -> dict[int, list[ConsumerColumns]]:
    """Per group id, the measured linear-layer columns that read its channels (bias slices and layers that are
    not linear, or whose weight is computed, are left out), from one pass over the calibration batches. The
    statistics are recorded on the graph (:func:`record_input_statistics`)."""
    pieces = [(g, k) for g in groups for k in analysis.slices_of(g, Role.CONSUMER) if not is_bias(analysis, k)]
    stats = linear_input_statistics(gm, evaluator, {analysis.slices[k].target for _, k in pieces}, num_batches)
    record_input_statistics(gm, stats)
    found: dict[int, list[ConsumerColumns]] = defaultdict(list)
    for group, k in pieces:
        piece = analysis.slices[k]
        inputs = stats.get(piece.target)
        if inputs is None:
            continue
        weight = effective_tensor(gm, piece.target).float()
        if weight.dim() != 2 or piece.dim != 1 or weight.shape[1] != inputs.mean.shape[0]:
            continue
        positions, local = analysis.positions(k, group)
        index = torch.from_numpy(positions)
        w_norm = torch.linalg.vector_norm(weight, dim=0).double().cpu()
        found[group.id].append(ConsumerColumns(local, w_norm[index], inputs.select(index)))
    return found


def _per_channel(columns: list[ConsumerColumns], n: int, value) -> np.ndarray:
    """``Σ value(column)`` per group channel over every column that reads it."""
    return sum((np.bincount(c.local, weights=value(c).numpy(), minlength=n) for c in columns), np.zeros(n))


@dataclasses.dataclass(frozen=True)
class ActivationNorm(DataAwarePruner):
    """Wanda-style structured importance: each channel's weights times the norm of the activation it carries.

    For a channel ``j`` of a group, every linear layer that *reads* it (a
    consumer column: the attention's ``o_proj`` for a head, ``down_proj`` for
    an FFN channel, every q/k/v/gate/up projection and ``lm_head`` for a
    residual-stream channel) contributes

        ``S_j += ||W[:, c]||₂ · ||X_c||₂``  for each input column ``c`` of the layer that belongs to ``j``

    where ``X_c`` is the layer's input column over every calibration token
    (``num_batches`` batches of the evaluator's data, collected once, in one
    pass of an ``fx.Interpreter``). ``||W[:, c]||₂ · ||X_c||₂`` is exactly
    the Frobenius norm of ``W[:, c] X_cᵀ``, the part of the layer's output
    on the calibration data that removing the channel deletes, so channels
    whose weights are small but whose activations are large (LLMs' outlier
    features) are kept where weight magnitude (``L1Norm``) removes them.
    The products are summed over the group's consumer layers (raw scale).

    The idea is Wanda's (Sun et al., 2023, "A Simple and Effective Pruning
    Approach for Large Language Models": ``|W_ij| · ||X_j||₂``), applied to
    whole channels as in FLAP's Wanda-sp baseline (An et al., 2024,
    "Fluctuation-based Adaptive Structured Pruning for Large Language
    Models"). Consumers are linear layers (``nn.Linear``, or ``linear``
    calls on ``get_attr`` weights in ``torch.export`` graphs such as
    Hugging Face models'); a group that no measured linear layer reads (a
    conv net's channels) falls back to the L1 norm of its weights
    (:class:`~fxcompress.prune.L1Norm`'s score). The evaluator's ``loss`` is
    not called: only its batches and ``inputs`` are.
    """

    key = "activation-norm"

    def group_scores(self, gm, analysis, groups):
        columns = consumer_columns(gm, analysis, groups, self.evaluator, self.num_batches)
        return [_per_channel(columns[g.id], len(g), lambda c: c.weight_norms * c.inputs.norms) if columns.get(g.id)
                else group_norm_scores(gm, analysis, g, 1) for g in groups]


def standardized(column_scores: np.ndarray, channel_sums: np.ndarray, channel_columns: np.ndarray) -> np.ndarray:
    """Each channel's mean column score, in standard deviations of all the columns' scores from their mean.

    FLAP's standardisation (``(x - mean) / std`` over one layer's columns of
    one structure, then the mean over a head's columns): under
    ``Allocation.GLOBAL`` heads, FFN channels and layers then compare on one
    scale, whatever their raw magnitudes. Constant scores give zeros.

    >>> standardized(np.array([1.0, 2.0, 3.0, 6.0]), np.array([3.0, 9.0]), np.array([2, 2])).round(3).tolist()
    [-0.694, 0.694]
    """
    centre = column_scores.mean()
    spread = column_scores.std(ddof=1) if len(column_scores) > 1 else 0.0
    means = channel_sums / np.maximum(channel_columns, 1)
    return (means - centre) / spread if spread > 0 and np.isfinite(spread) else np.zeros_like(means)


@dataclasses.dataclass(frozen=True)
class Fluctuation(DataAwarePruner):
    """FLAP's fluctuation metric (An et al., 2024, "Fluctuation-based Adaptive Structured Pruning for Large
    Language Models"): channels whose input barely varies over the calibration data go first.

    For each input column ``c`` of a linear layer that reads a channel (the
    ``o_proj`` columns of a head or GQA group, ``down_proj``'s column of an
    FFN channel, every projection and ``lm_head`` for a residual-stream
    channel), the column scores

        ``F_c = Var(X_c) · ||W[:, c]||₂²``

    over every calibration token (sample variance; the input's mean and
    variance per column are gathered in one pass with
    :func:`consumer_columns`). Removing a column whose input is nearly
    constant changes the layer's output by about a constant, ``W[:, c] ·
    mean(X_c)``, which ``compensate-bias`` puts back into the bias: what is
    lost is the fluctuation around the mean, which ``F_c`` measures. So
    unlike :class:`ActivationNorm` a loud but constant channel scores low.

    Scores are standardised per group as FLAP does per layer and structure
    (:func:`standardized`): the columns' mean and standard deviation over
    the group, and each channel's mean column score in those units. Within a
    group this keeps the ranking (``Allocation.LOCAL``, FLAP's uniform
    "UL-UM"); across groups it makes heads, FFN channels and layers
    comparable, so ``Allocation.GLOBAL`` with a params target is FLAP's
    adaptive structure search ("AL-AM": one threshold on the standardised
    score, moved until the parameter budget is met). FLAP's code squares the
    attention columns' scores before standardising; this is the paper's
    formula, the same for every structure. A group no measured linear layer
    reads is ranked by the L1 norm of its weights, standardised alike. The
    evaluator's ``loss`` is not called.
    """

    key = "fluctuation"

    def group_scores(self, gm, analysis, groups):
        columns = consumer_columns(gm, analysis, groups, self.evaluator, self.num_batches)
        return [self._scores(columns[g.id], len(g)) if columns.get(g.id) else self._fallback(gm, analysis, g)
                for g in groups]

    @staticmethod
    def _scores(columns: list[ConsumerColumns], n: int) -> np.ndarray:
        def fluctuation(c: ConsumerColumns) -> torch.Tensor:
            return c.inputs.variance * c.weight_norms.pow(2)

        every = np.concatenate([fluctuation(c).numpy() for c in columns])
        counts = _per_channel(columns, n, lambda c: torch.ones(len(c.local), dtype=torch.float64))
        return standardized(every, _per_channel(columns, n, fluctuation), counts)

    @staticmethod
    def _fallback(gm, analysis, group) -> np.ndarray:
        scores = np.asarray(group_norm_scores(gm, analysis, group, 1), dtype=np.float64)
        return standardized(scores, scores, np.ones(len(scores)))


# ---------------------------------------------------------------------------- gradients


def _trainable(gm: fx.GraphModule, target: str) -> torch.Tensor | None:
    """The parameter whose ``.grad`` holds the gradient of ``target`` (its dense values when masked)."""
    owner, name = split_target(target)
    param = trainable(gm.get_submodule(owner), name)
    return param if isinstance(param, nn.Parameter) else None


def _group_slices(analysis: ChannelAnalysis, groups: Sequence[Group]) -> list[tuple[Group, int]]:
    return [(g, k) for g in groups for k in g.slices if analysis.slices[k].role is not Role.BUFFER]


def _rows(tensor: torch.Tensor, dim: int, positions: np.ndarray) -> torch.Tensor:
    moved = tensor.movedim(dim, 0)
    return moved.reshape(moved.shape[0], -1)[torch.from_numpy(positions).to(tensor.device)].double().cpu()


def each_gradient(gm: fx.GraphModule, evaluator: Evaluator, num_batches: int):
    """Yield after each calibration batch's ``backward`` (eval mode; gradients are cleared afterwards)."""
    params = [p for p in gm.parameters() if p.requires_grad]
    try:
        with eval_flags(gm):
            for batch in evaluator.batches(num_batches):
                for p in params:
                    p.grad = None
                evaluator.loss(gm, batch).backward()
                yield
    finally:
        for p in params:
            p.grad = None


def accumulated_gradients(gm: fx.GraphModule, evaluator: Evaluator, num_batches: int, targets) -> dict:
    """Sum over ``num_batches`` batches of the gradient of each target tensor (eval mode)."""
    grads: dict[str, torch.Tensor] = {}
    for _ in each_gradient(gm, evaluator, num_batches):
        for target in targets:
            param = _trainable(gm, target)
            if param is not None and param.grad is not None:
                grads[target] = grads.get(target, 0) + param.grad.detach().double()
    return grads


@dataclasses.dataclass(frozen=True)
class Taylor(GroupAggregation, DataAwarePruner):
    """First-order Taylor importance (Molchanov et al., 2019) over every coupled slice.

    Zeroing weight ``w`` changes the loss by about ``-g * w``. Each weight
    slice of the group (producer rows, consumer columns, norm gammas; biases
    only with ``include_bias``) scores a channel by ``sum |w * g|`` over its
    entries, ``g`` summed over ``num_batches`` batches; slices are combined
    by ``normalizer`` and ``reduction`` (raw scale, mean, as for
    :class:`~fxcompress.prune.L1Norm`). Summing ``|w * g|`` per weight
    rather than squaring ``sum(g * w)`` over the whole group keeps
    opposite-signed slices from cancelling; compare with Torch-Pruning's
    ``GroupTaylorImportance`` in ``python tools/bench_real.py --criteria taylor``.

    On a Hugging Face LLM (a ``torch.export`` graph) the groups are GQA
    groups (query heads with their key/value head and ``o_proj`` columns),
    FFN channels and the hidden size; a tensor registered under several
    names (a tied embedding and ``lm_head``) is one slice with its whole
    gradient, and a masked tensor scores by its masked values.
    ``tests/test_taylor_llm.py`` checks the scores against autograd on the
    Hugging Face model.
    """

    key = "taylor"
    needs: ClassVar[str] = "batches and a loss for gradients"

    def group_scores(self, gm, analysis, groups):
        pieces = [(g, k) for g, k in _group_slices(analysis, groups) if self.include_bias or not is_bias(analysis, k)]
        grads = accumulated_gradients(gm, self.evaluator, self.num_batches, {analysis.slices[k].target for _, k in pieces})
        per_group: dict[int, list[np.ndarray]] = defaultdict(list)
        for group, k in pieces:
            piece = analysis.slices[k]
            if piece.target not in grads:
                continue
            positions, local = analysis.positions(k, group)
            product = (effective_tensor(gm, piece.target).double() * grads[piece.target]).abs()
            scores = np.bincount(local, weights=_rows(product, piece.dim, positions).sum(1).numpy(), minlength=len(group))
            if scores.max() > 0:
                per_group[group.id].append(normalize(scores, self.normalizer))
        return [reduce_slices(per_group[g.id], self.reduction, len(g)) for g in groups]


@dataclasses.dataclass(frozen=True)
class OBD(DataAwarePruner):
    """Second order: Optimal Brain Damage saliency (LeCun et al., 1990) with a Fisher Hessian diagonal.

    The loss increase of zeroing weight ``w`` at a minimum is ``0.5 * H_ii * w**2``;
    ``H_ii`` is estimated by the empirical Fisher, the mean over batches of the
    squared gradient. A channel's score sums the saliency of its group's weights.
    """

    key = "obd"
    needs: ClassVar[str] = "batches and a loss for gradients"

    def group_scores(self, gm, analysis, groups):
        fisher: dict[str, torch.Tensor] = {}
        pieces = _group_slices(analysis, groups)
        targets = {analysis.slices[k].target for _, k in pieces}
        batches = 0
        for _ in each_gradient(gm, self.evaluator, self.num_batches):
            for target in targets:
                param = _trainable(gm, target)
                if param is not None and param.grad is not None:
                    fisher[target] = fisher.get(target, 0) + param.grad.detach().double() ** 2
            batches += 1
        scores = [np.zeros(len(g)) for g in groups]
        index = {g.id: i for i, g in enumerate(groups)}
        for group, k in pieces:
            piece = analysis.slices[k]
            if piece.target not in fisher:
                continue
            positions, local = analysis.positions(k, group)
            saliency = 0.5 * fisher[piece.target] / max(batches, 1) * effective_tensor(gm, piece.target).double() ** 2
            rows = _rows(saliency, piece.dim, positions).sum(1).numpy()
            scores[index[group.id]] += np.bincount(local, weights=rows, minlength=len(group))
        return scores
