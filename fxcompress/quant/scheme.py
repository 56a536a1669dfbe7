"""Quantization schemes: the integer grid a tensor is rounded onto.

A :class:`QScheme` is the typed description of one grid: bit width,
signedness, symmetric or affine, per tensor or per channel. It turns observed
value ranges into ``(scale, zero_point)`` and applies the grid with the same
arithmetic as ONNX ``QuantizeLinear``/``DequantizeLinear`` (divide by the
scale, round half to even, add the zero point, saturate), so a simulated
model and its exported QDQ form agree bit for bit.

>>> s = QScheme(bits=8, signed=False, symmetric=False)
>>> s.qmin, s.qmax, s.dtype
(0, 255, torch.uint8)
>>> scale, zp = s.qparams(torch.tensor(0.0), torch.tensor(2.55))
>>> round(float(scale), 4), int(zp)
(0.01, 0)
"""

from __future__ import annotations

import dataclasses

import torch

from fxcompress.errors import ConfigError

__all__ = ["QScheme", "INT8_WEIGHT", "UINT8_ACTIVATION", "INT8_ACTIVATION", "fake_quantize", "broadcast_shape"]

_EPS = torch.finfo(torch.float32).eps


def broadcast_shape(ndim: int, axis: int | None) -> list[int]:
    """Shape that makes a per-channel vector broadcast along ``axis`` of an ``ndim`` tensor.

    >>> broadcast_shape(4, 0)
    [-1, 1, 1, 1]
    """
    shape = [1] * ndim
    if axis is not None and ndim:
        shape[axis] = -1
    return shape


@dataclasses.dataclass(frozen=True)
class QScheme:
    """An integer grid: ``bits`` wide, ``signed`` or not, ``symmetric`` (zero maps to the middle) or affine.

    ``per_channel`` gives each slice along ``ch_axis`` its own scale (weights:
    output channels, axis 0). Signed grids store as ``int8``, unsigned as
    ``uint8``; lower bit widths use the same containers with a narrower range.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    per_channel: bool = False
    ch_axis: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ConfigError(f"QScheme: bits must be an integer from 1 to 8, got {self.bits!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    @property
    def axis(self) -> int | None:
        return self.ch_axis if self.per_channel else None

    def qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` covering ``[lo, hi]`` (widened to include 0, so zero is exact)."""
        lo = torch.clamp(lo.float(), max=0.0)
        hi = torch.clamp(hi.float(), min=0.0)
        if self.symmetric:
            amax = torch.maximum(-lo, hi)
            scale = amax / ((self.qmax - self.qmin) / 2)
            middle = 0 if self.signed else (self.qmin + self.qmax + 1) // 2
            zero_point = torch.full_like(scale, middle)
        else:
            scale = (hi - lo) / (self.qmax - self.qmin)
            zero_point = self.qmin - torch.round(lo / torch.clamp(scale, min=_EPS))
        scale = torch.clamp(scale, min=_EPS)
        zero_point = torch.clamp(zero_point, self.qmin, self.qmax).to(torch.int32)
        return scale, zero_point

    def quantize(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """The integers of ``x`` on this grid (as float), saturated to ``[qmin, qmax]``."""
        shape = broadcast_shape(x.dim(), self.axis if scale.numel() > 1 else None)
        q = torch.round(x / scale.reshape(shape)) + zero_point.reshape(shape)
        return torch.clamp(q, self.qmin, self.qmax)


def fake_quantize(x: torch.Tensor, scheme: QScheme, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Round ``x`` onto the grid and back, with the straight-through estimator.

    The forward value is ``(clamp(round(x / scale) + zp) - zp) * scale``; the
    gradient is 1 inside the representable range and 0 where it saturates
    (as ``torch.fake_quantize_per_tensor_affine``, whose ``x * (1 / scale)``
    rounding differs from ONNX's ``x / scale`` at ties, hence our own).
    """
    shape = broadcast_shape(x.dim(), scheme.axis if scale.numel() > 1 else None)
    s, z = scale.reshape(shape), zero_point.reshape(shape).to(x.dtype)
    q = scheme.quantize(x.detach(), scale, zero_point)
    value = (q - z) * s
    clipped = torch.minimum(torch.maximum(x, (scheme.qmin - z) * s), (scheme.qmax - z) * s)
    return clipped + (value - clipped).detach()


#: Weights: per-output-channel symmetric int8 (what ONNX Runtime's int8 kernels expect).
INT8_WEIGHT = QScheme(bits=8, signed=True, symmetric=True, per_channel=True)
#: Activations: per-tensor affine uint8 (ONNX Runtime fuses these into QLinearConv / int8 MatMul).
UINT8_ACTIVATION = QScheme(bits=8, signed=False, symmetric=False)
#: Activations: per-tensor affine int8.
INT8_ACTIVATION = QScheme(bits=8, signed=True, symmetric=False)
