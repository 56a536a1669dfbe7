"""Schemes and quantizers: forward values and gradients (STE, LSQ step size, DoReFa, BNN)."""

import math

import pytest
import torch

from fxcompress.errors import ConfigError, PipelineError
from fxcompress.quant.observers import MinMaxObserver
from fxcompress.quant.quantizers import BNN, LSQ, DoReFa, STEQuantizer, LSQPlus
from fxcompress.quant.scheme import INT8_WEIGHT, UINT8_ACTIVATION, QScheme, fake_quantize


def _frozen(cls, scheme, data):
    q = cls(scheme, MinMaxObserver())
    q.observing = True
    q(data)
    q.observing = False
    q.freeze()
    return q.eval()


def test_scheme_ranges_and_dtypes():
    assert (QScheme(4, signed=True).qmin, QScheme(4, signed=True).qmax) == (-8, 7)
    assert (UINT8_ACTIVATION.qmin, UINT8_ACTIVATION.qmax, UINT8_ACTIVATION.dtype) == (0, 255, torch.uint8)
    with pytest.raises(ConfigError, match="bits"):
        QScheme(bits=16)


def test_affine_qparams_make_zero_exact():
    scale, zp = UINT8_ACTIVATION.qparams(torch.tensor(-1.0), torch.tensor(3.0))
    assert float(scale) == pytest.approx(4.0 / 255)
    assert int(zp) == 64  # round(1 / (4/255))
    assert float(fake_quantize(torch.tensor(0.0), UINT8_ACTIVATION, scale, zp)) == 0.0


def test_symmetric_per_channel_scales():
    lo, hi = torch.tensor([-1.0, -0.5]), torch.tensor([0.5, 2.0])
    scale, zp = INT8_WEIGHT.qparams(lo, hi)
    assert scale.tolist() == pytest.approx([1.0 / 127.5, 2.0 / 127.5])
    assert zp.tolist() == [0, 0]


def test_fake_quantize_forward_rounds_half_to_even_and_saturates():
    scale, zp = torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)
    x = torch.tensor([0.5, 1.5, 2.5, 300.0, -5.0])
    assert fake_quantize(x, UINT8_ACTIVATION, scale, zp).tolist() == [0.0, 2.0, 2.0, 255.0, 0.0]


def test_fake_quantize_gradient_is_straight_through_inside_range_only():
    x = torch.tensor([0.3, 100.0, 300.0, -5.0], requires_grad=True)
    fake_quantize(x, UINT8_ACTIVATION, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_fake_quantizer_observes_then_rounds():
    q = _frozen(STEQuantizer, UINT8_ACTIVATION, torch.tensor([0.0, 2.55]))
    assert q(torch.tensor([0.014, 1.0])).tolist() == pytest.approx([0.01, 1.0])


def test_freeze_without_data_is_a_clear_error():
    with pytest.raises(PipelineError, match="calibrate"):
        STEQuantizer(UINT8_ACTIVATION).freeze()


def test_lsq_step_gradient_matches_the_paper():
    scheme = QScheme(bits=4, signed=True, symmetric=True)
    q = _frozen(LSQ, scheme, torch.tensor([-8.0, 7.0])).train()
    with torch.no_grad():
        q.step.fill_(1.0)
    x = torch.tensor([0.4, 2.6, 20.0, -20.0])
    q(x).sum().backward()
    # d/ds of s * round(x/s) inside the range is round(x/s) - x/s; at the clip it is qmax or qmin.
    expected = (0 - 0.4) + (3 - 2.6) + 7 + (-8)
    assert float(q.step.grad) == pytest.approx(expected / math.sqrt(4 * 7), rel=1e-5)


def test_lsq_input_gradient_is_straight_through():
    q = _frozen(LSQ, QScheme(bits=4, signed=True, symmetric=True), torch.tensor([-8.0, 7.0])).train()
    x = torch.tensor([0.4, 20.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0]


def test_lsq_plus_learns_an_integer_offset():
    q = _frozen(LSQPlus, QScheme(bits=8, signed=False, symmetric=False), torch.tensor([-1.0, 3.0])).train()
    y = q(torch.tensor([0.0, 1.0, -1.0]))
    y.sum().backward()
    scale, zp = q.qparams()
    assert int(zp) == 64 and q.offset.grad is not None
    assert torch.allclose(y, (torch.round(torch.tensor([0.0, 1.0, -1.0]) / scale) + zp - zp) * scale)


def test_dorefa_weights_lie_on_the_odd_grid():
    q = DoReFa(QScheme(bits=2))
    q.freeze()
    w = torch.randn(64, requires_grad=True)
    out = q(w)
    levels = set((out.detach() * 3).round().tolist())
    assert levels <= {-3.0, -1.0, 1.0, 3.0}
    out.sum().backward()
    assert w.grad.abs().sum() > 0


def test_bnn_is_sign_with_clipped_straight_through_gradient():
    q = BNN(QScheme(bits=1))
    q.freeze()
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0], requires_grad=True)
    out = q(x)
    out.sum().backward()
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
