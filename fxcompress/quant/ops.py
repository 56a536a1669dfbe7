"""The two graph ops of a folded (QDQ) model, and their ONNX translations.

``quantize(x, scale, zero_point)`` returns the integers of ``x`` in the zero
point's dtype (uint8 or int8), with ONNX ``QuantizeLinear`` arithmetic:
``saturate(round_half_even(x / scale) + zero_point)``. ``dequantize(q, scale,
zero_point, axis)`` returns ``(q - zero_point) * scale`` in float32, per
channel along ``axis`` when ``scale`` is a vector (ONNX ``DequantizeLinear``).

They are ``torch.library`` custom ops (``torch.ops.fxcompress.quantize``), so
``torch.fx`` keeps them as single nodes and the TorchScript ONNX exporter
translates each into exactly one ONNX node (see :func:`register_onnx_symbolics`).

>>> q = quantize(torch.tensor([0.0, 0.26, 9.0]), torch.tensor(0.1), torch.tensor(128, dtype=torch.uint8))
>>> q, dequantize(q, torch.tensor(0.1), torch.tensor(128, dtype=torch.uint8), 0)
(tensor([128, 131, 218], dtype=torch.uint8), tensor([0.0000, 0.3000, 9.0000]))
"""

from __future__ import annotations

import functools

import torch

from fxcompress.quant.scheme import broadcast_shape

__all__ = ["quantize", "dequantize", "QUANTIZE", "DEQUANTIZE", "register_onnx_symbolics", "ONNX_OPSET"]

#: Lowest opset with per-channel (``axis``) DequantizeLinear.
ONNX_OPSET = 13


@torch.library.custom_op("fxcompress::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    info = torch.iinfo(zero_point.dtype)
    q = torch.round(x / scale) + zero_point.to(x.dtype)
    return torch.clamp(q, info.min, info.max).to(zero_point.dtype)


@quantize.register_fake
def _(x, scale, zero_point):
    return torch.empty(x.shape, dtype=zero_point.dtype, device=x.device)


@torch.library.custom_op("fxcompress::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    shape = broadcast_shape(q.dim(), axis if scale.numel() > 1 else None)
    return (q.to(torch.float32) - zero_point.to(torch.float32).reshape(shape)) * scale.reshape(shape)


@dequantize.register_fake
def _(q, scale, zero_point, axis):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


#: The graph targets (``call_function`` nodes) of the two ops.
QUANTIZE = torch.ops.fxcompress.quantize.default
DEQUANTIZE = torch.ops.fxcompress.dequantize.default


def _quantize_symbolic(g, x, scale, zero_point):
    return g.op("QuantizeLinear", x, scale, zero_point)


def _dequantize_symbolic(g, q, scale, zero_point, axis):
    from torch.onnx import symbolic_helper

    return g.op("DequantizeLinear", q, scale, zero_point, axis_i=symbolic_helper._get_const(axis, "i", "axis"))


@functools.cache
def register_onnx_symbolics(opset: int = ONNX_OPSET) -> None:
    """Teach the TorchScript ONNX exporter our two ops (idempotent)."""
    from torch.onnx import register_custom_op_symbolic

    register_custom_op_symbolic("fxcompress::quantize", _quantize_symbolic, opset)
    register_custom_op_symbolic("fxcompress::dequantize", _dequantize_symbolic, opset)
