"""ONNX export through ``torch.export`` (``torch.onnx.export(..., dynamo=True)``, onnxscript).

:func:`fxcompress.export.to_onnx` prepares one flat module (tensor inputs,
a flat tuple of tensor outputs) and checks whatever ONNX model comes out; this
module is the exporter that writes it the way PyTorch's current ONNX
exporter does, with fxcompress's own ops translated by
:data:`translation_table`: ``quantize``/``dequantize`` into
``QuantizeLinear``/``DequantizeLinear`` (the QDQ placement ONNX Runtime
fuses into int8 kernels) and ``matmul_nbits`` into ``com.microsoft``
``MatMulNBits``.

Dynamic axes become ``torch.export`` dimensions, one per label shared by every
input that carries it. ``torch.export`` specialises a dimension that is 1 in
the example (it cannot tell such a size from a broadcast), so the module is
traced at inputs resized to 2 along every dynamic axis of size 1.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence

import onnx
import torch
from torch import fx

from fxcompress.quant.ops import DEQUANTIZE, QUANTIZE
from fxcompress.trace import inference_mode, resized_inputs

__all__ = ["export_dynamo", "translation_table", "available"]


def available() -> bool:
    """Whether onnxscript, which the exporter needs, is installed."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def translation_table() -> dict:
    """fxcompress's ops -> onnxscript functions writing their ONNX form."""
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    _register_matmul_nbits_schema()
    microsoft = Opset("com.microsoft", 1)

    def quantize(x, scale, zero_point):
        return op.QuantizeLinear(x, scale, zero_point)

    def dequantize(q, scale, zero_point, axis: int):
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    def matmul_nbits(x, packed, scales, zero_points, bias, input_divisor, k: int, n: int, bits: int,
                     block_size: int):
        if input_divisor is not None:
            x = op.Div(x, input_divisor)
        inputs = [x, packed, scales] + ([] if zero_points is None else [zero_points])
        y = microsoft.MatMulNBits(*inputs, K=k, N=n, bits=bits, block_size=block_size)
        return y if bias is None else op.Add(y, bias)

    # registered by fxcompress.export, the only caller of this module
    return {QUANTIZE: quantize, DEQUANTIZE: dequantize, torch.ops.fxcompress.matmul_nbits.default: matmul_nbits}


def _core_export():
    """The exporter behind ``torch.onnx.export(dynamo=True)`` when it takes a ready registry, else None.

    ``torch.onnx.export`` builds the registry of every torchlib translation anew on each call, about 0.8 s,
    often more than the rest of a small model's export; building it once per opset (:func:`_registry`) keeps
    ``to_onnx`` quick. Where this internal entry point differs, the public one is used."""
    try:
        from torch.onnx._internal.exporter import _core, _registration  # noqa: F401
    except ImportError:
        return None
    parameters = inspect.signature(_core.export).parameters
    wanted = ("registry", "dynamic_shapes", "input_names", "output_names", "opset_version", "report", "verbose")
    return _core.export if all(name in parameters for name in wanted) else None


@functools.cache
def _registry(opset: int):
    """torchlib's translations for ``opset`` plus fxcompress's (:func:`translation_table`), built once."""
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
    for target, function in translation_table().items():
        registry.register_op(target, function, is_complex=False)
    return registry


def _register_matmul_nbits_schema() -> None:
    """Tell ONNX the signature of ONNX Runtime's contrib op ``com.microsoft::MatMulNBits`` (the inputs and
    attributes fxcompress writes), which onnxscript needs to build a call; once per process, and only where
    nothing registered it before."""
    if onnx.defs.has("MatMulNBits", domain="com.microsoft"):
        return
    schema = onnx.defs.OpSchema
    param, optional = schema.FormalParameter, schema.FormalParameterOption.Optional
    onnx.defs.register_schema(schema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                param("zero_points", "T3", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], "activations and scales"), ("T2", ["tensor(uint8)"], "packed"),
                          ("T3", ["tensor(uint8)", "tensor(float)"], "zero points")],
        attributes=[schema.Attribute(name, schema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size")],
    ))


def _dynamic_shapes(names: Sequence[str], axes: dict[str, dict[int, str]]) -> tuple:
    dims: dict[str, torch.export.Dim] = {}
    return tuple({axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes.get(name, {}).items()}
                 or None for name in names)


def _traceable_inputs(tensors: Sequence[torch.Tensor], names: Sequence[str], axes) -> tuple[torch.Tensor, ...]:
    """``tensors`` resized to 2 along each dynamic axis where they are 1 (see the module docstring)."""
    dims = [axes.get(name, {}) for name in names]
    sizes = {label: 2 for t, found in zip(tensors, dims) for d, label in found.items() if t.shape[d] == 1}
    return tuple(resized_inputs(tuple(tensors), sizes, dims)) if sizes else tuple(tensors)


def export_dynamo(flat: fx.GraphModule, tensors: Sequence[torch.Tensor], opset: int, input_names: Sequence[str],
                  output_names: Sequence[str], axes: dict[str, dict[int, str]]) -> onnx.ModelProto:
    """``flat`` as an ONNX model of ``opset`` (at least 18, the exporter's own) by ``torch.onnx.export(...,
    dynamo=True)``, inputs and outputs named, ``axes`` dynamic."""
    options = dict(input_names=list(input_names), output_names=list(output_names), opset_version=opset,
                   dynamic_shapes=_dynamic_shapes(input_names, axes) if axes else None, verbose=False, report=False)
    inputs = _traceable_inputs(tensors, input_names, axes)
    with inference_mode(flat), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on opset conversion and draft export
        core = _core_export()
        if core is not None:
            program = core(flat, inputs, registry=_registry(opset), **options)
        else:
            program = torch.onnx.export(flat, inputs, dynamo=True, custom_translation_table=translation_table(),
                                        **options)
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)
    return model
