"""FoldBatchNorm: fold an eval-mode BatchNorm into the conv or linear layer that feeds it.

In eval mode a BatchNorm is a per-channel affine map ``y = (x - mean) * w /
sqrt(var + eps) + b``; when ``x`` is the output of a conv or linear layer the
map can be multiplied into that layer's weight and bias, removing one
memory-bound pass over the activation per block. The arithmetic is torch's
own (:func:`torch.nn.utils.fusion.fuse_conv_bn_weights`).

>>> import torch, fxcompress
>>> from torch import nn
>>> from fxcompress.passes import FoldBatchNorm
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
>>> gm = fxcompress.trace(model, torch.randn(1, 3, 8, 8))
>>> FoldBatchNorm()(gm).modified, [n.target for n in gm.graph.nodes if n.op == "call_module"]
(True, ['0', '2'])

What is left alone (the model stays correct, only less folded):

- a BatchNorm in training mode (it normalises with batch statistics, so no
  fixed affine map exists) or one without running statistics: skipped with one
  :class:`FoldBatchNormWarning` naming the modules; call ``model.eval()`` first;
- a producer whose output has other users besides the BatchNorm (they must
  keep seeing the un-normalised tensor), or a producer or BatchNorm module
  called from more than one place, or whose weights the graph reads directly;
- masked layers (run it after ``shrink``), subclasses of the listed types
  (their ``forward`` may not be the plain affine op), grouped transposed convs.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter, defaultdict
from typing import ClassVar

import torch
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights

from fxcompress import meta
from fxcompress.masks import is_masked
from fxcompress.ops import op_keys
from fxcompress.pipeline import Pass, register_pass
from fxcompress.trace import module_uses

__all__ = ["FoldBatchNorm", "FoldBatchNormWarning", "Fold", "FOLDS"]


class FoldBatchNormWarning(UserWarning):
    """A BatchNorm that matched a fold pattern was left in place, for the reason given."""


@dataclasses.dataclass(frozen=True)
class Fold:
    """One (pattern, replacement) entry: a producer module type feeding a BatchNorm type.

    ``transpose`` marks weights laid out ``(in, out, ...)``; ``output_ndim``
    restricts the producer's output rank (a ``BatchNorm1d`` after a ``Linear``
    normalises the linear's features only when the output is ``(N, C)``).
    """

    producer: type[nn.Module]
    norm: type[nn.Module]
    transpose: bool = False
    output_ndim: int | None = None


FOLDS: tuple[Fold, ...] = (
    Fold(nn.Conv1d, nn.BatchNorm1d),  # bn(conv1d(x)) -> conv1d'(x)
    Fold(nn.Conv2d, nn.BatchNorm2d),  # bn(conv2d(x)) -> conv2d'(x)
    Fold(nn.Conv3d, nn.BatchNorm3d),  # bn(conv3d(x)) -> conv3d'(x)
    Fold(nn.ConvTranspose1d, nn.BatchNorm1d, transpose=True),  # bn(convT1d(x)) -> convT1d'(x)
    Fold(nn.ConvTranspose2d, nn.BatchNorm2d, transpose=True),  # bn(convT2d(x)) -> convT2d'(x)
    Fold(nn.ConvTranspose3d, nn.BatchNorm3d, transpose=True),  # bn(convT3d(x)) -> convT3d'(x)
    Fold(nn.Linear, nn.BatchNorm1d, output_ndim=2),  # bn1d(linear(x)) with x (N, F) -> linear'(x)
)

_SHOWN = 4  # module names listed per reason in the warning

_BY_TYPES: dict[tuple[type, type], Fold] = {(f.producer, f.norm): f for f in FOLDS}



def _candidate(gm: fx.GraphModule, bn_node: fx.Node) -> tuple[fx.Node, Fold] | None:
    """The producer node and table entry when ``bn_node`` is a BatchNorm applied to a listed layer's output."""
    if bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs:
        return None
    producer = bn_node.args[0]
    if not isinstance(producer, fx.Node) or producer.op != "call_module":
        return None
    for layer in op_keys(gm, producer):
        for norm in op_keys(gm, bn_node):
            if (layer, norm) in _BY_TYPES:
                return producer, _BY_TYPES[layer, norm]
    return None


