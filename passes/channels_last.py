"""ChannelsLast: store 2-d convolution weights channels-last (NHWC), so activations flow NHWC too.

On CPU, oneDNN runs a convolution channels-last when its weight (or input) is
channels-last, and then hands a channels-last output to the next op: ReLU,
add, pooling and the next convolution all keep the layout, and the per-layer
reorders between PyTorch's NCHW and oneDNN's preferred blocked layout go away.
That matters most for the thin layers a pruned network is made of.

The layout lives in the parameters, not in the graph, so two graph rewrites
keep the module correct for the contiguous NCHW inputs it was traced with
(``gm.code`` before and after)::

    x = x.view(n, -1) ... return y      ->      x = x.reshape(n, -1) ... return y.contiguous()

- ``x.view(...)`` becomes ``x.reshape(...)``: the same view where one exists,
  a copy where ``x`` is now channels-last and a view cannot exist (an in-place
  update through such a copy would no longer reach ``x``; inference graphs do
  not do that);
- a channels-last graph output is made contiguous again, so callers see the
  same strides as before.

The module stays trainable, ``state_dict`` loads into the original model (and
back), and ``torch.save`` keeps the layout.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import fx, nn

from fxcompress import meta
from fxcompress.pipeline import Pass, Rewrite, apply_rewrites, register_pass
from fxcompress.trace import propagate_shapes

__all__ = ["ChannelsLast", "REWRITES", "LAYOUT_MODULES"]

#: Modules whose 4-d tensors (weights, and their pruning masks and dense values) are stored channels-last.
LAYOUT_MODULES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.ConvTranspose2d)


def _to_channels_last(module: nn.Module) -> bool:
    """Re-lay every 4-d parameter and buffer of ``module`` channels-last in place (same ``Parameter`` objects)."""
    changed = False
    for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        if tensor.dim() != 4 or tensor.is_contiguous(memory_format=torch.channels_last):
            continue
        tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
        changed = True
    return changed


def _is_channels_last(value) -> bool:
    if not isinstance(value, fx.Node):
        return False
    return getattr(value.meta.get(meta.TENSOR_META), "memory_format", None) is torch.channels_last


def _is_view(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "view"


def _view_to_reshape(gm: fx.GraphModule, node: fx.Node) -> None:
    node.target = "reshape"


def _output_channels_last(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "output":
        return False
    found = []
    fx.node.map_arg(node.args[0], lambda n: found.append(_is_channels_last(n)))
    return any(found)


def _contiguous_outputs(gm: fx.GraphModule, node: fx.Node) -> None:
    def contiguous(value: fx.Node) -> fx.Node:
        if not _is_channels_last(value):
            return value
        with gm.graph.inserting_before(node):
            return gm.graph.call_method("contiguous", (value,))

    node.args = (fx.node.map_arg(node.args[0], contiguous),)


#: The layout fix-ups, in the order they are applied.
REWRITES: tuple[Rewrite, ...] = (
    Rewrite("view-to-reshape", _is_view, _view_to_reshape),  # x.view(*s) -> x.reshape(*s)
    Rewrite("contiguous-outputs", _output_channels_last, _contiguous_outputs),  # return y -> return y.contiguous()
)


def _fresh_layouts(gm: fx.GraphModule) -> None:
    gm.recompile()
    propagate_shapes(gm, gm.meta[meta.EXAMPLE_INPUTS], exact_layout=True)


@register_pass
@dataclasses.dataclass(frozen=True)
class ChannelsLast(Pass):
    """Store conv weights channels-last and fix up the graph ops that depend on contiguity (see :data:`REWRITES`)."""

    name: ClassVar[str] = "channels-last"
    preserves_outputs: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule) -> bool:
        relaid = [_to_channels_last(m) for m in gm.modules() if isinstance(m, LAYOUT_MODULES)]
        if not any(relaid):
            return False
        apply_rewrites(gm, REWRITES, refresh=_fresh_layouts)
        return True
