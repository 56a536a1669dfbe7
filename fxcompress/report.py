"""What compression bought: parameters, MACs, latency and size, whole-model and per layer.

Every measurement is a small pure function (``count_params``, ``count_macs``,
``measure_latency``, ``size_on_disk``); :func:`model_stats`, :func:`compare`
and :func:`layer_table` collect them into dataclasses that print as tabulate
tables and convert to dicts and JSON (``to_dict`` / ``from_dict``,
``to_json`` / ``from_json``), so scripts, tests and the README quote the same
numbers.

MACs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts two
FLOPs per multiply-accumulate of convolutions, matmuls and attention, so MACs
are FLOPs / 2. Elementwise ops (norms, activations, adds) are not counted, as
in every MACs figure in the literature.

Masked (simulated) models keep their dense tensors: ``params`` counts them all,
``nonzero_params`` counts what the masks of :func:`fxcompress.masks.current_masks`
leave alive, and MACs are the dense MACs (a masked model computes densely).

>>> from torch import nn
>>> count_params(nn.Linear(10, 20)), count_macs(nn.Linear(10, 20), torch.randn(1, 10))
(220, 200)

Extension point: other passes (quantization) add per-layer tables to
:func:`report` by registering a section builder with :func:`register_section`;
a builder returns a :class:`Section` or ``None`` when it has nothing to say
about the model.

The zoo sweeps' per-model check, which drives a whole compile, is
:func:`fxcompress.sweep.check_pruning`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tabulate import tabulate
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fxcompress.masks import count_kept, mask_of, own_masks
from fxcompress.trace import inference_mode, normalize_example_inputs

__all__ = [
    "count_params",
    "count_nonzero_params",
    "count_macs",
    "macs_by_module",
    "measure_latency",
    "measure_latencies",
    "size_on_disk",
    "Latency",
    "ModelStats",
    "model_stats",
    "Comparison",
    "compare",
    "LayerRow",
    "LAYER_KINDS",
    "layer_table",
    "format_layers",
    "Section",
    "SECTION_BUILDERS",
    "register_section",
    "Report",
    "report",
    "relative_error",
    "flat_outputs",
    "frozen_summary",
]


# ---------------------------------------------------------------------------- leaf measurements


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the duration, restoring every submodule's mode after."""
    with inference_mode(model):
        yield


@contextlib.contextmanager
def _all_ops_visible() -> Iterator[None]:
    """Switch off ``nn.MultiheadAttention``'s fused eval fast path, whose kernel ``FlopCounterMode`` counts as 0."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (dense: a masked weight counts in full)."""
    return sum(p.numel() for p in model.parameters())


def _masked_away(module: nn.Module) -> int:
    """Parameter elements zeroed by the masks on ``module`` itself (not its children)."""
    return sum(mask.numel() - count_kept(mask) for mask in own_masks(module).values())


def count_nonzero_params(model: nn.Module) -> int:
    """Parameter elements that masks leave alive: what the model would have once shrunk element-wise.

    >>> m = nn.Linear(4, 2); _ = torch.nn.utils.prune.custom_from_mask(m, "weight", torch.tensor([[1.0] * 4, [0.0] * 4]))
    >>> count_params(m), count_nonzero_params(m)
    (10, 6)
    """
    return count_params(model) - sum(_masked_away(m) for m in model.modules())


def _flop_counter(model: nn.Module, example_inputs) -> FlopCounterMode:
    inputs = normalize_example_inputs(example_inputs)
    counter = FlopCounterMode(display=False)
    with _inference(model), _all_ops_visible(), counter:
        model(*inputs)
    return counter


def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (FLOPs / 2, see module docstring)."""
    return _flop_counter(model, example_inputs).get_total_flops() // 2


def macs_by_module(model: nn.Module, example_inputs) -> dict[str, int]:
    """MACs per module path (as in ``named_modules``), parents including their children; ``""`` is the whole model."""
    counts = _flop_counter(model, example_inputs).get_flop_counts()
    result = {}
    for name, per_op in counts.items():
        if name == "Global":
            continue
        _, _, path = name.partition(".")  # drop the root's class name
        result[path] = sum(per_op.values()) // 2
    return result


def size_on_disk(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what a checkpoint of the model costs."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@dataclass
class Latency:
    """Wall-clock seconds of single forward passes; ``median_ms`` is the figure to quote."""

    runs_s: list[float]
    threads: int

    @property
    def median_ms(self) -> float:
        return 1000.0 * statistics.median(self.runs_s)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n or previous)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def measure_latencies(
    models: Sequence[nn.Module], example_inputs, *, runs: int = 20, warmup: int = 3, threads: int | None = None
) -> list[Latency]:
    """Latency of several models, interleaved run by run so that machine noise hits them alike.

    Each model gets ``warmup`` untimed passes, then ``runs`` timed ones, in
    eval mode without grad and with ``threads`` intra-op threads (the current
    setting when None). Ratios of the medians are the honest speed-ups.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    inputs = normalize_example_inputs(example_inputs)
    timings: list[list[float]] = [[] for _ in models]
    with contextlib.ExitStack() as stack:
        n_threads = stack.enter_context(_threads(threads))
        for model in models:
            stack.enter_context(_inference(model))
        for _ in range(warmup):
            for model in models:
                model(*inputs)
        for _ in range(runs):
            for model, times in zip(models, timings):
                start = time.perf_counter()
                model(*inputs)
                times.append(time.perf_counter() - start)
    return [Latency(times, n_threads) for times in timings]


