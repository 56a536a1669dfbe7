"""FakeQuantize: grids frozen from statistics, simulation close to float, errors when uncalibrated."""

import pytest
import torch

import fxcompress
from fxcompress.errors import PipelineError
from fxcompress.passes.fake_quantize import FakeQuantize
from fxcompress.passes.insert_observers import InsertObservers
from quant_helpers import config, inputs, ptq, small_model


def test_simulated_int8_is_close_to_float_and_second_run_is_a_no_op():
    model = small_model()
    gm = ptq(model)
    x = inputs(32, 2)  # the calibration data
    ref, out = model(x), gm(x)
    assert not torch.equal(ref, out)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert FakeQuantize()(gm).modified is False


def test_weights_are_rounded_onto_their_per_channel_grid():
    gm = ptq()
    q = gm.conv1.parametrizations.weight[0]
    ints = gm.conv1.weight / q.scale.reshape(-1, 1, 1, 1)
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    assert int(ints.abs().max()) <= 128


def test_uncalibrated_activations_name_the_quantizer():
    with pytest.raises(PipelineError, match="'x_aq' has seen no data: run calibrate"):
        fxcompress.compile(small_model(), inputs(4), [InsertObservers(config()), FakeQuantize()])


def test_a_simulated_eval_model_keeps_its_grids_whatever_runs_through_it():
    """Quantizers take the model's mode: an eval-mode model's grids stay frozen (training mode would move
    them with every forward, as QAT does), until the user trains it."""
    gm = ptq(small_model().eval())
    quantizers = [m for m in gm.modules() if hasattr(m, "observer")]
    assert quantizers and not any(q.training for q in quantizers)
    x = inputs(32, 2)
    first = gm(x)
    gm(100 * inputs(32, 2))  # data far outside the calibration range
    assert torch.equal(gm(x), first)
    gm.train()
    assert all(q.training for q in quantizers)
