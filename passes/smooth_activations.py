"""SmoothActivations: SmoothQuant's per-channel migration of activation outliers into the weights.

For every input that selected linear layers read, the pass calibrates
``max|X_j|`` on ``data``, takes ``s = max|X_j|^α / max|W_j|^(1-α)`` (``max|W_j|``
over all the layers reading that input, so q/k/v or gate/up share one ``s``),
multiplies those weights by ``s`` and divides the input by ``s``. The division
is folded into the op that produced the input when that op scales each
channel by a parameter of its own and feeds nothing else — a LayerNorm or
RMSNorm with an affine weight (module or functional call), or a ``mul`` by a
1-D parameter, which is how an exported Hugging Face ``LlamaRMSNorm`` ends
(``weight * normalized``). Otherwise it inserts ``mul(x, 1/s)`` before those
layers. :data:`fxcompress.meta.SMOOTHED` records which happened per layer.

Float outputs do not change (verification checks it); the point is that
int8 activations (``quantize-activations``) then lose far less.

>>> import torch, fxcompress
>>> from torch import nn
>>> from fxcompress.oneshot import SmoothQuant
>>> model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8)).eval()
>>> data = [torch.randn(4, 16) for _ in range(2)]
>>> smooth = fxcompress.compile(model, data[0], [SmoothActivations(SmoothQuant(0.5), data)])
>>> smooth.meta[fxcompress.meta.SMOOTHED]
{'1.weight': 'folded into 0'}
"""

from __future__ import annotations

import dataclasses
import operator
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxcompress import meta
from fxcompress.errors import ConfigError
from fxcompress.masks import mask_of, refresh, split_target, trainable
from fxcompress.oneshot import LinearSite, linear_sites
from fxcompress.oneshot.engine import current_value
from fxcompress.oneshot.smoothquant import SmoothQuant, input_absmax, weight_absmax
from fxcompress.ops import lookup
from fxcompress.pipeline import Pass, register_pass
from fxcompress.trace import module_uses

__all__ = ["SmoothActivations"]

aten = torch.ops.aten


def _scale_tensor(owner: nn.Module, name: str, factor: torch.Tensor, dim: int) -> None:
    """Multiply ``owner.name``'s dense values by ``factor`` along ``dim`` (masked entries stay masked)."""
    dense = trainable(owner, name)
    shape = [1] * dense.dim()
    shape[dim] = -1
    with torch.no_grad():
        dense.mul_(factor.to(device=dense.device, dtype=dense.dtype).reshape(shape))
    if mask_of(owner, name) is not None:
        refresh(owner, name)


def _scale_attr(gm: fx.GraphModule, target: str, factor: torch.Tensor, dim: int = 0) -> None:
    owner, name = split_target(target)
    _scale_tensor(gm.get_submodule(owner), name, factor, dim)


# ---------------------------------------------------------------------------- folds: who can absorb 1/s


def _channel_attr(gm: fx.GraphModule, value, reads: Counter, channels: int) -> str | None:
    """``value``'s target when it is a ``get_attr`` of a 1-D tensor of ``channels`` values read only there."""
    if not isinstance(value, fx.Node) or value.op != "get_attr" or reads[value.target] != 1 or len(value.users) != 1:
        return None
    tensor = current_value(gm, value.target)
    return value.target if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (channels,) else None


def _fold_norm_module(gm, node, reads, channels) -> Callable | None:
    # LayerNorm/RMSNorm(x) / s  ->  the same norm with weight / s (and bias / s)
    module = gm.get_submodule(node.target)
    if getattr(module, "weight", None) is None or module_uses(gm)[node.target] != 1:
        return None
    if tuple(module.weight.shape) != (channels,):
        return None

    def fold(inverse):
        for name in ("weight", "bias"):
            if getattr(module, name, None) is not None:
                _scale_tensor(module, name, inverse, 0)
    return fold


def _fold_norm_call(weight_at: int, bias_at: int | None):
    # layer_norm(x, shape, w, b) / s  ->  layer_norm(x, shape, w / s, b / s);  rms_norm(x, shape, w) / s likewise
    def match(gm, node, reads, channels) -> Callable | None:
        names = ("weight", "bias")
        values = [node.args[i] if len(node.args) > i else node.kwargs.get(n)
                  for i, n in zip((weight_at, bias_at), names) if i is not None]
        targets = [_channel_attr(gm, v, reads, channels) if v is not None else "" for v in values]
        if not values or values[0] is None or None in targets:
            return None
        return lambda inverse: [_scale_attr(gm, t, inverse) for t in targets if t]
    return match


def _fold_mul(gm, node, reads, channels) -> Callable | None:
    # x * w  (w a 1-D parameter: the end of an exported RMSNorm) / s  ->  x * (w / s)
    if len(node.args) != 2 or node.kwargs:
        return None
    for value in node.args:
        target = _channel_attr(gm, value, reads, channels)
        if target is not None:
            return lambda inverse: _scale_attr(gm, target, inverse)
    return None


