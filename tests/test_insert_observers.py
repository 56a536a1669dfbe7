"""InsertObservers: where quantizers go, honest modified flag, unchanged outputs."""

import pytest
import torch
from torch.nn.utils import parametrize

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.passes.fold_batch_norm import FoldBatchNorm
from fxcompress.passes.insert_observers import InsertObservers
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
