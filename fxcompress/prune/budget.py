"""Budgets, and the shape cost model that predicts a pruned model's MACs or parameters without building it.

A :class:`Budget` says how much smaller a model must get (``"macs=3"``: three
times fewer multiply-accumulates). :class:`ShapeCost` predicts the cost of
keeping a fraction of the channels of each dependency group, from shapes
alone, so a search can try many allocations per second:

- parameters: every parameter tensor shrinks along each channel dimension by
  the kept fraction of the groups there;
- MACs: the dense MACs of every graph node are measured once (one forward
  pass under ``torch.utils.flop_counter``, as :func:`fxcompress.report.count_macs`
  counts them), and each node's MACs scale with the channels it touches: a
  conv or linear layer with its weight's kept size, a
  ``MultiheadAttention`` with its projections' kept sizes and its kept heads,
  any other node (functional or ``aten`` convs, linears and matmuls of the
  export frontend) with its output's kept size times its contracted
  dimensions' kept fraction.

For convolutional and linear networks, and attention modules, the prediction
is exact (the tests compare it with the built model's count).

``fxcompress.auto`` searches per-group sparsities under a budget;
:class:`fxcompress.prune.Targeted` fits one criterion's sparsity to it.

>>> import torch
>>> from fxcompress.analysis import get_analysis
>>> from fxcompress.examples import SmallCNN
>>> gm = fxcompress.trace(SmallCNN(), torch.randn(1, 1, 28, 28))
>>> analysis = get_analysis(gm)
>>> groups = {str(g.id): g for g in analysis.prunable_groups()}
>>> cost = ShapeCost.of_graph(gm, analysis, groups, BudgetMetric.MACS)
>>> cost.dense, cost.predict({key: 0.5 for key in groups})
(4241152.0, 1117056.0)
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from fxcompress import meta
from fxcompress.analysis import ChannelAnalysis, Group
from fxcompress.errors import ConfigError, coerce_enum
from fxcompress.masks import public_name
from fxcompress.modules import HeadPrunedMultiheadAttention
from fxcompress.trace import inference_mode, normalize_example_inputs

__all__ = ["BudgetMetric", "Budget", "ShapeCost", "macs_by_node"]


class BudgetMetric(enum.Enum):
    """What a budget limits."""

    MACS = "macs"  #: multiply-accumulates of one forward pass on the example inputs
    PARAMS = "params"  #: parameter elements
    LATENCY = "latency"  #: median forward latency on this machine (``fxcompress.auto.LatencyTable``)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Make ``metric`` ``ratio`` times smaller than the dense model's (``Budget("macs", 3)``: 3x fewer MACs).

    >>> Budget.parse("params=2.5")
    Budget(metric=<BudgetMetric.PARAMS: 'params'>, ratio=2.5)
    """

    metric: BudgetMetric = BudgetMetric.MACS
    ratio: float = 2.0

    def __post_init__(self) -> None:
        coerce_enum(self, "metric", BudgetMetric, what="budget metric")
        if not isinstance(self.ratio, (int, float)) or not self.ratio > 1:
            raise ConfigError(f"budget ratio must be a number above 1 (3 = three times smaller), got {self.ratio!r}")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"macs=3"``, ``"params=2"`` or ``"latency=1.5"``."""
        metric, sep, ratio = text.partition("=")
        try:
            value = float(ratio)
        except ValueError:
            value = None
        if not sep or value is None:
            raise ConfigError(f"budget {text!r} must look like METRIC=RATIO, e.g. macs=3")
        return cls(metric.strip(), value)

    @classmethod
    def of(cls, value: Budget | str) -> Budget:
        """A budget given as a :class:`Budget` or as text (``"macs=2"``)."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        raise ConfigError(f"a budget is a Budget or text like 'macs=2', got {value!r}")

    def __str__(self) -> str:
        return f"{self.metric.value}={self.ratio:g}"

    def to_dict(self) -> dict:
        return {"metric": self.metric.value, "ratio": self.ratio}

    @classmethod
    def from_dict(cls, data: Mapping) -> Budget:
        return cls(data["metric"], float(data["ratio"]))


# ---------------------------------------------------------------------------- the terms of a prediction


@dataclasses.dataclass(frozen=True)
class _Dim:
    """One channel dimension of a tensor: positions outside every searched group, and per group."""

    fixed: int
    per_group: tuple[tuple[str, int], ...]

    def kept(self, kept: Mapping[str, float]) -> float:
        return self.fixed + sum(count * kept.get(key, 1.0) for key, count in self.per_group)


@dataclasses.dataclass(frozen=True)
class _Term:
    """``coefficient * (size of the tensor once shrunk)``: one parameter tensor, or one node's MACs."""

    coefficient: float
    fixed_size: int  #: product of the dimensions no group shrinks
    dims: tuple[_Dim, ...]

    def value(self, kept: Mapping[str, float]) -> float:
        return self.coefficient * self.fixed_size * math.prod(d.kept(kept) for d in self.dims)


