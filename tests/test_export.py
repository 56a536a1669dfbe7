"""ONNX export: float, pruned and quantized modules pass onnx.checker and match ONNX Runtime."""

import onnx
import pytest
import torch

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.export import onnx_session, to_onnx
from fxcompress.passes import standard_pruning
from fxcompress.passes.fold_batch_norm import FoldBatchNorm
from fxcompress.passes.fold_qdq import FoldQDQ
from fxcompress.prune import L1Norm
from quant_helpers import config, inputs, ptq, small_model


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_float_export_matches_onnx_runtime(tmp_path):
    gm = fxcompress.trace(small_model(), inputs(2))
    result = to_onnx(gm, path=tmp_path / "float.onnx")
    assert (tmp_path / "float.onnx").exists() and not result.quantized
    assert result.max_error <= 1e-4
    assert "QuantizeLinear" not in _op_types(result.model)


def test_quantized_export_is_qdq_with_int8_weights():
    gm = ptq(fold=True)
    result = to_onnx(gm, inputs(8, 7))
    types = _op_types(result.model)
    assert result.quantized and result.max_error <= result.tolerance
    assert types.count("QuantizeLinear") == 8 and "Conv" in types and "Gemm" in types
    dtypes = {i.name: i.data_type for i in result.model.graph.initializer}
    assert dtypes["conv1.weight"] == onnx.TensorProto.INT8
    assert dtypes["conv1.bias"] == onnx.TensorProto.INT32
    assert dtypes["x_aq.zero_point"] == onnx.TensorProto.UINT8


def test_onnx_runtime_agrees_with_the_graph_module_on_predictions():
    gm = ptq(fold=True)
    session = onnx_session(to_onnx(gm, inputs(64, 8)).model)
    x = inputs(64, 8)
    got = session.run(None, {"input_0": x.numpy()})[0]
    assert (torch.from_numpy(got).argmax(1) == gm(x).argmax(1)).float().mean() >= 0.98


def test_pruned_then_quantized_pipeline_exports():
    passes = [*standard_pruning(L1Norm(0.5)), FoldBatchNorm()]
    pruned = fxcompress.compile(small_model(), inputs(4), passes)
    assert pruned.conv1.out_channels == 4
    from fxcompress.passes.calibrate import Calibrate
    from fxcompress.passes.fake_quantize import FakeQuantize
    from fxcompress.passes.insert_observers import InsertObservers

    both = fxcompress.compile(
        small_model(), inputs(4),
        [*passes, InsertObservers(config()), Calibrate((inputs(32, 2),), progress=False), FakeQuantize(), FoldQDQ()],
    )
    assert both.conv1.weight.shape[0] == 4 and both.conv1.weight.dtype == torch.int8
    result = to_onnx(both)
    assert result.max_error <= result.tolerance


def test_old_opsets_are_refused():
    with pytest.raises(ConfigError, match="opset >= 13"):
        to_onnx(fxcompress.trace(small_model(), inputs(2)), opset=11)
