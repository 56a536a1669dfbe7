"""Dependency-group analysis: which channels of which layers must be pruned together.

``analyze(gm)`` walks the graph once in topological order, asks the op-rule
table (:mod:`fxcompress.rules`) what each node does to channels, and solves
the resulting coupling graph into *components* (one component = one channel
that is kept or removed everywhere at once). Components that touch exactly the
same parameter slices form a *group*: the channels of a residual stream and all
its producers and consumers, or the output channels of one branch of a ``cat``.
Groups are the unit a pruner ranks and selects channels in.

Every node and edge is touched a bounded number of times, and the per-channel
work is vectorised numpy, so the analysis is linear in graph size.

>>> import torch, torchvision, fxcompress
>>> gm = fxcompress.trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
>>> analysis = analyze(gm)
>>> len(analysis.prunable_groups())   # 4 residual streams and the inner channels of 8 blocks
12
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

from fxcompress import meta
from fxcompress.channels import ChannelSpace, ParamSlice, Role, Solution
from fxcompress.rules import RULES, AnalyzeContext, Multi, Opaque
from fxcompress.trace import describe_node

__all__ = ["Group", "ChannelAnalysis", "OpaqueOpWarning", "analyze", "get_analysis", "invalidate_analysis"]


class OpaqueOpWarning(UserWarning):
    """An op without a channel rule: the channels around it were frozen (never pruned)."""


@dataclass(eq=False)
class Group:
    """Channels that touch the same parameter slices and are ranked and pruned as one set."""

    id: int
    components: np.ndarray = field(repr=False)  #: component labels, one per channel of the group
    slices: tuple[int, ...]  #: indices into ``ChannelAnalysis.slices``
    frozen_reason: str | None  #: why the group may not be pruned, or None

    @property
    def prunable(self) -> bool:
        return self.frozen_reason is None

    def __len__(self) -> int:
        return len(self.components)


@dataclass(eq=False)
class ChannelAnalysis:
    """The result of :func:`analyze`: slices, components and groups of one graph."""

    slices: list[ParamSlice]
    solution: Solution
    groups: list[Group]
    group_of: np.ndarray  #: per component, its group id or -1
    local_index: np.ndarray  #: per component, its position inside its group
    opaque_nodes: dict[str, list[str]]  #: op description -> names of nodes treated as opaque

    @property
    def labels(self) -> np.ndarray:
        return self.solution.labels

    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def positions(self, slice_index: int, group: Group) -> tuple[np.ndarray, np.ndarray]:
        """Indices along a slice's dim that belong to ``group``, and the group channel of each."""
        components = self.labels[self.slices[slice_index].ids]
        positions = np.flatnonzero(self.group_of[components] == group.id)
        return positions, self.local_index[components[positions]]

    def slices_of(self, group: Group, role: Role | None = None) -> list[int]:
        return [k for k in group.slices if role is None or self.slices[k].role is role]

    def describe(self, group: Group) -> str:
        """E.g. ``"layer1.0.conv1.weight[0] +2 (64 channels)"``: the group's first producer and size."""
        producers = self.slices_of(group, Role.PRODUCER) or list(group.slices)
        first = self.slices[producers[0]]
        more = f" +{len(producers) - 1}" if len(producers) > 1 else ""
        return f"{first.target}[{first.dim}]{more} ({len(group)} channels)"


# ---------------------------------------------------------------------------- the walk


def _fresh_like(ctx: AnalyzeContext, value, reason: str):
    if isinstance(value, TensorMetadata):
        return ctx.fresh_frozen(value.shape, reason)
    if isinstance(value, (tuple, list)) and any(isinstance(v, TensorMetadata) for v in value):
        return Multi(_fresh_like(ctx, v, reason) for v in value)
    return None


def _tensor_inputs(ctx: AnalyzeContext, node: fx.Node) -> list:
    found = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(ctx.channels(n)) or n)
    return [c for c in found if c is not None]


def _get_attr(ctx: AnalyzeContext, node: fx.Node):
    value = _fetch_attr(ctx.gm, node.target)
    if not isinstance(value, torch.Tensor):
        return None
    ids = tuple(ctx.space.fresh(n) for n in value.shape)
    owner, _, name = node.target.rpartition(".")
    for dim, dim_ids in enumerate(ids):
        ctx.space.add_slice(owner, name, dim, dim_ids, Role.AFFINE, maskable=False)
    return ids