def measure_latency(model: nn.Module, example_inputs, **options) -> Latency:
    """Latency of one model (see :func:`measure_latencies` for the options)."""
    return measure_latencies([model], example_inputs, **options)[0]


# ---------------------------------------------------------------------------- whole-model stats


@dataclass
class ModelStats:
    """Whole-model figures. ``latency_ms`` is None when latency was not measured."""

    params: int
    nonzero_params: int
    macs: int
    size_bytes: int
    latency_ms: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelStats:
        return cls(**data)


def model_stats(model: nn.Module, example_inputs, *, latency: Latency | None = None) -> ModelStats:
    """Params, non-zero params, MACs and size of ``model``; latency from a :class:`Latency` measured by the caller."""
    return ModelStats(
        params=count_params(model),
        nonzero_params=count_nonzero_params(model),
        macs=count_macs(model, example_inputs),
        size_bytes=size_on_disk(model),
        latency_ms=None if latency is None else latency.median_ms,
    )


def _ratio(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or after == 0:
        return None
    return before / after


#: Rows of the before/after table: label, ModelStats field, how to print a value.
_STAT_ROWS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("params", "params", lambda v: f"{v:,}"),
    ("non-zero params", "nonzero_params", lambda v: f"{v:,}"),
    ("MACs", "macs", lambda v: f"{v:,}"),
    ("size on disk (MB)", "size_bytes", lambda v: f"{v / 1e6:.2f}"),
    ("latency (ms, median)", "latency_ms", lambda v: f"{v:.2f}"),
)


@dataclass
class Comparison:
    """Before/after figures of a compressed model; ``ratios`` are before / after (bigger is better)."""

    before: ModelStats
    after: ModelStats
    threads: int | None = None  #: intra-op threads of the latency measurement

    @property
    def ratios(self) -> dict[str, float | None]:
        return {f: _ratio(getattr(self.before, f), getattr(self.after, f)) for _, f, _ in _STAT_ROWS}

    def table(self) -> str:
        rows = []
        for label, name, fmt in _STAT_ROWS:
            b, a = getattr(self.before, name), getattr(self.after, name)
            if b is None or a is None:
                continue
            ratio = self.ratios[name]
            rows.append([label, fmt(b), fmt(a), "" if ratio is None else f"{ratio:.2f}x"])
        title = f"latency: {self.threads} thread(s)\n" if self.threads else ""
        return title + tabulate(rows, headers=["", "before", "after", "before/after"], tablefmt="github", disable_numparse=True)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        return {"before": self.before.to_dict(), "after": self.after.to_dict(), "threads": self.threads,
                "ratios": self.ratios}

    @classmethod
    def from_dict(cls, data: dict) -> Comparison:
        return cls(ModelStats.from_dict(data["before"]), ModelStats.from_dict(data["after"]), data.get("threads"))


def compare(
    before: nn.Module,
    after: nn.Module,
    example_inputs,
    *,
    latency: bool = True,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    show: bool = True,
) -> Comparison:
    """Measure ``before`` and ``after`` on the same inputs, print the table (when ``show``), return it.

    Latencies are measured interleaved in this process (:func:`measure_latencies`).

    With ``model`` and its example input ``x`` (``latency=False`` leaves out the timed rows):

    >>> from fxcompress.passes import standard_pruning
    >>> small = fxcompress.compile(model, x, standard_pruning(fxcompress.prune.L1Norm(0.5)))
    >>> comparison = compare(model, small, x, latency=False)
    |                   | before    | after     | before/after   |
    |-------------------|-----------|-----------|----------------|
    | params            | 421,834   | 105,962   | 3.98x          |
    | non-zero params   | 421,834   | 105,962   | 3.98x          |
    | MACs              | 4,241,152 | 1,117,056 | 3.80x          |
    | size on disk (MB) | 1.69      | 0.43      | 3.94x          |
    """
    timed = [None, None]
    n_threads = None
    if latency:
        timed = measure_latencies([before, after], example_inputs, runs=runs, warmup=warmup, threads=threads)
        n_threads = timed[0].threads
    comparison = Comparison(
        model_stats(before, example_inputs, latency=timed[0]),
        model_stats(after, example_inputs, latency=timed[1]),
        n_threads,
    )
    if show:
        print(comparison.table())
    return comparison


