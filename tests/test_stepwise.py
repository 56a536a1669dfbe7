"""The quantizer-by-quantizer check of int8 exports (fxcompress.quant.stepwise): it accepts the one-step flips of
a correct export, however amplified, and names the quantizer of a wrong one."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fxcompress.errors import VerificationError
from fxcompress.export import _export, _flat_module, _relative_error, onnx_session, to_onnx
from fxcompress.quant import stepwise
from fxcompress.quant.stepwise import FLIP_RATE, QuantizerAgreement, StepwiseCheck, stepwise_check
from quant_helpers import inputs, ptq


def _scale_up(model: onnx.ModelProto, output: str, factor: float) -> onnx.ModelProto:
    """``model`` with the scale of the QuantizeLinear writing ``output`` (only that node's) times ``factor``."""
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and output in n.output)
    scale = next(i for i in model.graph.initializer if i.name == node.input[1])
    wrong = numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(factor), f"{scale.name}_wrong")
    model.graph.initializer.append(wrong)
    node.input[1] = wrong.name
    return model


def _check(corrupt=None):
    gm = ptq(fold=True)
    flat, tensors, n_outputs = _flat_module(gm, (inputs(4),))

    def export(probe, count):
        names = [f"output_{i}" for i in range(n_outputs)] + [f"quantized_{i}" for i in range(count - n_outputs)]
        model = _export(probe, tensors, 17, ["input_0"], names, {})
        return model if corrupt is None else corrupt(model)

    return stepwise_check(flat, tensors, 3e-2, export, onnx_session, _relative_error)


def test_a_correct_export_agrees_quantizer_by_quantizer():
    check = _check()
    assert len(check.quantizers) >= 4  # the input, both convs' and the hidden layer's outputs
    assert all(q.max_steps <= 1 and q.flip_rate <= FLIP_RATE for q in check.quantizers)
    assert check.output_error <= 3e-2 and check.failure() is None


def test_a_wrong_scale_is_caught_and_named():
    check = _check(lambda model: _scale_up(model, "quantized_2", 1.05))
    wrong = [q for q in check.quantizers if not q.agrees]
    assert wrong and wrong[0].node == check.quantizers[2].node
    assert all(q.agrees for q in check.quantizers[:2])  # teacher forcing: quantizers before it are untouched
    assert repr(check.quantizers[2].node) in check.failure()


def test_rare_one_step_flips_pass_and_anything_more_fails():
    flips = StepwiseCheck((QuantizerAgreement("q", 1, FLIP_RATE / 2),), 0.0, 3e-2)
    assert flips.failure() is None
    assert "'q'" in StepwiseCheck((QuantizerAgreement("q", 2, 1e-6),), 0.0, 3e-2).failure()
    assert "'q'" in StepwiseCheck((QuantizerAgreement("q", 1, FLIP_RATE * 2),), 0.0, 3e-2).failure()
    assert "outputs computed" in StepwiseCheck((QuantizerAgreement("q", 0, 0.0),), 0.1, 3e-2).failure()


def test_without_vnni_the_failure_says_how_to_avoid_saturation(monkeypatch):
    monkeypatch.setattr(stepwise, "cpu_has_vnni", lambda: False)
    assert "weight_bits=7" in StepwiseCheck((QuantizerAgreement("q", 5, 0.1),), 0.0, 3e-2).failure()


def _exports_with_first_scale_times(factor: float, monkeypatch) -> None:
    """Make ``to_onnx`` export every model with its first activation quantizer's scale times ``factor``."""
    import fxcompress.export as export

    def corrupted(*args, **kwargs):
        model = _export(*args, **kwargs)
        first = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
        return _scale_up(model, first.output[0], factor)

    monkeypatch.setattr(export, "_export", corrupted)


def test_to_onnx_accepts_rare_one_step_flips_through_the_stepwise_check(monkeypatch):
    """A scale off by 4e-6 moves the rare codes that sat within that of a boundary by one step (here 2 of
    25,088): what summation order does. End to end the outputs move; quantizer by quantizer the export is right."""
    _exports_with_first_scale_times(1 + 4e-6, monkeypatch)
    result = to_onnx(ptq(fold=True), inputs(32), rtol=1e-12, dynamic_axes=None)
    assert result.max_error > result.tolerance
    assert result.stepwise is not None and result.stepwise.failure() is None
    assert 0 < result.stepwise.quantizers[0].flip_rate <= FLIP_RATE


def test_to_onnx_names_the_quantizer_of_a_wrong_export(monkeypatch):
    _exports_with_first_scale_times(1.05, monkeypatch)
    with pytest.raises(VerificationError, match="quantizer 'quantize_default' differs"):
        to_onnx(ptq(fold=True), inputs(4), dynamic_axes=None)
