"""The op-rule table: everything fxcompress knows about how ops treat channels.

For every op it understands — as an ``nn.Module`` type, a ``torch``/``F``
function, or a tensor method — one :class:`OpRule` says

* ``analyze``: given the channel ids of the op's inputs, what the channel ids of
  its output are, which ids it couples, which it freezes, and which parameter
  slices read or write them;
* ``shrink`` (optional): how to fix the op's module attributes or shape
  arguments once some channels are removed. Parameters themselves are sliced
  generically from the recorded slices, so most rules need no shrink step.
* ``mask`` (optional): how the op keeps computing, in the masked model, what
  its shrunk form will once some of its channels are removed. Only ops that
  compute statistics over channels need one (a norm's mean and variance must
  cover the kept channels only); zeroed parameters do the rest.

An op with no rule is *opaque*: every dimension of every tensor it touches is
frozen, with one warning naming it. It can only make the model less compressed,
never wrong. Supporting a new op is one ``@RULES.register(...)`` entry here and
one test (see CONTRIBUTING.md).

Keys: an ``nn.Module`` subclass (used only when it does not override
``forward``), a Python callable (``torch.cat``, ``operator.add``), a string
``".name"`` for the tensor method ``name``, or a string ``"pkg.mod.fn"`` for a
function looked up by qualified name (so optional packages need not be imported).
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from fxcompress import meta
from fxcompress.channels import ChannelSpace, Role
from fxcompress.ops import lookup, submodule
from fxcompress.modules import (
    MASKED_STATISTICS, MaskedLayerNorm, MaskedRMSNorm, masked_layer_norm, masked_mean, masked_rms_norm,
)
from fxcompress.trace import describe_node

__all__ = ["OpRule", "RuleTable", "RULES", "AnalyzeContext", "ShrinkContext", "Multi", "Opaque"]

Channels = tuple  # one np.ndarray of ids per tensor dimension


class Multi(tuple):
    """The channels of a node that returns several tensors (``split``, ``chunk``): one entry per output."""


class Opaque(Exception):
    """Raised by a rule that cannot handle this particular call; the node is then treated as opaque."""


# ---------------------------------------------------------------------------- contexts


@dataclass
class AnalyzeContext:
    gm: fx.GraphModule
    space: ChannelSpace

    def channels(self, arg: Any):
        return arg.meta.get(meta.CHANNELS) if isinstance(arg, fx.Node) else None

    def tensor_channels(self, arg: Any) -> Channels:
        value = self.channels(arg)
        if value is None or isinstance(value, Multi):
            raise Opaque("expected a tensor argument")
        return value

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        tm = node.meta.get(meta.TENSOR_META)
        if not isinstance(tm, TensorMetadata):
            raise Opaque("expected a tensor output")
        return tuple(tm.shape)

    def module(self, node: fx.Node) -> nn.Module:
        return submodule(self.gm, node.target)

    def where(self, node: fx.Node) -> str:
        return describe_node(self.gm, node)

    def fresh_frozen(self, shape, reason: str) -> Channels:
        return tuple(self.space.fresh(n, frozen=reason) for n in shape)

    def freeze_all(self, value, reason: str) -> None:
        """Freeze every id in a (possibly nested) channel value."""
        if value is None:
            return
        if isinstance(value, Multi):
            for item in value:
                self.freeze_all(item, reason)
            return
        for ids in value:
            self.space.freeze(ids, reason)


@dataclass
class ShrinkContext:
    gm: fx.GraphModule
    keep: np.ndarray  #: bool per component
    labels: np.ndarray  #: component of each channel id

    def kept(self, ids: np.ndarray) -> np.ndarray:
        """Positions along a dimension with ids ``ids`` that survive shrinking."""
        return np.flatnonzero(self.keep[self.labels[ids]])

    def new_size(self, ids: np.ndarray) -> int:
        return int(np.count_nonzero(self.keep[self.labels[ids]]))

    def new_shape(self, channels: Channels) -> tuple[int, ...]:
        return tuple(self.new_size(ids) for ids in channels)

    def module(self, node: fx.Node) -> nn.Module:
        return submodule(self.gm, node.target)


AnalyzeFn = Callable[[AnalyzeContext, fx.Node], Any]
ShrinkFn = Callable[[ShrinkContext, fx.Node], None]
MaskFn = Callable[[ShrinkContext, fx.Node], bool]  #: returns whether it changed the node


@dataclass(frozen=True)
class OpRule:
    analyze: AnalyzeFn
    shrink: ShrinkFn | None = None
    mask: MaskFn | None = None


class RuleTable:
    """Maps op spellings to rules. One rule may be registered under many spellings."""

    def __init__(self) -> None:
        self._rules: dict[Any, OpRule] = {}

    def register(
        self, *keys, shrink: ShrinkFn | None = None, mask: MaskFn | None = None
    ) -> Callable[[AnalyzeFn], AnalyzeFn]:
        def decorate(analyze: AnalyzeFn) -> AnalyzeFn:
            rule = OpRule(analyze, shrink, mask)
            for key in keys:
                self._rules[key] = rule
            return analyze

        return decorate

    def __contains__(self, key) -> bool:
        return key in self._rules

    def lookup(self, gm: fx.GraphModule, node: fx.Node) -> OpRule | None:
        """The rule of the op ``node`` runs, under any of its spellings (:func:`fxcompress.ops.op_keys`)."""
        return lookup(self._rules, gm, node)


RULES = RuleTable()
aten = torch.ops.aten  # torch.export spellings of the same ops share the rules below

# ---------------------------------------------------------------------------- helpers


def arg(node: fx.Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of a call node; a number computed in the graph (a size read with
    ``aten.sym_size`` from a dynamic dim, arithmetic on it) as its value on the example inputs."""
    value = node.args[index] if len(node.args) > index else node.kwargs.get(name, default)
    if not isinstance(value, fx.Node) or meta.TENSOR_META in value.meta:
        return value
    if meta.VALUE in value.meta:
        return value.meta[meta.VALUE]
    symbolic = value.meta.get("val")  # torch.export's record, which outlives shrink (dynamic dims never shrink)
    hint = symbolic.node.hint if isinstance(symbolic, torch.SymInt) else None
    return hint if isinstance(hint, int) else value


