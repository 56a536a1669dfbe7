"""Quantization: observers, fake-quantization schemes and quantizers.

The algorithms that the quantization passes consult (``insert-observers``,
``calibrate``, ``fake-quantize``, ``fold-qdq``)::

    >>> from fxcompress.quant import QConfig, LSQ
    >>> QConfig.int8(weight_bits=4, algorithm=LSQ).weight.scheme.qmin
    -8
"""

from fxcompress.quant.config import ALGORITHMS, WEIGHTED_TYPES, QConfig, QuantSpec
from fxcompress.quant.observers import (
    HistogramMSEObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
    PercentileObserver,
)
from fxcompress.quant.ops import dequantize, quantize
from fxcompress.quant.quantizers import BNN, LSQ, DoReFa, STEQuantizer, LSQPlus, Quantizer
from fxcompress.quant.scheme import INT8_ACTIVATION, INT8_WEIGHT, UINT8_ACTIVATION, QScheme, fake_quantize

__all__ = [
    "QScheme", "INT8_WEIGHT", "UINT8_ACTIVATION", "INT8_ACTIVATION", "fake_quantize",
    "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver", "PercentileObserver",
    "HistogramMSEObserver",
    "Quantizer", "STEQuantizer", "LSQ", "LSQPlus", "DoReFa", "BNN",
    "QuantSpec", "QConfig", "WEIGHTED_TYPES", "ALGORITHMS",
    "quantize", "dequantize",
]
