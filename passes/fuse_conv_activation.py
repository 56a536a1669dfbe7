"""FuseConvActivation: run ``act(conv(x))`` and ``act(conv(x) + y)`` as one oneDNN convolution with a post-op.

Eager PyTorch runs a conv, then a separate pass over its output for the
activation (and another for a residual add): for the thin layers of a pruned
network those memory-bound passes are a large share of the time. oneDNN can
apply them while the conv's output is still in cache; PyTorch exposes that as
``torch.ops.mkldnn._convolution_pointwise`` (the op TorchInductor's CPU
backend emits). This pass swaps each matched conv for a :class:`FusedConv2d`
that calls it::

    conv = self.conv(x); relu = self.relu(conv)            ->  conv = self.conv(x)       # FusedConv2d, post-op relu
    conv = self.conv(x); add = conv + y; relu = relu(add)  ->  conv = self.conv(x, y)    # FusedConv2d, add then relu

``FusedConv2d`` is an ``nn.Conv2d`` with the same parameters under the same
names (``state_dict`` is unchanged) that falls back to the plain eager ops
when autograd needs them (training, or any forward with grad enabled), on
non-CPU tensors, non-float32 tensors, or on a PyTorch build without oneDNN: the
module stays trainable and correct everywhere, and is fast under
``torch.no_grad()`` / ``torch.inference_mode()`` on CPU. Importing this module
registers the fused op's FLOPs with ``torch.utils.flop_counter``, so MACs
reports count it as the convolution it is. ``FusedConv2d`` overrides
``forward``, so the channel analysis treats it as opaque: prune first, fuse last.

Left alone: convs whose output has other users, shared or masked convs,
subclasses of ``Conv2d``, string paddings and non-zero padding modes, adds
that broadcast, activations with options the post-op cannot express.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula

from fxcompress import meta
from fxcompress.ops import lookup, runs_one_of
from fxcompress.masks import is_masked
from fxcompress.pipeline import Pass, register_pass
from fxcompress.trace import module_uses

__all__ = ["FuseConvActivation", "FusedConv2d", "Activation", "ACTIVATIONS", "fused_kernels_available"]


@dataclasses.dataclass(frozen=True)
class Activation:
    """A oneDNN eltwise post-op: its name, scalars and algorithm, plus the eager function computing the same."""

    attr: str
    scalars: tuple[float, ...] = ()
    algorithm: str = ""

    def eager(self, y: torch.Tensor) -> torch.Tensor:
        return _EAGER[self.attr](y, self)


_EAGER: dict[str, Callable[[torch.Tensor, Activation], torch.Tensor]] = {
    "relu": lambda y, a: F.relu(y),
    "hardtanh": lambda y, a: F.hardtanh(y, *a.scalars),
    "swish": lambda y, a: F.silu(y),
    "hardswish": lambda y, a: F.hardswish(y),
    "sigmoid": lambda y, a: torch.sigmoid(y),
    "tanh": lambda y, a: torch.tanh(y),
    "gelu": lambda y, a: F.gelu(y, approximate=a.algorithm),
}

RELU, RELU6 = Activation("relu"), Activation("hardtanh", (0.0, 6.0))
SWISH, HARDSWISH = Activation("swish"), Activation("hardswish")
SIGMOID, TANH = Activation("sigmoid"), Activation("tanh")

#: How each spelling of a supported activation maps to its post-op (modules map through a function of the module).
ACTIVATIONS: dict[object, Activation | Callable[[nn.Module], Activation]] = {
    nn.ReLU: RELU, F.relu: RELU, torch.relu: RELU, ".relu": RELU,
    nn.ReLU6: RELU6, F.relu6: RELU6,
    nn.SiLU: SWISH, F.silu: SWISH,
    nn.Hardswish: HARDSWISH, F.hardswish: HARDSWISH,
    nn.Sigmoid: SIGMOID, torch.sigmoid: SIGMOID, ".sigmoid": SIGMOID,
    nn.Tanh: TANH, torch.tanh: TANH, ".tanh": TANH,
    nn.GELU: lambda m: Activation("gelu", (), m.approximate),
}

#: Spellings of a two-tensor add (without ``alpha``) that can become the conv's binary post-op.
ADDS = (operator.add, operator.iadd, torch.add, ".add")

#: Keyword arguments an activation call may carry without changing what it computes.
_HARMLESS_KWARGS = {"inplace"}


def fused_kernels_available() -> bool:
    """Whether this PyTorch build has oneDNN's fused convolution (CPU builds with mkldnn do)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return torch.ops.mkldnn._convolution_pointwise.default is not None
    except (AttributeError, RuntimeError):
        return False


class FusedConv2d(nn.Conv2d):
    """A ``Conv2d`` whose output goes through an optional residual add and an activation, fused on CPU.

    >>> fused = FusedConv2d.from_conv(nn.Conv2d(3, 8, 3), RELU, add=False)
    >>> with torch.no_grad(): fused(torch.randn(1, 3, 8, 8)).min() >= 0
    tensor(True)
    """

    def __init__(self, *args, activation: Activation = RELU, add: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.activation = activation
        self.add = add

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, activation: Activation, add: bool) -> FusedConv2d:
        """A fused conv sharing ``conv``'s parameter objects (so optimisers and ``state_dict`` see no change)."""
        fused = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, bias=False, padding_mode=conv.padding_mode, device="meta", activation=activation, add=add,
        )
        fused.weight, fused.bias = conv.weight, conv.bias
        fused.train(conv.training)
        return fused

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation.attr}" + (", add=True" if self.add else "")

    def _fast_path(self, x: torch.Tensor, other: torch.Tensor | None) -> bool:
        """The fused op has no autograd formula and is CPU/float32 only: use it only where neither matters."""
        if x.device.type != "cpu" or x.dtype != torch.float32 or not _FUSED:
            return False
        if not torch.is_grad_enabled():
            return True
        return not (x.requires_grad or self.weight.requires_grad or (other is not None and other.requires_grad))

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if self._fast_path(x, other):
            return self._fused(x, other)
        y = self._conv_forward(x, self.weight, self.bias)
        return self.activation.eager(y if other is None else y + other)

    def _fused(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        act = self.activation
        if other is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, *geometry, act.attr, list(act.scalars), act.algorithm
            )
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self.weight, self.bias, *geometry, "add", None, act.attr, list(act.scalars), act.algorithm
        )


