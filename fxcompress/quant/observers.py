"""Observers: statistics of the values a quantizer sees, turned into a clipping range.

An observer is a small ``nn.Module`` (its statistics are buffers, so they are
saved with the model) with one protocol:

- ``update(x, axis)``: fold a batch of values in (``axis`` is the channel axis
  of per-channel statistics, or ``None``);
- ``bounds(scheme) -> (lo, hi)``: the range to quantize, scalars or one per
  channel; ``scheme`` lets an observer search for the range whose rounding
  error on that grid is smallest;
- ``observed``: whether any value has been seen.

>>> obs = MinMaxObserver()
>>> obs.update(torch.tensor([-1.0, 3.0]), None); obs.update(torch.tensor([5.0]), None)
>>> [float(v) for v in obs.bounds(QScheme())]
[-1.0, 5.0]
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from fxcompress.errors import ConfigError
from fxcompress.quant.scheme import QScheme

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "HistogramObserver",
    "PercentileObserver",
    "HistogramMSEObserver",
]


@runtime_checkable
class Observer(Protocol):
    """What a quantizer needs from an observer (see the module docstring)."""

    observed: bool

    def update(self, x: torch.Tensor, axis: int | None) -> None: ...

    def bounds(self, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]: ...


def _extrema(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x``, over everything or per slice along ``axis``."""
    x = x.detach().float()
    if axis is None:
        return x.min(), x.max()
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


class _RangeObserver(nn.Module):
    """Shared storage of the running ``lo``/``hi`` range."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    @property
    def observed(self) -> bool:
        return bool(torch.isfinite(self.lo).all())

    def bounds(self, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo.clone(), self.hi.clone()


class MinMaxObserver(_RangeObserver):
    """The smallest and largest value ever seen (per channel along ``axis`` when given)."""

    def update(self, x: torch.Tensor, axis: int | None) -> None:
        lo, hi = _extrema(x, axis)
        if not self.observed:
            self.lo, self.hi = lo, hi
            return
        self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)


class MovingAverageMinMaxObserver(_RangeObserver):
    """An exponential moving average of each batch's min and max (less sensitive to one outlier batch).

    ``lo <- lo + momentum * (batch_min - lo)``; the first batch sets the range.
    """

    def __init__(self, momentum: float = 0.01) -> None:
        super().__init__()
        if not 0 < momentum <= 1:
            raise ConfigError(f"MovingAverageMinMaxObserver: momentum must be in (0, 1], got {momentum!r}")
        self.momentum = momentum

    def update(self, x: torch.Tensor, axis: int | None) -> None:
        lo, hi = _extrema(x, axis)
        if not self.observed:
            self.lo, self.hi = lo, hi
            return
        self.lo = self.lo + self.momentum * (lo - self.lo)
        self.hi = self.hi + self.momentum * (hi - self.hi)


class HistogramObserver(nn.Module):
    """A per-tensor histogram of every value seen, over a range that grows as needed.

    When a batch falls outside the current range the old counts are moved to
    the bins of the wider range that contain their bin centres, so memory stays
    ``bins`` floats whatever the data size. Subclasses pick the range.
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    @property
    def observed(self) -> bool:
        return bool(self.histogram.sum() > 0)

    def update(self, x: torch.Tensor, axis: int | None) -> None:
        if axis is not None:
            raise ConfigError(f"{type(self).__name__} is per-tensor only; use MinMaxObserver for per-channel schemes")
        x = x.detach().flatten()
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()  # no float64 copy of every activation
        low, high = torch.aminmax(x)  # one pass
        lo, hi = torch.minimum(self.lo, low.double()), torch.maximum(self.hi, high.double())
        if hi <= lo:
            hi = lo + 1e-8
        if self.observed and (lo < self.lo or hi > self.hi):
            self.histogram = self._rebin(lo, hi)
        self.lo, self.hi = lo, hi
        self.histogram += torch.histc(x, self.bins, float(lo), float(hi)).double()

    def _rebin(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        index = ((self.centers() - lo) / (hi - lo) * self.bins).long().clamp(0, self.bins - 1)
        return torch.bincount(index, weights=self.histogram, minlength=self.bins)

    def centers(self) -> torch.Tensor:
        width = (self.hi - self.lo) / self.bins
        return self.lo + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)


class PercentileObserver(HistogramObserver):
    """Clip the ``100 - percentile`` lowest and highest fraction of values (outliers do not set the scale).

    >>> obs = PercentileObserver(percentile=99.0, bins=1000)
    >>> obs.update(torch.arange(1001.0), None)
    >>> [round(float(v)) for v in obs.bounds(QScheme())]
    [10, 991]
    """

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        if not 50 < percentile <= 100:
            raise ConfigError(f"PercentileObserver: percentile must be in (50, 100], got {percentile!r}")
        self.percentile = percentile

    def bounds(self, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
        cdf = torch.cumsum(self.histogram, 0) / self.histogram.sum()
        edges = torch.linspace(float(self.lo), float(self.hi), self.bins + 1, dtype=torch.float64)
        tail = 1 - self.percentile / 100
        lo_bin = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(1 - tail, dtype=torch.float64)))
        return edges[lo_bin].float(), edges[min(hi_bin + 1, self.bins)].float()


class HistogramMSEObserver(HistogramObserver):
    """The clipping range whose rounding plus clipping error on the histogram is smallest.

    The low and high ends are shrunk towards zero independently, by factors
    on a grid in ``[min_ratio, 1]``; each candidate range is scored by
    ``sum(count * (centre - fq(centre))**2)`` on the scheme's own grid, so the
    choice accounts for the bit width and for outliers on one side only.
    """

    def __init__(self, bins: int = 2048, candidates: int = 48, min_ratio: float = 0.02) -> None:
        super().__init__(bins)
        self.candidates = candidates
        self.min_ratio = min_ratio

    def bounds(self, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
        ratios = torch.logspace(0.0, torch.log10(torch.tensor(self.min_ratio)).item(), self.candidates, dtype=torch.float64)
        his = self.hi * ratios
        # a range starting at zero (every ReLU output) has one low end, not one per ratio: scoring it once
        # instead of ``candidates`` times gives the same choice
        los = self.lo * ratios if self.lo != 0 else self.lo.reshape(1)
        filled = self.histogram > 0  # empty bins add nothing to any error
        counts, centers = self.histogram[filled], self.centers()[filled]
        errors = torch.stack([self._errors(scheme, lo, his, counts, centers) for lo in los])
        best = int(torch.argmin(errors))
        i, j = divmod(best, len(ratios))
        return los[i].float(), his[j].float()

    @staticmethod
    def _errors(scheme: QScheme, lo: torch.Tensor, his: torch.Tensor, counts: torch.Tensor,
                centers: torch.Tensor) -> torch.Tensor:
        """Squared error of the histogram (``counts`` at bin ``centers``) for one low end and every candidate
        high end."""
        scale, zero_point = scheme.qparams(lo.expand_as(his), his)
        scale, zero_point = scale.double()[:, None], zero_point.double()[:, None]
        q = torch.clamp(torch.round(centers[None, :] / scale) + zero_point, scheme.qmin, scheme.qmax)
        return (counts * (centers[None, :] - (q - zero_point) * scale) ** 2).sum(dim=1)
