"""The layer-sequential calibration engine: compress each linear layer from the statistics of its own input,
computed by the already-compressed layers before it.

GPTQ (Frantar et al. 2022) and SparseGPT (Frantar & Alistarh 2023) solve one
layer at a time: ``min ||W X - Ŵ X||`` over the layer's calibration inputs
``X``. Taking ``X`` from the *compressed* model ("true sequential") lets every
layer correct for the errors of the layers before it. The engine walks the
graph once, in topological order, holding each live node's value for every
calibration batch (a value is freed after its last user, so memory stays at
the live activations plus one layer's statistics). At a selected linear layer
it first gathers its input's statistics over all batches (``XᵀX`` and per-input
``||X_j||²``, in float32), lets the algorithm compress the weight, writes the
result through :mod:`fxcompress.masks` and only then runs the node, so later
layers see the compressed output. Each node runs once per batch: linear in
graph size.

Layers are ``nn.Linear`` modules (``symbolic_trace``) and ``linear`` calls
whose weight is a ``get_attr`` (``torch.export``), recognised through
:mod:`fxcompress.ops` and chosen by :mod:`fxcompress.selection`. A weight that
the graph reads more than once (tied embeddings, a layer called twice) has no
single input to calibrate on: it is left alone, with a warning.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from fxcompress import meta
from fxcompress.errors import ConfigError, build_registered
from fxcompress.masks import apply_masks, mask_of, masked, refresh, split_target, trainable
from fxcompress.ops import runs_one_of
from fxcompress.selection import layer_selected
from fxcompress.trace import ExampleInputs, describe_node, fetch_attr, inference_mode, module_type

__all__ = [
    "Statistics", "InputStats", "Layer", "Compressed", "OneShotAlgorithm", "LINEAR_OPS", "LinearSite",
    "linear_sites", "linear_site", "compress_layers", "gather_stats", "current_value", "ALGORITHMS", "register_algorithm",
    "make_algorithm",
]

#: The ops whose weight the engine compresses, in the spellings of :func:`fxcompress.ops.op_keys`.
LINEAR_OPS = frozenset({nn.Linear, F.linear, torch.ops.aten.linear.default})


class Statistics(enum.IntEnum):
    """What an algorithm needs to know about a layer's input (each level includes the ones below)."""

    NONE = 0  #: nothing (RTN, magnitude): the layer's input is not read
    NORMS = 1  #: ``||X_j||²`` per input column (Wanda)
    HESSIAN = 2  #: ``XᵀX / tokens`` as well (SparseGPT, GPTQ)


@dataclasses.dataclass(frozen=True, eq=False)
class InputStats:
    """A layer's calibration input ``X`` (``tokens x in``) summarised: ``hessian = XᵀX / tokens`` (float32,
    None when not asked for), ``sq_norms = ||X_j||²`` and ``abs_sums = Σ|X_j|`` over all tokens (float64)."""

    tokens: int
    sq_norms: torch.Tensor
    hessian: torch.Tensor | None = None
    abs_sums: torch.Tensor | None = None

    @property
    def norms(self) -> torch.Tensor:
        """``||X_j||₂`` per input column, over every calibration token."""
        return self.sq_norms.sqrt()


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """What an algorithm sees of one layer: its weight as the forward reads it (masked entries are zero),
    the keep-mask already installed on it (bool, or None) and the grid recorded for it (or None)."""

    target: str
    weight: torch.Tensor
    keep: torch.Tensor | None = None
    grid: Any = None

    @property
    def path(self) -> str:
        """The layer's module path (``model.layers.0.mlp.up_proj``)."""
        return split_target(self.target)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class Compressed:
    """An algorithm's answer for one layer: new dense ``weight`` values, a ``keep`` mask to install (multiplied
    into any mask there), the ``grid`` the weight now lies on; None leaves that part as it is."""

    weight: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    grid: Any = None


@runtime_checkable
class OneShotAlgorithm(Protocol):
    """What the engine (and the ``one-shot`` pass) asks of an algorithm: a layer selection
    (``op_types``/``op_names``/``exclude``, as pruners have), the ``statistics`` it needs, ``check(layer)``
    raising a :class:`~fxcompress.errors.ConfigError` for a layer it cannot compress, and
    ``compress(layer, stats) -> Compressed``."""

    op_types: tuple[type[nn.Module], ...]
    op_names: tuple[str, ...]
    exclude: tuple[str, ...]
    statistics: ClassVar[Statistics]

    def check(self, layer: Layer) -> None: ...

    def compress(self, layer: Layer, stats: InputStats | None) -> Compressed: ...