# ---------------------------------------------------------------------------- per-layer table


def _alive(mask: torch.Tensor, groups: int, out_first: bool) -> tuple[int, int]:
    """(input, output) channels of a conv-like weight with at least one unmasked entry.

    The weight is ``[out, in/groups, *k]`` (``out_first``) or ``[in, out/groups, *k]``
    (transposed conv); it is viewed as ``[groups, lead/groups, per_group, rest]``.
    """
    alive = mask.ne(0)
    lead, per_group = alive.shape[0], alive.shape[1] if alive.dim() > 1 else 1
    blocks = alive.reshape(groups, lead // groups, per_group, -1)
    lead_alive = int(blocks.any(dim=(2, 3)).sum())
    trail_alive = int(blocks.any(dim=(1, 3)).sum())
    return (trail_alive, lead_alive) if out_first else (lead_alive, trail_alive)


def _conv_channels(module: nn.Module, mask: torch.Tensor) -> tuple[int, int]:
    return _alive(mask, module.groups, out_first=not module.transposed)


def _linear_channels(module: nn.Module, mask: torch.Tensor) -> tuple[int, int]:
    return _alive(mask, 1, out_first=True)


def _norm_channels(module: nn.Module, mask: torch.Tensor) -> tuple[int, int]:
    alive = mask.ne(0).reshape(-1, mask.shape[-1]).any(dim=0)
    n = int(alive.sum())
    return n, n


def _norm_size(module: nn.Module) -> int:
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    return module.num_features


#: The layers the per-layer table lists, and how to read (input, output) channels off
#: their weight and its mask (all ones for an unmasked weight).
LAYER_KINDS: tuple[tuple[tuple[type[nn.Module], ...], Callable[[nn.Module, torch.Tensor], tuple[int, int]]], ...] = (
    ((nn.modules.conv._ConvNd,), _conv_channels),
    ((nn.Linear,), _linear_channels),
    ((nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm),
     _norm_channels),
)


def _channel_reader(module: nn.Module):
    for types, reader in LAYER_KINDS:
        if isinstance(module, types):
            return reader
    return None


def _channels(module: nn.Module, masked: bool) -> tuple[int, int]:
    """(input, output) channels of a listed layer: dense, or alive under its mask when ``masked``."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):  # a norm without affine parameters
        n = _norm_size(module)
        return n, n
    mask = mask_of(module, "weight") if masked else None
    return _channel_reader(module)(module, torch.ones_like(weight) if mask is None else mask)


@dataclass
class LayerRow:
    """One conv/linear/norm layer: channels before and after, its params and MACs, and weight sparsity.

    ``before`` figures come from the reference model when one is given, else
    from the dense tensors of the same (masked) layer.
    """

    name: str
    type: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int
    params_before: int
    params: int
    nonzero_params: int
    macs_before: int
    macs: int
    sparsity: float  #: fraction of weight entries masked to zero

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LayerRow:
        return cls(**data)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _sparsity(module: nn.Module) -> float:
    mask = mask_of(module, "weight")
    if mask is None or mask.numel() == 0:
        return 0.0
    return 1.0 - int(mask.count_nonzero()) / mask.numel()


def _layer_row(name: str, module: nn.Module, reference: nn.Module | None, macs: int, macs_before: int) -> LayerRow:
    in_after, out_after = _channels(module, masked=True)
    in_before, out_before = _channels(reference if reference is not None else module, masked=False)
    own = _own_params(module)
    return LayerRow(
        name=name,
        type=type(module).__name__,
        in_before=in_before,
        in_after=in_after,
        out_before=out_before,
        out_after=out_after,
        params_before=_own_params(reference) if reference is not None else own,
        params=own,
        nonzero_params=own - _masked_away(module),
        macs_before=macs_before,
        macs=macs,
        sparsity=_sparsity(module),
    )


def layer_table(model: nn.Module, example_inputs, before: nn.Module | None = None) -> list[LayerRow]:
    """One :class:`LayerRow` per conv, linear and norm layer of ``model``, in ``named_modules`` order.

    ``before`` is the uncompressed model (matched by module path, which
    tracing preserves); without it, "before" means the dense tensors of
    ``model`` itself, which shows what the masks of a masked model remove.
    """
    macs = macs_by_module(model, example_inputs)
    macs_before = macs_by_module(before, example_inputs) if before is not None else macs
    reference = dict(before.named_modules()) if before is not None else {}
    rows = []
    for name, module in model.named_modules():
        if _channel_reader(module) is None:
            continue
        ref = reference.get(name)
        ref = ref if ref is not None and type(ref) is type(module) else None
        rows.append(_layer_row(name, module, ref, macs.get(name, 0), macs_before.get(name, macs.get(name, 0))))
    return rows


def _arrow(before: int, after: int, fmt: str = "{:,}") -> str:
    return fmt.format(after) if before == after else f"{fmt.format(before)} → {fmt.format(after)}"


def format_layers(rows: Sequence[LayerRow]) -> str:
    """The per-layer table as text (``a → b`` where a layer changed)."""
    table = [
        [r.name, r.type, _arrow(r.in_before, r.in_after), _arrow(r.out_before, r.out_after),
         _arrow(r.params_before, r.params), f"{r.nonzero_params:,}", _arrow(r.macs_before, r.macs),
         f"{r.sparsity:.1%}"]
        for r in rows
    ]
    headers = ["layer", "type", "in", "out", "params", "non-zero", "MACs", "weight sparsity"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


# ---------------------------------------------------------------------------- the full report


@dataclass
class Section:
    """An extra per-layer table contributed by a registered builder (e.g. quantization)."""

    title: str
    headers: list[str]
    rows: list[list]

    def table(self) -> str:
        return f"{self.title}\n" + tabulate(self.rows, headers=self.headers, tablefmt="github", disable_numparse=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Section:
        return cls(**data)


SectionBuilder = Callable[[nn.Module], "Section | None"]

#: Builders of extra report sections, by name. See :func:`register_section`.
SECTION_BUILDERS: dict[str, SectionBuilder] = {}


def register_section(name: str) -> Callable[[SectionBuilder], SectionBuilder]:
    """Decorator: add a section to every :func:`report` of a model the builder has something to say about.

    >>> @register_section("quantization")
    ... def quant_table(model):
    ...     rows = [[n, m.bits] for n, m in model.named_modules() if hasattr(m, "bits")]
    ...     return Section("quantization", ["layer", "bits"], rows) if rows else None
    >>> quant_table(nn.Linear(2, 2)) is None   # nothing to say about a float model: no section
    True
    """

    def decorate(builder: SectionBuilder) -> SectionBuilder:
        SECTION_BUILDERS[name] = builder
        return builder

    return decorate


@dataclass
class Report:
    """Whole-model comparison, per-layer table and registered sections of one compressed model."""

    comparison: Comparison
    layers: list[LayerRow]
    sections: list[Section] = field(default_factory=list)

    def table(self) -> str:
        parts = [self.comparison.table(), format_layers(self.layers), *(s.table() for s in self.sections)]
        return "\n\n".join(parts)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        return {
            "comparison": self.comparison.to_dict(),
            "layers": [r.to_dict() for r in self.layers],
            "sections": [s.to_dict() for s in self.sections],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        return cls(
            Comparison.from_dict(data["comparison"]),
            [LayerRow.from_dict(r) for r in data["layers"]],
            [Section.from_dict(s) for s in data.get("sections", [])],
        )

    def to_json(self, **options) -> str:
        return json.dumps(self.to_dict(), **options)

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))


def report(before: nn.Module, after: nn.Module, example_inputs, **compare_options) -> Report:
    """The full report of ``after`` against ``before`` (options as :func:`compare`, which does not print here)."""
    compare_options.setdefault("show", False)
    sections = [s for s in (build(after) for build in SECTION_BUILDERS.values()) if s is not None]
    return Report(
        compare(before, after, example_inputs, **compare_options),
        layer_table(after, example_inputs, before=before),
        sections,
    )


# ---------------------------------------------------------------------------- the pruning check of the zoo sweep


def relative_error(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> float:
    """Largest ``max|a - b| / max|a|`` over pairs of outputs (the tolerance model of ``VerifyOutputs``)."""
    worst = 0.0
    for a, b in zip(reference, other, strict=True):
        if a.shape != b.shape:
            return float("inf")
        scale = a.abs().max().item() or 1.0
        worst = max(worst, (a.float() - b.float()).abs().max().item() / scale)
    return worst


def flat_outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """The tensors of one inference forward's output, flattened (tuples, lists and dicts)."""
    with _inference(model):
        out = model(*inputs)
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def frozen_summary(analysis, top: int = 3, width: int = 90) -> str:
    """Why channels stayed: opaque ops, then the reasons freezing the most channels.

    E.g. ``"opaque: Tensor.roll (4 nodes); 768 ch: graph output"``. Empty when
    nothing is frozen.
    """
    parts = [f"opaque: {op} ({len(nodes)} node{'s' * (len(nodes) > 1)})" for op, nodes in analysis.opaque_nodes.items()]
    frozen = Counter()
    for group in analysis.groups:
        if not group.prunable:
            frozen[group.frozen_reason] += len(group)
    parts += [f"{n} ch: {_short(reason, width)}" for reason, n in frozen.most_common(top)]
    return "; ".join(parts)
