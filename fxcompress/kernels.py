"""Linear layers whose weights are stored packed in int8 or int4 and multiplied by packed CPU kernels.

Why: decoding one token at batch 1 reads every weight once and does two flops
per weight read, so its speed is set by how many bytes of weight cross the
memory bus. A one-shot quantized model that keeps its dequantized weights in
float32 (as :mod:`fxcompress.oneshot` leaves it, so that it stays trainable
and maskable) is no faster than the dense one; these modules store the grid
integers themselves (1 byte or half a byte per weight) and let the kernel
dequantize on the fly.

The kernels (CPU):

* ``native`` (:class:`Int8WeightLinear`'s default where it can run) is
  fxcompress's own int8 matrix-vector kernel (:func:`fxcompress.native.gemv_int8`,
  C with AVX-512 VNNI, built on first use with the system C compiler). It
  writes each activation row as two (bf16) or three (fp32) bytes of fixed
  point, multiplies them by the int8 weight exactly with ``vpdpbusd`` and
  holds the weight on huge pages; it serves up to four rows (decoding), and
  more rows (a prompt) go to ``_weight_int8pack_mm``'s GEMM on the same matrix.
* ``torch.ops.onednn.qlinear_pointwise`` (``"onednn"``) is oneDNN's int8 GEMM, the one Inductor lowers int8
  models to. It takes only int8 activations, so the layer keeps weight-only
  numerics by writing each activation row as int8 *digits*
  (:func:`split_int8`): with ``step = max|row| / 127``, ``row = step * (d0 +
  d1 / 254 + d2 / 254**2 ...)``, every digit in ``[-127, 127]``. Each digit
  row goes through the GEMM as one more row and the float results are summed
  back with their weights. Two digits carry about 15 bits per element, more
  than the bf16 activations ``_weight_int8pack_mm`` runs on (bf16 and fp16
  inputs get two); fp32 inputs get a third, which keeps outputs to float32
  rounding, as ``pack-weights`` promises. The weight is held once, prepacked
  by ``onednn.qlinear_prepack`` into an opaque tensor, and read back to int8
  for ``state_dict``, pickling and copies. It runs where torch has oneDNN
  and the CPU has AVX-512 VNNI: without VNNI, oneDNN's int8 products may
  saturate in 16 bits.
* ``aten._weight_int8pack_mm(x, q, scales)`` is ``x @ (q * scales[:, None]).T``
  for an ``int8`` ``q`` (``out x in``) and one scale per output row: symmetric,
  no zero point, no groups. An integer zero point ``z`` is carried exactly (by
  either int8 kernel) as a row correction ``- sum(x) * (z - offset) * scale``
  (the ``offset`` moves an unsigned 8-bit grid into ``int8``).
* ``aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)`` packs an ``int32``
  ``out x in`` tensor of values ``0..15`` (two per byte); then
  ``_weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)``
  computes with ``w = (q - 8) * scale + zero``, ``scales_and_zeros`` being
  ``in/group x out x 2`` (scale, zero) in ``x``'s dtype. The zero is a float
  offset, so any integer zero point ``z`` maps onto it exactly:
  ``zero = (8 + qmin - z) * scale`` with ``q - qmin`` stored. Groups must be
  32, 64, 128 or 256 contiguous input columns, and ``out`` a multiple of 16.
  Grids of 2 or 3 bits fit the same container (their integers are below 16):
  they run at int4 speed, exactly.
* ``native`` int4 (:class:`Int4NativeLinear`, the default where it can run:
  inputs a multiple of 128, groups of 64, 128 or 256) is fxcompress's own
  (:func:`fxcompress.native.gemv_int4`): the codes ``q - qmin`` two per byte
  in its own layout, each weight ``q * scale + bias`` per group, multiplied
  as the native int8 kernel does, with signed activation digits. Up to four
  rows; more rows dequantize the weight in torch, 1024 output rows at a time,
  and call ``F.linear``.

Speed: ``python tools/bench_kernels.py`` times each kernel's module on 24
cycled 5632 x 2048 layers (too many for the caches) at one activation row.
On an AVX-512 VNNI Xeon, 2 threads, torch 2.14: fp32 ``F.linear`` streams
its weights at 29 GB/s, the native int8 layer at 20 GB/s (2.8x fp32), the
oneDNN int8 layer at 14 GB/s (1.9x, the activation split included), the
``_weight_int8pack_mm`` layer at 13.5 GB/s (1.85x); the native int4 layer
its half-byte weights at 16 GB/s (4.3x), ``_weight_int4pack_mm_for_cpu`` at
12 GB/s (3.2x). Decoding is memory bound, so the digit rows cost little. Against the exact
dequantized layer the oneDNN layer is within float32 rounding for fp32 input
(three digits) and finer than bf16 for bf16 input (two), as the tests check. The oneDNN kernel is
fast with fp32 or bf16 activations; ``_weight_int8pack_mm`` and the int4
kernel only with bf16 (fp32 activations take a slow path there, several times
slower than a dense fp32 layer), so run those in bf16 (``model.to(torch.bfloat16)``
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

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from fxcompress import native
from fxcompress.errors import ConfigError
from fxcompress.oneshot.engine import Layer
from fxcompress.oneshot.grid import WeightGrid
from fxcompress.oneshot.quantize import RTN

__all__ = [
    "INT4_GROUP_SIZES", "Packing", "packing_of", "PackedLinear", "Int8WeightLinear", "Int4WeightLinear",
    "pack_linear", "rtn_grid", "pack_linears", "kernels_available", "INT8_KERNELS", "split_int8",
    "portable_kernels", "INT4_KERNELS", "Int4NativeLinear",
]

#: The group sizes ``_weight_int4pack_mm_for_cpu`` accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)
_INT4_ROWS = 16  # the int4 packing works on blocks of 16 output rows
_INNER_K_TILES = 2  # the packing's tile argument; the CPU layout is [out, in / 2] whatever it is
#: :class:`Int8WeightLinear`'s kernels, in the default's order of preference: fxcompress's own VNNI matrix-vector
#: kernel for decode rows, oneDNN's int8 GEMM on activations split into int8 digits, ``aten._weight_int8pack_mm``
#: (see the module docstring).
INT8_KERNELS = ("native", "onednn", "int8pack")
#: The int4 layers' kernels, in the default's order of preference: fxcompress's own VNNI matrix-vector kernel
#: (:class:`Int4NativeLinear`) and ``aten._weight_int4pack_mm_for_cpu`` (:class:`Int4WeightLinear`).
INT4_KERNELS = ("native", "int4pack")
_NATIVE_ROWS = 4  # the native kernels stream the weight once per row: more rows (a prompt) go to a GEMM
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)
_DEQUANTIZED_ROWS = 1024  # output rows an int4 layer dequantizes at a time for a prompt
_DIGIT_BASE = 254  # each digit counts 1/254 of the one before: a remainder in [-1/2, 1/2] becomes [-127, 127]
_LARGEST_PRODUCT = 127 * 128  # |digit x weight|: oneDNN sums in int32, so in_features * this must stay below 2**31


def kernels_available() -> dict[str, bool]:
    """Which packed CPU kernels this torch provides (names as in ``torch.ops.aten``)."""
    names = ("_weight_int8pack_mm", "_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    return {name: hasattr(torch.ops.aten, name) for name in names}


@functools.cache
def _onednn_missing() -> str:
    """Why oneDNN's int8 GEMM cannot serve :class:`Int8WeightLinear` in this process, or ``""`` when it can."""
    if not hasattr(torch.ops.onednn, "qlinear_prepack") or not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN int8 linear (torch.ops.onednn.qlinear_prepack)"
    if not getattr(torch.cpu, "_is_vnni_supported", lambda: False)():  # torch's own CPU feature query
        return "this CPU has no AVX-512 VNNI (without it, oneDNN's int8 products may saturate in 16 bits)"
    return ""


