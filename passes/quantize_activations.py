"""QuantizeActivations: round the inputs of the selected linear layers to int8 (simulated), for W8A8.

Each distinct input of the selected linear layers gets one
:class:`fxcompress.oneshot.FakeQuantActivation` before it (a root submodule
``act_quant_<first layer reading it>``): static per tensor, its scale calibrated as ``max|x|``
over ``data``, or dynamic per token. The model stays in float, so its
perplexity can be measured; with per-channel int8 weights (``one-shot`` RTN,
8 bits, one group per row) that is W8A8, and :func:`w8a8_passes` builds the
whole pipeline, with SmoothQuant's smoothing first or without it (the plain
W8A8 baseline). A second run finds every input already quantized.

>>> import torch, fxcompress
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
>>> data = [torch.randn(4, 16) for _ in range(2)]
>>> q = fxcompress.compile(model, data[0], w8a8_passes(data, alpha=None))
>>> [n.target for n in q.graph.nodes if n.op == "call_module"]
['act_quant_0', '0', '1', 'act_quant_2', '2']
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import fx, nn

from fxcompress import meta
from fxcompress.errors import ConfigError
from fxcompress.masks import split_target
from fxcompress.oneshot import RTN, LinearSite, linear_sites
from fxcompress.oneshot.smoothquant import ActivationQuant, FakeQuantActivation, SmoothQuant, input_absmax
from fxcompress.pipeline import Pass, register_pass
from fxcompress.passes.one_shot import OneShot
from fxcompress.passes.smooth_activations import SmoothActivations

__all__ = ["QuantizeActivations", "w8a8_passes"]


@register_pass
@dataclasses.dataclass(frozen=True)
class QuantizeActivations(Pass):
    """Insert a fake-quantizer before each input of the layers ``activation`` selects (static scales from ``data``).

    Without ``data`` a static scheme calibrates on the example inputs, with a warning.
    """

    activation: ActivationQuant = ActivationQuant()
    data: Sequence = ()

    name: ClassVar[str] = "quantize-activations"
    preserves_outputs: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.activation, ActivationQuant):
            raise ConfigError(f"quantize-activations takes a fxcompress.oneshot.ActivationQuant, got "
                              f"{type(self.activation).__name__}")
        if isinstance(self.data, (torch.Tensor, dict, str)):
            raise ConfigError("quantize-activations takes data as a sequence of batches, e.g. tuple(tokens.split(8))")

    @classmethod
    def from_options(cls, options: dict) -> QuantizeActivations:
        """``quantize-activations{granularity=token}`` in a textual pipeline."""
        return cls(ActivationQuant(**options))

    def text_options(self) -> dict:
        if len(self.data):
            raise ConfigError(f"pass 'quantize-activations': its calibration data ({len(self.data)} batches) has no "
                              "text form; build this pass in Python")
        return {f.name: getattr(self.activation, f.name) for f in dataclasses.fields(self.activation)
                if getattr(self.activation, f.name) != f.default}

    def run(self, gm: fx.GraphModule) -> bool:
        groups: dict[fx.Node, list[LinearSite]] = {}
        for site in linear_sites(gm, self.activation):
            if isinstance(site.source, fx.Node) and not _is_quantizer(gm, site.source):
                groups.setdefault(site.source, []).append(site)
        if not groups:
            return False
        absmax = {}
        if self.activation.static:
            data = self.data
            if not len(data):
                warnings.warn("quantize-activations: no calibration data given; calibrating on the example inputs "
                              "only (pass data=[...] with a few hundred real sequences)", stacklevel=4)
                data = (gm.meta[meta.EXAMPLE_INPUTS],)
            absmax = {node: amax.max() for node, amax in input_absmax(gm, list(groups), data).items()}
        for source, sites in groups.items():
            module = FakeQuantActivation(self.activation.bits, absmax.get(source))
            _insert_quantizer(gm, source, sites, module)
        gm.graph.lint()
        gm.recompile()
        return True


def _is_quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantActivation)


def _insert_quantizer(gm: fx.GraphModule, source: fx.Node, sites: list[LinearSite], module: nn.Module) -> None:
    base = "act_quant_" + re.sub(r"\W", "_", split_target(sites[0].target)[0] or source.name)  # named by its first reader
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(source):
        call = gm.graph.call_module(name, (source,))
    if meta.TENSOR_META in source.meta:
        call.meta[meta.TENSOR_META] = source.meta[meta.TENSOR_META]
    for site in sites:
        site.node.replace_input_with(source, call)


def w8a8_passes(data: Sequence, alpha: float | None = 0.5, granularity: str = "tensor",
                exclude: tuple[str, ...] = ()) -> list[Pass]:
    """W8A8, simulated: SmoothQuant smoothing with migration ``alpha`` (None: none, the plain W8A8 baseline),
    per-channel symmetric int8 weights (round to nearest, grids recorded, so ``pack-weights`` can pack them)
    and int8 linear inputs (``granularity`` ``"tensor"``: static, ``"token"``: dynamic). ``exclude`` globs
    apply to all three (``("lm_head",)`` keeps the output layer in float, as the SmoothQuant paper does)."""
    passes: list[Pass] = []
    if alpha is not None:
        passes.append(SmoothActivations(SmoothQuant(alpha, exclude=exclude), data))
    passes.append(OneShot(RTN(bits=8, group_size=0, symmetric=True, exclude=exclude), data, progress=False))
    passes.append(QuantizeActivations(ActivationQuant(granularity, exclude=exclude), data))
    return passes