#: op -> ``match(gm, node, get_attr read counts, channels)`` returning ``fold(1/s)`` or None when it cannot absorb
FOLDS: dict[object, Callable] = {
    nn.LayerNorm: _fold_norm_module,
    nn.RMSNorm: _fold_norm_module,
    F.layer_norm: _fold_norm_call(2, 3),
    aten.layer_norm.default: _fold_norm_call(2, 3),
    F.rms_norm: _fold_norm_call(2, None),
    aten.rms_norm.default: _fold_norm_call(2, None),
    operator.mul: _fold_mul,
    torch.mul: _fold_mul,
    ".mul": _fold_mul,
    aten.mul.Tensor: _fold_mul,
}


# ---------------------------------------------------------------------------- the pass


@register_pass
@dataclasses.dataclass(frozen=True)
class SmoothActivations(Pass):
    """Smooth the inputs of the layers ``smoothing`` selects (SmoothQuant), calibrated on ``data``.

    Without ``data`` (a text pipeline) it calibrates on the example inputs, with a warning.
    """

    smoothing: SmoothQuant = SmoothQuant()
    data: Sequence = ()

    name: ClassVar[str] = "smooth-activations"
    preserves_outputs: ClassVar[bool] = True
    keeps_analysis: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.smoothing, SmoothQuant):
            raise ConfigError(f"smooth-activations takes a fxcompress.oneshot.SmoothQuant, got "
                              f"{type(self.smoothing).__name__}")
        if isinstance(self.data, (torch.Tensor, dict, str)):
            raise ConfigError("smooth-activations takes data as a sequence of batches, e.g. tuple(tokens.split(8))")

    @classmethod
    def from_options(cls, options: dict) -> SmoothActivations:
        """``smooth-activations{alpha=0.8,exclude=lm_head}`` in a textual pipeline."""
        return cls(SmoothQuant(**options))

    def text_options(self) -> dict:
        if len(self.data):
            raise ConfigError(f"pass 'smooth-activations': its calibration data ({len(self.data)} batches) has no "
                              "text form; build this pass in Python")
        return {f.name: getattr(self.smoothing, f.name) for f in dataclasses.fields(self.smoothing)
                if getattr(self.smoothing, f.name) != f.default}

    def run(self, gm: fx.GraphModule) -> bool:
        done = gm.meta.setdefault(meta.SMOOTHED, {})
        groups: dict[fx.Node, list[LinearSite]] = {}
        for site in linear_sites(gm, self.smoothing):
            if site.target not in done and isinstance(site.source, fx.Node):
                groups.setdefault(site.source, []).append(site)
        if not groups:
            return False
        data = self.data
        if not len(data):
            warnings.warn("smooth-activations: no calibration data given; calibrating on the example inputs only "
                          "(pass data=[...] with a few hundred real sequences)", stacklevel=4)
            data = (gm.meta[meta.EXAMPLE_INPUTS],)
        absmax = input_absmax(gm, list(groups), data)
        reads = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
        for source, sites in groups.items():
            how = self._smooth(gm, source, sites, absmax[source], reads)
            for site in sites:
                done[site.target] = how
                gm.meta.get(meta.WEIGHT_GRIDS, {}).pop(site.target, None)  # W·s is off any grid it was on
        gm.graph.lint()
        gm.recompile()
        return True

    def _smooth(self, gm, source: fx.Node, sites: list[LinearSite], act_absmax, reads: Counter) -> str:
        weights = [current_value(gm, site.target) for site in sites]
        scale = self.smoothing.scales(act_absmax, weight_absmax(weights))
        fold = None
        if set(source.users) == {site.node for site in sites}:
            match = lookup(FOLDS, gm, source)
            fold = match(gm, source, reads, len(scale)) if match is not None else None
        if fold is not None:
            fold(1 / scale)
            how = f"folded into {source.name if source.op != 'call_module' else source.target}"
        else:
            how = f"mul node {_insert_divide(gm, source, sites, 1 / scale).name}"
        for site in sites:
            _scale_attr(gm, site.target, scale, dim=1)
        return how


def _insert_divide(gm: fx.GraphModule, source: fx.Node, sites: list[LinearSite], inverse: torch.Tensor) -> fx.Node:
    """``mul(source, 1/s)`` read by the sites' linear nodes only; ``1/s`` a buffer of the root module."""
    base = "smooth_" + re.sub(r"\W", "_", split_target(sites[0].target)[0] or source.name)  # named by its first reader
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    weight = current_value(gm, sites[0].target)
    gm.register_buffer(name, inverse.to(device=weight.device, dtype=weight.dtype))
    exported = any(isinstance(site.node.target, torch._ops.OpOverload) for site in sites)
    with gm.graph.inserting_after(source):
        attr = gm.graph.get_attr(name)
    with gm.graph.inserting_after(attr):
        mul = gm.graph.call_function(aten.mul.Tensor if exported else torch.mul, (source, attr))
    for site in sites:
        site.node.replace_input_with(source, mul)
    return mul