_FUSED = fused_kernels_available()


def _fused_conv_flops(x_shape, second, third, *args, out_shape, **kwargs) -> int:
    """FLOPs of either overload (``(X, W, B, ...)`` or ``(X, other, W, B, ...)``): those of the convolution."""
    weight_shape = third if third is not None and len(third) == len(x_shape) else second
    return conv_flop_count(x_shape, weight_shape, out_shape)


def _register_flop_formula() -> None:
    """Teach ``FlopCounterMode`` (and so every MACs report) to count the fused op like the conv it replaces."""
    packet = torch.ops.mkldnn._convolution_pointwise
    if packet not in flop_registry:
        register_flop_formula(packet)(_fused_conv_flops)


if _FUSED:
    _register_flop_formula()


# ---------------------------------------------------------------------------- matching


def _activation(gm: fx.GraphModule, node: fx.Node) -> Activation | None:
    """The post-op ``node`` computes on its single tensor argument, or None."""
    if len(node.args) != 1 or set(node.kwargs) - _HARMLESS_KWARGS:
        return None
    entry = lookup(ACTIVATIONS, gm, node)
    return entry(gm.get_submodule(node.target)) if callable(entry) else entry


def _is_add(gm: fx.GraphModule, node: fx.Node) -> bool:
    return runs_one_of(ADDS, gm, node) and len(node.args) == 2 and not node.kwargs



def _fusable_conv(gm: fx.GraphModule, uses: Counter, node, only_user: fx.Node) -> bool:
    """A plain, unshared, unmasked ``Conv2d`` call whose only reader is ``only_user``."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    conv = gm.get_submodule(node.target)
    if type(conv) is not nn.Conv2d or uses[node.target] != 1 or list(node.users) != [only_user]:
        return False
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or conv._forward_hooks or conv._forward_pre_hooks:
        return False
    return not is_masked(conv)


def _same_tensor_shape(a: fx.Node, b) -> bool:
    meta_a = a.meta.get(meta.TENSOR_META)
    meta_b = b.meta.get(meta.TENSOR_META) if isinstance(b, fx.Node) else None
    return hasattr(meta_a, "shape") and hasattr(meta_b, "shape") and (meta_a.shape, meta_a.dtype) == (
        meta_b.shape, meta_b.dtype
    )


@dataclasses.dataclass(frozen=True)
class Match:
    """``act(conv(x))`` (``add`` and ``other`` None) or ``act(conv(x) + other)``."""

    conv: fx.Node
    add: fx.Node | None
    other: fx.Node | None
    act: fx.Node
    activation: Activation


def _match(gm: fx.GraphModule, uses: Counter, act_node: fx.Node) -> Match | None:
    activation = _activation(gm, act_node)
    if activation is None:
        return None
    source = act_node.args[0]
    if _fusable_conv(gm, uses, source, act_node):  # act(conv(x)) -> fused_conv(x)
        return Match(source, None, None, act_node, activation)
    if not isinstance(source, fx.Node) or not _is_add(gm, source) or list(source.users) != [act_node]:
        return None
    for conv, other in (source.args, source.args[::-1]):  # act(conv(x) + y) -> fused_conv(x, y)
        if other is not conv and _fusable_conv(gm, uses, conv, source) and _same_tensor_shape(conv, other):
            return Match(conv, source, other, act_node, activation)
    return None


# ---------------------------------------------------------------------------- rewriting


def _rewrite(gm: fx.GraphModule, uses: Counter, match: Match) -> None:
    """Put a ``FusedConv2d`` call where the activation was (all its inputs exist there) and drop the old nodes."""
    conv = gm.get_submodule(match.conv.target)
    gm.set_submodule(match.conv.target, FusedConv2d.from_conv(conv, match.activation, add=match.add is not None))
    args = (match.conv.args[0],) + (() if match.other is None else (match.other,))
    with gm.graph.inserting_before(match.act):
        fused = gm.graph.call_module(match.conv.target, args)
    fused.meta = dict(match.act.meta)
    match.act.replace_all_uses_with(fused)
    for node in (match.act, match.add, match.conv):
        if node is not None:
            gm.graph.erase_node(node)
    if match.act.op == "call_module":
        uses[match.act.target] -= 1
        if uses[match.act.target] == 0:
            gm.delete_submodule(match.act.target)


@register_pass
@dataclasses.dataclass(frozen=True)
class FuseConvActivation(Pass):
    """Swap each ``act(conv(x))`` / ``act(conv(x) + y)`` for one :class:`FusedConv2d` call (see module docs)."""

    name: ClassVar[str] = "fuse-conv-activation"
    preserves_outputs: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule) -> bool:
        if not _FUSED:
            return False
        uses, modified = module_uses(gm), False
        for node in list(gm.graph.nodes):  # a rewrite only erases nodes before ``node``: the snapshot stays valid
            match = _match(gm, uses, node)
            if match is None:
                continue
            _rewrite(gm, uses, match)
            modified = True
        return modified