def _dim(analysis: ChannelAnalysis, ids: np.ndarray, key_of: Mapping[int, str]) -> _Dim:
    """How the positions of one dimension (channel ids ``ids``) split over the searched groups."""
    group_ids = analysis.group_of[analysis.labels[ids]]
    found, counts = np.unique(group_ids, return_counts=True)
    per_group = tuple((key_of[i], int(c)) for i, c in zip(found.tolist(), counts.tolist()) if i in key_of)
    return _Dim(len(ids) - sum(c for _, c in per_group), per_group)


def _channel_dims(analysis: ChannelAnalysis, key_of: Mapping[int, str]) -> dict[str, dict[int, _Dim]]:
    """Per tensor (fully qualified name) and dimension: how its positions split over the searched groups."""
    found: dict[str, dict[int, _Dim]] = {}
    for piece in analysis.slices:
        found.setdefault(piece.target, {})[piece.dim] = _dim(analysis, piece.ids, key_of)
    return found


def _term(shape: Sequence[int], dims: Mapping[int, _Dim], coefficient: float) -> _Term:
    fixed = math.prod(n for d, n in enumerate(shape) if d not in dims)
    return _Term(coefficient, fixed, tuple(dims[d] for d in sorted(dims)))


# ---------------------------------------------------------------------------- MACs per node


