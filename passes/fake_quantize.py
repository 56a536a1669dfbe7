"""FakeQuantize: fix every quantizer's grid from its statistics and turn rounding on (simulation, QAT).

After this pass the ``GraphModule`` computes what the integer model will,
in float: it can be evaluated (PTQ) or trained (QAT, LSQ, DoReFa, BNN: the
quantizers carry straight-through or learned-step gradients). Weight
quantizers observe the current weight here, so they need no calibration;
activation quantizers must have been calibrated.

>>> import torch, fxcompress
>>> from fxcompress.examples import SmallCNN
>>> from fxcompress.passes import Calibrate, FakeQuantize, InsertObservers
>>> from fxcompress.quant import QConfig
>>> images = torch.randn(64, 1, 28, 28)
>>> passes = [InsertObservers(QConfig.int8()), Calibrate(tuple(images.split(32)), progress=False), FakeQuantize()]
>>> gm = fxcompress.compile(SmallCNN().eval(), images[:1], passes)
>>> gm.x_aq.enabled
True
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import fx
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from fxcompress.errors import PipelineError
from fxcompress.pipeline import Pass, Requires, register_pass
from fxcompress.quant.quantizers import Quantizer, is_planned

__all__ = ["FakeQuantize"]


def _weight_quantizers(gm: fx.GraphModule) -> list[tuple[str, Quantizer, torch.Tensor]]:
    """``(layer path, quantizer, float weight)`` for every parametrized weight."""
    found = []
    for path, module in gm.named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        plist = module.parametrizations.weight
        for q in plist:
            if isinstance(q, Quantizer):
                found.append((path, q, plist.original))
    return found


def _activation_quantizers(gm: fx.GraphModule) -> list[tuple[str, Quantizer]]:
    seen, found = set(), []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, Quantizer):
            seen.add(node.target)
            found.append((node.target, module))
    return found


@register_pass
@dataclasses.dataclass(frozen=True)
class FakeQuantize(Pass):
    """Freeze the grid of every quantizer not yet enabled; a second run finds none and changes nothing.

    Choosing activation ranges can take seconds (a histogram search per
    quantizer): with ``progress``, a bar appears once it has run for 2 s.
    """

    progress: bool = True

    name: ClassVar[str] = "fake-quantize"
    requires: ClassVar[tuple[Requires, ...]] = (Requires("insert-observers", is_planned),)
    preserves_outputs: ClassVar[bool] = False
    keeps_analysis: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule) -> bool:
        modified = False
        for path, q, weight in _weight_quantizers(gm):
            if q.enabled:
                continue
            q.observer.update(weight.detach(), q.scheme.axis)
            q.freeze()
            modified = True
        activations = _activation_quantizers(gm)
        for target, q in tqdm(activations, desc="fake-quantize: activation ranges", disable=not self.progress,
                              delay=2.0, leave=False):
            if q.enabled:
                continue
            if not q.observer.observed:
                raise PipelineError(
                    f"activation quantizer '{target}' has seen no data: run calibrate (with data that reaches it) "
                    "before fake-quantize"
                )
            q.freeze()
            modified = True
        return modified
