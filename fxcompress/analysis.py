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

The analysis also remembers *who froze what*: every freeze is attributed to the
op being analysed when it was made (an op without a rule, a rule such as
LayerNorm's, a graph input or output), and every channel weighs the parameter
entries it indexes. :meth:`ChannelAnalysis.freezers` ranks the culprits and
:meth:`ChannelAnalysis.coverage` says how much of what a pruner asked for was
removed; :func:`fxcompress.compile` turns that into one warning
(:class:`LowCoverageWarning`), or an error with ``strict=True``.

>>> import torch, torchvision, fxcompress
>>> gm = fxcompress.trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
>>> analysis = analyze(gm)
>>> len(analysis.prunable_groups())   # 4 residual streams and the inner channels of 8 blocks
12
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

from fxcompress import meta
from fxcompress.channels import ChannelSpace, Ids, ParamSlice, Role, Solution, distinct
from fxcompress.errors import LowCoverageError
from fxcompress.masks import public_name
from fxcompress.rules import RULES, AnalyzeContext, Multi, Opaque
from fxcompress.trace import describe_node, fetch_attr

__all__ = [
    "Group",
    "ChannelAnalysis",
    "Culprit",
    "Freezer",
    "Coverage",
    "OpaqueOpWarning",
    "LowCoverageWarning",
    "OpaqueLowCoverageWarning",
    "CoverageLog",
    "collect_coverage",
    "report_coverage",
    "analyze",
    "get_analysis",
    "invalidate_analysis",
    "LOW_COVERAGE",
]

#: A compile is "low coverage" when it removed less than this fraction of what its pruner asked for
#: (see :meth:`Coverage.low`).
LOW_COVERAGE = 0.5


class OpaqueOpWarning(UserWarning):
    """Ops without a channel rule: the channels around them were frozen (never pruned).

    One warning per analysis (or per compile) names every such op; ``ops``
    maps each op to the names of its nodes.
    """

    def __init__(self, message: str, ops: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.ops = dict(ops or {})


class LowCoverageWarning(UserWarning):
    """A compile removed (almost) nothing of what its pruner asked for; ``coverage`` says why.

    The message gives how much was removed against how much was asked and
    names the ops that froze the most channels; ``compile(..., strict=True)``
    raises :class:`fxcompress.errors.LowCoverageError` instead.
    """

    def __init__(self, message: str, coverage: Coverage | None = None, ops: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.coverage = coverage
        self.ops = dict(ops or {})


class OpaqueLowCoverageWarning(LowCoverageWarning, OpaqueOpWarning):
    """A low-coverage warning whose culprits include ops without a rule: filters on either class catch it."""


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


@dataclass(frozen=True)
class Culprit:
    """The op that made a freeze: what it is, where it sits, and what kind of freeze it is."""

    op: str  #: e.g. ``"torch.roll"``, ``"LayerNorm"``, ``"Tensor.view"``, ``"graph output"``
    where: str = ""  #: the module path it runs in (or the node's name), ``""`` when unknown
    opaque: bool = False  #: the op has no channel rule (or its rule refused this call)
    contract: bool = False  #: a graph input or output: frozen by the output contract, not by a missing rule


@dataclass(frozen=True)
class Freezer:
    """All freezes of one op kind among the channels that layers produce (see :meth:`ChannelAnalysis.freezers`)."""

    op: str
    opaque: bool
    channels: int  #: channels it froze (each channel counted for the first op that froze it)
    share: float  #: their share of the parameter mass of the candidate channels
    where: tuple[str, ...]  #: module paths (or node names) of its freezes, in graph order

    def describe(self) -> str:
        """E.g. ``"torch.roll (no channel rule; in mid, tail) froze 16 channels (40%)"``."""
        parts = ["no channel rule"] if self.opaque else []
        if self.where:
            more = f" and {len(self.where) - 3} more" if len(self.where) > 3 else ""
            parts.append(f"in {', '.join(self.where[:3])}{more}")
        note = f" ({'; '.join(parts)})" if parts else ""
        return f"{self.op}{note} froze {self.channels:,} channels ({self.share:.0%})"


@dataclass(frozen=True)
class Coverage:
    """How much of what a pruner asked for one compile removed, and who froze the rest.

    *Candidates* are the channels some layer produces, less those the graph's
    inputs and outputs pin (no compiler may prune those), restricted to the
    pruner's layer selection. Shares are of their parameter mass: a channel
    weighs the parameter entries it indexes, so a head of 64 dims or a
    residual stream read by 40 layers weighs what removing it would save.
    """

    requested: float | None  #: the sparsity the pruner asked for, None when it does not say
    removed: float  #: share of the candidates' parameter mass that was removed
    frozen: float  #: share that is frozen
    channels: int  #: number of candidate channels
    freezers: tuple[Freezer, ...]  #: the ops that froze candidates, most mass first
    pruner: str = ""  #: the pruner's name, for messages
    params_ratio: float | None = None  #: parameter count before / after (masked entries removed), when known

    @property
    def low(self) -> bool:
        """Whether the compile removed less than :data:`LOW_COVERAGE` (half) of the requested share.

        With a uniform sparsity ``s`` a pruner removes about ``s * (1 - frozen)``,
        so this is "more than half of the candidate channels are frozen", and
        it also catches pruners whose masks remove fewer channels than they
        asked for. A pruner that does not state a sparsity (a target, per-group
        sparsities, unstructured masks) is never low coverage, nor is a request
        for less than one channel (it rounds to none).
        """
        if not self.requested or self.requested * self.channels < 1:
            return False
        return self.removed < LOW_COVERAGE * self.requested

    def message(self, top: int = 3, strict: bool = False) -> str:
        """One paragraph: removed against requested, the frozen share, the top culprits, what to do."""
        ratio = f", {self.params_ratio:.2f}x fewer parameters" if self.params_ratio else ""
        head = (
            f"fxcompress removed {self.removed:.1%} of the prunable parameters where {self.pruner or 'the pruner'} "
            f"asked for {self.requested:.0%}{ratio}: {self.frozen:.0%} of the {self.channels:,} channels it may prune "
            "are frozen (never pruned)"
        )
        culprits = [f.describe() for f in self.freezers[:top]]
        body = f". Top: {'; '.join(culprits)}" if culprits else ""
        advice = (
            ". Ops without a channel rule need one in fxcompress/rules.py; "
            "`python -m fxcompress viz MODEL` shows every frozen group"
        )
        tail = " (strict=True)" if strict else "; compile(..., strict=True) makes this an error"
        return head + body + advice + tail


@dataclass(eq=False)
class ChannelAnalysis:
    """The result of :func:`analyze`: slices, components and groups of one graph."""

    slices: list[ParamSlice]
    solution: Solution
    groups: list[Group]
    group_of: np.ndarray  #: per component, its group id or -1
    local_index: np.ndarray  #: per component, its position inside its group
    opaque_nodes: dict[str, list[str]]  #: op description -> names of nodes treated as opaque
    #: freeze reason -> the op that made it (first maker of each reason)
    culprits: dict[str, Culprit] = field(default_factory=dict, repr=False)
    #: per component: the parameter entries it indexes (what removing it saves), None when not measured
    mass: np.ndarray | None = field(default=None, repr=False)
    #: tensor name -> every name the same tensor is registered under, for tensors with more than one
    #: (a tied embedding and output layer: the graph reads one name, a user may select by either)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    @property
    def labels(self) -> np.ndarray:
        return self.solution.labels

    def owners(self, target: str) -> tuple[str, ...]:
        """The modules that hold tensor ``target``: its owner, and the owners of its other names."""
        return tuple(name.rpartition(".")[0] for name in self.aliases.get(target, (target,)))

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

    # -- who froze what, and how much a pruner got

    def produced(self) -> np.ndarray:
        """Per component: whether some layer produces it (it touches a producer slice)."""
        found = np.zeros(self.solution.num_components, dtype=bool)
        for piece in self.slices:
            if piece.role is Role.PRODUCER:
                found[self.labels[piece.ids]] = True
        return found

    def candidates(self, selected: Callable[[Group], bool] | None = None) -> np.ndarray:
        """Per component: produced by a layer, not pinned by a graph input or output, and in a selected group."""
        found = self.produced()
        reasons = self.solution.reason_of
        contract = [i for i, r in enumerate(self.solution.reasons) if getattr(self.culprits.get(r), "contract", False)]
        if contract:
            found &= ~np.isin(reasons, contract)
        if selected is not None:
            chosen = np.array([selected(g) for g in self.groups] + [False], dtype=bool)
            found &= chosen[self.group_of]  # group_of == -1 reads the trailing False
        return found

    def _mass(self) -> np.ndarray:
        return self.mass if self.mass is not None else np.ones(self.solution.num_components)

    def freezers(self, candidates: np.ndarray | None = None) -> list[Freezer]:
        """The ops that froze candidate channels (default: all produced channels), most parameter mass first.

        Each frozen channel counts once, for the first op that froze it; one
        entry per op kind, with the places it sits. Linear in components.
        """
        candidates = self.produced() if candidates is None else candidates
        mass = self._mass()
        total = float(mass[candidates].sum()) or 1.0
        frozen = np.flatnonzero(candidates & self.solution.frozen)
        reason_of = self.solution.reason_of[frozen]
        per_reason_count = np.bincount(reason_of, minlength=len(self.solution.reasons))
        per_reason_mass = np.bincount(reason_of, weights=mass[frozen], minlength=len(self.solution.reasons))
        by_op: dict[tuple[str, bool], list] = {}
        for index in np.flatnonzero(per_reason_count):
            reason = self.solution.reasons[index]
            culprit = self.culprits.get(reason) or Culprit(reason)
            entry = by_op.setdefault((culprit.op, culprit.opaque), [0, 0.0, {}])
            entry[0] += int(per_reason_count[index])
            entry[1] += float(per_reason_mass[index])
            if culprit.where:
                entry[2][culprit.where] = None
        found = [Freezer(op, opaque, n, m / total, tuple(where)) for (op, opaque), (n, m, where) in by_op.items()]
        return sorted(found, key=lambda f: (-f.share, -f.channels, f.op))

    def coverage(
        self,
        keep: np.ndarray,
        requested: float | None = None,
        selected: Callable[[Group], bool] | None = None,
        pruner: str = "",
        params_ratio: float | None = None,
    ) -> Coverage:
        """How much of the candidates ``keep`` (bool per component) removed, against ``requested``."""
        candidates = self.candidates(selected)
        mass = self._mass()
        total = float(mass[candidates].sum())
        share = (lambda m: float(mass[m].sum()) / total) if total > 0 else (lambda m: 0.0)
        return Coverage(
            requested=requested,
            removed=share(candidates & ~keep),
            frozen=share(candidates & self.solution.frozen),
            channels=int(candidates.sum()),
            freezers=tuple(self.freezers(candidates)),
            pruner=pruner,
            params_ratio=params_ratio,
        )


# ---------------------------------------------------------------------------- the walk


class _AttributedSpace(ChannelSpace):
    """A channel space that remembers which op made each freeze reason (the op being analysed then)."""

    def __init__(self) -> None:
        super().__init__()
        self.culprit: Culprit | None = None
        self.culprits: dict[str, Culprit] = {}

    def freeze(self, ids: Ids, reason: str) -> None:
        super().freeze(ids, reason)
        if len(ids) and self.culprit is not None:
            self.culprits.setdefault(reason, self.culprit)


def _module_path(ctx: AnalyzeContext, node: fx.Node) -> str:
    """Where a node runs: its module for ``call_module``, else the innermost module it was traced in, else its name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    path = next(reversed(stack.values()))[0] if stack else ""
    return str(path) or node.name


def _culprit(ctx: AnalyzeContext, node: fx.Node, opaque: bool = False) -> Culprit:
    if node.op == "placeholder":
        return Culprit("graph input", node.name, contract=True)
    if node.op == "output":
        return Culprit("graph output", contract=True)
    return Culprit(_op_name(ctx, node), _module_path(ctx, node), opaque=opaque)


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
    value = fetch_attr(ctx.gm, node.target)
    if not isinstance(value, torch.Tensor):
        return None
    ids = tuple(ctx.space.fresh(n) for n in value.shape)
    owner, _, name = node.target.rpartition(".")
    for dim, dim_ids in enumerate(ids):
        ctx.space.add_slice(owner, name, dim, dim_ids, Role.AFFINE, maskable=False, provisional=True)
    return ids


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
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            # a call the rule did not foresee (argument kinds, shapes): what it coupled so far only constrains
            # more, and freezing everything the node touches keeps the model correct; the warning names it
            reason = f"{describe_node(ctx.gm, node)}: its rule failed ({type(exc).__name__}: {exc}); please report"
    else:
        reason = f"{describe_node(ctx.gm, node)} has no channel rule"
    opaque[_op_name(ctx, node)].append(node.name)
    ctx.space.culprit = _culprit(ctx, node, opaque=True)
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
    slices, so grouping is one sort instead of a Python loop.
    """
    labels, n_comp = solution.labels, solution.num_components
    comps, owners = _distinct_components(slices, labels, n_comp)
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
    pairs = distinct(group_of[comps] * stride + owners)  # (group, slice), sorted by group
    pair_group, pair_slice = np.divmod(pairs, stride)
    bounds = np.searchsorted(pair_group, np.arange(len(order) + 1))
    slices_of_group = [tuple(pair_slice[bounds[g] : bounds[g + 1]].tolist()) for g in range(len(order))]
    return group_of, slices_of_group


def _distinct_components(slices: list[ParamSlice], labels: np.ndarray, n_comp: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (component, slice) pair where the slice indexes the component, once each: the components, and
    the slice of each. One sort over all slices' indices (one ``np.unique`` per slice cost more than the
    rest of the grouping)."""
    if not slices:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    sizes = [len(piece.ids) for piece in slices]
    ids = np.concatenate([piece.ids for piece in slices])
    owner_of_id = np.repeat(np.arange(len(slices), dtype=np.int64), sizes)
    pairs = distinct(owner_of_id * max(n_comp, 1) + labels[ids])
    owners, comps = np.divmod(pairs, max(n_comp, 1))
    return comps, owners


def _aliases(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """Every name of each tensor registered under more than one (masked storage read as the tensor's name)."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        public = public_name(name)
        if public is not None:
            names[id(tensor)].append(public)
    return {name: tuple(group) for group in names.values() if len(group) > 1 for name in group}


def _component_mass(gm: fx.GraphModule, slices: list[ParamSlice], solution: Solution) -> np.ndarray:
    """Per component: the parameter entries its slices index (``numel / size`` per index), buffers left out."""
    mass = np.zeros(solution.num_components)
    for piece in slices:
        if piece.role is Role.BUFFER:
            continue
        try:
            tensor = fetch_attr(gm, piece.target)
        except AttributeError:
            continue
        if isinstance(tensor, torch.Tensor) and tensor.dim() > piece.dim and tensor.shape[piece.dim]:
            np.add.at(mass, solution.labels[piece.ids], tensor.numel() / tensor.shape[piece.dim])
    return mass


def analyze(gm: fx.GraphModule) -> ChannelAnalysis:
    """Run the dependency-group analysis on a shape-annotated graph (see module docstring).

    Ops without a rule are reported in one :class:`OpaqueOpWarning` (inside
    :func:`fxcompress.compile`, folded into the compile's one summary instead).
    """
    space = _AttributedSpace()
    ctx = AnalyzeContext(gm, space)
    opaque: dict[str, list[str]] = defaultdict(list)
    for node in gm.graph.nodes:
        space.culprit = _culprit(ctx, node)
        node.meta[meta.CHANNELS] = _analyze_node(ctx, node, opaque)
    space.culprit = None  # reshape carriers are decided in solve(): their reasons name the reshape
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
    mass = _component_mass(gm, space.slices, solution)
    analysis = ChannelAnalysis(
        space.slices, solution, groups, group_of, local_index, dict(opaque), space.culprits, mass, _aliases(gm)
    )
    if opaque:
        log = _LOG.get()
        if log is not None:
            log.add_opaque(analysis)
        else:
            message = opaque_message(analysis.opaque_nodes, _opaque_channels(analysis))
            warnings.warn(OpaqueOpWarning(message, analysis.opaque_nodes), stacklevel=2)
    return analysis


def _opaque_channels(analysis: ChannelAnalysis) -> dict[str, int]:
    return {f.op: f.channels for f in analysis.freezers() if f.opaque}


def opaque_message(ops: dict[str, list[str]], channels: dict[str, int]) -> str:
    """One sentence naming every op without a rule, its nodes and the layer channels it froze.

    >>> opaque_message({"torch.roll": ["roll"]}, {"torch.roll": 8})
    'fxcompress has no channel rule for torch.roll (nodes roll), froze 8 layer channels. The channels ...'
    """
    parts = []
    for op, names in ops.items():
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        froze = f", froze {channels[op]:,} layer channels" if channels.get(op) else ""
        parts.append(f"{op} (nodes {shown}){froze}")
    return (
        f"fxcompress has no channel rule for {'; for '.join(parts)}. The channels these ops touch are frozen; "
        "add a rule in fxcompress/rules.py to prune through them."
    )


# ---------------------------------------------------------------------------- one summary per compile


@dataclass
class CoverageLog:
    """What one compile learnt about frozen channels: ops without a rule, and each pruning's coverage.

    :func:`collect_coverage` makes one current for a block of code (a
    compile); :func:`analyze` and ``InsertMasks`` report to it instead of
    warning, and :meth:`warn` then emits the compile's one warning.
    """

    strict: bool = False
    opaque: dict[str, list[str]] = field(default_factory=dict)  #: op -> its nodes, over every analysis
    opaque_channels: dict[str, int] = field(default_factory=dict)  #: op -> most layer channels it froze
    coverages: list[Coverage] = field(default_factory=list)

    def add_opaque(self, analysis: ChannelAnalysis) -> None:
        for op, names in analysis.opaque_nodes.items():
            known = self.opaque.setdefault(op, [])
            known.extend(n for n in names if n not in known)
        for op, n in _opaque_channels(analysis).items():
            self.opaque_channels[op] = max(n, self.opaque_channels.get(op, 0))

    def add_coverage(self, coverage: Coverage) -> None:
        """Record one pruning's coverage; under ``strict`` a low one is a :class:`LowCoverageError` at once."""
        if coverage.low and self.strict:
            raise LowCoverageError(coverage.message(strict=True))
        self.coverages.append(coverage)

    def warning(self) -> Warning | None:
        """The compile's one warning: low coverage (naming the culprits) if any, else the ops without a rule."""
        low = [c for c in self.coverages if c.low]
        if low:
            coverage = low[-1]
            opaque = any(f.opaque for f in coverage.freezers) or bool(self.opaque)
            cls = OpaqueLowCoverageWarning if opaque else LowCoverageWarning
            return cls(coverage.message(), coverage, self.opaque)
        if self.opaque:
            return OpaqueOpWarning(opaque_message(self.opaque, self.opaque_channels), self.opaque)
        return None

    def warn(self, stacklevel: int = 2) -> None:
        found = self.warning()
        if found is not None:
            warnings.warn(found, stacklevel=stacklevel + 1)


_LOG: ContextVar[CoverageLog | None] = ContextVar("fxcompress_coverage_log", default=None)


@contextlib.contextmanager
def collect_coverage(strict: bool = False) -> Iterator[CoverageLog]:
    """Collect opaque ops and coverages of the code inside (a compile) into one :class:`CoverageLog`.

    >>> from fxcompress.pipeline import run_pipeline
    >>> from fxcompress.passes import standard_pruning
    >>> with collect_coverage() as log:
    ...     small = run_pipeline(fxcompress.trace(model, x), standard_pruning(fxcompress.prune.L1Norm(0.5)))
    >>> log.warning() is None, round(log.coverages[0].removed, 2)
    (True, 0.5)
    """
    log = CoverageLog(strict)
    token = _LOG.set(log)
    try:
        yield log
    finally:
        _LOG.reset(token)


def report_coverage(coverage: Coverage, stacklevel: int = 2) -> None:
    """Hand a pruning's coverage to the current compile's log, or warn at once when low outside a compile."""
    log = _LOG.get()
    if log is not None:
        log.add_coverage(coverage)
    elif coverage.low:
        opaque = any(f.opaque for f in coverage.freezers)
        cls = OpaqueLowCoverageWarning if opaque else LowCoverageWarning
        warnings.warn(cls(coverage.message(), coverage), stacklevel=stacklevel + 1)


def get_analysis(gm: fx.GraphModule) -> ChannelAnalysis:
    """The cached analysis of ``gm``, computing it if the graph changed since."""
    cached = gm.meta.get(meta.ANALYSIS)
    if cached is None:
        cached = gm.meta[meta.ANALYSIS] = analyze(gm)
    return cached


def invalidate_analysis(gm: fx.GraphModule) -> None:
    gm.meta.pop(meta.ANALYSIS, None)
