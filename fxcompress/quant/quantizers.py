"""Quantizers: the modules a quantized graph calls to round a weight or an activation.

Every quantizer is an ``nn.Module`` with one protocol, consulted by the passes
(``insert-observers`` places them, ``calibrate`` feeds their observers,
``fake-quantize`` freezes them, ``fold-qdq`` turns them into integer tensors
and QuantizeLinear/DequantizeLinear pairs):

- ``forward(x, observe=True)``: observe ``x`` while ``observing`` is on; once
  ``enabled``, return ``x`` rounded onto the grid (else ``x`` unchanged);
- ``freeze()``: fix the grid from the observer's statistics and enable;
- ``qparams() -> (scale, zero_point)``: the affine grid the output lies on,
  which is what ``fold-qdq`` stores (``zero_point`` is int32);
- ``exportable``: whether the output is ``(clamp(round(x / scale) + zp) - zp) *
  scale`` for an 8-bit activation, i.e. expressible as one ONNX Q/DQ pair.

Built in: :class:`STEQuantizer` (straight-through estimator; PTQ and QAT),
:class:`LSQ` and :class:`LSQPlus` (learned step size, and learned offset),
:class:`DoReFa` and :class:`BNN` (binary). Users write their own by
subclassing :class:`Quantizer` and overriding ``quantize`` (and ``qparams``
when the output grid is not the scheme's).

>>> q = STEQuantizer(QScheme(bits=8, signed=False, symmetric=False), MinMaxObserver())
>>> q.observing = True; _ = q(torch.tensor([0.0, 2.55])); q.freeze()
>>> q(torch.tensor([0.014, 1.0]))
tensor([0.0100, 1.0000])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxcompress import meta
from fxcompress.errors import ConfigError, PipelineError
from fxcompress.quant.observers import MinMaxObserver, Observer
from fxcompress.quant.scheme import QScheme, broadcast_shape, fake_quantize

__all__ = ["Quantizer", "STEQuantizer", "LSQ", "LSQPlus", "DoReFa", "BNN", "round_ste", "scale_grad", "quantizers",
           "is_planned", "all_frozen"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` whose gradient is the identity (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged in the forward pass, its gradient multiplied by ``factor`` (LSQ's step-size gradient scale)."""
    return x * factor + (x - x * factor).detach()


class Quantizer(nn.Module):
    """Base class: observer handling and the enabled/observing switches (see the module docstring)."""

    exportable: bool = True

    def __init__(self, scheme: QScheme, observer: Observer | None = None) -> None:
        super().__init__()
        if not isinstance(scheme, QScheme):
            raise ConfigError(f"{type(self).__name__} needs a QScheme, got {type(scheme).__name__}")
        self.scheme = scheme
        self.observer = observer if observer is not None else MinMaxObserver()
        self.observing = False
        self.enabled = False
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    def extra_repr(self) -> str:
        s = self.scheme
        kind = f"{'int' if s.signed else 'uint'}{s.bits}, {'symmetric' if s.symmetric else 'affine'}"
        return f"{kind}, {'per-channel' if s.per_channel else 'per-tensor'}, enabled={self.enabled}"

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        if self.observing and observe:
            self.observer.update(x.detach(), self.scheme.axis)
        if not self.enabled:
            return x
        return self.quantize(x)

    def freeze(self) -> None:
        """Fix ``scale`` and ``zero_point`` from the observer and start rounding."""
        if not self.observer.observed:
            raise PipelineError(f"{type(self).__name__} has observed no data; run calibrate before fake-quantize")
        scale, zero_point = self.scheme.qparams(*self.observer.bounds(self.scheme))
        self.scale, self.zero_point = scale.detach(), zero_point
        self.enabled = True

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale.detach(), self.zero_point

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class STEQuantizer(Quantizer):
    """Round onto the scheme's grid with the straight-through estimator (PTQ, and QAT when trained).

    In training mode the observer keeps observing and the grid follows it
    (weights change during QAT); in eval mode the frozen grid is used.
    """

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.observer.update(x.detach(), self.scheme.axis)
            scale, zero_point = self.scheme.qparams(*self.observer.bounds(self.scheme))
            self.scale, self.zero_point = scale.detach(), zero_point
        return fake_quantize(x, self.scheme, self.scale, self.zero_point)