def method_dims(node: fx.Node, start: int) -> tuple:
    """Varargs-or-sequence dims of calls like ``x.permute(0, 2, 1)`` / ``x.view((a, b))``."""
    rest = node.args[start:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return tuple(rest[0])
    return tuple(rest)


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def same_shape_passthrough(ctx: AnalyzeContext, node: fx.Node, source) -> Channels:
    channels = ctx.tensor_channels(source)
    if ctx.shape(node) != ctx.shape(source):
        raise Opaque("output shape differs from input shape")
    return channels


# ---------------------------------------------------------------------------- channel-wise ops


@RULES.register(".type_as", ".type", aten.type_as.default, aten.to.other)
def cast(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``x.type_as(other)`` / ``x.to(other)``: a dtype (and device) cast of ``x``; ``other`` lends only its
    dtype, so its channels are not coupled (timm EVA/DINOv3 cast rotated queries with ``.type_as(v)``)."""
    return same_shape_passthrough(ctx, node, node.args[0])


@RULES.register(
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.SELU, nn.Softplus, nn.Hardtanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, torch.sigmoid,
    torch.tanh, F.tanh, F.leaky_relu, F.elu, F.mish, F.dropout, F.dropout2d, operator.neg, torch.neg,
    ".relu", ".relu_", ".sigmoid", ".tanh", ".contiguous", ".clone", ".detach", ".float", ".to", ".neg",
    "torchvision.ops.stochastic_depth.stochastic_depth", torch.exp, torch.cos, torch.sin, ".exp", ".cos", ".sin",
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
    aten.hardswish.default, aten.hardsigmoid.default, aten.neg.default, aten.dropout.default, aten.clone.default,
    aten.detach.default, aten.alias.default, aten._to_copy.default, aten.to.dtype, aten.contiguous.default,
    aten.exp.default, aten.cos.default, aten.sin.default, aten.pow.Tensor_Scalar, torch.pow, ".pow",
    aten.to.dtype_layout, aten.to.device,
    aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, F.hardtanh,
    aten.leaky_relu.default, aten.elu.default, aten.mish.default, aten.softplus.default, aten.relu6.default,
    aten.abs.default, aten.erf.default, aten.sqrt.default, aten.square.default,
    aten.feature_dropout.default, aten.alpha_dropout.default, aten.lift_fresh_copy.default,
    aten.fill.Scalar, aten.fill.Tensor, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero.default, aten.zero_.default,
    torch.abs, ".abs", torch.erf, ".erf", torch.sqrt, ".sqrt", torch.square, ".square", F.softplus, operator.pow,
)
def channelwise(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``y[..., c, ...] = f(x[..., c, ...])``: output channel ``c`` is input channel ``c``.

    Only functions that stay finite at 0 belong here: a removed channel may
    carry any finite value in the masked model (its consumers' columns are
    zero), but an inf or nan would leak through ``0 * inf``. A second tensor
    operand (``pow(x, exponent_tensor)``) is coupled like an elementwise operand.
    """
    if any(isinstance(ctx.channels(a), tuple) for a in node.args[1:]):
        return broadcast_into(ctx, ctx.shape(node), [a for a in node.args if isinstance(a, fx.Node)], ctx.where(node))
    return same_shape_passthrough(ctx, node, node.args[0])


def broadcast_into(ctx: AnalyzeContext, out_shape, inputs: list, why: str) -> Channels:
    """Couple the channels of broadcast-compatible ``inputs`` (nodes or scalars) dimension by dimension."""
    operands = []
    for source in inputs:
        channels = ctx.channels(source)
        if isinstance(channels, Multi):
            raise Opaque("tuple operand")
        if channels is not None:  # None: a Python scalar
            operands.append(channels)
    return broadcast_channels(ctx, out_shape, operands, why)


def broadcast_channels(ctx: AnalyzeContext, out_shape, operands: list[Channels], why: str) -> Channels:
    """The output channels of broadcasting ``operands`` to ``out_shape``.

    Dimensions align from the right. A size-1 dimension broadcast against a
    larger one is frozen (it cannot lose indices); equal-size ones are coupled.
    """
    out_ndim = len(out_shape)
    out: list = [None] * out_ndim
    for channels in operands:
        offset = out_ndim - len(channels)
        for i, ids in enumerate(channels):
            j = i + offset
            if len(ids) != out_shape[j]:
                ctx.space.freeze(ids, f"broadcast by {why}")
            elif out[j] is None:
                out[j] = ids
            else:
                ctx.space.couple(out[j], ids)
    for j, ids in enumerate(out):
        if ids is None:
            out[j] = ctx.space.fresh(out_shape[j], frozen=f"created by broadcasting in {why}")
    return tuple(out)


@RULES.register(
    operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, torch.maximum, torch.minimum,
    ".add", ".sub", ".mul", ".add_", ".mul_", aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.add.Scalar,
    aten.mul.Scalar, aten.sub.Scalar,
)
def elementwise(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Tensor-tensor and tensor-scalar arithmetic with broadcasting (residual adds, SE gates, layer scale)."""
    return broadcast_into(ctx, ctx.shape(node), list(node.args[:2]), ctx.where(node))


@RULES.register(
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_,
    torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.logical_and, torch.logical_or,
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor, aten.lt.Scalar, aten.le.Tensor,
    aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar, aten.__and__.Tensor,
    aten.__or__.Tensor, aten.logical_and.default, aten.logical_or.default, aten.bitwise_and.Tensor,
    aten.bitwise_or.Tensor, aten.bitwise_not.default, aten.logical_not.default,
)
def comparison(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Comparisons and logic (attention-mask arithmetic): elementwise, so broadcast like ``add``."""
    return broadcast_into(ctx, ctx.shape(node), list(node.args[:2]), ctx.where(node))


@RULES.register(torch.where, aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, ".masked_fill")
def select_elementwise(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``where(cond, a, b)`` / ``masked_fill(x, mask, v)``: elementwise over all tensor operands."""
    return broadcast_into(ctx, ctx.shape(node), list(node.args[:3]), ctx.where(node))


@RULES.register(torch.lerp, ".lerp", aten.lerp.Tensor, aten.lerp.Scalar, torch.addcmul, ".addcmul",
                aten.addcmul.default)
def elementwise_three(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``lerp(a, b, w)`` / ``addcmul(a, t1, t2)``: elementwise over every tensor operand, like ``add``."""
    return broadcast_into(ctx, ctx.shape(node), list(node.args[:3]), ctx.where(node))


@RULES.register(torch.addcdiv, ".addcdiv", aten.addcdiv.default)
def addcdiv(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``addcdiv(a, t1, t2) = a + value * t1 / t2``: elementwise, and the divisor ``t2`` is frozen (as in ``div``)."""
    out = broadcast_into(ctx, ctx.shape(node), list(node.args[:3]), ctx.where(node))
    ctx.freeze_all(ctx.channels(node.args[2]), f"divisor in {ctx.where(node)}")
    return out


@RULES.register(torch.clamp, ".clamp", torch.clip, ".clip", aten.clamp.Tensor, aten.clip.Tensor)
def clamp(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``clamp(x, min, max)``: channel-wise for number bounds, elementwise with tensor bounds (coupled)."""
    bounds = [arg(node, 1, "min"), arg(node, 2, "max")]
    return broadcast_into(ctx, ctx.shape(node), [node.args[0], *[b for b in bounds if isinstance(b, fx.Node)]],
                          ctx.where(node))


@RULES.register(".expand_as", aten.expand_as.default)
def expand_as(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``x.expand_as(other)`` takes ``other``'s shape: broadcast and coupled with it, like ``x + 0 * other``."""
    return broadcast_into(ctx, ctx.shape(node), list(node.args[:2]), ctx.where(node))


@RULES.register(torch.unbind, ".unbind", aten.unbind.int)
def unbind(ctx: AnalyzeContext, node: fx.Node) -> Multi:
    """``unbind(x, dim)`` (``q, k, v = qkv.unbind(0)``): ``dim`` is frozen and dropped; each piece keeps the rest."""
    channels = ctx.tensor_channels(node.args[0])
    dim = norm_dim(arg(node, 1, "dim", 0), len(channels))
    ctx.space.freeze(channels[dim], f"unbound by {ctx.where(node)}")
    rest = tuple(channels[:dim] + channels[dim + 1:])
    return Multi([rest] * len(channels[dim]))


@RULES.register(F.normalize)
def normalize(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``F.normalize(x, p, dim)`` divides by the norm over ``dim`` (clamped away from zero): that dim is
    frozen, the others are channel-wise."""
    channels = same_shape_passthrough(ctx, node, node.args[0])
    ctx.space.freeze(channels[norm_dim(arg(node, 2, "dim", 1), len(channels))], f"normalised over by {ctx.where(node)}")
    return channels


@RULES.register(torch.roll, ".roll", aten.roll.default)
def roll(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``roll`` moves indices around along ``dims`` (all of them, flattened, when none are given): frozen."""
    channels = same_shape_passthrough(ctx, node, node.args[0])
    dims = arg(node, 2, "dims", ())
    dims = [dims] if isinstance(dims, int) else list(dims)
    for d in dims or range(len(channels)):
        ctx.space.freeze(channels[norm_dim(d, len(channels))], f"rolled by {ctx.where(node)}")
    return channels


@RULES.register(aten.index.Tensor)
def index_tensor(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``x[i, j]`` with index tensors (relative position tables): indexed dims are frozen and replaced by the
    indices' (frozen) dims; dims before and after pass through."""
    return _index_with_tensors(ctx, node, ctx.tensor_channels(node.args[0]), list(node.args[1]))


def _index_with_tensors(ctx: AnalyzeContext, node: fx.Node, channels: Channels, indices: list) -> Channels:
    """``x[..., i, j, ...]``, ``indices`` holding an index tensor per indexed dim and None elsewhere."""
    used = [k for k, i in enumerate(indices) if i is not None]
    if not used or used != list(range(used[0], used[-1] + 1)):
        raise Opaque("index tensors that are not adjacent")
    out_shape = ctx.shape(node)
    before, after = channels[: used[0]], channels[used[-1] + 1:]
    middle = len(out_shape) - len(before) - len(after)
    if middle < 0:
        raise Opaque("unexpected index output")
    where = ctx.where(node)
    for k in used:
        ctx.space.freeze(channels[k], f"indexed by {where}")
        ctx.freeze_all(ctx.channels(indices[k]), f"index of {where}")
    made = ctx.fresh_frozen(out_shape[len(before): len(before) + middle], f"indexed by {where}")
    return (*before, *made, *after)


@RULES.register(torch.gather, ".gather", aten.gather.default)
def gather(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``gather(x, dim, index)``: ``out[.., j, ..] = x[.., index[.., j, ..], ..]``. The gathered dim is frozen
    in ``x`` and comes from ``index`` (frozen too); every other dim reads the same position in ``x``, ``index``
    and the output, so those are coupled (or frozen where ``index`` covers only part of ``x``)."""
    x, index = ctx.tensor_channels(node.args[0]), ctx.tensor_channels(arg(node, 2, "index"))
    dim = norm_dim(arg(node, 1, "dim"), len(x))
    if len(index) != len(x) or tuple(len(ids) for ids in index) != ctx.shape(node):
        raise Opaque("unexpected gather shapes")
    where = ctx.where(node)
    for d, (x_ids, i_ids) in enumerate(zip(x, index)):
        if d != dim and len(x_ids) == len(i_ids):
            ctx.space.couple(x_ids, i_ids)
            continue
        ctx.space.freeze(x_ids, f"gathered by {where}")
        ctx.space.freeze(i_ids, f"gathered by {where}")
    return tuple(index)


@RULES.register(torch.linalg.vector_norm, aten.linalg_vector_norm.default, torch.norm, ".norm")
def vector_norm(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """A norm over ``dim`` (``F.normalize``'s, cosine attention's) mixes that dim: frozen, like ``sum``."""
    channels = ctx.tensor_channels(node.args[0])
    dim = arg(node, 2, "dim")
    dims = range(len(channels)) if dim is None else [dim] if isinstance(dim, int) else dim
    dims = {norm_dim(d, len(channels)) for d in dims}
    keepdim = arg(node, 3, "keepdim", False)
    out = []
    for d, ids in enumerate(channels):
        if d not in dims:
            out.append(ids)
            continue
        ctx.space.freeze(ids, f"reduced over by {ctx.where(node)}")
        if keepdim:
            out.append(ctx.space.fresh(1, frozen=f"reduced by {ctx.where(node)}"))
    if tuple(len(i) for i in out) != ctx.shape(node):
        raise Opaque("unexpected norm output")
    return tuple(out)


@RULES.register(torch.rsqrt, ".rsqrt", aten.rsqrt.default, torch.reciprocal, aten.reciprocal.default, torch.log,
                aten.log.default)
def channelwise_unbounded(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Channel-wise but infinite at 0 (``rsqrt``, ``log``): channels pass through and are frozen.

    A removed channel would turn into inf and leak through ``0 * inf = nan``.
    """
    channels = same_shape_passthrough(ctx, node, node.args[0])
    ctx.freeze_all(channels, f"infinite at zero in {ctx.where(node)}")
    return channels


@RULES.register(torch.cumsum, ".cumsum", aten.cumsum.default)
def cumulative(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``cumsum`` along ``dim`` mixes that dim's indices (frozen); the others pass through."""
    channels = same_shape_passthrough(ctx, node, node.args[0])
    ctx.space.freeze(channels[norm_dim(arg(node, 1, "dim"), len(channels))], f"accumulated over by {ctx.where(node)}")
    return channels


@RULES.register(aten.new_ones.default, aten.new_zeros.default, aten.new_full.default, aten.new_empty.default,
                ".new_ones", ".new_zeros")
def created_like(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """A tensor made from constants that only borrows dtype/device from its input: no channels."""
    return ctx.fresh_frozen(ctx.shape(node), f"made from constants by {ctx.where(node)}")


@RULES.register(torch.ones_like, torch.zeros_like, torch.full_like, aten.ones_like.default, aten.zeros_like.default,
                aten.full_like.default)
def constant_like(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """A constant of its input's shape (Swin v2's zero key bias): it follows the input's channels, since
    dropping an entry of a constant is exact and its shape follows the input's after shrinking."""
    return same_shape_passthrough(ctx, node, node.args[0])


@RULES.register(operator.truediv, torch.div, ".div", aten.div.Tensor, aten.div.Scalar)
def divide(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Like ``elementwise``, but the divisor is frozen: a masked (zero) divisor channel would give inf/nan.
    A divisor clamped to a positive minimum (``F.normalize``'s ``norm.clamp_min(eps)``) never is zero."""
    out = broadcast_into(ctx, ctx.shape(node), list(node.args[:2]), ctx.where(node))
    if not _positive(node.args[1]):
        ctx.freeze_all(ctx.channels(node.args[1]), f"divisor in {ctx.where(node)}")
    return out


#: ops that only move or repeat values, through which a divisor's positivity is looked up
_VALUE_PRESERVING = {aten.expand.default, aten.expand_as.default, aten.view.default, aten.reshape.default,
                     aten.unsqueeze.default, aten.contiguous.default, aten.clone.default, "expand", "expand_as",
                     "view", "reshape", "unsqueeze", "contiguous"}
_CLAMPS = {aten.clamp_min.default: 1, aten.clamp.default: 1, torch.clamp: 1, torch.clamp_min: 1, "clamp": 1,
           "clamp_min": 1}


def _positive(value) -> bool:
    """Whether ``value`` is provably > 0 everywhere: a positive number, or a clamp to a positive minimum."""
    if isinstance(value, (int, float)):
        return value > 0
    while isinstance(value, fx.Node) and value.target in _VALUE_PRESERVING:
        value = value.args[0]
    if not isinstance(value, fx.Node) or value.target not in _CLAMPS:
        return False
    low = arg(value, _CLAMPS[value.target], "min")
    return isinstance(low, (int, float)) and low > 0


def _norm_channel_dim(ctx: AnalyzeContext, node: fx.Node, module: nn.Module) -> Channels:
    channels = same_shape_passthrough(ctx, node, node.args[0])
    if len(channels) < 2:
        raise Opaque("unbatched input")
    ids = channels[1]
    for name in ("weight", "bias"):
        if getattr(module, name, None) is not None:
            ctx.space.add_slice(node.target, name, 0, ids, Role.AFFINE)
    for name in ("running_mean", "running_var"):
        if getattr(module, name, None) is not None:
            ctx.space.add_slice(node.target, name, 0, ids, Role.BUFFER)
    return channels


def _shrink_num_features(ctx: ShrinkContext, node: fx.Node) -> None:
    module = ctx.module(node)
    module.num_features = ctx.new_size(node.meta[meta.CHANNELS][1])


@RULES.register(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    shrink=_shrink_num_features,
)
def batch_norm(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Per-channel normalisation: channels pass through; weight, bias and running stats are per channel."""
    return _norm_channel_dim(ctx, node, ctx.module(node))


# Norms over the last dim compute their statistics over its channels. Those channels stay prunable: the
# rule records them under meta.STATISTICS and, once some are removed, its mask step switches the node to
# statistics over the kept channels only (fxcompress.modules), which is what the shrunk norm computes.


def _statistics_over(ctx: AnalyzeContext, node: fx.Node, channels: Channels, k: int) -> Channels:
    """Record that ``node`` normalises over its last ``k`` dims: one dim stays prunable, several are frozen."""
    if k == 1:
        node.meta[meta.STATISTICS] = channels[-1]
        return channels
    for ids in channels[-k:]:
        ctx.space.freeze(ids, f"normalised over by {ctx.where(node)}")
    return channels


def _device_of(gm: fx.GraphModule) -> torch.device:
    """Where the model's tensors live: buffers the rules add go there too."""
    return next((t.device for t in [*gm.parameters(), *gm.buffers()]), torch.device("cpu"))


def _keep_tensor(ctx: ShrinkContext, node: fx.Node) -> torch.Tensor:
    return torch.from_numpy(ctx.keep[ctx.labels[node.meta[meta.STATISTICS]]].astype(np.float32))


#: The arguments of each functional statistics op, in the order its masked form takes them (then ``keep``).
_STATISTICS_ARGS = {
    "layer_norm": ((0, "input"), (1, "normalized_shape"), (2, "weight"), (3, "bias"), (4, "eps", 1e-5)),
    "rms_norm": ((0, "input"), (1, "normalized_shape"), (2, "weight"), (3, "eps")),
    "mean": ((0, "input"), (1, "dim"), (2, "keepdim", False)),
}
#: masked form -> (the plain function it shrinks back to, its kind)
_UNMASKED = {masked_layer_norm: (F.layer_norm, "layer_norm"), masked_rms_norm: (F.rms_norm, "rms_norm"),
             masked_mean: (torch.mean, "mean")}


def _statistics_kind(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return "mean" if name.startswith("mean") else name.split(".")[0].removeprefix("masked_")


def restrict_statistics(ctx: ShrinkContext, node: fx.Node) -> bool:
    """Make ``node`` compute its statistics over the kept channels only; return whether it changed.

    A module becomes its masked twin (same parameters and hooks, plus a
    ``channel_keep`` buffer); a function call is rewritten to the masked
    function with the keep vector as a buffer of the graph module.
    """
    if meta.STATISTICS not in node.meta:
        return False
    keep = _keep_tensor(ctx, node).to(_device_of(ctx.gm))
    current = _current_keep(ctx.gm, node)
    if current is not None:
        if torch.equal(current, keep):
            return False
        current.copy_(keep)
        return True
    if bool(keep.all()):
        return False
    if node.op == "call_module":
        module = ctx.module(node)
        module._unmasked_class = type(module)
        module.__class__ = next(v for k, v in MASKED_STATISTICS.items() if isinstance(k, type) and isinstance(module, k))
        module.register_buffer("channel_keep", keep)
        return True
    kind = _statistics_kind(node)
    values = [arg(node, i, name, *default) for i, name, *default in _STATISTICS_ARGS[kind]]
    if kind == "mean":
        values[1] = values[1][0] if isinstance(values[1], (list, tuple)) else values[1]
    name = _free_attr(ctx.gm, f"{node.name}_channel_keep")
    ctx.gm.register_buffer(name, keep)
    with ctx.gm.graph.inserting_before(node):
        keep_node = ctx.gm.graph.get_attr(name)
    keep_node.meta[meta.TENSOR_META] = _extract_tensor_metadata(keep)
    masked = MASKED_STATISTICS[node.target] if node.op == "call_function" else MASKED_STATISTICS[torch.mean]
    node.op, node.target, node.args, node.kwargs = "call_function", masked, (*values, keep_node), {}
    ctx.gm.recompile()
    return True


def _current_keep(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The keep vector a masked statistics node already uses, or None for a plain node."""
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "channel_keep", None)
    if node.target in MASKED_STATISTICS.values():
        return gm.get_buffer(node.args[-1].target)
    return None


def _free_attr(gm: fx.GraphModule, base: str) -> str:
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    return name


def unrestrict_statistics(ctx: ShrinkContext, node: fx.Node) -> None:
    """After slicing, a masked statistics node keeps only kept channels: back to the plain, smaller op."""
    if meta.STATISTICS not in node.meta:
        return
    size = ctx.new_size(node.meta[meta.STATISTICS])
    if node.op == "call_module":
        module = ctx.module(node)
        module.normalized_shape = (size,)
        if hasattr(module, "channel_keep"):
            del module._buffers["channel_keep"]
            module.__class__ = module.__dict__.pop("_unmasked_class")
        return
    if _current_keep(ctx.gm, node) is None:
        return
    keep_node = node.args[-1]
    plain, kind = _UNMASKED[node.target]
    args = list(node.args[:-1])
    if kind != "mean":
        args[1] = (size,)
    node.target, node.args = plain, tuple(args)
    ctx.gm.graph.erase_node(keep_node)
    delattr(ctx.gm, keep_node.target)


@RULES.register(nn.LayerNorm, nn.RMSNorm, MaskedLayerNorm, MaskedRMSNorm, shrink=unrestrict_statistics,
                mask=restrict_statistics)
def layer_norm_module(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """LayerNorm / RMSNorm: statistics over the normalised dims (see ``_statistics_over``); affine per channel."""
    module = ctx.module(node)
    channels = same_shape_passthrough(ctx, node, node.args[0])
    k = len(module.normalized_shape)
    for offset, ids in enumerate(channels[-k:]):
        for name in ("weight", "bias"):
            if getattr(module, name, None) is not None:
                ctx.space.add_slice(node.target, name, offset, ids, Role.AFFINE)
    return _statistics_over(ctx, node, channels, k)


@RULES.register(F.layer_norm, aten.layer_norm.default, F.rms_norm, aten.rms_norm.default,
                masked_layer_norm, masked_rms_norm,
                shrink=unrestrict_statistics, mask=restrict_statistics)
def layer_norm_function(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    channels = same_shape_passthrough(ctx, node, node.args[0])
    k = len(arg(node, 1, "normalized_shape"))
    params = ((2, "weight"),) if _statistics_kind(node) == "rms_norm" else ((2, "weight"), (3, "bias"))
    for index, name in params:
        param = ctx.channels(arg(node, index, name))
        if param is not None:
            for p_ids, ids in zip(param, channels[-k:]):
                ctx.space.couple(p_ids, ids)
    return _statistics_over(ctx, node, channels, k)


def _shrink_group_norm(ctx: ShrinkContext, node: fx.Node) -> None:
    channels = node.meta[meta.CHANNELS][1]
    if node.op == "call_module":
        module = ctx.module(node)
        group_size = module.num_channels // module.num_groups
        module.num_channels = ctx.new_size(channels)
        module.num_groups = module.num_channels // group_size
        return
    groups = arg(node, 1, "num_groups")
    new_groups = ctx.new_size(channels) // (len(channels) // groups)
    node.args = (node.args[0], new_groups, *node.args[2:]) if len(node.args) > 1 else node.args
    if "num_groups" in node.kwargs:
        node.kwargs = {**node.kwargs, "num_groups": new_groups}


@RULES.register(nn.GroupNorm, F.group_norm, aten.group_norm.default, shrink=_shrink_group_norm)
def group_norm(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """GroupNorm's statistics mix the channels of a group, so a group is pruned whole (one component each)."""
    channels = same_shape_passthrough(ctx, node, node.args[0])
    if len(channels) < 2:
        raise Opaque("unbatched input")
    groups = ctx.module(node).num_groups if node.op == "call_module" else arg(node, 1, "num_groups")
    if not isinstance(groups, int):
        raise Opaque("num_groups computed in the graph")
    ctx.space.couple(channels[1], np.repeat(ctx.space.fresh(groups), len(channels[1]) // groups))
    if node.op == "call_module":
        module = ctx.module(node)
        for name in ("weight", "bias"):
            if getattr(module, name, None) is not None:
                ctx.space.add_slice(node.target, name, 0, channels[1], Role.AFFINE)
        return channels
    for index, name in ((2, "weight"), (3, "bias")):
        param = ctx.channels(arg(node, index, name))
        if param is not None:
            ctx.space.couple(param[0], channels[1])
    return channels


@dataclass(frozen=True)
class _NormArgs:
    """Where a functional per-channel norm takes its tensors (positions in its schema)."""

    weight: int
    bias: int
    running_mean: int | None = None
    running_var: int | None = None


#: Every spelling of per-channel batch/instance norm and where its tensors are.
_NORM_ARGS: dict = {
    F.batch_norm: _NormArgs(weight=3, bias=4, running_mean=1, running_var=2),
    F.instance_norm: _NormArgs(weight=3, bias=4, running_mean=1, running_var=2),
    aten.batch_norm.default: _NormArgs(1, 2, 3, 4),
    aten.instance_norm.default: _NormArgs(1, 2, 3, 4),
    aten.native_batch_norm.default: _NormArgs(1, 2, 3, 4),
    aten._native_batch_norm_legit.default: _NormArgs(1, 2, 3, 4),
    aten._native_batch_norm_legit.no_stats: _NormArgs(1, 2),
    aten._native_batch_norm_legit_no_training.default: _NormArgs(1, 2, 3, 4),
    aten._native_batch_norm_legit_functional.default: _NormArgs(1, 2, 3, 4),
}

@RULES.register(*_NORM_ARGS)
def batch_norm_function(ctx: AnalyzeContext, node: fx.Node):
    """Functional per-channel norm (``F.batch_norm``, timm's ``BatchNormAct2d``, every export spelling).

    Like the module: channels pass through dim 1, weight and bias are
    per-channel affine parameters, running statistics per-channel buffers.
    The aten forms that return ``(out, save_mean, save_rstd, ...)`` give the
    per-channel extras the input's channel ids too.
    """
    channels = ctx.tensor_channels(node.args[0])
    if len(channels) < 2:
        raise Opaque("unbatched input")
    positions = _NORM_ARGS[node.target]
    roles = {"weight": Role.AFFINE, "bias": Role.AFFINE, "running_mean": Role.BUFFER, "running_var": Role.BUFFER}
    for name, role in roles.items():
        index = getattr(positions, name)
        if index is not None:
            param = _param_channels(ctx, node, index, name, {0: role})
            if param is not None:
                ctx.space.couple(param[0], channels[1])
    output = node.meta.get(meta.TENSOR_META)
    if isinstance(output, TensorMetadata):
        return same_shape_passthrough(ctx, node, node.args[0])
    extras = [channels[1:2] if tuple(tm.shape) == (len(channels[1]),) else ctx.fresh_frozen(tm.shape, f"statistics of {ctx.where(node)}")
              for tm in output[1:]]
    return Multi([channels, *extras])


# ---------------------------------------------------------------------------- layers with weights


def _conv_spatial(ctx: AnalyzeContext, node: fx.Node, channels: Channels, nspatial: int,
                  out_shape: tuple[int, ...] | None = None) -> tuple[list, int]:
    """Batch dims pass through, input spatial dims freeze, output spatial dims are new and frozen."""
    out_shape = ctx.shape(node) if out_shape is None else out_shape
    cdim = len(channels) - nspatial - 1
    for ids in channels[cdim + 1 :]:
        ctx.space.freeze(ids, f"spatial dimension of {ctx.where(node)}")
    out = list(channels[:cdim]) + [None]
    out += [ctx.space.fresh(n, frozen=f"spatial dimension of {ctx.where(node)}") for n in out_shape[cdim + 1 :]]
    return out, cdim


def _shrink_conv(ctx: ShrinkContext, node: fx.Node) -> None:
    conv = ctx.module(node)
    in_ids = node.args[0].meta[meta.CHANNELS][-conv.weight.dim() + 1]
    new_in = ctx.new_size(in_ids)
    if conv.in_channels // conv.groups == 1 and conv.groups > 1:  # depthwise-like: one group per input channel
        conv.groups = new_in
    conv.in_channels = new_in
    conv.out_channels = conv.weight.shape[1] * conv.groups if conv.transposed else conv.weight.shape[0]


def _grouped_channels(ctx: AnalyzeContext, in_ids: np.ndarray, groups: int, c_out: int):
    """``(output ids, ids the weight's columns read)`` of a convolution with ``groups``.

    * ``groups == 1``: new output ids; the columns read every input channel.
    * depthwise-like (one input channel per group, ``m`` outputs each): output
      channel ``j`` is input ``j // m``; the weight has one column, read by none.
    * other grouped convolutions: the same local index is pruned in every
      group (input and output), so all groups keep equal sizes.
    """
    if groups == 1:
        return ctx.space.fresh(c_out), in_ids
    if len(in_ids) // groups == 1:
        return np.repeat(in_ids, c_out // groups), None
    in_local = in_ids.reshape(groups, -1)
    ctx.space.couple(in_local[1:].ravel(), np.tile(in_local[0], groups - 1))
    return np.tile(ctx.space.fresh(c_out // groups), groups), in_local[0]


@RULES.register(nn.Conv1d, nn.Conv2d, nn.Conv3d, shrink=_shrink_conv)
def conv(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Convolution: consumes input channels (weight columns), produces output channels (weight rows,
    bias); grouped and depthwise as :func:`_grouped_channels` says."""
    module = ctx.module(node)
    channels = ctx.tensor_channels(node.args[0])
    nspatial = module.weight.dim() - 2
    out, cdim = _conv_spatial(ctx, node, channels, nspatial)
    in_ids = channels[cdim]
    out_ids, read = _grouped_channels(ctx, in_ids, module.groups, module.out_channels)
    if read is not None:
        ctx.space.add_slice(node.target, "weight", 1, read, Role.CONSUMER)
    ctx.space.add_slice(node.target, "weight", 0, out_ids, Role.PRODUCER)
    if module.bias is not None:
        ctx.space.add_slice(node.target, "bias", 0, out_ids, Role.PRODUCER)
    out[cdim] = out_ids
    return tuple(out)


@RULES.register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, shrink=_shrink_conv)
def conv_transpose(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Transposed convolution (``groups == 1``): weight is ``[in, out, *k]``."""
    module = ctx.module(node)
    if module.groups != 1 or len(node.args) > 1:  # output_size argument depends on spatial sizes only, but be safe
        raise Opaque("grouped transposed convolution")
    channels = ctx.tensor_channels(node.args[0])
    out, cdim = _conv_spatial(ctx, node, channels, module.weight.dim() - 2)
    out_ids = ctx.space.fresh(module.out_channels)
    ctx.space.add_slice(node.target, "weight", 0, channels[cdim], Role.CONSUMER)
    ctx.space.add_slice(node.target, "weight", 1, out_ids, Role.PRODUCER)
    if module.bias is not None:
        ctx.space.add_slice(node.target, "bias", 0, out_ids, Role.PRODUCER)
    out[cdim] = out_ids
    return tuple(out)


def _shrink_linear(ctx: ShrinkContext, node: fx.Node) -> None:
    module = ctx.module(node)
    module.out_features, module.in_features = module.weight.shape


@RULES.register(nn.Linear, shrink=_shrink_linear)
def linear(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Linear: consumes the last dimension (weight columns), produces a new one (weight rows, bias)."""
    module = ctx.module(node)
    channels = ctx.tensor_channels(node.args[0])
    out_ids = ctx.space.fresh(module.out_features)
    ctx.space.add_slice(node.target, "weight", 1, channels[-1], Role.CONSUMER)
    ctx.space.add_slice(node.target, "weight", 0, out_ids, Role.PRODUCER)
    if module.bias is not None:
        ctx.space.add_slice(node.target, "bias", 0, out_ids, Role.PRODUCER)
    return tuple(channels[:-1]) + (out_ids,)


def _shrink_embedding(ctx: ShrinkContext, node: fx.Node) -> None:
    module = ctx.module(node)
    module.embedding_dim = module.weight.shape[1]


@RULES.register(nn.Embedding, shrink=_shrink_embedding)
def embedding(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Embedding: index dims pass through; the embedding dimension is produced by the weight's columns."""
    module = ctx.module(node)
    channels = ctx.tensor_channels(node.args[0])
    out_ids = ctx.space.fresh(module.embedding_dim)
    ctx.space.add_slice(node.target, "weight", 1, out_ids, Role.PRODUCER)
    return tuple(channels) + (out_ids,)


def _param_channels(ctx: AnalyzeContext, node: fx.Node, index: int, name: str, roles: dict[int, Role]):
    """Channels of a weight passed as an argument (``F.linear(x, w)``, export graphs), upgrading its roles.

    The weight must be a parameter read by ``get_attr``: only then can it be
    masked and sliced.
    """
    weight = arg(node, index, name)
    if weight is None:
        return None
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        raise Opaque(f"{name} is computed in the graph, not a parameter")
    channels = ctx.tensor_channels(weight)
    owner, _, attr = weight.target.rpartition(".")
    # a buffer (a fixed blur filter) is sliced but never masked: only parameters carry masks
    maskable = isinstance(getattr(ctx.gm.get_submodule(owner), attr, None), nn.Parameter)
    for dim, role in roles.items():
        ctx.space.add_slice(owner, attr, dim, channels[dim], role, maskable=maskable)
    return channels


@RULES.register(F.linear, aten.linear.default)
def linear_function(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``linear(x, w, b)`` with parameter arguments: same channel semantics as ``nn.Linear``."""
    channels = ctx.tensor_channels(node.args[0])
    weight = _param_channels(ctx, node, 1, "weight", {0: Role.PRODUCER, 1: Role.CONSUMER})
    bias = arg(node, 2, "bias")
    if isinstance(bias, fx.Node) and bias.op != "get_attr":  # computed (Swin v2's cat of q, zero, v biases)
        bias = ctx.tensor_channels(bias)
    else:
        bias = _param_channels(ctx, node, 2, "bias", {0: Role.PRODUCER})
    ctx.space.couple(weight[1], channels[-1])
    if bias is not None:
        ctx.space.couple(bias[-1], weight[0])
    return tuple(channels[:-1]) + (weight[0],)


@RULES.register(torch.addmm, aten.addmm.default)
def addmm(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``addmm(bias, x [N, in], w [in, out])``: a linear layer with a transposed weight (HF GPT-2's Conv1D)."""
    channels = ctx.tensor_channels(node.args[1])
    weight = _param_channels(ctx, node, 2, "mat2", {0: Role.CONSUMER, 1: Role.PRODUCER})
    bias = _param_channels(ctx, node, 0, "input", {0: Role.PRODUCER} if len(ctx.shape(node.args[0])) == 1 else {})
    if bias is None or len(bias) != 1 or len(channels) != 2:
        raise Opaque("addmm that is not a linear layer")
    ctx.space.couple(weight[0], channels[1])
    ctx.space.couple(bias[0], weight[1])
    return (channels[0], weight[1])


def _shrink_conv_function(ctx: ShrinkContext, node: fx.Node) -> None:
    """A depthwise-like functional convolution has one group per input channel: ``groups`` follows them."""
    groups = arg(node, 6, "groups", 1)
    weight = node.args[1].meta[meta.CHANNELS]
    if groups == 1 or len(weight[1]) != 1:
        return
    new_groups = ctx.new_size(node.args[0].meta[meta.CHANNELS][-len(weight) + 1])
    if len(node.args) > 6:
        node.args = (*node.args[:6], new_groups, *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "groups": new_groups}


@RULES.register(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, aten.conv1d.default,
                aten.conv2d.default, aten.conv3d.default,
                shrink=_shrink_conv_function)
def conv_function(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``conv(x, w, b, stride, padding, dilation, groups)`` with parameter arguments, as ``nn.Conv2d``."""
    channels = ctx.tensor_channels(node.args[0])
    groups = arg(node, 6, "groups", 1)
    if not isinstance(groups, int):
        raise Opaque("groups computed in the graph")
    weight = _param_channels(ctx, node, 1, "weight", {0: Role.PRODUCER, 1: Role.CONSUMER})
    bias = _param_channels(ctx, node, 2, "bias", {0: Role.PRODUCER})
    out, cdim = _conv_spatial(ctx, node, channels, len(weight) - 2)
    out_ids, read = _grouped_channels(ctx, channels[cdim], groups, len(weight[0]))
    for ids in weight[2:]:
        ctx.space.freeze(ids, f"kernel window of {ctx.where(node)}")
    ctx.space.couple(weight[0], out_ids)
    if read is not None:
        ctx.space.couple(weight[1], read)
    else:
        ctx.space.freeze(weight[1], f"the single input column of depthwise {ctx.where(node)}")
    if bias is not None:
        ctx.space.couple(bias[0], weight[0])
    out[cdim] = weight[0]
    return tuple(out)


@RULES.register(aten.embedding.default)
def embedding_function(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``aten.embedding(weight, indices)``: the embedding dim comes from the weight's columns."""
    weight = _param_channels(ctx, node, 0, "weight", {1: Role.PRODUCER})
    indices = ctx.tensor_channels(node.args[1])
    return tuple(indices) + (weight[1],)


@RULES.register(F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default)
def attention(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``sdpa(q [.., H, L, E], k [.., H, S, E], v [.., H, S, Ev]) -> [.., H, L, Ev]``.

    Batch and head dims couple across q, k, v and the output (grouped-query
    attention's ``enable_gqa`` is treated as opaque); the contracted ``E``
    and the softmaxed key length ``S`` are frozen (the default scale depends
    on ``E``); ``L`` and ``Ev`` pass through.
    """
    if arg(node, 7, "enable_gqa", False):
        raise Opaque("enable_gqa")
    q, k, v = (ctx.tensor_channels(node.args[i]) for i in range(3))
    if not (len(q) == len(k) == len(v) >= 3):
        raise Opaque("unexpected ranks")
    where = ctx.where(node)
    for ids in (q[-1], k[-1], k[-2], v[-2]):
        ctx.space.freeze(ids, f"contracted by {where}")
    for d in range(len(q) - 2):
        ctx.space.couple(q[d], k[d])
        ctx.space.couple(q[d], v[d])
    mask = ctx.channels(arg(node, 3, "attn_mask"))  # None also when a graph value turned out to be None
    if mask is not None:  # added to the scores [.., H, L, S]: a per-head bias (timm MaxViT) shrinks with the heads
        if isinstance(mask, Multi):
            raise Opaque("a tuple as attention mask")
        scores = (*q[:-1], k[-2])
        broadcast_channels(ctx, tuple(len(ids) for ids in scores), [scores, mask], where)
    return tuple(q[:-1]) + (v[-1],)


def _shrink_multihead_attention(ctx: ShrinkContext, node: fx.Node) -> None:
    """Swap the (already sliced) module for a ``HeadPrunedMultiheadAttention`` that accepts any head count."""
    from fxcompress.masks import remove_masks
    from fxcompress.modules import HeadPrunedMultiheadAttention

    module = ctx.module(node)
    if isinstance(module, HeadPrunedMultiheadAttention):
        module.num_heads = module.in_proj_weight.shape[0] // 3 // module.head_dim
        return
    remove_masks(module)
    owner, _, name = node.target.rpartition(".")
    parent = ctx.gm.get_submodule(owner) if owner else ctx.gm
    setattr(parent, name, HeadPrunedMultiheadAttention.from_module(module).train(module.training))


def _mha_supported(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn
    return True


@RULES.register(nn.MultiheadAttention, "fxcompress.modules.HeadPrunedMultiheadAttention",
                shrink=_shrink_multihead_attention)
def multihead_attention(ctx: AnalyzeContext, node: fx.Node) -> Multi:
    """Multi-head attention as one module: heads are channels.

    ``in_proj_weight`` rows are ``(q|k|v, head, head_dim)``: removing head
    ``h`` removes its rows in all three and its ``head_dim`` columns of
    ``out_proj``. The embedding width read by ``in_proj`` and written by
    ``out_proj`` follows the usual consumer/producer rules; masks and the
    sequence dims are frozen. Shrinking swaps in
    :class:`fxcompress.modules.HeadPrunedMultiheadAttention`, since
    ``nn.MultiheadAttention`` cannot have fewer heads than its width implies.
    """
    module = ctx.module(node)
    if not _mha_supported(module) or node.kwargs.get("need_weights", True) and len(node.users) and any(
        u.args[1] != 0 for u in node.users if u.target is operator.getitem
    ):
        raise Opaque("separate q/k/v weights, bias_k or attention weights used")
    query, key, value = (ctx.tensor_channels(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    where = ctx.where(node)
    for name, index in (("key_padding_mask", 3), ("attn_mask", 5)):
        ctx.freeze_all(ctx.channels(arg(node, index, name)), f"mask of {where}")
    embed = query[-1]
    for other in (key, value):
        ctx.space.couple(other[-1], embed)
        for ids in other[:-1]:
            ctx.space.freeze(ids, f"key/value sequence of {where}")
    heads = ctx.space.fresh(module.num_heads)
    rows = np.tile(np.repeat(heads, module.head_dim), 3)
    target = node.target
    ctx.space.add_slice(target, "in_proj_weight", 0, rows, Role.PRODUCER)
    ctx.space.add_slice(target, "in_proj_weight", 1, embed, Role.CONSUMER)
    if module.in_proj_bias is not None:
        ctx.space.add_slice(target, "in_proj_bias", 0, rows, Role.PRODUCER)
    out_ids = ctx.space.fresh(module.out_proj.weight.shape[0])
    ctx.space.add_slice(f"{target}.out_proj", "weight", 1, np.repeat(heads, module.head_dim), Role.CONSUMER)
    ctx.space.add_slice(f"{target}.out_proj", "weight", 0, out_ids, Role.PRODUCER)
    if module.out_proj.bias is not None:
        ctx.space.add_slice(f"{target}.out_proj", "bias", 0, out_ids, Role.PRODUCER)
    weights = node.meta[meta.TENSOR_META][1]
    return Multi([tuple(query[:-1]) + (out_ids,), _fresh_weights(ctx, weights, where)])


def _fresh_weights(ctx: AnalyzeContext, weights, where: str):
    return None if weights is None else ctx.fresh_frozen(weights.shape, f"attention weights of {where}")


@RULES.register("torchvision.models.swin_transformer._get_relative_position_bias")
def swin_position_bias(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Swin's ``table[(2W-1)^2, heads] -> bias[1, heads, N, N]``: the heads dim carries through."""
    table = ctx.tensor_channels(node.args[0])
    ctx.freeze_all(ctx.channels(node.args[1]), f"position index of {ctx.where(node)}")
    ctx.space.freeze(table[0], f"relative positions of {ctx.where(node)}")
    one, _, n, m = ctx.shape(node)
    where = f"window positions of {ctx.where(node)}"
    return (ctx.space.fresh(one, frozen=where), table[1], ctx.space.fresh(n, frozen=where), ctx.space.fresh(m, frozen=where))


_SWIN_HEADS = "fxcompress.swin_heads"


def _shrink_swin_attention(ctx: ShrinkContext, node: fx.Node) -> None:
    """Retarget to :func:`fxcompress.modules.window_attention` (head width from the weights) with fewer heads."""
    from fxcompress.modules import window_attention

    heads = ctx.new_size(node.meta[_SWIN_HEADS])
    args = list(node.args)
    if len(args) > 5:
        args[5] = heads
    node.args = tuple(args)
    if len(args) <= 5:
        node.kwargs = {**node.kwargs, "num_heads": heads}
    node.target = window_attention
    for index, name in ((1, "qkv_weight"), (2, "proj_weight")):
        layer = ctx.gm.get_submodule(arg(node, index, name).target.rpartition(".")[0])
        if isinstance(layer, nn.Linear):  # read by get_attr only, but keep its attributes true
            layer.out_features, layer.in_features = layer.weight.shape


@RULES.register("torchvision.models.swin_transformer.shifted_window_attention",
                "fxcompress.modules.window_attention", shrink=_shrink_swin_attention)
def swin_attention(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """torchvision's (shifted) window attention, one traced function: heads are channels.

    ``qkv_weight`` rows are ``(q|k|v, head, head_dim)``, ``proj_weight``
    columns ``(head, head_dim)``; the relative position bias and Swin V2's
    ``logit_scale`` have a heads dim. Removing a head removes all of them.
    """
    x = ctx.tensor_channels(node.args[0])
    num_heads = arg(node, 5, "num_heads")
    qkv = _param_channels(ctx, node, 1, "qkv_weight", {0: Role.PRODUCER, 1: Role.CONSUMER})
    proj = _param_channels(ctx, node, 2, "proj_weight", {0: Role.PRODUCER, 1: Role.CONSUMER})
    if not isinstance(num_heads, int) or len(qkv[0]) % (3 * num_heads):
        raise Opaque("unexpected num_heads")
    heads = ctx.space.fresh(num_heads)
    node.meta[_SWIN_HEADS] = heads
    per_head = np.repeat(heads, len(qkv[0]) // (3 * num_heads))
    ctx.space.couple(qkv[0], np.tile(per_head, 3))
    ctx.space.couple(qkv[1], x[-1])
    ctx.space.couple(proj[1], per_head)
    for index, name, partner in ((9, "qkv_bias", qkv[0]), (10, "proj_bias", proj[0])):
        bias = _param_channels(ctx, node, index, name, {0: Role.PRODUCER})
        if bias is not None:
            ctx.space.couple(bias[0], partner)
    ctx.space.couple(ctx.tensor_channels(node.args[3])[1], heads)
    logit_scale = ctx.channels(arg(node, 11, "logit_scale"))
    if logit_scale is not None:
        ctx.space.couple(logit_scale[0], heads)
    for ids in x[:-1]:
        ctx.space.freeze(ids, f"windowed by {ctx.where(node)}")
    return tuple(x[:-1]) + (proj[0],)


# ---------------------------------------------------------------------------- spatial ops


def spatial(nspatial: int) -> AnalyzeFn:
    """Pooling and resizing over the last ``nspatial`` dims: channel and batch dims pass through."""

    def analyze(ctx: AnalyzeContext, node: fx.Node) -> Channels | Multi:
        channels = ctx.tensor_channels(node.args[0])
        output = node.meta.get(meta.TENSOR_META)
        # max pooling's (values, argmax positions); a single TensorMetadata is itself a NamedTuple
        with_indices = isinstance(output, (tuple, list)) and not isinstance(output, TensorMetadata)
        out_shape = tuple(output[0].shape) if with_indices else None
        out, cdim = _conv_spatial(ctx, node, channels, nspatial, out_shape)
        out[cdim] = channels[cdim]
        return Multi([tuple(out), tuple(out)]) if with_indices else tuple(out)

    return analyze


for _n, _keys in {
    1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, F.max_pool1d, F.avg_pool1d,
        F.adaptive_avg_pool1d),
    2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, F.max_pool2d, F.avg_pool2d,
        F.adaptive_avg_pool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
    3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, F.max_pool3d, F.avg_pool3d,
        F.adaptive_avg_pool3d),
}.items():
    RULES.register(*_keys)(spatial(_n))


for _n, _keys in {
    1: (aten.max_pool1d.default, aten.avg_pool1d.default, aten.adaptive_avg_pool1d.default),
    2: (aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
        aten._adaptive_avg_pool2d.default, aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default,
        aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default, aten.upsample_bicubic2d.vec,
        aten._upsample_bilinear2d_aa.vec),
    3: (aten.max_pool3d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool3d.default,
        aten._adaptive_avg_pool3d.default),
}.items():
    RULES.register(*_keys)(spatial(_n))


@RULES.register(F.interpolate)
def interpolate(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    return spatial(len(ctx.shape(node)) - 2)(ctx, node)


@RULES.register(aten.max_pool1d_with_indices.default, aten.max_pool2d_with_indices.default,
                aten.max_pool3d_with_indices.default, aten.adaptive_max_pool1d.default,
                aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default)
def pool_with_indices(ctx: AnalyzeContext, node: fx.Node) -> Multi:
    """Max pooling that also returns the argmax positions: both outputs keep batch and channel ids."""
    nspatial = int(node.target.overloadpacket.__name__.split("pool")[1][0])  # max_pool2d_with_indices -> 2
    return spatial(nspatial)(ctx, node)


@RULES.register("torchvision.models.swin_transformer._patch_merging_pad")
def patch_merging_pad(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Swin's patch merging, ``[..., H, W, C] -> [..., H/2, W/2, 4C]``: the four pixels of each 2x2 window
    concatenated along channels, so the channel ids tile four times; the spatial dims are frozen."""
    channels = ctx.tensor_channels(node.args[0])
    shape = ctx.shape(node)
    if len(shape) != len(channels) or shape[-1] != 4 * len(channels[-1]):
        raise Opaque("unexpected patch merging shape")
    where = ctx.where(node)
    for ids in channels[-3:-1]:
        ctx.space.freeze(ids, f"windowed by {where}")
    return (*channels[:-3], *ctx.fresh_frozen(shape[-3:-1], f"windowed by {where}"), np.tile(channels[-1], 4))


def _padded_dims(node: fx.Node, ndim: int) -> list[int]:
    """Dims a pad list ``(left_last, right_last, left_second_last, ...)`` touches with a non-zero width."""
    pad = arg(node, 1, "pad")
    if isinstance(pad, (tuple, list)):  # widths computed in the graph (a window's remainder) by their value
        pad = [p.meta.get(meta.VALUE) if isinstance(p, fx.Node) else p for p in pad]
    if not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
        raise Opaque("pad widths computed in the graph")
    return [ndim - 1 - k for k in range(len(pad) // 2) if pad[2 * k] or pad[2 * k + 1]]


@RULES.register(F.pad, aten.pad.default, aten.constant_pad_nd.default, aten.reflection_pad1d.default,
                aten.reflection_pad2d.default, aten.reflection_pad3d.default, aten.replication_pad1d.default,
                aten.replication_pad2d.default, aten.replication_pad3d.default)
def pad(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Padding: padded dims get new (frozen) indices at their edges; every other dim passes through.

    A padded dim is frozen on both sides, so pruning never has to move the
    pad (padding a channel dim adds channels no layer produces).
    """
    channels = ctx.tensor_channels(node.args[0])
    out = list(channels)
    out_shape = ctx.shape(node)
    for d in _padded_dims(node, len(channels)):
        ctx.space.freeze(channels[d], f"padded by {ctx.where(node)}")
        out[d] = ctx.space.fresh(out_shape[d], frozen=f"padded by {ctx.where(node)}")
    if tuple(len(ids) for ids in out) != out_shape:
        raise Opaque("unexpected padded shape")
    return tuple(out)


# ---------------------------------------------------------------------------- shape ops


def _factor_groups(in_shape, out_shape) -> list[tuple[list[int], list[int]]] | None:
    """Match the non-1 dims of two shapes of equal numel into groups of equal product.

    >>> _factor_groups((2, 6, 4), (12, 4))
    [([0, 1], [0]), ([2], [1])]
    """
    ins = [i for i, n in enumerate(in_shape) if n != 1]
    outs = [j for j, n in enumerate(out_shape) if n != 1]
    groups, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        gi, gj = [ins[i]], [outs[j]]
        pi, pj = in_shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i == len(ins):
                    return None
                gi.append(ins[i]); pi *= in_shape[ins[i]]; i += 1  # noqa: E702
            else:
                if j == len(outs):
                    return None
                gj.append(outs[j]); pj *= out_shape[outs[j]]; j += 1  # noqa: E702
        groups.append((gi, gj))
    return groups if i == len(ins) and j == len(outs) else None


def _is_size_query(size) -> bool:
    """``t.size(d)``, ``t.size()[d]`` or ``t.shape[d]``: a size read from a tensor, right after shrinking too."""
    if not isinstance(size, fx.Node):
        return False
    if size.op == "call_method" and size.target == "size" and len(size.args) == 2:
        return True
    if size.op == "call_function" and size.target is aten.sym_size.int:
        return True
    if size.op == "call_function" and size.target is operator.getitem and isinstance(size.args[0], fx.Node):
        source = size.args[0]
        return (source.op == "call_method" and source.target == "size" and len(source.args) == 1) or (
            source.op == "call_function" and source.target is builtins.getattr and source.args[1] == "shape"
        )
    return False


def _queried_dim(size: fx.Node) -> tuple[fx.Node, int] | None:
    """``(tensor, dim)`` for a size query node, else None."""
    if (size.op == "call_method" and size.target == "size" and len(size.args) == 2) or (
        size.op == "call_function" and size.target is aten.sym_size.int
    ):
        return size.args[0], size.args[1]
    source = size.args[0] if size.args else None
    if _is_size_query(size) and isinstance(source, fx.Node):
        return source.args[0], size.args[1]
    return None


def _queried_new_size(ctx: ShrinkContext, size: fx.Node) -> int | None:
    """The size a size query (``x.shape[d]``) reads after shrinking, or None when unknown."""
    tensor, dim = _queried_dim(size)
    channels = tensor.meta.get(meta.CHANNELS) if isinstance(tensor, fx.Node) else None
    if channels is None or isinstance(channels, Multi) or not isinstance(dim, int):
        return None
    return ctx.new_size(channels[norm_dim(dim, len(channels))])


def _reads_shrunk_size(ctx: ShrinkContext, size: fx.Node) -> bool:
    """Whether a size computed in the graph (``c // groups``) reads the size of a dim that shrinks."""
    stack, seen = [size], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        queried = _queried_dim(node)
        if queried is not None:
            tensor, dim = queried
            channels = tensor.meta.get(meta.CHANNELS) if isinstance(tensor, fx.Node) else None
            if channels is None or isinstance(channels, Multi) or not isinstance(dim, int):
                return True  # x.shape[1:3] and the like: assume it reads a dim that shrinks
            ids = channels[norm_dim(dim, len(channels))]
            if ctx.new_size(ids) != len(ids):
                return True
            continue
        if node.op == "placeholder" or node.meta.get(meta.TENSOR_META) is not None:
            return True  # reads a tensor some other way: assume the worst
        stack.extend(node.all_input_nodes)
    return False


def _shrink_shape_args(ctx: ShrinkContext, node: fx.Node) -> None:
    """Rewrite sizes in ``view``/``reshape``/``expand`` to the shrunk output shape.

    Literals become the new size of their dim when that dim shrank. Sizes
    computed in the graph (``c // groups`` in a channel shuffle) become
    literals when their dim shrank or when they read the size of a dim that
    shrank (otherwise they stay, e.g. a batch size). ``-1`` stays, and so do
    sizes read straight from a tensor dim that shrinks to the same size (they
    follow by themselves); one read from a dim that ends up a different size
    (``D = x.shape[-1]`` reshaping an attention output whose width is not
    ``x``'s) becomes the literal new size.
    """
    channels = node.meta[meta.CHANNELS]
    first = 1
    packed = len(node.args) == first + 1 and isinstance(node.args[first], (tuple, list))
    sizes = list(node.args[first] if packed else node.args[first:])
    if len(sizes) != len(channels):
        return
    for d, size in enumerate(sizes):
        if size == -1 or not isinstance(size, (int, fx.Node)):
            continue
        new = ctx.new_size(channels[d])
        if _is_size_query(size):
            if _queried_new_size(ctx, size) != new:
                sizes[d] = new
            continue
        if new != len(channels[d]) or isinstance(size, fx.Node) and _reads_shrunk_size(ctx, size):
            sizes[d] = new
    node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)


def _refinement(a: list[int], b: list[int]) -> list[int] | None:
    """The coarsest sizes that both ``a`` and ``b`` are merges of, if any.

    >>> _refinement([2, 32], [8, 8])
    [2, 4, 8]
    """
    cuts = sorted({math.prod(a[: i + 1]) for i in range(len(a))} | {math.prod(b[: i + 1]) for i in range(len(b))})
    sizes, previous = [], 1
    for cut in cuts:
        if cut % previous:
            return None
        sizes.append(cut // previous)
        previous = cut
    return sizes


def _regroup(ctx, channels, out, gi, gj, in_shape, out_shape, where) -> None:
    """Several dims to several others (``[B, H*D] -> [B*H, D]``): split each side into the common
    refinement (``[B, H, D]``) and let carriers decide, as for plain splits and merges."""
    sizes = _refinement([in_shape[i] for i in gi], [out_shape[j] for j in gj])
    if sizes is None:
        for i in gi:
            ctx.space.freeze(channels[i], f"regrouped by {where}")
        for j in gj:
            out[j] = ctx.space.fresh(out_shape[j], frozen=f"regrouped by {where}")
        return
    pieces = [ctx.space.fresh(n) for n in sizes]

    def attach(dims, shape, ids_of):
        k = 0
        for d in dims:
            start, product = k, 1
            while product < shape[d]:
                product *= sizes[k]
                k += 1
            own = pieces[start:k]
            if len(own) == 1:
                ctx.space.couple(ids_of(d), own[0])
            else:
                ctx.space.reshape(ids_of(d), sizes[start:k], own, where)

    attach(gi, in_shape, lambda i: channels[i])
    for j in gj:
        out[j] = ctx.space.fresh(out_shape[j])
    attach(gj, out_shape, lambda j: out[j])


@RULES.register(".view", ".reshape", torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                shrink=_shrink_shape_args)
def reshape_with_sizes(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    return reshape(ctx, node)


def _shrink_unflatten(ctx: ShrinkContext, node: fx.Node) -> None:
    """Rewrite the sizes of ``unflatten(x, dim, sizes)`` (or ``nn.Unflatten``) to the shrunk output dims."""
    channels = node.meta[meta.CHANNELS]
    if node.op == "call_module":
        module = ctx.module(node)
        dim, sizes = module.dim, module.unflattened_size
    else:
        dim, sizes = arg(node, 1, "dim"), arg(node, 2, "sizes")
    first = norm_dim(dim, len(channels) - len(sizes) + 1)
    new = [s if s == -1 else ctx.new_size(channels[first + k]) for k, s in enumerate(sizes)]
    if node.op == "call_module":
        module.unflattened_size = tuple(new)
    else:
        node.args = (node.args[0], dim, new)
        node.kwargs = {}


@RULES.register(nn.Unflatten, torch.unflatten, ".unflatten", aten.unflatten.int, shrink=_shrink_unflatten)
def unflatten(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    return reshape(ctx, node)


@RULES.register(torch.flatten, ".flatten", nn.Flatten, torch.squeeze, ".squeeze", torch.unsqueeze, ".unsqueeze",
                aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.flatten.using_ints)
def reshape(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Reshapes, by matching input and output dims into groups of equal product.

    A dim carried over unchanged keeps its ids. When one dim splits into
    several (``[C] -> [g, C/g]``, ``[768] -> [12 heads, 64]``) or several
    merge into one (``[C, H, W] -> [C*H*W]``), exactly one of the pieces — the
    *carrier* — keeps channels and the others are frozen: index ``c`` of the
    big dim belongs to the channel of its carrier coordinate. The carrier is
    chosen once the whole graph is known (``ChannelSpace.reshape``): the
    channel dim of a flatten (spatial dims are frozen), the heads of an
    attention block (the head dim is contracted), the ``C/g`` dim of both
    reshapes of a channel shuffle.
    """
    source = node.args[0]
    channels = ctx.tensor_channels(source)
    in_shape, out_shape = ctx.shape(source), ctx.shape(node)
    groups = _factor_groups(in_shape, out_shape)
    where = ctx.where(node)
    if groups is None:
        raise Opaque("cannot match input and output dims")
    out = [None] * len(out_shape)
    for d, n in enumerate(in_shape):
        if n == 1:
            ctx.space.freeze(channels[d], f"size-1 dim reshaped by {where}")
    for gi, gj in groups:
        if len(gi) == 1 and len(gj) == 1:
            out[gj[0]] = channels[gi[0]]
        elif len(gi) == 1:  # one dim splits into several
            pieces = [ctx.space.fresh(out_shape[j]) for j in gj]
            ctx.space.reshape(channels[gi[0]], [out_shape[j] for j in gj], pieces, where)
            for j, piece in zip(gj, pieces):
                out[j] = piece
        elif len(gj) == 1:  # several dims merge into one
            out[gj[0]] = ctx.space.fresh(out_shape[gj[0]])
            ctx.space.reshape(out[gj[0]], [in_shape[i] for i in gi], [channels[i] for i in gi], where)
        else:
            _regroup(ctx, channels, out, gi, gj, in_shape, out_shape, where)
    for j, n in enumerate(out_shape):
        if out[j] is None:
            out[j] = ctx.space.fresh(n, frozen=f"size-1 dim made by {where}")
    return tuple(out)


@RULES.register(".reshape_as", ".view_as", aten.view_as.default, aten.reshape_as.default)
def reshape_as(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``x.reshape_as(other)`` (timm LeViT: ``bn(x.flatten(0, 1)).reshape_as(x)``): a reshape whose
    sizes are read from ``other`` at run time, so each output dim is coupled with ``other``'s —
    after shrinking the two must agree, and nothing needs rewriting."""
    out = reshape(ctx, node)
    for mine, theirs in zip(out, ctx.tensor_channels(node.args[1])):
        ctx.space.couple(mine, theirs)
    return out


@RULES.register(".expand", aten.expand.default, shrink=_shrink_shape_args)
def expand(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``expand``: new and size-1 dims that grow are frozen; the others pass through."""
    channels = ctx.tensor_channels(node.args[0])
    out_shape = ctx.shape(node)
    offset = len(out_shape) - len(channels)
    out = [ctx.space.fresh(n, frozen=f"created by {ctx.where(node)}") for n in out_shape[:offset]]
    for ids, n in zip(channels, out_shape[offset:]):
        if len(ids) == n:
            out.append(ids)
        else:
            ctx.space.freeze(ids, f"expanded by {ctx.where(node)}")
            out.append(ctx.space.fresh(n, frozen=f"expanded by {ctx.where(node)}"))
    return tuple(out)


@RULES.register(torch.permute, ".permute", aten.permute.default)
def permute(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    channels = ctx.tensor_channels(node.args[0])
    dims = method_dims(node, 1) if node.op == "call_method" else tuple(arg(node, 1, "dims"))
    return tuple(channels[norm_dim(d, len(channels))] for d in dims)


@RULES.register(torch.transpose, ".transpose", torch.swapaxes, ".swapaxes", aten.transpose.int, aten.swapaxes.default,
                aten.swapdims.default, torch.swapdims, ".swapdims")
def transpose(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    channels = list(ctx.tensor_channels(node.args[0]))
    a, b = (norm_dim(d, len(channels)) for d in node.args[1:3])
    channels[a], channels[b] = channels[b], channels[a]
    return tuple(channels)


@RULES.register(torch.repeat_interleave, ".repeat_interleave", aten.repeat_interleave.self_int)
def repeat_interleave(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``repeat_interleave(x, r, dim)``: output index ``i`` is input index ``i // r`` (GQA's key/value repeat)."""
    channels = list(ctx.tensor_channels(node.args[0]))
    repeats, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
    if not isinstance(repeats, int) or dim is None:
        raise Opaque("tensor repeats or flattening repeat_interleave")
    dim = norm_dim(dim, len(channels))
    channels[dim] = np.repeat(channels[dim], repeats)
    return tuple(channels)


@RULES.register(torch.cat, torch.concat, torch.concatenate, aten.cat.default)
def cat(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``cat`` along ``dim``: the output's ids along ``dim`` are the inputs' ids one after another."""
    tensors = arg(node, 0, "tensors")
    parts = [ctx.tensor_channels(t) for t in tensors]
    dim = norm_dim(arg(node, 1, "dim", 0), len(parts[0]))
    out = list(parts[0])
    for part in parts[1:]:
        for d, ids in enumerate(part):
            if d != dim:
                ctx.space.couple(out[d], ids)
    out[dim] = np.concatenate([part[dim] for part in parts])
    return tuple(out)


def _shrink_split(ctx: ShrinkContext, node: fx.Node) -> None:
    """Rewrite ``split``/``chunk`` as ``split`` with the shrunk section sizes."""
    outputs = node.meta[meta.CHANNELS]
    dim = _split_dim(node, len(outputs[0]))
    sizes = [ctx.new_size(o[dim]) for o in outputs]
    old = [len(o[dim]) for o in outputs]
    if sizes == old:
        return
    source = node.args[0]
    if node.op == "call_method":
        node.target = "split"
    elif isinstance(node.target, torch._ops.OpOverload):
        node.target = aten.split_with_sizes.default
    else:
        node.target = torch.split
    node.args, node.kwargs = (source, sizes, dim), {}


def _split_dim(node: fx.Node, ndim: int) -> int:
    return norm_dim(arg(node, 2, "dim", 0), ndim)


@RULES.register(torch.split, ".split", torch.chunk, ".chunk", aten.split.Tensor, aten.split_with_sizes.default,
                aten.chunk.default, shrink=_shrink_split)
def split(ctx: AnalyzeContext, node: fx.Node) -> Multi:
    """``split``/``chunk``: each output's ids along ``dim`` are a sub-range of the input's."""
    channels = ctx.tensor_channels(node.args[0])
    dim = _split_dim(node, len(channels))
    outs, start = [], 0
    for tm in node.meta[meta.TENSOR_META]:
        size = tm.shape[dim]
        part = list(channels)
        part[dim] = channels[dim][start : start + size]
        outs.append(tuple(part))
        start += size
    return Multi(outs)


def _index_items(index, ndim: int) -> list | None:
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        at = items.index(Ellipsis)
        fill = ndim - sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:at] + [slice(None)] * fill + items[at + 1 :]
    return items


def _is_plain_slice(item) -> bool:
    return isinstance(item, slice) and item.step in (None, 1) and all(
        b is None or isinstance(b, int) for b in (item.start, item.stop)
    )


def _resolve_slice(item):
    """A slice whose bounds are graph values (``x[..., x.shape[-1] // 2:]``) with their example values, or None."""
    if not isinstance(item, slice):
        return None
    bounds = []
    for bound in (item.start, item.stop, item.step):
        if isinstance(bound, fx.Node):
            bound = bound.meta.get(meta.VALUE)
            if not isinstance(bound, int):
                return None
        bounds.append(bound)
    resolved = slice(*bounds)
    return resolved if _is_plain_slice(resolved) else None


def _shrink_getitem(ctx: ShrinkContext, node: fx.Node) -> None:
    source, index = node.args
    channels = source.meta.get(meta.CHANNELS)
    if channels is None or isinstance(channels, Multi):
        return
    items, d, changed = _index_items(index, len(channels)), 0, False
    for k, item in enumerate(items):
        if item is None:
            continue
        if _is_plain_slice(item) and item != slice(None):
            start, stop, _ = item.indices(len(channels[d]))
            kept = ctx.kept(channels[d])
            new = slice(int(np.searchsorted(kept, start)), int(np.searchsorted(kept, stop)))
            if (new.start, new.stop) != (start, stop):
                items[k], changed = new, True
        d += 1
    if changed:
        node.args = (source, tuple(items) if isinstance(index, tuple) else items[0])


@RULES.register(operator.getitem, shrink=_shrink_getitem)
def getitem(ctx: AnalyzeContext, node: fx.Node):
    """Picking one output of a multi-output op, or basic slicing of a tensor.

    A plain slice keeps the ids of the selected range (and is rewritten when
    indices before or inside it are pruned); an integer index freezes its dim.
    """
    source, index = node.args
    channels = ctx.channels(source)
    if isinstance(channels, Multi):
        return channels[index]
    if channels is None:
        return None
    items = _index_items(index, len(channels))
    out, d = [], 0
    for item in items:
        if item is None:
            out.append(ctx.space.fresh(1, frozen=f"new axis in {ctx.where(node)}"))
        elif isinstance(item, int):
            ctx.space.freeze(channels[d], f"indexed by an integer in {ctx.where(node)}")
            d += 1
        elif _is_plain_slice(item):
            out.append(channels[d][item])
            d += 1
        elif _resolve_slice(item) is not None:  # bounds computed in the graph cannot follow pruning: freeze
            ctx.space.freeze(channels[d], f"sliced with computed bounds in {ctx.where(node)}")
            out.append(channels[d][_resolve_slice(item)])
            d += 1
        else:
            return _getitem_with_tensors(ctx, node, channels, items)
    return tuple(out) + tuple(channels[d:])


def _getitem_with_tensors(ctx: AnalyzeContext, node: fx.Node, channels: Channels, items: list) -> Channels:
    """``table[index]`` (timm's relative position bias tables): index tensors at some dims, whole dims at the
    others, as ``aten.index`` takes them."""
    if len(items) > len(channels) or not all(isinstance(item, fx.Node) or item == slice(None) for item in items):
        raise Opaque("advanced indexing other than index tensors and whole dims")
    indices = [item if isinstance(item, fx.Node) else None for item in items]
    return _index_with_tensors(ctx, node, channels, indices + [None] * (len(channels) - len(items)))


def _shrink_slice(ctx: ShrinkContext, node: fx.Node) -> None:
    """``aten.slice(x, dim, start, end)``: move the bounds to the shrunk positions (strided dims are frozen)."""
    channels = node.args[0].meta[meta.CHANNELS]
    dim = norm_dim(arg(node, 1, "dim", 0), len(channels))
    if arg(node, 4, "step", 1) != 1:
        return
    start, stop, _ = slice(arg(node, 2, "start"), arg(node, 3, "end")).indices(len(channels[dim]))
    kept = ctx.kept(channels[dim])
    new = (int(np.searchsorted(kept, start)), int(np.searchsorted(kept, stop)))
    if new != (start, stop):
        node.args = (node.args[0], dim, *new)
        node.kwargs = {}


@RULES.register(aten.slice.Tensor, shrink=_shrink_slice)
def slice_dim(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``aten.slice``: the export spelling of ``x[:, a:b]``."""
    channels = list(ctx.tensor_channels(node.args[0]))
    dim = norm_dim(arg(node, 1, "dim", 0), len(channels))
    if arg(node, 4, "step", 1) != 1:  # every other pixel (Swin's patch merging): that dim is frozen
        where = ctx.where(node)
        ctx.space.freeze(channels[dim], f"strided slice in {where}")
        channels[dim] = ctx.space.fresh(ctx.shape(node)[dim], frozen=f"strided slice in {where}")
        return tuple(channels)
    start, stop, _ = slice(arg(node, 2, "start"), arg(node, 3, "end")).indices(len(channels[dim]))
    channels[dim] = channels[dim][start:stop]
    return tuple(channels)


@RULES.register(aten.select.int)
def select(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``aten.select``: the export spelling of ``x[:, i]``; the indexed dim is frozen and removed."""
    channels = list(ctx.tensor_channels(node.args[0]))
    dim = norm_dim(node.args[1], len(channels))
    ctx.space.freeze(channels[dim], f"indexed by an integer in {ctx.where(node)}")
    return tuple(channels[:dim] + channels[dim + 1 :])


# ---------------------------------------------------------------------------- reductions and contractions


def _reduce_dims(node: fx.Node, ndim: int):
    dim = arg(node, 1, "dim")
    if dim is None:
        return list(range(ndim))
    dims = dim if isinstance(dim, (tuple, list)) else [dim]
    return sorted(norm_dim(d, ndim) for d in dims)


@RULES.register(torch.sum, ".sum", torch.amax, ".amax", torch.amin, ".amin", aten.sum.dim_IntList, aten.amax.default)
def reduction(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """Reductions mix indices of the reduced dims, which are frozen; other dims pass through."""
    return _reduce(ctx, node, statistics=False)


@RULES.register(torch.mean, ".mean", aten.mean.dim, masked_mean, shrink=unrestrict_statistics,
                mask=restrict_statistics)
def mean(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """A mean over one dim is a statistic over its channels (kept prunable, see ``_statistics_over``)."""
    return _reduce(ctx, node, statistics=True)


def _reduce(ctx: AnalyzeContext, node: fx.Node, statistics: bool) -> Channels:
    channels = ctx.tensor_channels(node.args[0])
    dims = _reduce_dims(node, len(channels))
    keepdim = arg(node, 2, "keepdim", False)
    statistics = statistics and len(dims) == 1 and arg(node, 3, "dtype") is None
    out = []
    for d, ids in enumerate(channels):
        if d in dims:
            if statistics:
                node.meta[meta.STATISTICS] = ids
            else:
                ctx.space.freeze(ids, f"reduced over by {ctx.where(node)}")
            if keepdim:
                out.append(ctx.space.fresh(1, frozen=f"reduced by {ctx.where(node)}"))
        else:
            out.append(ids)
    if tuple(len(i) for i in out) != ctx.shape(node):
        raise Opaque("unexpected reduction output")
    return tuple(out)


@RULES.register(F.softmax, torch.softmax, ".softmax", F.log_softmax, torch.log_softmax, ".log_softmax", nn.Softmax,
                aten.softmax.int, aten._softmax.default, aten.log_softmax.int)
def softmax(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    channels = same_shape_passthrough(ctx, node, node.args[0])
    dim = ctx.module(node).dim if node.op == "call_module" else arg(node, 1, "dim")
    if dim is None:
        raise Opaque("implicit softmax dim")
    ctx.space.freeze(channels[norm_dim(dim, len(channels))], f"normalised over by {ctx.where(node)}")
    return channels


@RULES.register(operator.matmul, torch.matmul, torch.bmm, ".matmul", ".bmm", aten.matmul.default, aten.bmm.default)
def matmul(ctx: AnalyzeContext, node: fx.Node) -> Channels:
    """``[..., n, k] @ [..., k, m]``: the contracted ``k`` is frozen, batch dims broadcast."""
    a, b = ctx.tensor_channels(node.args[0]), ctx.tensor_channels(node.args[1])
    if len(a) < 2 or len(b) < 2:
        raise Opaque("matmul with a vector")
    out_shape = ctx.shape(node)
    ctx.space.freeze(a[-1], f"contracted by {ctx.where(node)}")
    ctx.space.freeze(b[-2], f"contracted by {ctx.where(node)}")
    batch = broadcast_channels(ctx, out_shape[:-2], [a[:-2], b[:-2]], ctx.where(node))
    return batch + (a[-2], b[-1])


# ---------------------------------------------------------------------------- non-tensor values


@RULES.register(".size", ".dim", ".numel", aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int)
def metadata_query(ctx: AnalyzeContext, node: fx.Node) -> None:
    """Shape queries return Python values that follow the tensor: after shrinking they report the new size."""
    return None


@RULES.register(builtins.getattr)
def attribute(ctx: AnalyzeContext, node: fx.Node) -> None:
    if node.args[1] in ("shape", "dtype", "device", "ndim", "is_cuda"):
        return None
    raise Opaque(f"attribute {node.args[1]!r}")