def _output_ndim(node: fx.Node) -> int | None:
    tensor_meta = node.meta.get(meta.TENSOR_META)
    return len(tensor_meta.shape) if hasattr(tensor_meta, "shape") else None


def _fits(gm: fx.GraphModule, uses: Counter, producer: fx.Node, bn_node: fx.Node, fold: Fold) -> bool:
    """Whether folding changes nothing else: the BatchNorm is the producer's only reader, nothing is shared."""
    if len(producer.users) != 1 or uses[producer.target] != 1 or uses[bn_node.target] != 1:
        return False
    if fold.output_ndim is not None and _output_ndim(producer) != fold.output_ndim:
        return False
    layer, bn = gm.get_submodule(producer.target), gm.get_submodule(bn_node.target)
    if fold.transpose and layer.groups != 1:
        return False
    return bn.num_features == layer.weight.shape[1 if fold.transpose else 0]


def _skip_reason(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why a structurally matching BatchNorm still cannot be folded, in words the user can act on."""
    if bn.training:
        return "in training mode (call model.eval() before compiling)"
    if bn.running_mean is None or bn.running_var is None:
        return "without running statistics (track_running_stats=False)"
    if is_masked(layer) or is_masked(bn):
        return "next to pruning masks (run fold-batch-norm after shrink)"
    if parametrize.is_parametrized(layer) or parametrize.is_parametrized(bn):
        return "next to quantizers (run fold-batch-norm before insert-observers)"
    return None


def _fold(gm: fx.GraphModule, producer: fx.Node, bn_node: fx.Node, fold: Fold) -> None:
    """Multiply the BatchNorm into the producer's parameters and splice the BatchNorm out of the graph."""
    layer, bn = gm.get_submodule(producer.target), gm.get_submodule(bn_node.target)
    with torch.no_grad():
        weight, bias = fuse_conv_bn_weights(
            layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias, fold.transpose
        )
    layer.weight = nn.Parameter(weight.detach(), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias.detach(), requires_grad=layer.weight.requires_grad)
    bn_node.replace_all_uses_with(producer)
    gm.graph.erase_node(bn_node)
    gm.delete_submodule(bn_node.target)


def _warn(skipped: dict[str, list[str]]) -> None:
    """One warning for the whole run, grouped by reason: ``3 BatchNorms are in training mode (...): 'bn1', ...``."""
    if not skipped:
        return
    parts = []
    for reason, names in skipped.items():
        shown = ", ".join(repr(n) for n in names[:_SHOWN])
        if len(names) > _SHOWN:
            shown += f" and {len(names) - _SHOWN} more"
        parts.append(f"{len(names)} BatchNorm(s) {reason}: {shown}")
    warnings.warn("fold-batch-norm left BatchNorms in place: " + "; ".join(parts), FoldBatchNormWarning, stacklevel=4)


@register_pass
@dataclasses.dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold every eval-mode BatchNorm that directly follows a conv or linear layer into it (see :data:`FOLDS`)."""

    name: ClassVar[str] = "fold-batch-norm"
    preserves_outputs: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule) -> bool:
        uses = module_uses(gm)
        skipped: dict[str, list[str]] = defaultdict(list)
        modified = False
        for bn_node in list(gm.graph.nodes):
            matched = _candidate(gm, bn_node)
            if matched is None:
                continue
            producer, fold = matched
            if not _fits(gm, uses, producer, bn_node, fold):
                continue
            reason = _skip_reason(gm.get_submodule(producer.target), gm.get_submodule(bn_node.target))
            if reason is not None:
                skipped[reason].append(bn_node.target)
                continue
            _fold(gm, producer, bn_node, fold)
            modified = True
        _warn(skipped)
        return modified
