"""Observers: each one's statistics on crafted inputs."""

import pytest
import torch

from fxcompress.errors import ConfigError
from fxcompress.quant.observers import (
    HistogramMSEObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PercentileObserver,
)
from fxcompress.quant.scheme import QScheme

UINT8 = QScheme(bits=8, signed=False, symmetric=False)


def test_min_max_tracks_extremes_over_batches():
    obs = MinMaxObserver()
    obs.update(torch.tensor([-1.0, 3.0]), None)
    obs.update(torch.tensor([0.5, 5.0]), None)
    lo, hi = obs.bounds(UINT8)
    assert (float(lo), float(hi)) == (-1.0, 5.0)


def test_min_max_per_channel_along_axis():
    x = torch.stack([torch.full((3, 2), -2.0), torch.full((3, 2), 7.0)])  # channel 0 all -2, channel 1 all 7
    x[0, 0, 0] = 4.0
    obs = MinMaxObserver()
    obs.update(x, 0)
    lo, hi = obs.bounds(UINT8)
    assert lo.tolist() == [-2.0, 7.0] and hi.tolist() == [4.0, 7.0]


def test_moving_average_moves_by_momentum():
    obs = MovingAverageMinMaxObserver(momentum=0.5)
    obs.update(torch.tensor([0.0, 2.0]), None)
    obs.update(torch.tensor([-2.0, 4.0]), None)
    lo, hi = obs.bounds(UINT8)
    assert (float(lo), float(hi)) == (-1.0, 3.0)


def test_percentile_ignores_outliers():
    obs = PercentileObserver(percentile=99.0, bins=1000)
    x = torch.linspace(0, 1, 10_000)
    x[-50:] = 1000.0  # 0.5% outliers
    obs.update(x, None)
    lo, hi = obs.bounds(UINT8)
    assert float(lo) == pytest.approx(0.0, abs=1.5)
    assert float(hi) < 5.0  # the outliers do not set the range


def test_histogram_keeps_counts_when_range_grows():
    obs = PercentileObserver(percentile=100.0, bins=100)
    obs.update(torch.zeros(10) + 0.5, None)
    obs.update(torch.tensor([10.0]), None)
    assert float(obs.histogram.sum()) == 11
    lo, hi = obs.bounds(UINT8)
    assert float(hi) == pytest.approx(10.0)


def test_histogram_mse_clips_a_far_outlier_at_low_bit_width():
    obs = HistogramMSEObserver()
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0)).abs()
    x[0] = 100.0
    obs.update(x, None)
    four_bit = QScheme(bits=4, signed=False, symmetric=False)
    lo, hi = obs.bounds(four_bit)
    assert float(lo) < 1e-3 and 2.0 < float(hi) < 20.0


def test_histogram_mse_keeps_the_range_of_uniform_data():
    obs = HistogramMSEObserver()
    obs.update(torch.linspace(0, 1, 50_000), None)
    _, hi = obs.bounds(UINT8)
    assert float(hi) == pytest.approx(1.0, abs=0.05)


def test_histogram_observers_refuse_per_channel():
    with pytest.raises(ConfigError, match="per-tensor only"):
        HistogramMSEObserver().update(torch.zeros(2, 2), 0)


def _exhaustive_mse_bounds(obs: HistogramMSEObserver, scheme: QScheme) -> tuple[float, float]:
    """Every (low ratio, high ratio) pair scored on every bin, empty ones included: the search by definition."""
    ratios = torch.logspace(0.0, torch.log10(torch.tensor(obs.min_ratio)).item(), obs.candidates, dtype=torch.float64)
    centers = obs.centers()
    best = None
    for lo in obs.lo * ratios:
        for hi in obs.hi * ratios:
            scale, zero_point = scheme.qparams(lo, hi)
            scale, zero_point = scale.double(), zero_point.double()
            q = torch.clamp(torch.round(centers / scale) + zero_point, scheme.qmin, scheme.qmax)
            error = float((obs.histogram * (centers - (q - zero_point) * scale) ** 2).sum())
            if best is None or error < best[0]:
                best = (error, float(lo), float(hi))
    return best[1], best[2]


@pytest.mark.parametrize("kind", ["relu", "signed", "sparse"])
def test_histogram_mse_search_finds_the_exhaustive_searchs_range(kind):
    """Scoring a zero low end once and skipping empty bins are shortcuts, not approximations."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=generator) * 2 + 0.5
    x = {"relu": x.relu(), "signed": x, "sparse": torch.cat([x[:50], torch.tensor([40.0, -9.0])])}[kind]
    obs = HistogramMSEObserver(bins=256, candidates=12)
    obs.update(x, None)
    assert [float(v) for v in obs.bounds(UINT8)] == pytest.approx(_exhaustive_mse_bounds(obs, UINT8), rel=1e-6)