class _NodeMacs(fx.Interpreter):
    """Runs the graph once under a flop counter and records the MACs of each node."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter = counter
        self.macs: dict[str, int] = {}

    def run_node(self, n: fx.Node):
        before = self.counter.get_total_flops()
        result = super().run_node(n)
        flops = self.counter.get_total_flops() - before
        if flops:
            self.macs[n.name] = flops // 2
        return result


def macs_by_node(gm: fx.GraphModule, example_inputs=None) -> dict[str, int]:
    """MACs of each node of ``gm`` on ``example_inputs`` (default: those it was traced with); one forward pass.

    Counted as :func:`fxcompress.report.count_macs` counts them (FLOPs / 2 of
    convolutions, matmuls and attention; ``MultiheadAttention``'s fused fast
    path switched off so that its matmuls are visible).

    >>> from fxcompress.examples import SmallCNN
    >>> macs_by_node(fxcompress.trace(SmallCNN(), torch.randn(1, 1, 28, 28)))
    {'conv1': 225792, 'conv2': 3612672, 'fc1': 401408, 'fc2': 1280}
    """
    inputs = normalize_example_inputs(gm.meta[meta.EXAMPLE_INPUTS] if example_inputs is None else example_inputs)
    counter = FlopCounterMode(display=False)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with inference_mode(gm), counter:
            interpreter = _NodeMacs(gm, counter)
            interpreter.run(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return interpreter.macs


def _shape(node) -> tuple[int, ...] | None:
    tm = node.meta.get(meta.TENSOR_META) if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if hasattr(tm, "shape") else None


def _attention_terms(module: nn.Module, node: fx.Node, macs: int, dims: Mapping[str, Mapping[int, _Dim]]):
    """``MultiheadAttention``: its input projection, output projection and attention products.

    With ``L`` query and ``S`` key positions over ``N`` sequences: the input
    projection costs ``N (L + 2S) / 3`` per entry of ``in_proj_weight``
    (rows are q|k|v), the output projection ``N L`` per entry of
    ``out_proj.weight``, and the two attention products ``2 N L S`` per
    attention channel (a third of ``in_proj_weight``'s rows). None when these
    do not add up to the measured MACs (a variant this formula does not know).
    """
    query = _shape(node.args[0] if node.args else node.kwargs.get("query"))
    key = _shape(node.args[1] if len(node.args) > 1 else node.kwargs.get("key"))
    if query is None or key is None or len(query) != 3 or len(key) != 3:
        return None
    batch_first = getattr(module, "batch_first", False)
    (n, length), s = (query[:2] if batch_first else query[1::-1]), key[1 if batch_first else 0]
    in_w, out_w = module.in_proj_weight, module.out_proj.weight
    rows = in_w.shape[0]
    expected = n * (length + 2 * s) * in_w.numel() // 3 + n * length * out_w.numel() + 2 * n * length * s * rows // 3
    if expected != macs:
        return None
    target = node.target
    in_dims, out_dims = dims.get(f"{target}.in_proj_weight", {}), dims.get(f"{target}.out_proj.weight", {})
    return [
        _term(in_w.shape, in_dims, n * (length + 2 * s) / 3),
        _term(out_w.shape, out_dims, n * length),
        _term((rows,), {0: in_dims[0]} if 0 in in_dims else {}, 2 * n * length * s / 3),
    ]


#: Modules whose MACs are not their weight's size times a constant: how to predict them.
COMPOSITE_MACS = {
    nn.MultiheadAttention: _attention_terms,
    HeadPrunedMultiheadAttention: _attention_terms,
}


def _module_terms(gm: fx.GraphModule, node: fx.Node, macs: int, dims: Mapping[str, Mapping[int, _Dim]]):
    module = gm.get_submodule(node.target)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and next(module.children(), None) is None:
        return [_term(weight.shape, dims.get(f"{node.target}.weight", {}), macs / weight.numel())]
    special = COMPOSITE_MACS.get(type(module))
    terms = special(module, node, macs, dims) if special is not None else None
    if terms is not None:
        return terms
    # Any other module: its MACs spread over its matrices in proportion to their size.
    matrices = [(f"{node.target}.{public_name(n)}", p) for n, p in module.named_parameters() if p.dim() >= 2]
    total = sum(p.numel() for _, p in matrices)
    return [_term(p.shape, dims.get(name, {}), macs / total) for name, p in matrices] if total else []


def _node_terms(analysis: ChannelAnalysis, key_of: Mapping[int, str], node: fx.Node, macs: int) -> list[_Term]:
    """Any other node: its MACs scale with its output's kept size times its contracted dims' kept fraction.

    A contracted dimension is an input dimension none of whose channels
    reaches the output (a linear's input features, a conv's input channels,
    a matmul's inner dimension); dimensions holding the same channels count
    once.
    """
    output = node.meta.get(meta.CHANNELS)
    if not isinstance(output, tuple) or not all(isinstance(ids, np.ndarray) for ids in output):
        return []
    labels = analysis.labels
    produced = np.unique(np.concatenate([labels[ids] for ids in output])) if output else np.zeros(0, dtype=np.int64)
    dims, seen = list(output), set()
    inputs: list = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: inputs.append(a.meta.get(meta.CHANNELS)) or a)
    for value in inputs:
        if not isinstance(value, tuple) or not all(isinstance(ids, np.ndarray) for ids in value):
            continue
        for ids in value:
            components = np.unique(labels[ids])
            signature = components.tobytes()
            if len(ids) and signature not in seen and not np.isin(components, produced).any():
                seen.add(signature)
                dims.append(ids)
    sizes = [len(ids) for ids in dims]
    if not all(sizes):
        return []
    return [_Term(macs / math.prod(sizes), 1, tuple(_dim(analysis, ids, key_of) for ids in dims))]


# ---------------------------------------------------------------------------- the cost model


@dataclasses.dataclass(frozen=True)
class ShapeCost:
    """MACs or parameters predicted from shapes (see the module docstring).

    ``predict(kept)`` takes the kept fraction of each searched group, by the
    keys of the ``groups`` it was built with (groups not named keep all).
    """

    metric: BudgetMetric
    dense: float
    constant: float  #: cost no group changes (parameters of frozen layers, MACs of weightless ops)
    terms: tuple[_Term, ...]

    @classmethod
    def of_graph(
        cls,
        gm: fx.GraphModule,
        analysis: ChannelAnalysis,
        groups: Mapping[str, Group],
        metric: BudgetMetric,
        example_inputs=None,
    ) -> ShapeCost:
        """The cost model of ``gm`` (traced, with ``analysis``) for the searched ``groups``, keyed by name."""
        metric = BudgetMetric(metric)
        if metric is BudgetMetric.LATENCY:
            raise ConfigError("ShapeCost predicts MACs or params; latency needs fxcompress.auto.LatencyTable")
        key_of = {g.id: k for k, g in groups.items()}
        dims = _channel_dims(analysis, key_of)
        if metric is BudgetMetric.PARAMS:
            params = list(gm.named_parameters())
            terms = [_term(p.shape, dims.get(public_name(name), {}), 1.0) for name, p in params]
            dense = float(sum(p.numel() for _, p in params))
        else:
            terms, dense = [], 0.0
            nodes = {n.name: n for n in gm.graph.nodes}
            for name, macs in macs_by_node(gm, example_inputs).items():
                node = nodes[name]
                dense += macs
                if node.op == "call_module":
                    terms.extend(_module_terms(gm, node, macs, dims))
                else:
                    terms.extend(_node_terms(analysis, key_of, node, macs))
        covered = sum(t.value({}) for t in terms)
        return cls(metric, dense, dense - covered, tuple(terms))

    @classmethod
    def build(cls, ws, metric: BudgetMetric) -> ShapeCost:
        """The cost model of a :class:`fxcompress.auto.Workspace` (its graph, analysis and groups)."""
        return cls.of_graph(ws.gm, ws.analysis, ws.groups, metric, ws.example_inputs)

    def predict(self, kept: Mapping[str, float]) -> float:
        return self.constant + sum(t.value(kept) for t in self.terms)
