"""ONNX export of float, pruned and quantized ``GraphModule``s, checked against ONNX Runtime.

Quantized modules (after ``fold-qdq``) export as QuantizeLinear/DequantizeLinear
pairs with int8 weight initializers (opset >= 13, per-channel ``axis``), the
form ONNX Runtime fuses into int8 kernels. Every export is validated with
``onnx.checker`` and, with ``check=True``, run in ONNX Runtime on the example
inputs and compared with the ``GraphModule``'s own output.

The exporter is torch's TorchScript-based one (``dynamo=False``): it takes a
``GraphModule`` as is and maps our two custom ops one-to-one, while the
``torch.export``-based exporter needs ``onnxscript``.

With ``model`` and its example input ``x`` (a path, ``to_onnx(gm, x,
"model.onnx")``, also saves the file):

>>> gm = fxcompress.compile(model, x, "insert-masks{pruner=l1,sparsity=0.5},analyze-groups,propagate-channels,shrink")
>>> result = to_onnx(gm, x)
>>> result.max_error <= result.tolerance
True
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings

import numpy as np
import onnx
import torch
from torch import fx

from fxcompress import meta
from fxcompress.errors import ConfigError, VerificationError
from fxcompress.quant.ops import DEQUANTIZE, QUANTIZE, register_onnx_symbolics
from fxcompress.trace import inference_mode, normalize_example_inputs

__all__ = ["to_onnx", "ExportResult", "is_quantized", "onnx_session", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17

#: Tolerance of the ONNX Runtime check, relative to the output's largest magnitude. Float graphs differ
#: by reassociation only; int8 kernels requantize with their own rounding, which may move an output by
#: a step or two of its grid (1/255 of its range each).
FLOAT_RTOL = 1e-4
QUANTIZED_RTOL = 3e-2


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where the model went and how closely ONNX Runtime reproduced it (``nan`` when unchecked)."""

    path: str | None
    model: onnx.ModelProto
    quantized: bool
    max_error: float
    tolerance: float


def is_quantized(gm: fx.GraphModule) -> bool:
    """Whether the graph holds QDQ nodes (it went through ``fold-qdq``)."""
    return any(n.op == "call_function" and n.target in (QUANTIZE, DEQUANTIZE) for n in gm.graph.nodes)


def onnx_session(model: onnx.ModelProto | str, threads: int = 2):
    """An ONNX Runtime CPU session with all graph optimisations (which fuse QDQ groups into int8 kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _export(gm: fx.GraphModule, inputs: tuple, opset: int) -> onnx.ModelProto:
    register_onnx_symbolics()
    buffer = io.BytesIO()
    with inference_mode(gm), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            gm, inputs, buffer, dynamo=False, opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE,  # inference_mode set eval; torch.export graphs refuse .train()
            input_names=[f"input_{i}" for i in range(len(inputs))],
        )
    return onnx.load_from_string(buffer.getvalue())


def _max_error(model: onnx.ModelProto, gm: fx.GraphModule, inputs: tuple) -> float:
    session = onnx_session(model)
    feeds = {i.name: t.detach().numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feeds)
    with inference_mode(gm):
        expected, _ = torch.utils._pytree.tree_flatten(gm(*inputs))
    worst = 0.0
    for a, b in zip(expected, got):
        a = a.detach().numpy()
        scale = float(np.abs(a).max()) or 1.0
        worst = max(worst, float(np.abs(a - b).max()) / scale)
    return worst


def to_onnx(
    gm: fx.GraphModule,
    example_inputs=None,
    path: str | os.PathLike | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    rtol: float | None = None,
) -> ExportResult:
    """Export ``gm`` to ONNX (to ``path`` when given) and check it.

    ``example_inputs`` defaults to the inputs ``gm`` was compiled with. With
    ``check=True`` ONNX Runtime's output must match ``gm``'s within ``rtol``
    of the output's largest magnitude (default :data:`FLOAT_RTOL`, or
    :data:`QUANTIZED_RTOL` for QDQ graphs), else :class:`VerificationError`.
    """
    if opset < 13:
        raise ConfigError(f"to_onnx needs opset >= 13 (per-channel DequantizeLinear), got {opset}")
    if example_inputs is None:
        example_inputs = gm.meta.get(meta.EXAMPLE_INPUTS)
        if example_inputs is None:
            raise ConfigError("to_onnx needs example_inputs for a module that fxcompress did not compile")
    inputs = normalize_example_inputs(example_inputs)
    quantized = is_quantized(gm)
    model = _export(gm, inputs, opset)
    onnx.checker.check_model(model, full_check=True)
    tolerance = rtol if rtol is not None else (QUANTIZED_RTOL if quantized else FLOAT_RTOL)
    error = _max_error(model, gm, inputs) if check else float("nan")
    if check and not error <= tolerance:
        raise VerificationError(
            f"ONNX Runtime's output differs from the GraphModule's by {error:.2e} of its scale "
            f"(tolerance {tolerance:.0e}); please report this with the model"
        )
    if path is not None:
        onnx.save(model, os.fspath(path))
    return ExportResult(None if path is None else os.fspath(path), model, quantized, error, tolerance)
