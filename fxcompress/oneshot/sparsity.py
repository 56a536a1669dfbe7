"""One-shot sparsity on the layer-sequential engine: magnitude, Wanda and SparseGPT, unstructured or N:M.

All three return ordinary fxcompress masks (installed with
:func:`fxcompress.masks.apply_masks`), so they compose with structured
pruning, fine-tuning and export. ``sparsity`` is the fraction of weights
removed (exactly ``floor(k · sparsity)`` in every comparison group of ``k``
weights); ``n``/``m`` > 0 asks for N:M instead (in every run of ``m``
consecutive inputs of a row, ``n`` weights stay), and ``sparsity`` is then
ignored. Weights already masked count as removed first.

>>> w = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
>>> drop_lowest_per_row(w, 2), keep_n_of_m(w, 1, 2)
(tensor([[ True, False,  True, False]]), tensor([[ True, False,  True, False]]))
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from fxcompress.errors import ConfigError
from fxcompress.oneshot.engine import Compressed, InputStats, Layer, Statistics, register_algorithm
from fxcompress.oneshot.obs import inverse_hessian_factor, obs_columns
from fxcompress.prune.base import check_fraction, removed_count
from fxcompress.selection import normalize_selection

__all__ = [
    "SparsityAlgorithm", "MagnitudeSparsity", "Wanda", "SparseGPT",
    "drop_lowest", "drop_lowest_per_row", "keep_n_of_m",
]


def drop_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A bool keep-mask that drops the ``count`` lowest ``scores`` of the whole tensor (ties: lowest index first)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.argsort(scores.flatten(), stable=True)[:count]] = False
    return keep.reshape(scores.shape)


def drop_lowest_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A bool keep-mask that drops the ``count`` lowest ``scores`` of every row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    return keep.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :count], False)


def keep_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A bool keep-mask that keeps the ``n`` highest ``scores`` of every run of ``m`` consecutive columns."""
    runs = scores.reshape(-1, m)
    top = torch.argsort(runs, dim=1, descending=True, stable=True)[:, :n]
    return torch.zeros_like(runs, dtype=torch.bool).scatter_(1, top, True).reshape(scores.shape)


