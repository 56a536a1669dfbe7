"""Calibrate: run data through the model so that every quantizer's observer collects statistics.

``data`` is a sequence of batches; a batch is one tensor (for a one-input
model) or a tuple of ``forward`` arguments. Only quantizers that have not been
calibrated yet observe, so running the pass again is a no-op; to recalibrate,
insert fresh observers.

>>> import torch, fxcompress
>>> from fxcompress.examples import SmallCNN
>>> from fxcompress.passes import Calibrate, InsertObservers
>>> from fxcompress.quant import QConfig
>>> images = torch.randn(64, 1, 28, 28)   # in practice a few hundred real inputs
>>> passes = [InsertObservers(QConfig.int8()), Calibrate(tuple(images.split(32)), progress=False)]
>>> gm = fxcompress.compile(SmallCNN().eval(), images[:1], passes)
>>> gm.x_aq.calibrated, gm.x_aq.enabled   # the input's quantizer has its range, not yet rounding
(True, False)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import fx
from tqdm.auto import tqdm

from fxcompress.trace import inference_mode
from fxcompress.errors import ConfigError
from fxcompress.pipeline import Pass, Requires, register_pass
from fxcompress.quant.quantizers import is_planned, quantizers

__all__ = ["Calibrate", "quantizers"]


def _as_args(batch) -> tuple:
    return (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)


@register_pass
@dataclasses.dataclass(frozen=True)
class Calibrate(Pass):
    """Feed ``data`` (a sequence of batches) to every quantizer not yet calibrated, in eval mode, with a progress bar."""

    data: Sequence = ()
    progress: bool = True

    name: ClassVar[str] = "calibrate"
    requires: ClassVar[tuple[Requires, ...]] = (Requires("insert-observers", is_planned),)
    preserves_outputs: ClassVar[bool] = True
    keeps_analysis: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.data, torch.Tensor) or not len(self.data):
            raise ConfigError("Calibrate needs a non-empty sequence of batches, e.g. tuple(images.split(256))")

    def run(self, gm: fx.GraphModule) -> bool:
        fresh = [q for q in quantizers(gm) if not getattr(q, "calibrated", False)]
        if not fresh:
            return False
        for q in fresh:
            q.observing = True
        try:
            with inference_mode(gm):
                for batch in tqdm(self.data, desc="calibrate", disable=not self.progress, leave=False):
                    gm(*_as_args(batch))
        finally:
            for q in fresh:
                q.observing, q.calibrated = False, True
        return True
