"""Shrink: physically remove masked channels, producing a smaller dense model."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import ClassVar

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from fxcompress import meta
from fxcompress.analysis import get_analysis
from fxcompress.decision import current_decision, is_propagated, record_shrunk
from fxcompress.masks import mask_of, ones_where_kept, public_name, set_masked, split_target, trainable, unmask
from fxcompress.ops import submodule
from fxcompress.pipeline import Pass, Requires, register_pass
from fxcompress.rules import RULES, Multi, ShrinkContext

__all__ = ["Shrink"]


def _replace_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, value)


def _slice_tensor(module: nn.Module, name: str, kept_by_dim: dict[int, np.ndarray]) -> None:
    """Index-select a tensor (and its mask, when masked) along each dim that loses channels."""
    mask = mask_of(module, name)
    if mask is None:
        _replace_tensor(module, name, _select(getattr(module, name).detach(), kept_by_dim))
        return
    orig = _select(trainable(module, name).detach(), kept_by_dim)
    if ones_where_kept(mask, kept_by_dim):
        unmask(module, name, orig)
    else:
        set_masked(module, name, orig, _select(mask, kept_by_dim))


#: matrices larger than this lose rows and columns in one gather (see :func:`_select`)
_ONE_STEP_BYTES = 64 << 20


def _select(value: torch.Tensor, kept_by_dim: dict[int, np.ndarray]) -> torch.Tensor:
    """``value`` with only the kept indices of each dim; a large matrix losing rows and columns is gathered
    in one step, without the half-sliced temporary (hundreds of MB for a large classifier; for smaller
    tensors two ``index_select`` calls are up to several times faster)."""
    index = {dim: torch.from_numpy(kept).to(value.device) for dim, kept in kept_by_dim.items()}
    if value.dim() == 2 and len(index) == 2 and value.numel() * value.element_size() > _ONE_STEP_BYTES:
        return value[index[0][:, None], index[1][None, :]].contiguous()
    for dim, kept in index.items():
        value = value.index_select(dim, kept)
    return value.contiguous()


def _tied_tensors(gm: fx.GraphModule) -> list[tuple[torch.Tensor, list[str]]]:
    """Tensors registered under several names (tied input and output embeddings), with their names."""
    names: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), (tensor, []))[1].append(name)
    return [entry for entry in names.values() if len(entry[1]) > 1]


def _tie_again(gm: fx.GraphModule, tied: list[tuple[torch.Tensor, list[str]]]) -> None:
    """Names that shared one tensor share its sliced version: slicing replaced the tensor under the name
    the graph reads, and every other name of it (an unread alias, e.g. ``wte.weight`` when the graph reads
    ``lm_head.weight``) must follow, or the model would hold the old width twice."""
    for original, names in tied:
        current = {}
        for name in names:
            owner, attr = split_target(name)
            module = gm.get_submodule(owner)
            plain = public_name(attr)
            value = getattr(module, attr, None)
            if value is None and plain != attr:  # unmasked by slicing: the parameter is back under its name
                value = getattr(module, plain, None)
            current[name] = (module, attr, value)
        sliced = [value for _, _, value in current.values() if value is not None and value is not original]
        if not sliced:
            continue
        for module, attr, value in current.values():
            # unread aliases, and names sliced separately to the same values, become the same object again
            if value is original or value is not sliced[0] and _same_values(value, sliced[0]):
                attr = attr if attr in module._parameters or attr in module._buffers else public_name(attr)
                (module._parameters if attr in module._parameters else module._buffers)[attr] = sliced[0]


def _same_values(a, b) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


@register_pass
@dataclasses.dataclass(frozen=True)
class Shrink(Pass):
    """Slice the channels of the graph's keep decision out of every parameter and fix shapes in modules
    and graph arguments.

    Requires the decision as ``propagate-channels`` recorded it for the
    current masks, so that the masked model it starts from is exactly what
    the shrunk model computes; verification checks it.
    """

    name: ClassVar[str] = "shrink"
    requires: ClassVar[tuple[Requires, ...]] = (Requires("propagate-channels", is_propagated),)

    def run(self, gm: fx.GraphModule) -> bool:
        analysis = get_analysis(gm)
        keep = current_decision(gm, analysis)
        if keep.all():
            return False
        ctx = ShrinkContext(gm, keep, analysis.labels)
        by_tensor: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        for piece in analysis.slices:
            kept = ctx.kept(piece.ids)
            if len(kept) < len(piece.ids):
                by_tensor[piece.target][piece.dim] = kept
        tied = _tied_tensors(gm)
        for target, kept_by_dim in by_tensor.items():
            owner, name = split_target(target)
            _slice_tensor(submodule(gm, owner), name, kept_by_dim)
        _tie_again(gm, tied)
        for node in gm.graph.nodes:
            rule = RULES.lookup(gm, node)
            if rule is not None and rule.shrink is not None:
                rule.shrink(ctx, node)
        _update_shapes(ctx, gm)
        record_shrunk(gm)
        return True


def _shrunk_meta(ctx: ShrinkContext, tensor_meta, channels):
    """``tensor_meta`` with every dim's size replaced by its number of kept channels."""
    if isinstance(tensor_meta, TensorMetadata):
        shape = torch.Size(ctx.new_shape(channels))
        return tensor_meta._replace(shape=shape, stride=_contiguous_strides(shape))
    if isinstance(tensor_meta, (tuple, list)) and isinstance(channels, Multi):
        return type(tensor_meta)(_shrunk_meta(ctx, t, c) for t, c in zip(tensor_meta, channels))
    return tensor_meta


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    """Row-major strides of ``shape`` (what ``torch.empty(shape).stride()`` gives, without a tensor).

    >>> _contiguous_strides(torch.Size([2, 3, 4]))
    (12, 4, 1)
    """
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _update_shapes(ctx: ShrinkContext, gm: fx.GraphModule) -> None:
    """New shapes without another forward pass: a dim's size is the number of its kept channel ids.

    Python values recorded from the old shapes (``x.shape[-1] // 2``) are
    dropped rather than guessed; the next analysis treats them as unknown.
    """
    for node in gm.graph.nodes:
        node.meta.pop(meta.VALUE, None)
        channels = node.meta.get(meta.CHANNELS)
        if channels is not None:
            node.meta[meta.TENSOR_META] = _shrunk_meta(ctx, node.meta.get(meta.TENSOR_META), channels)