def _masked_first(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``scores`` with already-masked weights scored lowest, so they are the first removed."""
    return scores if keep is None else scores.masked_fill(~keep, float("-inf"))


@dataclasses.dataclass(frozen=True)
class SparsityAlgorithm:
    """Shared options of the one-shot sparsity algorithms: the amount (``sparsity`` or ``n``:``m``) and the
    layer selection (``op_types``/``op_names``/``exclude`` globs, as pruners take)."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    op_types: tuple[type[nn.Module], ...] = (nn.Linear,)
    op_names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    key: ClassVar[str] = ""
    statistics: ClassVar[Statistics] = Statistics.NONE

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_algorithm(cls)

    def __post_init__(self) -> None:
        check_fraction(self, "sparsity", self.sparsity)
        if (self.n or self.m) and not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n <= self.m):
            raise ConfigError(f"{type(self).__name__}: N:M sparsity needs integers 0 < n <= m, "
                              f"got n={self.n!r}, m={self.m!r} (leave both 0 for unstructured sparsity)")
        normalize_selection(self)

    def check(self, layer: Layer) -> None:
        """N:M runs along a row's inputs: their count must be a multiple of ``m``."""
        if layer.weight.dim() != 2:
            raise ConfigError(f"{type(self).__name__}: {layer.path} has a {layer.weight.dim()}-d weight; "
                              "one-shot sparsity takes linear layers (out x in); exclude it")
        if self.m and layer.weight.shape[1] % self.m:
            raise ConfigError(f"{type(self).__name__}: layer {layer.path} has {layer.weight.shape[1]} inputs, "
                              f"not a multiple of m={self.m}, so it cannot be {self.n}:{self.m} sparse; "
                              f"exclude it (exclude=({layer.path!r},)) or choose another m")

    def compress(self, layer: Layer, stats: InputStats | None) -> Compressed:
        return Compressed(keep=self.keep_mask(self.scores(layer, stats), layer.keep))

    def scores(self, layer: Layer, stats: InputStats | None) -> torch.Tensor:
        raise NotImplementedError

    def keep_mask(self, scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Keep the highest ``scores`` in each comparison group (subclasses choose unstructured groups)."""
        scores = _masked_first(scores, keep)
        if self.m:
            return keep_n_of_m(scores, self.n, self.m)
        return drop_lowest(scores, removed_count(scores.numel(), self.sparsity))


@dataclasses.dataclass(frozen=True)
class MagnitudeSparsity(SparsityAlgorithm):
    """Drop the smallest ``|W|`` of each layer (unstructured) or of each run of ``m`` inputs (N:M).

    The baseline of the Wanda and SparseGPT papers; it reads no data.

    >>> MagnitudeSparsity(n=2, m=4).keep_mask(torch.tensor([[1.0, -4.0, 3.0, 2.0]]).abs(), None)
    tensor([[False,  True,  True, False]])
    """

    key = "magnitude"
    statistics = Statistics.NONE

    def scores(self, layer, stats):
        return layer.weight.float().abs()


@dataclasses.dataclass(frozen=True)
class Wanda(SparsityAlgorithm):
    """Wanda (Sun et al. 2023): drop the smallest ``|W_ij| · ||X_j||₂`` in each output row (or N:M run).

    A weight matters as much as the input it multiplies: LLM activations have a
    few channels of huge magnitude, and magnitude pruning drops the small
    weights that read them. Comparing within each output row (not the whole
    layer) keeps every output's share of weights. Needs only ``||X_j||``, no
    weight update.
    """

    key = "wanda"
    statistics = Statistics.NORMS

    def scores(self, layer, stats):
        norms = stats.norms.to(device=layer.weight.device, dtype=torch.float32)
        return layer.weight.float().abs() * norms[None, :]

    def keep_mask(self, scores, keep):
        scores = _masked_first(scores, keep)
        if self.m:
            return keep_n_of_m(scores, self.n, self.m)
        return drop_lowest_per_row(scores, removed_count(scores.shape[1], self.sparsity))


@dataclasses.dataclass(frozen=True)
class SparseGPT(SparsityAlgorithm):
    """SparseGPT (Frantar & Alistarh 2023): prune with the Optimal Brain Surgeon update of the kept weights.

    Columns are taken left to right in blocks of ``block_size``. At each block
    (unstructured) or run of ``m`` columns (N:M) the weights with the lowest
    OBS saliency ``w² / [H⁻¹]²_jj`` are chosen; each pruned weight's error is
    then spread onto the not yet processed weights of its row through the
    inverse Hessian of the layer's input (``H = XᵀX``, damped by ``damp`` times
    its mean diagonal), which minimises ``||W X - Ŵ X||``. The kept weights'
    new dense values are written to the model with the mask. Blocks drop
    ``floor`` of the cumulative count, so the layer loses exactly
    ``floor(out · in · sparsity)`` weights.
    """

    block_size: int = 128
    damp: float = 0.01

    key = "sparsegpt"
    statistics = Statistics.HESSIAN

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.block_size, int) or self.block_size < 1 or (self.m and self.block_size % self.m):
            raise ConfigError(f"SparseGPT: block_size must be a positive integer (a multiple of m={self.m} for "
                              f"N:M), got {self.block_size!r}")
        if not isinstance(self.damp, (int, float)) or self.damp < 0:
            raise ConfigError(f"SparseGPT: damp must be a number >= 0, got {self.damp!r}")

    def compress(self, layer: Layer, stats: InputStats | None) -> Compressed:
        weight = layer.weight.float().clone()
        factor = inverse_hessian_factor(stats.hessian.to(weight.device), self.damp, layer.path)
        rows, columns = weight.shape
        keep = torch.ones_like(weight, dtype=torch.bool)
        for start in range(0, columns, self.block_size):
            stop = min(start + self.block_size, columns)
            dropped = removed_count(rows * stop, self.sparsity) - removed_count(rows * start, self.sparsity)
            block_keep = self._block(weight, factor, start, stop, layer.keep, dropped)
            keep[:, start:stop] = block_keep
        return Compressed(weight=weight.to(layer.weight.dtype), keep=keep)

    def _block(self, weight, factor, start, stop, prior, dropped) -> torch.Tensor:
        """Choose the block's mask (all at once, or per run of ``m`` as the OBS sweep reaches it) and sweep."""
        diagonal = factor.diagonal()[start:stop]
        prior = None if prior is None else prior[:, start:stop]
        keep = torch.ones_like(weight[:, start:stop], dtype=torch.bool)
        if not self.m:
            keep = drop_lowest(_masked_first(self._saliency(weight[:, start:stop], diagonal), prior), dropped)

        def target(i: int, block: torch.Tensor) -> torch.Tensor:
            if self.m and i % self.m == 0:
                run = slice(i, i + self.m)
                saliency = _masked_first(self._saliency(block[:, run], diagonal[run]),
                                         None if prior is None else prior[:, run])
                keep[:, run] = keep_n_of_m(saliency, self.n, self.m)
            return torch.where(keep[:, i], block[:, i], 0.0)

        obs_columns(weight, factor, start, stop, target)
        return keep

    @staticmethod
    def _saliency(columns: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
        """OBS saliency ``w² / [U]²_jj``: the output error of removing each weight alone."""
        return columns.square() / diagonal[None, :].square()
