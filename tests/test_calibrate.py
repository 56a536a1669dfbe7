"""Calibrate: observers see the data, outputs stay unchanged, a second run does nothing."""

import pytest
import torch

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.passes.calibrate import Calibrate, quantizers
from fxcompress.passes.insert_observers import InsertObservers
from quant_helpers import config, inputs, small_model


def test_calibration_fills_every_observer_once():
    data = (inputs(8, 3), inputs(8, 4))
    gm = fxcompress.compile(small_model(), inputs(4), [InsertObservers(config())])
    before = gm(inputs(4, 9))
    assert Calibrate(data, progress=False)(gm).modified is True
    assert all(q.observer.observed and not q.observing for q in quantizers(gm))
    lo, hi = gm.x_aq.observer.bounds(None)
    all_x = torch.cat(data)
    assert (float(lo), float(hi)) == (float(all_x.min()), float(all_x.max()))
    assert torch.equal(gm(inputs(4, 9)), before)
    assert Calibrate(data, progress=False)(gm).modified is False


def test_empty_data_is_refused():
    with pytest.raises(ConfigError, match="non-empty"):
        Calibrate(())
