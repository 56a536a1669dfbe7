"""Linear layers whose weights are stored packed in int8 or int4 and multiplied by PyTorch's own CPU kernels.

Why: decoding one token at batch 1 reads every weight once and does two flops
per weight read, so its speed is set by how many bytes of weight cross the
memory bus. A one-shot quantized model that keeps its dequantized weights in
float32 (as :mod:`fxcompress.oneshot` leaves it, so that it stays trainable
and maskable) is no faster than the dense one; these modules store the grid
integers themselves (1 byte or half a byte per weight) and let the kernel
dequantize on the fly.

The kernels (``torch.ops.aten``, CPU):

* ``_weight_int8pack_mm(x, q, scales)`` is ``x @ (q * scales[:, None]).T`` for
  an ``int8`` ``q`` (``out x in``) and one scale per output row: symmetric, no
  zero point, no groups. An integer zero point ``z`` is carried exactly as a
  row correction ``- sum(x) * (z - offset) * scale`` (the ``offset`` moves an
  unsigned 8-bit grid into ``int8``).
* ``_convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)`` packs an ``int32``
  ``out x in`` tensor of values ``0..15`` (two per byte); then
  ``_weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)``
  computes with ``w = (q - 8) * scale + zero``, ``scales_and_zeros`` being
  ``in/group x out x 2`` (scale, zero) in ``x``'s dtype. The zero is a float
  offset, so any integer zero point ``z`` maps onto it exactly:
  ``zero = (8 + qmin - z) * scale`` with ``q - qmin`` stored. Groups must be
  32, 64, 128 or 256 contiguous input columns, and ``out`` a multiple of 16.
  Grids of 2 or 3 bits fit the same container (their integers are below 16):
  they run at int4 speed, exactly.

Both kernels are fast with bf16 activations (measured on a 2048 x 5632 layer,
one thread, torch 2.14: int8 and int4 about 2.5x faster than the bf16 dense
layer); fp32 activations take a slow path, several times slower than a
dense fp32 layer, so run packed models in bf16 (``model.to(torch.bfloat16)``
before packing: scales follow the weight's dtype). In bf16 the int4 kernel
holds each group's zero offset in bf16 too, which adds a small systematic
error per group for asymmetric grids; symmetric grids have offset 0.

:func:`packing_of` says which container a :class:`~fxcompress.oneshot.WeightGrid`
fits (or why none); :func:`pack_linear` builds the module; :func:`pack_linears`
quantizes (round to nearest) and packs every ``nn.Linear`` of an ordinary
model in place, which keeps a Hugging Face model's ``generate()`` and KV cache.

>>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
>>> pack_linears(model, bits=4, group_size=32)
{'0': 'int4', '2': 'int4'}
>>> model[0]
Int4WeightLinear(in_features=64, out_features=32, bias=True, group_size=32)
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from fxcompress.errors import ConfigError
from fxcompress.oneshot.engine import Layer
from fxcompress.oneshot.grid import WeightGrid
from fxcompress.oneshot.quantize import RTN

__all__ = [
    "INT4_GROUP_SIZES", "Packing", "packing_of", "PackedLinear", "Int8WeightLinear", "Int4WeightLinear",
    "pack_linear", "rtn_grid", "pack_linears", "kernels_available",
]

#: The group sizes ``_weight_int4pack_mm_for_cpu`` accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)
_INT4_ROWS = 16  # the int4 packing works on blocks of 16 output rows
_INNER_K_TILES = 2  # the packing's tile argument; the CPU layout is [out, in / 2] whatever it is


def kernels_available() -> dict[str, bool]:
    """Which packed CPU kernels this torch provides (names as in ``torch.ops.aten``)."""
    names = ("_weight_int8pack_mm", "_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    return {name: hasattr(torch.ops.aten, name) for name in names}


@dataclasses.dataclass(frozen=True)
class Packing:
    """How a grid goes into a kernel: ``kind`` is ``"int8"`` or ``"int4"``; ``reason`` is empty when it fits,
    else why not (then ``kind`` is the container that was tried)."""

    kind: str
    reason: str = ""

    @property
    def fits(self) -> bool:
        return not self.reason


def _contiguous_groups(grid: WeightGrid) -> bool:
    columns = len(grid.group_index)
    expected = torch.arange(columns, device=grid.group_index.device) // grid.group_size
    return torch.equal(grid.group_index.to(expected.dtype), expected)


def packing_of(grid: WeightGrid, shape: tuple[int, int]) -> Packing:
    """The container ``grid`` (of an ``out x in`` weight) packs into, or the reason it does not.

    >>> from fxcompress.oneshot.grid import weight_scheme
    >>> grid = WeightGrid.fit(weight_scheme(4, False), torch.randn(32, 64), 16)
    >>> packing_of(grid, (32, 64)).reason
    'int4 groups of 16 columns (the kernel takes 32, 64, 128 or 256)'
    """
    rows, columns = shape
    if grid.input_scale is not None and grid.input_scale.numel() != columns:
        return Packing("int8", f"an input scale of {grid.input_scale.numel()} values for {columns} inputs")
    if grid.bits <= 4:
        return _int4_packing(grid, rows, columns)
    if grid.scale.shape[1] != 1:
        return Packing("int8", f"{grid.bits}-bit weights in {grid.scale.shape[1]} groups per row (the int8 kernel "
                               "has one scale per output row; quantize with group_size=0)")
    return Packing("int8")


def _int4_packing(grid: WeightGrid, rows: int, columns: int) -> Packing:
    if grid.group_size not in INT4_GROUP_SIZES:
        return Packing("int4", f"int4 groups of {grid.group_size} columns (the kernel takes 32, 64, 128 or 256)")
    if columns % grid.group_size:
        return Packing("int4", f"{columns} inputs, not a multiple of the group size {grid.group_size}")
    if rows % _INT4_ROWS:
        return Packing("int4", f"{rows} outputs, not a multiple of {_INT4_ROWS} (the int4 packing's row block)")
    if not _contiguous_groups(grid):
        return Packing("int4", "groups that are not contiguous columns (GPTQ act-order with static_groups=False)")
    return Packing("int4")


class PackedLinear(nn.Module):
    """What both packed layers share: ``in_features``/``out_features``, an optional ``bias`` and an optional
    ``input_divisor`` (AWQ's per-input scale: the input is divided by it before the kernel)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 input_divisor: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("input_divisor", None if input_divisor is None else input_divisor.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if self.input_divisor is not None:
            flat = flat / self.input_divisor.to(flat.dtype)
        y = self.matmul(flat.contiguous())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8WeightLinear(PackedLinear):
    """``y = x @ ((q - z) * scale).T + bias`` with ``int8`` ``q - offset`` through ``_weight_int8pack_mm``."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, correction: torch.Tensor | None,
                 bias: torch.Tensor | None = None, input_divisor: torch.Tensor | None = None):
        super().__init__(weight_int8.shape[1], weight_int8.shape[0], bias, input_divisor)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("correction", correction)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales.to(x.dtype))
        if self.correction is not None:
            y = y - x.sum(-1, keepdim=True) * self.correction.to(x.dtype)
        return y


class Int4WeightLinear(PackedLinear):
    """``y = x @ W.T + bias``, ``W = (q - 8) * scale + zero`` per group, through ``_weight_int4pack_mm_for_cpu``."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, in_features: int,
                 bias: torch.Tensor | None = None, input_divisor: torch.Tensor | None = None):
        super().__init__(in_features, scales_and_zeros.shape[1], bias, input_divisor)
        self.group_size = group_size
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight_int4, self.group_size,
                                                          self.scales_and_zeros.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def _float_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.is_floating_point() else torch.float32


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None, grid: WeightGrid, where: str) -> PackedLinear:
    """The packed module computing ``F.linear(x, grid.dequantize(grid.integers(weight)), bias)``.

    Scales take ``weight``'s dtype (a bf16 model gets bf16 scales, as its
    activations are); raises :class:`~fxcompress.errors.ConfigError` naming
    ``where`` when the grid does not fit a kernel (see :func:`packing_of`) or the
    weight is not on the CPU.
    """
    if weight.device.type != "cpu":
        raise ConfigError(f"pack-weights: {where} is on {weight.device}; the packed kernels are CPU ones: "
                          "move the model to the CPU first (model.cpu())")
    packing = packing_of(grid, tuple(weight.shape))
    if not packing.fits:
        raise ConfigError(f"pack-weights: {where} cannot be packed: {packing.reason}")
    q = grid.integers(weight)
    dtype = _float_dtype(weight)
    scale = grid.scale.float().to(weight.device)
    zero = grid.zero_point.to(device=weight.device, dtype=torch.float32)
    divisor = None if grid.input_scale is None else grid.input_scale.to(device=weight.device, dtype=dtype)
    if packing.kind == "int4":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q - grid.scheme.qmin).contiguous(),
                                                                    _INNER_K_TILES)
        offsets = (8 + grid.scheme.qmin - zero) * scale  # (q - z) s = (q - qmin - 8) s + (8 + qmin - z) s
        scales_and_zeros = torch.stack([scale.T, offsets.T], dim=-1).to(dtype).contiguous()
        return Int4WeightLinear(packed, scales_and_zeros, grid.group_size, weight.shape[1], bias, divisor)
    offset = 128 if grid.scheme.qmax > 127 else 0
    correction = (zero[:, 0] - offset) * scale[:, 0]
    return Int8WeightLinear((q - offset).to(torch.int8).contiguous(), scale[:, 0].to(dtype),
                            correction.to(dtype) if bool(correction.any()) else None, bias, divisor)


