"""SmoothQuant (Xiao et al. 2022) and simulated int8 activations: the algorithms behind W8A8 with smoothing.

Why: LLM activations have a few input channels hundreds of times louder
than the rest, in the same channels for every token. One int8 scale per
tensor (or per token) must cover them, so every other channel is rounded
onto a handful of levels. Weights have no such outliers. SmoothQuant moves
the difficulty: ``X W^T = (X / s) (W s)^T`` for any per-input-channel ``s``,
and ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (``α`` the migration strength)
flattens the activation ranges at the cost of slightly wider weight ranges.

* :class:`SmoothQuant` holds ``α`` and the layer selection and computes
  ``s`` (:meth:`SmoothQuant.scales`); the ``smooth-activations`` pass
  (:class:`fxcompress.passes.SmoothActivations`) calibrates ``max|X_j|``
  (:func:`input_absmax`), multiplies the weights by ``s`` and divides the
  input, folded into the norm before it where it can.
* :class:`ActivationQuant` says how linear inputs are rounded (int8,
  one static scale per tensor from calibration or one dynamic scale per
  token); :class:`FakeQuantActivation` does it in float (simulated), which
  the ``quantize-activations`` pass inserts before each selected linear.

>>> s = SmoothQuant(alpha=0.5).scales(torch.tensor([100.0, 1.0]), torch.tensor([1.0, 1.0]))
>>> s, outlier_ratio(torch.tensor([100.0, 1.0]) / s)
(tensor([10.,  1.]), 10.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import fx, nn

from fxcompress.errors import ConfigError
from fxcompress.oneshot.engine import current_value
from fxcompress.selection import normalize_selection
from fxcompress.trace import ExampleInputs, describe_node, inference_mode

__all__ = ["SmoothQuant", "ActivationQuant", "FakeQuantActivation", "input_absmax", "weight_absmax", "outlier_ratio"]

_TINY = 1e-5  # floor of ranges: a channel that never fired gets a finite scale


@dataclasses.dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant's migration: ``alpha`` in [0, 1] (0.5 is the paper's default; 0 leaves activations as they
    are, 1 moves all of their range onto the weights) and the layers smoothed (``op_types``/``op_names``/
    ``exclude``, as one-shot algorithms select)."""

    alpha: float = 0.5
    op_types: tuple[type[nn.Module], ...] = (nn.Linear,)
    op_names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    key: ClassVar[str] = "smoothquant"

    def __post_init__(self) -> None:
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"SmoothQuant: alpha (migration strength) must be a number in [0, 1], got {self.alpha!r}")
        normalize_selection(self)

    def scales(self, act_absmax: torch.Tensor, weight_max: torch.Tensor) -> torch.Tensor:
        """``s_j = max|X_j|^α / max|W_j|^(1-α)`` (float32, on ``weight_max``'s device)."""
        act = act_absmax.to(device=weight_max.device, dtype=torch.float32).clamp(min=_TINY)
        weight = weight_max.float().clamp(min=_TINY)
        return (act.pow(self.alpha) / weight.pow(1 - self.alpha)).clamp(min=_TINY)


@dataclasses.dataclass(frozen=True)
class ActivationQuant:
    """How the inputs of the selected linear layers are rounded: signed symmetric ``bits`` integers with one
    scale per tensor fixed from calibration (``granularity="tensor"``, static) or one per token computed on
    the fly (``"token"``, dynamic)."""

    granularity: str = "tensor"
    bits: int = 8
    op_types: tuple[type[nn.Module], ...] = (nn.Linear,)
    op_names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.granularity not in ("tensor", "token"):
            raise ConfigError(f"ActivationQuant: granularity must be 'tensor' (static) or 'token' (dynamic), "
                              f"got {self.granularity!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"ActivationQuant: bits must be an integer from 2 to 8, got {self.bits!r}")
        normalize_selection(self)

    @property
    def static(self) -> bool:
        return self.granularity == "tensor"


class FakeQuantActivation(nn.Module):
    """``x`` rounded onto a signed symmetric grid and back (``scale = max|x| / (2^(bits-1) - 0.5)``, as
    :meth:`fxcompress.quant.scheme.QScheme.qparams` spans ``[-max, max]``): static when built with an
    ``absmax`` (one calibrated scale), else per token (each row of the last dim its own scale)."""

    def __init__(self, bits: int = 8, absmax: torch.Tensor | None = None):
        super().__init__()
        self.bits = bits
        scale = None if absmax is None else self._scale(absmax.detach().float().reshape(()))
        self.register_buffer("scale", scale)

    def _scale(self, absmax: torch.Tensor) -> torch.Tensor:
        return (absmax / (2 ** (self.bits - 1) - 0.5)).clamp(min=torch.finfo(torch.float32).eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale if self.scale is not None else self._scale(x.detach().abs().amax(-1, keepdim=True).float())
        scale = scale.to(x.dtype)
        q = torch.clamp(torch.round(x / scale), -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1)
        return q * scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'static per tensor' if self.scale is not None else 'dynamic per token'}"


class _AbsMax(fx.Interpreter):
    """Runs the graph, keeping ``max|x_j|`` over all tokens of each wanted node's output (per last-dim channel)."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(gm)
        self.wanted = wanted
        self.found: dict[fx.Node, torch.Tensor] = {}

    def get_attr(self, target, args, kwargs):
        return current_value(self.module, target)  # masked weights as the forward reads them

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node in self.wanted:
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                raise ConfigError(f"smooth-activations: {describe_node(self.module, node)} feeds a linear layer but "
                                  f"is not a tensor ({type(value).__name__}); exclude the layers it feeds")
            amax = value.detach().reshape(-1, value.shape[-1]).abs().amax(0).float()
            seen = self.found.get(node)
            self.found[node] = amax if seen is None else torch.maximum(seen, amax)
        return value


def input_absmax(gm: fx.GraphModule, nodes: Sequence[fx.Node], data: Sequence) -> dict[fx.Node, torch.Tensor]:
    """``max|x_j|`` per channel (last dim) of each of ``nodes``' outputs over every calibration batch (a tensor,
    a tuple of ``forward`` arguments, a dict of keyword arguments or an ``(args, kwargs)`` pair per batch)."""
    interpreter = _AbsMax(gm, set(nodes))
    with inference_mode(gm):
        for batch in data:
            interpreter.run(*ExampleInputs.of(batch).positional(gm))
    return interpreter.found


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``max|W_j|`` per input column over every row of every weight (``out x in``) that reads the same input."""
    return torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)


def outlier_ratio(absmax: torch.Tensor) -> float:
    """How much louder the loudest channel is than the typical one: ``max_j / median_j`` of ``max|X_j|``
    (1 when every channel has the same range; in the hundreds for raw LLM activations)."""
    absmax = absmax.float().clamp(min=_TINY)
    return float(absmax.max() / absmax.median())
