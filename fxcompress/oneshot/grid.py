"""The integer grid a one-shot quantized weight lies on: one :class:`~fxcompress.quant.scheme.QScheme`,
a scale and zero point per (output row, group of input columns).

RTN, GPTQ and AWQ write the *dequantized* weight back to the parameter (the model
keeps running in float and composes with masks and fine-tuning) and record its
grid under :data:`fxcompress.meta.WEIGHT_GRIDS`, so that a packing step can
turn ``grid.integers(weight)`` into int4/int8 kernels without re-deriving
anything. The grid reuses ``QScheme``'s arithmetic (round half to even, add the
zero point, saturate), the same as the int8 QDQ path.

>>> from fxcompress.quant.scheme import QScheme
>>> w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
>>> grid = WeightGrid.fit(QScheme(bits=2, signed=False, symmetric=False, per_channel=True), w, group_size=2)
>>> grid.integers(w), grid.scale   # each range is widened to include 0, so 0 is exact
(tensor([[0, 3, 2, 3]], dtype=torch.int32), tensor([[0.3333, 1.0000]]))
"""

from __future__ import annotations

import dataclasses

import torch

from fxcompress.quant.scheme import QScheme

__all__ = ["WeightGrid", "group_qparams", "round_to_grid", "weight_scheme"]


def weight_scheme(bits: int, symmetric: bool) -> QScheme:
    """The per-row weight grid of ``bits``: signed around zero when ``symmetric``, else unsigned with a zero point."""
    return QScheme(bits=bits, signed=symmetric, symmetric=symmetric, per_channel=True, ch_axis=0)


def group_qparams(scheme: QScheme, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero_point)`` covering each row of ``columns`` (``rows x k``) on ``scheme``."""
    return scheme.qparams(columns.amin(dim=1), columns.amax(dim=1))


def round_to_grid(scheme: QScheme, columns: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
    """``columns`` (``rows x k``) rounded onto the per-row grid and dequantized, in float32."""
    q = scheme.quantize(columns.float(), scale, zero_point)
    return (q - zero_point.reshape(-1, 1).float()) * scale.reshape(-1, 1)


@dataclasses.dataclass(frozen=True, eq=False)
class WeightGrid:
    """Where a quantized ``out x in`` weight's values lie: ``(q - zero_point[r, g]) * scale[r, g]`` with integer
    ``q`` in ``[scheme.qmin, scheme.qmax]``, ``g = group_index[column]``.

    ``group_index`` is contiguous (``column // group_size``) unless GPTQ ran
    with act-order and dynamic groups, where groups follow the order columns
    were quantized in (GPTQ's ``g_idx``). ``input_scale`` (AWQ) means the grid
    holds ``weight · input_scale`` per input column: the weight is
    ``dequantized / input_scale``, and a kernel multiplies its input by
    ``1 / input_scale`` (or folds it into the op before).
    """

    scheme: QScheme
    group_size: int
    scale: torch.Tensor
    zero_point: torch.Tensor
    group_index: torch.Tensor
    input_scale: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @classmethod
    def fit(cls, scheme: QScheme, weight: torch.Tensor, group_size: int,
            input_scale: torch.Tensor | None = None) -> WeightGrid:
        """The min/max grid of every contiguous group of ``group_size`` columns of ``weight`` (times
        ``input_scale`` per column, when given): RTN's grid."""
        scaled = weight.float() if input_scale is None else weight.float() * input_scale
        columns = weight.shape[1]
        pieces = [group_qparams(scheme, scaled[:, i : i + group_size]) for i in range(0, columns, group_size)]
        index = torch.arange(columns, device=weight.device) // group_size
        return cls(scheme, group_size, torch.stack([s for s, _ in pieces], 1), torch.stack([z for _, z in pieces], 1),
                   index, input_scale)

    def _per_column(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale[:, self.group_index], self.zero_point[:, self.group_index]

    def integers(self, weight: torch.Tensor) -> torch.Tensor:
        """The grid integers of ``weight`` (``int32``, saturated to the scheme's range)."""
        scale, zero_point = self._per_column()
        scaled = weight.float() if self.input_scale is None else weight.float() * self.input_scale
        q = torch.round(scaled / scale) + zero_point
        return torch.clamp(q, self.scheme.qmin, self.scheme.qmax).to(torch.int32)

    def dequantize(self, integers: torch.Tensor) -> torch.Tensor:
        """The float32 weight the grid ``integers`` stand for."""
        scale, zero_point = self._per_column()
        values = (integers.float() - zero_point.float()) * scale
        return values if self.input_scale is None else values / self.input_scale

    def holds(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` lies exactly on this grid (so packing it loses nothing)."""
        if tuple(weight.shape) != (self.scale.shape[0], len(self.group_index)):
            return False
        return torch.equal(self.dequantize(self.integers(weight)).to(weight.dtype), weight)
