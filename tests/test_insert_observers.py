"""InsertObservers: where quantizers go, honest modified flag, unchanged outputs."""

import pytest
import torch
from torch.nn.utils import parametrize

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.passes.fold_batch_norm import FoldBatchNorm
from fxcompress.passes.insert_observers import InsertObservers
from fxcompress.quant.config import QConfig
from fxcompress.quant.quantizers import Quantizer
from quant_helpers import config, inputs, small_model


def _compiled():
    return fxcompress.compile(small_model(), inputs(4), [FoldBatchNorm(), InsertObservers(config())])


def test_quantizers_sit_after_activations_and_pools_share_the_grid():
    gm = _compiled()
    calls = [(n.target, dict(n.kwargs)) for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == [
        ("x_aq", {}), ("conv1", {}), ("relu_aq", {}), ("pool", {}), ("relu_aq", {"observe": False}),
        ("conv2", {}), ("relu_1_aq", {}), ("pool", {}), ("relu_1_aq", {"observe": False}),
        ("relu_1_aq", {"observe": False}), ("fc1", {}), ("relu_2_aq", {}), ("fc2", {}), ("fc2_aq", {}),
    ]


def test_gelu_is_quantized_after_a_linear_layer_but_not_after_a_conv():
    """A linear layer's GELU is fused (ONNX Runtime's QGemm hands it a float output, Inductor's qlinear takes it
    as a post-op): one quantizer after it. ONNX Runtime's int8 conv needs its output quantized: one before it."""

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(36, 8)
            self.conv_act, self.fc_act = torch.nn.GELU(), torch.nn.GELU()

        def forward(self, x):
            return self.fc_act(self.fc(self.conv_act(self.conv(x)).flatten(1)))

    gm = fxcompress.compile(Both().eval(), torch.randn(2, 3, 5, 5), [InsertObservers(config())])
    modules = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert modules == ["x_aq", "conv", "conv_aq", "conv_act", "flatten_aq", "fc", "fc_act", "fc_act_aq"]


def test_hardswish_is_fused_into_its_conv_in_inductors_placement_only():
    """functional=False (Inductor: oneDNN's int8 conv takes hardswish as a post-op) quantizes after it; the
    ONNX Runtime placement quantizes the conv's output, before it; adds stay float in Inductor's placement."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Hardswish(), torch.nn.Linear(36, 8)

        def forward(self, x):
            y = self.act(self.conv(x))
            return self.fc((y + y).flatten(1))

    def modules(functional: bool) -> list:
        gm = fxcompress.compile(Block().eval(), torch.randn(2, 3, 5, 5),
                                [InsertObservers(config(functional=functional))])
        return [n.target for n in gm.graph.nodes if n.op == "call_module"]

    assert modules(False) == ["x_aq", "conv", "act", "act_aq", "flatten_aq", "fc", "fc_aq"]
    assert modules(True) == ["x_aq", "conv", "conv_aq", "act", "act_aq", "add_aq", "add_aq", "fc", "fc_aq"]  # flatten shares


def test_weights_get_per_channel_quantizers():
    gm = _compiled()
    for name in ("conv1", "conv2", "fc1", "fc2"):
        module = gm.get_submodule(name)
        assert parametrize.is_parametrized(module, "weight")
        assert isinstance(module.parametrizations.weight[0], Quantizer)


def test_outputs_unchanged_and_second_run_is_a_no_op():
    model = small_model()
    gm = _compiled()
    x = inputs(8, seed=5)
    assert torch.allclose(gm(x), model(x), atol=1e-5)  # BN folding reassociates floats
    code = gm.code
    assert InsertObservers(config())(gm).modified is False
    assert gm.code == code


def test_selection_by_name_excludes_layers():
    gm = fxcompress.compile(small_model(), inputs(4), [FoldBatchNorm(), InsertObservers(config(exclude=("fc*",)))])
    assert not parametrize.is_parametrized(gm.fc1, "weight")
    assert parametrize.is_parametrized(gm.conv1, "weight")


def test_masked_layers_are_refused_with_a_clear_message():
    from fxcompress.passes import InsertMasks
    from fxcompress.prune import L1Norm

    with pytest.raises(ConfigError, match="pruning mask.*run shrink"):
        fxcompress.compile(small_model(), inputs(4), [InsertMasks(L1Norm(0.5)), InsertObservers(config())])


def test_function_form_linears_of_an_exported_graph_get_int8_weights():
    """torch.export calls BertModel's linear layers as aten.linear on their parameters: each becomes the
    nn.Linear it was (same path, same tensors), so its weight is quantized; outputs stay the model's."""
    import transformers

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=50)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))
    gm = fxcompress.compile(model, ids, [InsertObservers(QConfig.int8())], frontend="export")
    linears = {n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                        torch.nn.Linear)}
    assert len(linears) == 12 and "encoder.layer.0.attention.self.query" in linears
    assert all(parametrize.is_parametrized(gm.get_submodule(p), "weight") for p in linears)
    assert gm.get_submodule("encoder.layer.0.intermediate.dense").weight.shape == (64, 32)
    assert not any(n.op == "call_function" and n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)
    torch.testing.assert_close(gm(ids)[0], model(ids).last_hidden_state)