#: key -> algorithm class, for text pipelines (``one-shot{algorithm=wanda,sparsity=0.5}``)
ALGORITHMS: dict[str, type] = {}


def register_algorithm(cls: type) -> type:
    """Make an algorithm class reachable by its own ``key`` from :func:`make_algorithm` (a subclass that
    inherits its parent's key does not replace the parent)."""
    if cls.__dict__.get("key"):
        ALGORITHMS[cls.key] = cls
    return cls


def make_algorithm(name: str, **options) -> OneShotAlgorithm:
    """Build a registered algorithm by its key (``"wanda"``, ``"sparsegpt"``, ``"gptq"``, ...)."""
    return build_registered(ALGORITHMS, name, "one-shot algorithm", options)


# ---------------------------------------------------------------------------- finding the layers


@dataclasses.dataclass(frozen=True)
class LinearSite:
    """One linear layer of the graph: the node that runs it, the weight it reads and its input's node."""

    node: fx.Node
    target: str
    source: fx.Node


def linear_site(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    """``node`` as a linear layer (an ``nn.Linear`` call, or ``linear`` reading a ``get_attr`` weight), else None."""
    if not runs_one_of(LINEAR_OPS, gm, node):
        return None
    source = node.args[0] if node.args else node.kwargs.get("input")
    if node.op == "call_module":
        return LinearSite(node, f"{node.target}.weight", source)
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None  # a computed weight: nothing to compress
    return LinearSite(node, weight.target, source)


def _read_counts(gm: fx.GraphModule) -> dict[int, int]:
    """How many times the graph reads each tensor (by identity of the tensor holding its values)."""
    counts: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            tensors = list(gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            tensors = [_dense(gm, node.target)]
        else:
            continue
        for t in tensors:
            if isinstance(t, torch.Tensor):
                counts[id(t)] = counts.get(id(t), 0) + 1
    return counts


def _dense(gm: fx.GraphModule, target: str):
    owner, name = split_target(target)
    try:
        return trainable(gm.get_submodule(owner), name)
    except AttributeError:  # not a module's attribute (a constant on a non-module object)
        return fetch_attr(gm, target)


def selected_linear_sites(gm: fx.GraphModule, op_types, op_names, exclude) -> list[LinearSite]:
    """The linear layers of ``gm`` that a selection (``op_types``, ``op_names``, ``exclude``) picks, in graph
    order."""
    found = []
    for node in gm.graph.nodes:
        site = linear_site(gm, node)
        if site is None:
            continue
        owner = split_target(site.target)[0]
        if layer_selected(owner, module_type(gm, owner), op_types, op_names, exclude):
            found.append(site)
    return found


def linear_sites(gm: fx.GraphModule, algorithm: OneShotAlgorithm) -> list[LinearSite]:
    """The linear layers ``algorithm``'s selection picks, in graph order; shared weights are skipped (warned)."""
    counts = _read_counts(gm)
    found = []
    for site in selected_linear_sites(gm, algorithm.op_types, algorithm.op_names, algorithm.exclude):
        if counts.get(id(_dense(gm, site.target)), 0) > 1:
            warnings.warn(f"one-shot: {site.target} is read more than once by the graph (a tied or reused weight); "
                          "it has no single input to calibrate on and is left as it is", stacklevel=3)
            continue
        found.append(site)
    return found


# ---------------------------------------------------------------------------- reading and writing weights


def current_value(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """``target`` as the forward reads it now: dense values times mask when masked (even while masks.py
    defers recomputing it), else the attribute itself."""
    owner, name = split_target(target)
    try:
        module = gm.get_submodule(owner)
    except AttributeError:
        return fetch_attr(gm, target)
    mask = mask_of(module, name) if isinstance(module, nn.Module) else None
    return fetch_attr(gm, target) if mask is None else masked(trainable(module, name), mask)


def _layer(gm: fx.GraphModule, site: LinearSite) -> Layer:
    owner, name = split_target(site.target)
    mask = mask_of(gm.get_submodule(owner), name)
    keep = None if mask is None else mask.bool()
    grid = gm.meta.get(meta.WEIGHT_GRIDS, {}).get(site.target)
    return Layer(site.target, current_value(gm, site.target).detach(), keep, grid)


def _write_values(module: nn.Module, name: str, values: torch.Tensor) -> bool:
    """Give ``module.name`` new dense values (where it is masked, what the mask keeps matters); return
    whether what the forward reads changed."""
    dense = trainable(module, name)
    mask = mask_of(module, name)
    values = values.to(device=dense.device, dtype=dense.dtype)
    before = dense if mask is None else masked(dense, mask)
    after = values if mask is None else masked(values, mask)
    if torch.equal(before, after):
        return False
    with torch.no_grad():
        dense.copy_(values)
    if mask is not None:
        refresh(module, name)
    return True


def _install(gm: fx.GraphModule, target: str, result: Compressed) -> bool:
    """Write ``result`` onto the model (mask first, so new values are compared under it); return whether it changed."""
    owner, name = split_target(target)
    changed = False
    if result.keep is not None:
        changed |= apply_masks(gm, {target: result.keep})
    if result.weight is not None:
        changed |= _write_values(gm.get_submodule(owner), name, result.weight)
    if result.grid is not None:
        gm.meta.setdefault(meta.WEIGHT_GRIDS, {})[target] = result.grid
    return changed


# ---------------------------------------------------------------------------- statistics


def gather_stats(where: str, values: Sequence[torch.Tensor], like: torch.Tensor, level: Statistics) -> InputStats:
    """Summarise a layer's inputs (one tensor per batch, last dim = the layer's inputs) on ``like``'s device."""
    columns = like.shape[1]
    sq_norms = torch.zeros(columns, dtype=torch.float64, device=like.device)
    abs_sums = torch.zeros_like(sq_norms)
    hessian = torch.zeros(columns, columns, device=like.device) if level >= Statistics.HESSIAN else None
    tokens = 0
    for value in values:
        if not isinstance(value, torch.Tensor) or value.shape[-1] != columns:
            raise ConfigError(f"one-shot: the input of {where} is not a tensor whose last dim is its {columns} "
                              f"inputs (got {type(value).__name__} {tuple(getattr(value, 'shape', ()))})")
        x = value.detach().reshape(-1, columns).to(device=like.device, dtype=torch.float32)
        sq_norms += x.double().square().sum(0)
        abs_sums += x.double().abs().sum(0)
        if hessian is not None and len(x):  # running mean of XᵀX: no overflow on long calibration sets
            hessian.mul_(tokens / (tokens + len(x))).addmm_(x.T, x, alpha=1 / (tokens + len(x)))
        tokens += len(x)
    return InputStats(tokens, sq_norms, hessian, abs_sums)


# ---------------------------------------------------------------------------- the walk


def _placeholder_values(gm: fx.GraphModule, batch, placeholders: list[fx.Node]) -> list:
    """The values ``batch`` gives each placeholder: a tensor, a tuple of positional ``forward`` arguments (as
    Calibrate takes them), a dict of keyword arguments (a tokenizer's output) or an ``(args, kwargs)`` pair."""
    args = ExampleInputs.of(batch).positional(gm)
    flat = list(gm.graph.process_inputs(*args))
    for node in placeholders[len(flat):]:
        if not node.args:
            raise ConfigError(f"one-shot calibration batch has {len(args)} items but the graph also needs "
                              f"placeholder {node.target!r}; give every forward() argument")
        flat.append(node.args[0])  # a default value
    return flat


def _needed(sites: list[LinearSite]) -> set[fx.Node]:
    """The nodes the sites depend on (themselves included): nothing after the last one needs to run."""
    needed: set[fx.Node] = set()
    stack = [s.node for s in sites]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    return needed


def _run_node(gm: fx.GraphModule, node: fx.Node, load) -> Any:
    args, kwargs = fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return gm.get_submodule(node.target)(*args, **kwargs)


@dataclasses.dataclass
class _Walk:
    """The per-batch values of the live nodes; ``get_attr`` nodes are read when used, so a weight compressed
    after the node that reads it (exported graphs read every weight first) is seen compressed."""

    gm: fx.GraphModule
    batches: int
    values: dict[fx.Node, list] = dataclasses.field(default_factory=dict)
    renamed: dict[fx.Node, fx.Node] = dataclasses.field(default_factory=dict)

    def load(self, node: fx.Node, batch: int):
        if node.op == "get_attr":
            return current_value(self.gm, node.target)
        return self.values[self.renamed.get(node, node)][batch]

    def rename(self, old: fx.Node, new: fx.Node) -> None:
        """``old`` was replaced by ``new`` (its values move; sites and frees that still name ``old`` find them)."""
        self.values[new] = self.values.pop(old)
        self.renamed[old] = new

    def free(self, node: fx.Node) -> None:
        self.values.pop(self.renamed.get(node, node), None)

    def run(self, node: fx.Node) -> None:
        try:
            self.values[node] = [_run_node(self.gm, node, functools.partial(self.load, batch=b)) for b in range(self.batches)]
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"one-shot calibration failed at {describe_node(self.gm, node)}: "
                              f"{type(exc).__name__}: {exc}; check that the calibration batches are what "
                              "forward() takes") from exc


def _last_uses(order: list[fx.Node], needed: set[fx.Node]) -> dict[int, list[fx.Node]]:
    """position -> the nodes whose last needed user is there (their values can go after it runs)."""
    position = {node: i for i, node in enumerate(order)}
    last: dict[fx.Node, int] = {}
    for node in order:
        for source in node.all_input_nodes:
            last[source] = position[node]
    frees: dict[int, list[fx.Node]] = {}
    for node, i in last.items():
        frees.setdefault(i, []).append(node)
    return frees


def compress_layers(gm: fx.GraphModule, data: Sequence, algorithm: OneShotAlgorithm, progress: bool = False,
                    after: Callable[[LinearSite], fx.Node | None] | None = None) -> bool:
    """Compress every selected linear layer of ``gm`` in graph order, each from the inputs the compressed
    layers before it produce on ``data`` (a sequence of batches); return whether anything changed.

    Every layer is checked (``algorithm.check``) before the first is touched,
    so a layer the algorithm cannot take leaves the model as it was.
    ``after(site)``, when given, runs once the compressed layer has produced
    its output and nothing reads its weight any more (packing it there frees
    its dense weight before the next layer's is written); it returns the node
    that now computes the site's output when it replaced the site's node,
    else None.
    """
    sites = linear_sites(gm, algorithm)
    for site in sites:
        algorithm.check(_layer(gm, site))
    if not sites:
        return False
    needed = _needed(sites)
    order = [n for n in gm.graph.nodes if n in needed and n.op != "get_attr"]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    slot = {node: k for k, node in enumerate(placeholders)}
    walk = _Walk(gm, len(data))
    inputs = [_placeholder_values(gm, batch, placeholders) for batch in data]
    at = {site.node: site for site in sites}
    frees = _last_uses(order, needed)
    changed = False
    bar = tqdm(total=len(sites), desc=f"one-shot {type(algorithm).__name__}", disable=not progress, leave=False)
    with inference_mode(gm), bar:
        cache: dict[fx.Node, InputStats] = {}
        for i, node in enumerate(order):
            if node.op == "placeholder":
                walk.values[node] = [flat[slot[node]] for flat in inputs]
                continue
            if node in at:
                changed |= _compress_site(gm, at[node], algorithm, walk, cache)
                bar.update()
            walk.run(node)
            if node in at and after is not None:
                replaced = after(at[node])
                if replaced is not None:
                    walk.rename(node, replaced)
            if node in at:
                _return_freed_memory()
            for source in frees.get(i, ()):
                walk.free(source)
                cache.pop(source, None)
    return changed


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _return_freed_memory() -> None:
    """Hand the memory freed by the layer just done back to the system (glibc: ``malloc_trim``).

    Each layer frees weight- and Hessian-sized temporaries between longer-lived
    allocations (the next activations, packed weights); glibc keeps such holes
    in its heap, and on a TinyLlama-1.1B-shaped model the resident set grew by
    about 0.1 GiB per layer that way (``tools/gptq_scale.py``). Trimming once per
    layer costs milliseconds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _compress_site(gm, site: LinearSite, algorithm: OneShotAlgorithm, walk: _Walk, cache: dict) -> bool:
    """Statistics of the site's input (shared by layers reading the same input), the algorithm, the write."""
    layer = _layer(gm, site)
    stats = None
    if algorithm.statistics > Statistics.NONE:
        stats = cache.get(site.source)
        if stats is None or (stats.hessian is None and algorithm.statistics >= Statistics.HESSIAN):
            values = [walk.load(site.source, b) for b in range(walk.batches)]
            stats = gather_stats(layer.path or site.target, values, layer.weight, algorithm.statistics)
            cache[site.source] = stats
    return _install(gm, site.target, algorithm.compress(layer, stats))
