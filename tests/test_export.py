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


# ---------------------------------------------------------------------------- dynamic axes, names (issue 13)


def _relative_error(expected: torch.Tensor, got) -> float:
    got = torch.as_tensor(got)
    assert got.shape == expected.shape
    return ((expected - got).abs().max() / expected.abs().max()).item()


def test_pruned_resnet18_traced_at_batch_1_runs_in_onnx_runtime_at_batch_4():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    small = fxcompress.compile(model, torch.randn(1, 3, 32, 32), standard_pruning(L1Norm(0.5)))
    result = to_onnx(small)
    assert result.dynamic_axes == {"input_0": {0: "batch"}, "output_0": {0: "batch"}}
    assert result.checked_shapes == (((1, 3, 32, 32),), ((2, 3, 32, 32),))  # checked at another batch too
    x = torch.randn(4, 3, 32, 32)
    got = onnx_session(result.model).run(None, {"input_0": x.numpy()})[0]
    with torch.no_grad():
        assert _relative_error(small(x), got) <= 1e-4


def test_pruned_bert_traced_at_batch_1_runs_in_onnx_runtime_at_batch_4_and_another_length():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    tokens = {"input_ids": torch.randint(0, 64, (1, 16)), "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    small = fxcompress.compile(model, tokens, standard_pruning(L1Norm(0.5)))
    result = to_onnx(small, input_names=list(tokens), output_names=["last_hidden_state", "pooler_output"])
    assert result.dynamic_axes == {
        "input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
        "last_hidden_state": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"},
    }
    feed = {"input_ids": torch.randint(0, 64, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    feed["attention_mask"][1, 9:] = 0  # padding
    hidden, pooled = onnx_session(result.model).run(None, {k: v.numpy() for k, v in feed.items()})
    with torch.no_grad():
        expected = small(**feed)
    assert _relative_error(expected.last_hidden_state, hidden) <= 1e-4
    assert _relative_error(expected.pooler_output, pooled) <= 1e-4


def test_fixed_or_chosen_axes_on_request():
    gm = fxcompress.trace(small_model(), inputs(2))
    fixed = to_onnx(gm, dynamic_axes=None)
    assert fixed.dynamic_axes == {} and fixed.checked_shapes == (((2, 1, 28, 28),),)
    assert [d.dim_value for d in fixed.model.graph.input[0].type.tensor_type.shape.dim] == [2, 1, 28, 28]
    chosen = to_onnx(gm, input_names=["images"], output_names=["logits"], dynamic_axes={"images": [0], "logits": [0]})
    assert chosen.dynamic_axes == {"images": {0: "images_dim0"}, "logits": {0: "logits_dim0"}}
    assert chosen.checked_shapes == (((2, 1, 28, 28),), ((3, 1, 28, 28),))
    assert [i.name for i in chosen.model.graph.input] == ["images"]


@pytest.mark.parametrize("options, words", [
    (dict(input_names=["a", "b"]), "input_names has 2 names but the model takes 1 tensor inputs \\(x\\)"),
    (dict(output_names=[]), "output_names has 0 names but the model returns 1 tensors"),
    (dict(dynamic_axes={"images": [0]}), "dynamic_axes names 'images', which is no input or output"),
    (dict(dynamic_axes={"input_0": [4]}), "names axis 4, which input_0 \\(of 4 dims\\) lacks"),
    (dict(dynamic_axes="yes"), "dynamic_axes must be 'auto', None or a dict"),
])
def test_onnx_options_are_checked(options, words):
    with pytest.raises(ConfigError, match=words):
        to_onnx(fxcompress.trace(small_model(), inputs(2)), **options)


def test_a_graph_fixed_along_the_batch_exports_a_fixed_batch_and_says_why():
    class FixedBatch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x.view(2, 8))  # the batch size written as a constant

    gm = fxcompress.trace(FixedBatch(), torch.randn(2, 8))
    with pytest.warns(UserWarning, match="graph does not run at batch size 3.*batch dim stays fixed"):
        result = to_onnx(gm)
    assert result.dynamic_axes == {} and result.max_error <= 1e-4


def test_int8_linear_on_a_sequence_runs_as_qgemm_at_any_batch(tmp_path):
    """A linear layer on (batch, tokens, features) input exports as one 2-D Gemm, which ONNX Runtime fuses into
    QGemm with its int32 bias at dynamic shapes (MatMul + Add would run as MatMulIntegerToFloat, a float Add and a
    requantization)."""
    import onnxruntime as ort

    from fxcompress.passes.calibrate import Calibrate
    from fxcompress.passes.fake_quantize import FakeQuantize
    from fxcompress.passes.insert_observers import InsertObservers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(2, 5, 16)
    passes = [InsertObservers(config()), Calibrate((x,), progress=False), FakeQuantize(), FoldQDQ()]
    result = to_onnx(fxcompress.compile(model, x, passes), x)
    assert result.dynamic_axes and len(result.checked_shapes) == 2  # also checked at another batch size
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(result.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = _op_types(onnx.load(options.optimized_model_filepath))
    assert optimized.count("QGemm") == 2 and "MatMulIntegerToFloat" not in optimized


def test_the_torch_export_based_exporter_writes_int8_with_dynamic_batch():
    result = to_onnx(ptq(fold=True), inputs(4), exporter="dynamo")
    assert result.exporter == "dynamo" and result.max_error <= result.tolerance
    assert {o.domain: o.version for o in result.model.opset_import}[""] >= 18
    assert _op_types(result.model).count("QuantizeLinear") == 8
    assert result.dynamic_axes["input_0"] == {0: "batch"} and len(result.checked_shapes) == 2


def test_the_torchscript_exporter_on_request():
    result = to_onnx(ptq(fold=True), inputs(4), exporter="torchscript")
    assert result.exporter == "torchscript" and {o.domain: o.version for o in result.model.opset_import}[""] == 17


def test_auto_falls_back_to_torchscript_naming_why(monkeypatch):
    import fxcompress.export_dynamo as export_dynamo

    def fails(*args, **kwargs):
        raise RuntimeError("an op torch.export cannot take")

    monkeypatch.setattr(export_dynamo, "export_dynamo", fails)
    with pytest.warns(UserWarning, match="an op torch.export cannot take.*TorchScript exporter writes it"):
        result = to_onnx(ptq(fold=True), inputs(4))
    assert result.exporter == "torchscript" and result.max_error <= result.tolerance
    with pytest.raises(RuntimeError, match="cannot take"):  # chosen by name, it is not replaced
        to_onnx(ptq(fold=True), inputs(4), exporter="dynamo")


@pytest.mark.parametrize("options, words", [({"exporter": "jit"}, "exporter must be"),
                                            ({"exporter": "dynamo", "opset": 17}, "opset >= 18")])
def test_exporter_options_are_checked(options, words):
    with pytest.raises(ConfigError, match=words):
        to_onnx(ptq(fold=True), inputs(4), **options)


def test_the_environment_names_the_default_exporter(monkeypatch):
    monkeypatch.setenv("FXCOMPRESS_ONNX_EXPORTER", "torchscript")
    assert to_onnx(ptq(fold=True), inputs(4)).exporter == "torchscript"
    assert to_onnx(ptq(fold=True), inputs(4), exporter="dynamo").exporter == "dynamo"  # a call's choice wins
