"""PyTorch-native int8: the PT2E graph form and the oneDNN kernels Inductor lowers it to on x86 CPUs.

``fold-qdq{form=pt2e}`` writes a folded model with the ops PT2E's
``convert_pt2e`` leaves behind (``torch.ops.quantized_decomposed``):
``quantize_per_tensor``/``dequantize_per_tensor`` pairs with literal scale and
zero point on activations, ``dequantize_per_channel`` on int8 weights, float
biases. Inductor's x86 freezing passes (shipped by torchao since torch 2.6:
``torchao.quantization.pt2e.inductor_passes.x86``) match

    dequantize_per_tensor(x_u8) -> conv1d/conv2d <- dequantize_per_channel(w_s8)
    dequantize_per_tensor(x_u8) -> linear        <- dequantize_per_channel(w_s8)

and replace each by one ``onednn.qconv_pointwise`` / ``onednn.qlinear_pointwise``
call, folding a following ReLU, residual add and output ``quantize`` into it
where the pattern allows; pointwise ``dq -> op -> q`` chains become fused
uint8 loops. Everything else runs in float on dequantized values.

:func:`compile` registers those passes and calls ``torch.compile``, running
the result frozen under ``torch.no_grad`` (the passes run on frozen graphs only);
:func:`int8_kernels` counts the int8 kernels in Inductor's generated code.
"""

from __future__ import annotations

import collections
import functools
import re
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils import _pytree as pytree

from fxcompress.errors import ConfigError, VerificationError

__all__ = [
    "decomposed_ops", "register_x86_lowerings", "compile", "relative_error", "int8_kernels", "why_not_lowered",
    "KERNELS", "LAYERS",
]

#: The oneDNN int8 ops Inductor's generated code calls, by short name.
KERNELS = ("qconv", "qlinear")

_KERNEL_CALL = re.compile(r"torch\.ops\.onednn\.(qconv\w*|qlinear\w*)\.")


@functools.cache
def decomposed_ops():
    """The ``torch.ops.quantized_decomposed`` namespace, its ops registered (PT2E's quantize/dequantize)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)
    return torch.ops.quantized_decomposed


@functools.cache
def register_x86_lowerings() -> None:
    """Register Inductor's x86 int8 freezing passes (weight prepack, post-op fusion); idempotent."""
    decomposed_ops()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.pt2e.inductor_passes.x86 import _register_quantization_weight_pack_pass
    except ImportError as error:
        raise ConfigError(
            "int8 torch.compile needs Inductor's x86 quantization passes, which torch >= 2.6 ships in torchao "
            f"(pip install torchao): {error}"
        ) from error
    _register_quantization_weight_pack_pass()


def compile(model: torch.nn.Module, example_inputs=None, rtol: float | None = None, **options) -> Callable:  # noqa: A001
    """``torch.compile(model)`` with Inductor's int8 lowerings registered, run frozen under ``torch.no_grad()``.

    Dynamo reads ``torch._inductor.config.freezing`` while it traces (it then
    keeps parameters and buffers as constants the int8 passes can prepack), so
    the returned function sets it around each call rather than passing it in
    ``torch.compile``'s options. ``options`` are further Inductor config entries.

    Tensor arguments reach the compiled code as copies: Inductor fuses a
    residual ``add`` into oneDNN's int8 linear as a ``sum`` post-op that
    accumulates into the other operand's buffer in place, and when that operand
    is a graph input (a block whose input feeds its residual), torch 2.14 writes
    the result into the caller's tensor.

    With ``example_inputs`` (a tensor or a tuple), the model is compiled at once
    and its outputs compared with ``model``'s, each on its own scale:
    :class:`~fxcompress.errors.VerificationError` beyond ``rtol`` (default
    :data:`fxcompress.export.QUANTIZED_RTOL`, as ``to_onnx`` checks ONNX
    Runtime); the error is the returned function's ``max_error``.
    """
    register_x86_lowerings()
    compiled = torch.compile(model, options=options or None)

    @functools.wraps(model.forward)
    def run(*args, **kwargs):
        args, kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, (args, kwargs))
        with torch._inductor.config.patch(freezing=True), torch.no_grad():
            return compiled(*args, **kwargs)

    run.max_error = None
    if example_inputs is not None:
        run.max_error = _verify(run, model, example_inputs, rtol)
    return run


def relative_error(got, expected) -> float:
    """The largest ``max|got - expected| / max|expected|`` over the output leaves (``inf`` if shapes differ)."""
    worst = 0.0
    for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected), strict=True):
        if not isinstance(b, torch.Tensor) or not b.is_floating_point():
            continue
        if a.shape != b.shape:
            return float("inf")
        if b.numel():
            worst = max(worst, float((a.float() - b.float()).abs().max() / (b.abs().max().float() or 1.0)))
    return worst


def _verify(run: Callable, model: torch.nn.Module, example_inputs, rtol: float | None) -> float:
    from fxcompress.export import QUANTIZED_RTOL

    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    tolerance = QUANTIZED_RTOL if rtol is None else rtol
    with torch.no_grad():
        expected = model(*inputs)
    error = relative_error(run(*inputs), expected)
    if not error <= tolerance:
        raise VerificationError(f"torch.compile's output differs from the model's by {error:.2e} of its scale "
                                f"(tolerance {tolerance:.0e}); please report this with the model")
    return error


def int8_kernels(code: str | list[str]) -> collections.Counter:
    """How many calls of each oneDNN int8 kernel (``qconv``, ``qlinear``) Inductor's generated ``code`` makes.

    >>> int8_kernels("buf1 = torch.ops.onednn.qconv_pointwise.default(arg0, 0.1)")
    Counter({'qconv': 1})
    """
    text = "\n".join(code) if isinstance(code, list) else code
    counts: collections.Counter = collections.Counter()
    for match in _KERNEL_CALL.finditer(text):
        counts[next(k for k in KERNELS if match.group(1).startswith(k))] += 1
    return counts


#: The functional layers ``fold-qdq`` writes.
LAYERS = (F.conv1d, F.conv2d, F.conv3d, F.linear)

#: Layers whose int8 pattern Inductor (torch 2.14, torchao 0.18) lowers wrongly or not at all, and why.
_NO_INT8_KERNEL = {
    F.conv3d: "Inductor has no int8 conv3d kernel",
    F.conv1d: "Inductor's int8 conv1d gives wrong output shapes when a reshape follows",
}


def why_not_lowered(node: fx.Node) -> str | None:
    """Why Inductor's x86 passes would not turn this PT2E-form layer into a correct oneDNN int8 kernel (None: they do).

    ``node`` calls one of :data:`LAYERS` on ``dequantize_per_channel`` weights.
    Each reason was seen with the installed torch: int8 activations match the
    patterns and then fail in oneDNN (it takes uint8), nonzero weight zero
    points are matched and then ignored (wrong outputs).
    """
    ops = decomposed_ops()
    source, weight = node.args[0], node.args[1]
    if node.target in _NO_INT8_KERNEL:
        return _NO_INT8_KERNEL[node.target]
    if not (isinstance(source, fx.Node) and source.target is ops.dequantize_per_tensor.default):
        return "its input is not quantized (no dequantize_per_tensor before it)"
    if source.args[5] is not torch.uint8:
        return f"its input is {source.args[5]}; oneDNN's int8 kernels take uint8 activations"
    zero_points = weight.args[2]
    owner = node.graph.owning_module
    if isinstance(zero_points, fx.Node) and zero_points.op == "get_attr" and owner is not None:
        if owner.get_buffer(zero_points.target).any():
            return "its weight zero points are not all 0 (oneDNN ignores them)"
    return None