class LSQ(Quantizer):
    """Learned step size quantization (Esser et al., 2020): the scale is a trained parameter.

    ``x_q = (round(clamp(x / s + zp, qmin, qmax)) - zp) * s``, rounding with the
    straight-through estimator, so ``d x_q / d s`` is LSQ's step-size gradient;
    it is scaled by ``1 / sqrt(numel * qmax)`` as the paper prescribes. The
    step starts from the observer's range (call ``freeze`` after calibrating).
    """

    def __init__(self, scheme: QScheme, observer: Observer | None = None) -> None:
        super().__init__(scheme, observer)
        self.step = nn.Parameter(torch.ones(()))

    def freeze(self) -> None:
        super().freeze()
        self.step = nn.Parameter(self.scale.clone())

    def _grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = broadcast_shape(x.dim(), self.scheme.axis if self.step.numel() > 1 else None)
        per_scale = x.numel() / self.step.numel()
        step = scale_grad(self.step.abs() + 1e-12, 1.0 / math.sqrt(per_scale * max(self.scheme.qmax, 1)))
        return step.reshape(shape), self.zero_point.reshape(shape).to(x.dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        step, zero_point = self._grid(x)
        q = round_ste(torch.clamp(x / step + zero_point, self.scheme.qmin, self.scheme.qmax))
        return (q - zero_point) * step

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step.detach().abs() + 1e-12, self.zero_point


class LSQPlus(LSQ):
    """LSQ+ (Bhalgat et al., 2020): a learned step and a learned offset, for asymmetric activations.

    The offset enters as an integer zero point ``round(offset / step)`` with a
    straight-through gradient, so the learned grid stays exactly expressible
    as ONNX QuantizeLinear/DequantizeLinear.
    """

    def __init__(self, scheme: QScheme, observer: Observer | None = None) -> None:
        super().__init__(scheme, observer)
        self.offset = nn.Parameter(torch.zeros(()))

    def freeze(self) -> None:
        super().freeze()
        self.offset = nn.Parameter((self.zero_point.float() * self.scale).clone())

    def _zero_point(self, step: torch.Tensor) -> torch.Tensor:
        shape = step.shape
        return torch.clamp(round_ste(self.offset.reshape(shape) / step), self.scheme.qmin, self.scheme.qmax)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        step, _ = self._grid(x)
        zero_point = self._zero_point(step)
        q = round_ste(torch.clamp(x / step + zero_point, self.scheme.qmin, self.scheme.qmax))
        return (q - zero_point) * step

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.step.detach().abs() + 1e-12
        zero_point = torch.clamp(torch.round(self.offset.detach() / step), self.scheme.qmin, self.scheme.qmax)
        return step, zero_point.to(torch.int32)


class DoReFa(Quantizer):
    """DoReFa-Net (Zhou et al., 2016) for weights: ``2 * q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1``.

    ``q_k`` rounds to ``n = 2**bits - 1`` levels with the straight-through
    estimator. The output lies on the grid ``j / n`` for odd ``j`` in ``[-n, n]``,
    stored as int8 (``bits <= 7``). It needs no calibration: ``freeze`` only enables.
    """

    def __init__(self, scheme: QScheme, observer: Observer | None = None) -> None:
        super().__init__(scheme, observer)
        if scheme.bits > 7:
            raise ConfigError(f"DoReFa weights take bits <= 7 (the grid spans 2**(bits+1) - 1 integers), got {scheme.bits}")
        self.levels = 2**scheme.bits - 1

    def freeze(self) -> None:
        self.scale = torch.tensor(1.0 / self.levels)
        self.zero_point = torch.zeros((), dtype=torch.int32)
        self.enabled = True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(x)
        unit = t / (2 * t.detach().abs().max().clamp(min=1e-12)) + 0.5
        return 2 * round_ste(unit * self.levels) / self.levels - 1


class BNN(Quantizer):
    """Binarized networks (Courbariaux et al., 2016): ``sign(x)`` forward, gradient ``1`` where ``|x| <= 1``.

    For weights the stored integers are ``-1`` and ``+1``. A sign activation is
    not an affine rounding, so binary activations simulate and train but do
    not fold into ONNX Q/DQ pairs (``exportable = False`` when used on activations).
    """

    def __init__(self, scheme: QScheme, observer: Observer | None = None) -> None:
        super().__init__(scheme, observer)

    def freeze(self) -> None:
        self.scale = torch.ones(())
        self.zero_point = torch.zeros((), dtype=torch.int32)
        self.enabled = True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        clipped = torch.clamp(x, -1.0, 1.0)
        sign = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
        return clipped + (sign - clipped).detach()

    @property
    def exportable(self) -> bool:  # type: ignore[override]
        return False


def quantizers(model: nn.Module) -> list[Quantizer]:
    """Every quantizer in ``model`` (weight parametrizations included), each once."""
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def is_planned(gm: nn.Module) -> bool:
    """Whether ``gm`` carries a quantization plan: the config ``insert-observers`` applied, or quantizers
    (a fake-quantized model compiled again)."""
    return meta.QCONFIG in getattr(gm, "meta", {}) or any(isinstance(m, Quantizer) for m in gm.modules())


def all_frozen(model: nn.Module) -> bool:
    """Whether every quantizer of ``model`` has its grid frozen (``fake-quantize`` ran), as folding into
    QDQ form needs; true of a model with none left (already folded, or never quantized)."""
    return all(q.enabled for q in quantizers(model))
