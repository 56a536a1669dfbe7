"""One-shot weight quantization on the layer-sequential engine: round-to-nearest, GPTQ and AWQ.

Both round each linear weight onto a per-(row, group of ``group_size`` input
columns) grid of ``bits`` (a :class:`~fxcompress.quant.scheme.QScheme`:
``symmetric`` signed around zero, or unsigned with a zero point), write the
dequantized values to the parameter and record the grid
(:class:`~fxcompress.oneshot.grid.WeightGrid`) under
:data:`fxcompress.meta.WEIGHT_GRIDS`. Weights already masked stay zero (zero is
always on the grid). A weight already on a grid of the same format is left
alone, so a second run changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from fxcompress.errors import ConfigError
from fxcompress.oneshot.engine import Compressed, InputStats, Layer, Statistics, register_algorithm
from fxcompress.oneshot.grid import WeightGrid, group_qparams, round_to_grid, weight_scheme
from fxcompress.oneshot.obs import inverse_hessian_factor, obs_columns
from fxcompress.quant.scheme import QScheme
from fxcompress.selection import normalize_selection

__all__ = ["WeightQuantizer", "RTN", "GPTQ", "AWQ"]


@dataclasses.dataclass(frozen=True)
class WeightQuantizer:
    """Shared options of one-shot weight quantizers: the grid (``bits`` 2-8, ``group_size`` input columns per
    scale, 0 for one group per row; ``symmetric``) and the layer selection."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    op_types: tuple[type[nn.Module], ...] = (nn.Linear,)
    op_names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    key: ClassVar[str] = ""
    statistics: ClassVar[Statistics] = Statistics.NONE

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_algorithm(cls)

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(f"{type(self).__name__}: group_size must be an integer >= 0 (0: one group per row), "
                              f"got {self.group_size!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"{type(self).__name__}: bits must be an integer from 2 to 8, got {self.bits!r}")
        normalize_selection(self)

    @property
    def scheme(self) -> QScheme:
        return weight_scheme(self.bits, self.symmetric)

    def groups_of(self, layer: Layer) -> int:
        """Input columns per group in ``layer`` (a whole row when ``group_size`` is 0 or larger than it)."""
        columns = layer.weight.shape[1]
        return columns if not self.group_size else min(self.group_size, columns)

    def check(self, layer: Layer) -> None:
        if layer.weight.dim() != 2:
            raise ConfigError(f"{type(self).__name__}: {layer.path} has a {layer.weight.dim()}-d weight; "
                              "one-shot quantization takes linear layers (out x in); exclude it")

    def already_done(self, layer: Layer) -> bool:
        """Whether ``layer`` already lies on a recorded grid of this format (then nothing is left to do)."""
        grid = layer.grid
        return (isinstance(grid, WeightGrid) and grid.scheme == self.scheme
                and grid.group_size == self.groups_of(layer) and grid.holds(layer.weight))

    def rounded(self, layer: Layer, input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, WeightGrid]:
        """``layer``'s weight rounded to nearest on its min/max group grid (of ``weight · input_scale``)."""
        grid = WeightGrid.fit(self.scheme, layer.weight.float(), self.groups_of(layer), input_scale)
        return grid.dequantize(grid.integers(layer.weight)), grid


@dataclasses.dataclass(frozen=True)
class RTN(WeightQuantizer):
    """Round to nearest: each group's min/max grid, every weight rounded on its own (reads no data).

    The baseline GPTQ is measured against.

    >>> from fxcompress.oneshot.engine import Layer
    >>> out = RTN(bits=2, group_size=2).compress(Layer("w", torch.tensor([[0.0, 1.0, 2.0, 2.9]])), None)
    >>> out.weight, out.grid.scale
    (tensor([[0.0000, 1.0000, 1.9333, 2.9000]]), tensor([[0.3333, 0.9667]]))
    """

    key = "rtn"

    def compress(self, layer: Layer, stats: InputStats | None) -> Compressed:
        if self.already_done(layer):
            return Compressed()
        weight, grid = self.rounded(layer)
        return Compressed(weight=weight.to(layer.weight.dtype), grid=grid)


@dataclasses.dataclass(frozen=True)
class GPTQ(WeightQuantizer):
    """GPTQ (Frantar et al. 2022): round column by column, moving each rounding error onto the columns not
    yet rounded through the inverse Hessian of the layer's input, so ``||W X - Ŵ X||`` stays small.

    ``act_order`` rounds the inputs with the largest ``H_jj`` (the most active)
    first, while the most columns are left to absorb their error.
    ``static_groups`` takes every group's grid from the weight before any
    update, in column order, so groups stay contiguous (``group_index = column
    // group_size``, which packed int4 kernels want); otherwise each group's
    grid is fitted when the sweep reaches it, in the order columns are rounded
    (with act-order, a group is then a set of columns of similar activity).
    ``damp`` (× mean ``H_jj``) keeps ``H`` invertible; ``block_size`` columns
    share one lazy update of the rest.
    """

    act_order: bool = True
    static_groups: bool = True
    block_size: int = 128
    damp: float = 0.01

    key = "gptq"
    statistics = Statistics.HESSIAN

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"GPTQ: block_size must be a positive integer, got {self.block_size!r}")
        if not isinstance(self.damp, (int, float)) or self.damp < 0:
            raise ConfigError(f"GPTQ: damp must be a number >= 0, got {self.damp!r}")

    def compress(self, layer: Layer, stats: InputStats | None) -> Compressed:
        if self.already_done(layer):
            return Compressed()
        weight = layer.weight.float()
        columns, size = weight.shape[1], self.groups_of(layer)
        order = self._order(stats.hessian, columns, weight.device)
        grid = self._grid(weight, order, size)
        swept = weight[:, order].contiguous()
        factor = inverse_hessian_factor(stats.hessian.to(weight.device), self.damp, layer.path, order)
        keep = None if layer.keep is None else layer.keep[:, order]
        for start in range(0, columns, self.block_size):
            stop = min(start + self.block_size, columns)
            obs_columns(swept, factor, start, stop, self._rounder(swept, grid, order, keep, start, stop))
        result = torch.empty_like(swept)
        result[:, order] = swept
        return Compressed(weight=result.to(layer.weight.dtype), grid=grid)

    def _order(self, hessian: torch.Tensor, columns: int, device) -> torch.Tensor:
        if not self.act_order:
            return torch.arange(columns, device=device)
        return torch.argsort(hessian.diagonal().to(device), descending=True, stable=True)

    def _grid(self, weight: torch.Tensor, order: torch.Tensor, size: int) -> WeightGrid:
        """Static groups: fitted now on contiguous columns. Dynamic: empty, filled as the sweep reaches each group."""
        if self.static_groups:
            return WeightGrid.fit(self.scheme, weight, size)
        groups = -(-weight.shape[1] // size)
        index = torch.empty_like(order)
        index[order] = torch.arange(len(order), device=order.device) // size
        scale = torch.empty(weight.shape[0], groups, device=weight.device)
        zero_point = torch.empty(weight.shape[0], groups, dtype=torch.int32, device=weight.device)
        return WeightGrid(self.scheme, size, scale, zero_point, index)

    def _rounder(self, swept, grid: WeightGrid, order, keep, start: int, stop: int):
        """The OBS target of block ``start:stop``: each column rounded on its group's grid (masked entries 0)."""

        def target(i: int, block: torch.Tensor) -> torch.Tensor:
            position = start + i
            if not self.static_groups and position % grid.group_size == 0:
                ahead = torch.cat([block[:, i:], swept[:, stop:]], dim=1)[:, : grid.group_size]
                grid.scale[:, position // grid.group_size], grid.zero_point[:, position // grid.group_size] = (
                    group_qparams(grid.scheme, ahead))
            g = grid.group_index[order[position]]
            q = round_to_grid(grid.scheme, block[:, i : i + 1], grid.scale[:, g], grid.zero_point[:, g])[:, 0]
            return q if keep is None else torch.where(keep[:, position], q, 0.0)

        return target


@dataclasses.dataclass(frozen=True)
class AWQ(WeightQuantizer):
    """AWQ (Lin et al. 2023): scale each input column by ``s_j = mean|X_j|^α`` before rounding to nearest, so
    the weights that read the most active inputs lose the least to rounding; ``α`` is searched.

    The candidates ``α = 0, 1/grid_points, ...`` are scored by the layer's output
    error on the calibration data, ``tr(ΔW H ΔWᵀ)`` with ``H = XᵀX``, and the
    best is kept (``α = 0`` is RTN, so AWQ is never worse than RTN there). The
    parameter holds ``Q(W·s) / s``; the recorded grid carries ``s`` as its
    ``input_scale`` (a kernel multiplies its input by ``1/s``, or the op before
    it is folded). Each layer gets its own ``s``: layers sharing an input are
    not tied, since nothing is folded into a shared op here.
    """

    grid_points: int = 20

    key = "awq"
    statistics = Statistics.HESSIAN

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.grid_points, int) or self.grid_points < 1:
            raise ConfigError(f"AWQ: grid_points must be a positive integer, got {self.grid_points!r}")

    def compress(self, layer: Layer, stats: InputStats | None) -> Compressed:
        if self.already_done(layer):
            return Compressed()
        hessian = stats.hessian.to(layer.weight.device)
        activity = (stats.abs_sums / max(stats.tokens, 1)).to(device=layer.weight.device, dtype=torch.float32)
        best = None
        for step in range(self.grid_points):
            weight, grid = self.rounded(layer, self.input_scale(activity, step / self.grid_points))
            delta = weight - layer.weight.float()
            loss = float(((delta @ hessian) * delta).sum())
            if best is None or loss < best[0]:
                best = (loss, weight, grid)
        return Compressed(weight=best[1].to(layer.weight.dtype), grid=best[2])

    @staticmethod
    def input_scale(activity: torch.Tensor, alpha: float) -> torch.Tensor:
        """``mean|X_j|^α``, normalised to a geometric middle of 1 (AWQ's ``s / sqrt(max s · min s)``).

        >>> AWQ.input_scale(torch.tensor([1.0, 4.0, 16.0]), 0.5)
        tensor([0.5000, 1.0000, 2.0000])
        """
        scale = activity.clamp(min=1e-8).pow(alpha)
        return scale / (scale.max() * scale.min()).sqrt()