def _int8_kernel_missing(kernel: str, in_features: int) -> str:
    """Why ``kernel`` cannot run a layer of ``in_features`` inputs in this process, or ``""`` when it can."""
    if kernel == "int8pack":
        return ""
    missing = native.gemv_missing() if kernel == "native" else _onednn_missing()
    largest = native.GEMV_MAX_INPUTS if kernel == "native" else (2**31 - 1) // _LARGEST_PRODUCT
    if not missing and in_features > largest:
        missing = f"{in_features} inputs could overflow its int32 sums (at most {largest})"
    return missing


def _int4_kernel_missing(kernel: str, in_features: int, group_size: int) -> str:
    """Why ``kernel`` cannot run an int4 layer of ``in_features`` inputs in groups of ``group_size`` here, or ``""``."""
    if kernel == "int4pack":
        return ""
    chunk = native.INT4_CHUNK
    if in_features % chunk or group_size % (chunk // 2):
        return f"it takes inputs in multiples of {chunk} and groups in multiples of {chunk // 2}"
    return native.gemv_missing()


def _chosen_kernel(kernel: str | None, kernels: tuple[str, ...], missing, what: str) -> str:
    """``kernel`` once ``missing(kernel)`` says it runs here (else a ConfigError), or for None the first of
    ``kernels`` that runs."""
    if kernel is not None and kernel not in kernels:
        raise ConfigError(f"{what}: kernel must be one of {', '.join(kernels)} or None, got {kernel!r}")
    if kernel is None:
        return next(k for k in kernels if not missing(k))
    why = missing(kernel)
    if why:
        raise ConfigError(f"{what}: the {kernel} kernel cannot run here: {why}")
    return kernel


def _int8_kernel(kernel: str | None, in_features: int) -> str:
    """``kernel`` once checked to run here, or for None the default: the first of :data:`INT8_KERNELS` that
    runs here."""
    return _chosen_kernel(kernel, INT8_KERNELS, lambda k: _int8_kernel_missing(k, in_features), "Int8WeightLinear")


def split_int8(x: torch.Tensor, digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` (``M x K``) as ``digits`` rows of int8 digits: ``(digits * M x K`` int8, digit ``i``'s
    rows at ``i * M``; ``M x 1`` float32 ``step``) with ``x = step * sum_i d_i / 254**i`` to within
    ``step / (2 * 254**(digits - 1))`` per element, plus float32's rounding of ``x``.

    Why: oneDNN's int8 GEMM takes int8 activations only; summing its results over the digits (one more GEMM
    row each, free while decoding is memory bound) gives the float activations' product to that precision.
    ``step`` is the row's largest magnitude over 127 (in float32), so the first digit is the row on a
    symmetric int8 grid and each later one the previous one's rounding error, 254 times finer.

    >>> q, step = split_int8(torch.tensor([[1.0, -0.3]]), 2)
    >>> q.tolist(), round(float(step) * 127, 6)
    ([[127, -38], [0, -25]], 1.0)
    """
    x = x.float()
    largest = torch.linalg.vector_norm(x, float("inf"), -1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
    rest = x / largest * 127  # (dividing first: 127 / a tiny largest would overflow)
    parts = [rest.round()]
    for _ in range(digits - 1):
        rest = (rest - parts[-1]) * _DIGIT_BASE
        parts.append(rest.round())
    return torch.cat(parts).to(torch.int8), largest / 127


def _digits(dtype: torch.dtype) -> int:
    """Digits per activation for the digit-splitting kernels: three for float32 inputs (outputs to float32
    rounding), two for bf16 and fp16 (finer than they are)."""
    return 3 if torch.finfo(dtype).bits >= 32 else 2


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scales[:, None]).T`` in float32 for oneDNN's prepacked ``q``, through :func:`split_int8`:
    three digits for float32 ``x`` (outputs to float32 rounding), two for bf16 and fp16 (finer than they are)."""
    digits = _digits(x.dtype)  # (never one: a single row runs ~70x slower in oneDNN)
    q, step = split_int8(x, digits)
    zero_points = torch.zeros(len(scales), dtype=torch.long)
    y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, packed, scales.float(), zero_points, None, 1.0, 0,
                                           torch.float32, "none", [], "").view(digits, len(x), len(scales))
    total = y[-1]
    for i in reversed(range(digits - 1)):  # Horner: d0 + (d1 + d2 / 254) / 254
        total = torch.add(y[i], total, alpha=1 / _DIGIT_BASE)
    return total * step


def _int8pack_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``aten._weight_int8pack_mm``. bf16 rows whose width is not a multiple of 16 go in float32: there torch
    2.14's bf16 kernel crashes (widths such as 100 or 255) or returns wrong sums (8, 24)."""
    if x.dtype == torch.bfloat16 and x.shape[-1] % 16:
        x = x.float()
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales.to(x.dtype))


def _native_linear(x: torch.Tensor, weight: torch.Tensor, row_sums: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T`` by :func:`fxcompress.native.gemv_int8`, with :func:`_digits`' digits."""
    return native.gemv_int8(x, weight, row_sums, scales, _digits(x.dtype))


_CPU_SPECIFIC = ("native", "onednn")  # kernels an exported program must not hold


class _InferenceOnly(torch.autograd.Function):
    """A digit-splitting kernel ``run(x, *weights)`` whose backward raises as ``_weight_int8pack_mm``'s does.
    Left to autograd, the digits would carry no gradient and a wrong one would flow through ``step`` alone (or,
    for the native kernel, none at all)."""

    @staticmethod
    def forward(run, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return run(x, *weights)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("Int8WeightLinear has no backward (its kernels are for inference): train the float "
                           "model, then pack it")


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


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, skipped when it is one already (a no-op ``to`` costs about 1 us, and a decode step
    calls a packed layer per linear layer)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


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
            y = y + _as(self.bias, y.dtype)
        return y.reshape(*lead, self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _digit_kernel(run, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        """``run(x, *weights)``, through :class:`_InferenceOnly` where autograd records (its ``apply`` costs about
        10 us a call: only where needed)."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _InferenceOnly.apply(run, x, *weights)
        return run(x, *weights)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8WeightLinear(PackedLinear):
    """``y = x @ ((q - z) * scale).T + bias`` with ``int8`` ``q - offset`` (``out x in``), through ``kernel``:
    one of :data:`INT8_KERNELS` (see the module docstring); None, the default, picks the first that runs here.

    The weight is held once, as ``weight_packed`` in the form the kernel reads (oneDNN's prepacked, opaque
    tensor, or the int8 matrix itself; the native kernel also keeps each row's int32 total, ``row_sums``).
    ``weight_int8`` reads it back as the ``out x in`` int8 matrix; that
    is what ``state_dict``, pickling and ``copy.deepcopy`` carry (an opaque tensor has no storage to save or
    copy), packed again when loaded. Inference only: the backward raises.
    """

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, correction: torch.Tensor | None,
                 bias: torch.Tensor | None = None, input_divisor: torch.Tensor | None = None,
                 kernel: str | None = None):
        super().__init__(weight_int8.shape[1], weight_int8.shape[0], bias, input_divisor)
        self.register_buffer("scales", scales)
        self.register_buffer("correction", correction)
        self._hold(weight_int8, _int8_kernel(kernel, self.in_features))

    @property
    def weight_int8(self) -> torch.Tensor:
        """The ``out x in`` int8 weight (for the oneDNN kernel, a copy read out of the prepacked one)."""
        return self.weight_packed.to_dense().t() if self.kernel == "onednn" else self.weight_packed

    def _hold(self, weight_int8: torch.Tensor, kernel: str) -> None:
        self.kernel = kernel
        held = native.huge_page_copy(weight_int8) if kernel == "native" else weight_int8.contiguous()
        if kernel == "onednn":
            # the layout for the (at least) two digit rows a decode step sends
            held = torch.ops.onednn.qlinear_prepack(held, [2, self.in_features])
        self.register_buffer("weight_packed", held, persistent=False)
        self.register_buffer("row_sums", held.sum(1, dtype=torch.int32) if kernel == "native" else None,
                             persistent=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "onednn":
            y = self._digit_kernel(_onednn_linear, x, self.weight_packed, self.scales)
        elif self.kernel == "native" and len(x) <= _NATIVE_ROWS and x.dtype in _NATIVE_DTYPES:
            y = self._digit_kernel(_native_linear, x, self.weight_packed, self.row_sums, _as(self.scales, x.dtype))
        else:
            y = _int8pack_linear(x, self.weight_packed, self.scales)
        if self.correction is not None:
            y = y - x.sum(-1, keepdim=True, dtype=y.dtype) * self.correction.to(y.dtype)
        return _as(y, x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_int8"] = self.weight_int8

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "weight_int8"
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        if key in unexpected_keys:  # not a buffer of this module's: the base class took it for a stranger
            unexpected_keys.remove(key)
        weight = state_dict[key]
        if weight.dtype != torch.int8 or tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: copying a {weight.dtype} {tuple(weight.shape)}, the "
                              f"module holds torch.int8 {(self.out_features, self.in_features)}")
            return
        self._hold(weight, self.kernel)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_buffers"] = {**self._buffers, "weight_packed": self.weight_int8}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # a module pickled where its kernel ran, loaded where it cannot, takes this machine's default kernel
        kernel = None if _int8_kernel_missing(self.kernel, self.in_features) else self.kernel
        self._hold(self.weight_packed, _int8_kernel(kernel, self.in_features))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel}"


@contextlib.contextmanager
def portable_kernels(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s native and oneDNN int8 layers on ``_weight_int8pack_mm`` inside the block (then switch
    them back).

    oneDNN's prepacked weight is an opaque tensor that ``torch.export``'s
    serializer cannot write, and the native kernels are C calls that
    ``torch.export`` cannot trace; ``_weight_int8pack_mm`` is an ordinary aten
    op on the plain int8 matrix, with the same weights and scales (outputs
    agree to float32 rounding), and the native int4 layers dequantize their
    weight with ordinary ops. :func:`fxcompress.save` exports inside this block.
    """
    modules = model.modules() if isinstance(model, nn.Module) else ()  # (an ExportedProgram has none)
    modules = list(modules)
    switched = {m: m.kernel for m in modules if isinstance(m, Int8WeightLinear) and m.kernel in _CPU_SPECIFIC}
    dequantizing = [m for m in modules if isinstance(m, Int4NativeLinear) and m.kernel == "native"]
    for module in switched:
        module._hold(module.weight_int8, "int8pack")
    for module in dequantizing:
        module.kernel = "dequantize"
    try:
        yield
    finally:
        for module, kernel in switched.items():
            module._hold(module.weight_packed, kernel)
        for module in dequantizing:
            module.kernel = "native"


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


class Int4NativeLinear(PackedLinear):
    """``y = x @ W.T + bias``, ``W = q * scales + biases`` per group of ``group_size`` columns (``q`` in 0..15),
    through :func:`fxcompress.native.gemv_int4` for up to four rows (decoding). More rows (a prompt), and a
    process where the native kernel cannot run, dequantize ``W`` with ordinary torch ops and call ``F.linear``
    (``kernel`` is then ``"dequantize"`` in effect; :func:`portable_kernels` sets it for export).

    ``weight_codes`` holds ``q`` in the kernel's layout (:func:`fxcompress.native.int4_codes`: half a byte per
    weight, on huge pages); ``scales`` and ``biases`` are ``out x in / group_size`` in the model's dtype.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group_size: int,
                 in_features: int, bias: torch.Tensor | None = None, input_divisor: torch.Tensor | None = None):
        super().__init__(in_features, scales.shape[0], bias, input_divisor)
        self.group_size = group_size
        self.kernel = "native"
        self.register_buffer("weight_codes", native.huge_page_copy(codes))
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("biases", biases.contiguous())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if (self.kernel == "native" and len(x) <= _NATIVE_ROWS and x.dtype in _NATIVE_DTYPES
                and not native.gemv_missing()):
            return self._digit_kernel(_native_int4_linear, x, self.weight_codes, _as(self.scales, x.dtype),
                                      _as(self.biases, x.dtype), self.group_size)
        # a block of output rows at a time: the whole dequantized weight (lm_head's: 130 MB in bf16) never exists
        blocks = range(0, self.out_features, _DEQUANTIZED_ROWS)
        return torch.cat([torch.nn.functional.linear(x, self.dequantized(x.dtype, slice(start, start + _DEQUANTIZED_ROWS)))
                          for start in blocks], dim=-1)

    def dequantized(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """Rows ``rows`` of ``W`` (``out x in``) in ``dtype``."""
        codes = self.weight_codes[rows]
        chunks = codes.view(len(codes), -1, 1, native.INT4_CHUNK // 2)
        q = torch.cat([chunks & 15, chunks >> 4], 2).view(len(codes), -1, self.group_size).to(dtype)
        return q.mul_(_as(self.scales[rows], dtype)[..., None]).add_(_as(self.biases[rows], dtype)[..., None]).view(
            len(codes), -1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, kernel={self.kernel}"


def _native_int4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """:func:`fxcompress.native.gemv_int4` with :func:`_digits`' digits."""
    return native.gemv_int4(x, codes, scales, biases, group_size, _digits(x.dtype))


def _float_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.is_floating_point() else torch.float32


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None, grid: WeightGrid, where: str, *,
                int8_kernel: str | None = None, int4_kernel: str | None = None) -> PackedLinear:
    """The packed module computing ``F.linear(x, grid.dequantize(grid.integers(weight)), bias)``.

    Scales take ``weight``'s dtype (a bf16 model gets bf16 scales, as its
    activations are); ``int8_kernel`` is :class:`Int8WeightLinear`'s ``kernel``
    and ``int4_kernel`` one of :data:`INT4_KERNELS` (None: the first that runs
    here for this layer). Raises :class:`~fxcompress.errors.ConfigError` naming
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
        kernel = _chosen_kernel(int4_kernel, INT4_KERNELS,
                                lambda k: _int4_kernel_missing(k, weight.shape[1], grid.group_size), "int4 layer")
        if kernel == "native":  # (q - z) s = (q - qmin) s + (qmin - z) s
            return Int4NativeLinear(native.int4_codes(q - grid.scheme.qmin), scale.to(dtype),
                                    ((grid.scheme.qmin - zero) * scale).to(dtype), grid.group_size, weight.shape[1],
                                    bias, divisor)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q - grid.scheme.qmin).contiguous(),
                                                                    _INNER_K_TILES)
        offsets = (8 + grid.scheme.qmin - zero) * scale  # (q - z) s = (q - qmin - 8) s + (8 + qmin - z) s
        scales_and_zeros = torch.stack([scale.T, offsets.T], dim=-1).to(dtype).contiguous()
        return Int4WeightLinear(packed, scales_and_zeros, grid.group_size, weight.shape[1], bias, divisor)
    offset = 128 if grid.scheme.qmax > 127 else 0
    correction = (zero[:, 0] - offset) * scale[:, 0]
    return Int8WeightLinear((q - offset).to(torch.int8).contiguous(), scale[:, 0].to(dtype),
                            correction.to(dtype) if bool(correction.any()) else None, bias, divisor, int8_kernel)


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


def pack_linears(model: nn.Module, bits: int, group_size: int = 128, exclude: tuple[str, ...] = (),
                 int8_kernel: str | None = None, int4_kernel: str | None = None) -> dict[str, str]:
    """Quantize (round to nearest, :func:`rtn_grid`) and pack every ``nn.Linear`` of ``model`` in place, except
    paths matching an ``exclude`` glob; return ``{path: "int8" | "int4"}`` of the packed layers. ``int8_kernel``
    and ``int4_kernel`` force the kernels (None: the defaults; see :func:`pack_linear`).

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
        _set_module(model, path, pack_linear(module.weight.detach(), module.bias, grid, path, int8_kernel=int8_kernel,
                                             int4_kernel=int4_kernel))
        packed[path] = packing.kind
    if skipped:
        warnings.warn(f"pack_linears: {len(skipped)} linear layer(s) left in float: {'; '.join(skipped)}",
                      stacklevel=2)
    return packed