def _fetch_attr(gm: fx.GraphModule, target: str):
    value = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def _analyze_node(ctx: AnalyzeContext, node: fx.Node, opaque: dict[str, list[str]]):
    if node.op == "placeholder":
        return _fresh_like(ctx, node.meta.get(meta.TENSOR_META), f"graph input '{node.name}'")
    if node.op == "get_attr":
        return _get_attr(ctx, node)
    if node.op == "output":
        for value in _tensor_inputs(ctx, node):
            ctx.freeze_all(value, "graph output")
        return None
    inputs = _tensor_inputs(ctx, node)
    output = node.meta.get(meta.TENSOR_META)
    if output is None and (not inputs or not node.users):
        return None  # Python arithmetic on sizes, assertions, export's input guards
    if not inputs:  # arange, ones, full: a tensor made from constants carries no channels
        return _fresh_like(ctx, output, f"made from constants by {describe_node(ctx.gm, node)}")
    rule = RULES.lookup(ctx.gm, node)
    if rule is not None:
        try:
            return rule.analyze(ctx, node)
        except Opaque as why:
            reason = f"{describe_node(ctx.gm, node)}: {why}"
    else:
        reason = f"{describe_node(ctx.gm, node)} has no channel rule"
    opaque[_op_name(ctx, node)].append(node.name)
    for value in inputs:
        ctx.freeze_all(value, reason)
    return _fresh_like(ctx, node.meta.get(meta.TENSOR_META), reason)


def _op_name(ctx: AnalyzeContext, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(ctx.gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return "Tensor." + node.target
    return f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}"


# ---------------------------------------------------------------------------- grouping


def _form_groups(slices: list[ParamSlice], solution: Solution):
    """Group components by the exact set of slices they touch (and by frozen-ness), vectorised.

    A component's signature is hashed as a sum of random 64-bit keys of its
    slices, so grouping is one ``np.unique`` instead of a Python loop.
    """
    labels, n_comp = solution.labels, solution.num_components
    comps, owners = [], []
    for k, piece in enumerate(slices):
        c = np.unique(labels[piece.ids])
        comps.append(c)
        owners.append(np.full(len(c), k))
    comps = np.concatenate(comps) if comps else np.zeros(0, dtype=np.int64)
    owners = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
    keys = np.random.default_rng(0).integers(1, 2**62, size=len(slices), dtype=np.int64)
    signature = np.zeros(n_comp, dtype=np.int64)
    np.add.at(signature, comps, keys[owners])
    touched = np.zeros(n_comp, dtype=bool)
    touched[comps] = True
    members = np.flatnonzero(touched)
    key = signature[members] * 2 + solution.frozen[members]
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # groups in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    group_of = np.full(n_comp, -1, dtype=np.int64)
    group_of[members] = rank[inverse]
    stride = max(len(slices), 1)
    pairs = np.unique(group_of[comps] * stride + owners)  # (group, slice), sorted by group
    pair_group, pair_slice = np.divmod(pairs, stride)
    bounds = np.searchsorted(pair_group, np.arange(len(order) + 1))
    slices_of_group = [tuple(pair_slice[bounds[g] : bounds[g + 1]].tolist()) for g in range(len(order))]
    return group_of, slices_of_group


def analyze(gm: fx.GraphModule) -> ChannelAnalysis:
    """Run the dependency-group analysis on a shape-annotated graph (see module docstring)."""
    space = ChannelSpace()
    ctx = AnalyzeContext(gm, space)
    opaque: dict[str, list[str]] = defaultdict(list)
    for node in gm.graph.nodes:
        node.meta[meta.CHANNELS] = _analyze_node(ctx, node, opaque)
    solution = space.solve()
    group_of, slices_of_group = _form_groups(space.slices, solution)
    local_index = np.zeros(solution.num_components, dtype=np.int64)
    groups = []
    members = np.flatnonzero(group_of >= 0)
    order = members[np.argsort(group_of[members], kind="stable")]
    bounds = np.searchsorted(group_of[order], np.arange(len(slices_of_group) + 1))
    for gid, touched in enumerate(slices_of_group):
        components = order[bounds[gid] : bounds[gid + 1]]
        local_index[components] = np.arange(len(components))
        reason = solution.reason(components[0])
        if reason is None and not any(space.slices[k].role is Role.PRODUCER for k in touched):
            reason = "no layer produces these channels"
        groups.append(Group(gid, components, touched, reason))
    for op, names in opaque.items():
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(
            f"fxcompress has no channel rule for {op} (nodes {shown}); the channels it touches are frozen. "
            "Add a rule in fxcompress/rules.py to prune through it.",
            OpaqueOpWarning,
            stacklevel=2,
        )
    return ChannelAnalysis(space.slices, solution, groups, group_of, local_index, dict(opaque))


def get_analysis(gm: fx.GraphModule) -> ChannelAnalysis:
    """The cached analysis of ``gm``, computing it if the graph changed since."""
    cached = gm.meta.get(meta.ANALYSIS)
    if cached is None:
        cached = gm.meta[meta.ANALYSIS] = analyze(gm)
    return cached


def invalidate_analysis(gm: fx.GraphModule) -> None:
    gm.meta.pop(meta.ANALYSIS, None)