def rtn_grid(weight: torch.Tensor, bits: int, group_size: int) -> WeightGrid:
    """The round-to-nearest grid the on-the-fly packing uses: int8 symmetric with one scale per row (what the
    int8 kernel takes; ``group_size`` is ignored), int4 asymmetric in groups of ``group_size``."""
    if bits not in (4, 8):
        raise ConfigError(f"pack-weights: on-the-fly quantization takes bits=4 or bits=8, got {bits!r}")
    algorithm = RTN(bits=8, group_size=0, symmetric=True) if bits == 8 else RTN(bits=4, group_size=group_size)
    _, grid = algorithm.rounded(Layer("weight", weight.detach().float()))
    return grid


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, name, module)


def pack_linears(model: nn.Module, bits: int, group_size: int = 128, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Quantize (round to nearest, :func:`rtn_grid`) and pack every ``nn.Linear`` of ``model`` in place, except
    paths matching an ``exclude`` glob; return ``{path: "int8" | "int4"}`` of the packed layers.

    For ordinary eager models (a Hugging Face ``LlamaForCausalLM`` keeps
    ``generate()`` and its KV cache); graphs go through the ``pack-weights``
    pass instead. Layers no kernel takes stay in float, named in one warning.
    """
    from fnmatch import fnmatchcase

    packed, skipped = {}, []
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or any(fnmatchcase(path, pattern) for pattern in exclude):
            continue
        grid = rtn_grid(module.weight, bits, min(group_size, module.in_features))
        packing = packing_of(grid, tuple(module.weight.shape))
        if not packing.fits:
            skipped.append(f"{path} ({packing.reason})")
            continue
        _set_module(model, path, pack_linear(module.weight.detach(), module.bias, grid, path))
        packed[path] = packing.kind
    if skipped:
        warnings.warn(f"pack_linears: {len(skipped)} linear layer(s) left in float: {'; '.join(skipped)}",
                      stacklevel=2)
    return packed
