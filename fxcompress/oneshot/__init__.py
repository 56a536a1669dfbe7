"""One-shot compression of large models from a little calibration data: sparsity (magnitude, Wanda,
SparseGPT; unstructured or N:M) and weight quantization (RTN, GPTQ, AWQ) on a layer-sequential engine.

The algorithms are small frozen dataclasses that the ``one-shot`` pass
(:class:`fxcompress.passes.OneShot`) consults, one linear layer at a time, in
graph order (see :mod:`fxcompress.oneshot.engine`). Sparsity ends as ordinary
fxcompress masks; quantization as dequantized weights plus the integer grid,
recorded under :data:`fxcompress.meta.WEIGHT_GRIDS`.

>>> from fxcompress.passes import OneShot
>>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
>>> data = [torch.randn(4, 16) for _ in range(2)]
>>> sparse = fxcompress.compile(model, data[0], [OneShot(SparseGPT(0.5), data, progress=False)])
>>> float((sparse.get_submodule("0").weight == 0).float().mean())
0.5
>>> q = fxcompress.compile(model, data[0], [OneShot(GPTQ(bits=4, group_size=8), data, progress=False)])
>>> grid = q.meta[fxcompress.meta.WEIGHT_GRIDS]["2.weight"]
>>> grid.bits, tuple(grid.scale.shape), grid.holds(q.get_submodule("2").weight)
(4, (8, 4), True)
"""

from fxcompress.oneshot.engine import (
    ALGORITHMS,
    LINEAR_OPS,
    Compressed,
    InputStats,
    Layer,
    LinearSite,
    OneShotAlgorithm,
    Statistics,
    compress_layers,
    gather_stats,
    linear_sites,
    make_algorithm,
    register_algorithm,
)
from fxcompress.oneshot.grid import WeightGrid
from fxcompress.oneshot.quantize import AWQ, GPTQ, RTN, WeightQuantizer
from fxcompress.oneshot.smoothquant import (
    ActivationQuant,
    FakeQuantActivation,
    SmoothQuant,
    input_absmax,
    outlier_ratio,
    weight_absmax,
)
from fxcompress.oneshot.sparsity import MagnitudeSparsity, SparseGPT, SparsityAlgorithm, Wanda

__all__ = [
    "MagnitudeSparsity", "Wanda", "SparseGPT", "RTN", "GPTQ", "AWQ", "WeightGrid",
    "SparsityAlgorithm", "WeightQuantizer", "OneShotAlgorithm", "Layer", "Compressed", "InputStats", "Statistics",
    "LinearSite", "LINEAR_OPS", "ALGORITHMS", "compress_layers", "gather_stats", "linear_sites", "make_algorithm",
    "register_algorithm", "SmoothQuant", "ActivationQuant", "FakeQuantActivation", "input_absmax", "weight_absmax",
    "outlier_ratio",
]
