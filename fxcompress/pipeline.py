"""Passes and the pipeline runner.

A pass is a callable from a ``GraphModule`` to a ``PassResult(graph_module,
modified)`` (torch.fx's pass contract). Passes with settings are frozen
dataclasses with a short kebab-case ``name``, so a pipeline can be written as
text and parsed back::

    >>> parse_pipeline("analyze-groups,propagate-channels,shrink")
    [AnalyzeGroups(), PropagateChannels(), Shrink()]

The runner calls one hook between passes, ``hook(previous_pass, module,
next_pass)``; verification, timing and printing are all such hooks.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from fxcompress import meta
from fxcompress.analysis import invalidate_analysis
from fxcompress.errors import ConfigError, PipelineError, VerificationError
from fxcompress.masks import deferred_values
from fxcompress.trace import normalize_example_inputs
from fxcompress.verify import forward, largest_error, nonfinite_leaf, oracle_outputs, unreachable_error, worst_leaf

__all__ = [
    "Pass",
    "Requires",
    "PassResult",
    "Hook",
    "register_pass",
    "parse_pipeline",
    "run_pipeline",
    "VerifyOutputs",
    "TimePasses",
    "PASS_REGISTRY",
    "format_pipeline",
    "changed_fields",
    "option_fields",
    "Rewrite",
    "apply_rewrites",
]

PASS_REGISTRY: dict[str, type[Pass]] = {}


@dataclasses.dataclass(frozen=True)
class Requires:
    """A fact about the graph a pass needs, checked on the graph itself when the pass is called
    (like ``torch.fx``'s ``PassBase.requires(gm)``), and the pass that establishes it.

    A check of the graph rather than of the pass history: masks changed
    after ``propagate-channels`` (a schedule, a training step, the user's
    edit) must be propagated again before ``shrink``, however often the
    propagation ran before.
    """

    established_by: str
    holds: Callable[[fx.GraphModule], bool]


class Pass:
    """Base class of fxcompress passes.

    Subclasses set ``name`` (kebab-case), ``requires`` (what the graph must
    hold before the pass runs, see :class:`Requires`), ``preserves_outputs`` (whether outputs must be
    unchanged, which verification then checks) and ``keeps_analysis``
    (whether the channel analysis of the graph stays valid), and implement
    ``run(gm) -> bool`` returning whether anything changed.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[Requires, ...]] = ()
    preserves_outputs: ClassVar[bool] = True
    keeps_analysis: ClassVar[bool] = False

    def run(self, gm: fx.GraphModule) -> bool:
        raise NotImplementedError

    def text_options(self) -> dict[str, Any]:
        """The options that rebuild this pass from text: its fields that differ from their defaults."""
        return changed_fields(self)

    def to_text(self) -> str:
        """This pass as a textual pipeline writes it (``parse_pipeline`` reads it back to an equal pass).

        >>> from fxcompress.passes import InsertMasks
        >>> from fxcompress.prune import L1Norm
        >>> InsertMasks(L1Norm(0.3, exclude="fc")).to_text()
        'insert-masks{pruner=l1,sparsity=0.3,exclude=fc}'
        """
        body = ",".join(f"{key}={_text_value(self.name, key, value)}" for key, value in self.text_options().items())
        return f"{self.name}{{{body}}}" if body else self.name

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        history = gm.meta.setdefault(meta.PASS_HISTORY, [])
        missing = [r.established_by for r in self.requires if not r.holds(gm)]
        if missing:
            raise PipelineError(
                f"pass '{self.name}' needs {', '.join(repr(m) for m in missing)} to run before it; "
                f"passes run so far: {history or 'none'}"
            )
        before = _graph_signature(gm)
        modified = self.run(gm)
        if modified and _graph_signature(gm) != before:  # parameters alone need no new code
            gm.graph.lint()
            gm.recompile()
        if modified and not self.keeps_analysis:
            invalidate_analysis(gm)
        history.append(self.name)
        return PassResult(gm, modified)


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name to :func:`parse_pipeline`."""
    if not re.fullmatch(r"[a-z][a-z0-9-]*", cls.name):
        raise ValueError(f"pass name {cls.name!r} must be kebab-case")
    PASS_REGISTRY[cls.name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One (pattern, replacement) entry of a rewriting pass's table.

    ``match(gm, node)`` selects nodes; ``apply(gm, node)`` edits the graph in
    place and may erase the node it is given, but no other matched node.
    """

    name: str
    match: Callable[[fx.GraphModule, fx.Node], bool]
    apply: Callable[[fx.GraphModule, fx.Node], None]


def apply_rewrites(
    gm: fx.GraphModule, rewrites: Sequence[Rewrite], refresh: Callable[[fx.GraphModule], None] | None = None
) -> bool:
    """Apply ``rewrites`` in order, each to every node it matches; return whether any matched.

    A rewrite sees the graph its predecessors left: its nodes are matched
    first, then rewritten in graph order. ``refresh(gm)`` runs after each
    rewrite that changed something (e.g. to recompute the shapes the next
    rewrite reads).
    """
    modified = False
    for rewrite in rewrites:
        matched = [node for node in gm.graph.nodes if rewrite.match(gm, node)]
        for node in matched:
            rewrite.apply(gm, node)
        if matched and refresh is not None:
            refresh(gm)
        modified |= bool(matched)
    return modified


def option_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """The constructor fields of a dataclass (pass or pruner) with their defaults (``MISSING`` if none)."""
    if not dataclasses.is_dataclass(cls):
        return []
    found = []
    for field in dataclasses.fields(cls):
        if field.init:
            has_factory = field.default_factory is not dataclasses.MISSING
            found.append((field, field.default_factory() if has_factory else field.default))
    return found


def changed_fields(obj) -> dict[str, Any]:
    """The constructor fields of dataclass ``obj`` whose values differ from their defaults, in field order."""
    changed = {}
    for field, default in option_fields(obj):
        value = getattr(obj, field.name)
        if default is dataclasses.MISSING or value != default:
            changed[field.name] = value
    return changed


def _text_value(pass_name: str, key: str, value) -> str:
    """``value`` as text that :func:`parse_pipeline` reads back to it; a ConfigError when there is none."""
    plain = value.value if isinstance(value, enum.Enum) else value
    if isinstance(plain, tuple) and len(plain) == 1 and isinstance(plain[0], str):
        plain = plain[0]  # a one-pattern selection: the pruners accept the bare string
    if plain is None or isinstance(plain, (bool, int, float, str)):
        text = "none" if plain is None else str(plain).lower() if isinstance(plain, bool) else str(plain)
        if _parse_value(text) == plain and not re.search(r"[,{}]", text):
            return text
    raise ConfigError(
        f"pass {pass_name!r}: option {key}={value!r} has no text form (text options are numbers, booleans, "
        "names and one glob pattern); build this pass in Python"
    )


def format_pipeline(passes: Sequence[Pass]) -> str:
    """The text of a pipeline, the inverse of :func:`parse_pipeline`.

    >>> format_pipeline(parse_pipeline("insert-masks{pruner=fpgm,sparsity=0.4},propagate-channels,shrink"))
    'insert-masks{pruner=fpgm,sparsity=0.4},propagate-channels,shrink'
    """
    return ",".join(p.to_text() for p in passes)


def _parse_value(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str, option_parsers: dict[str, Callable[[dict], dict]] | None = None) -> list[Pass]:
    """Parse ``"name{key=value,...},name,..."`` into pass objects.

    ``option_parsers`` may turn raw options of a pass into constructor
    arguments (``insert-masks`` uses it to build a pruner from ``pruner=l1``).
    """
    passes, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _ITEM.match(text, pos)
        if not match or match.end() == pos:
            raise ConfigError(f"malformed pipeline at character {pos}: {text[pos:pos + 30]!r}")
        name, body = match.group(1), match.group(2)
        if name not in PASS_REGISTRY:
            raise ConfigError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASS_REGISTRY))}")
        options = {}
        for item in filter(None, (body or "").split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"option {item!r} of pass {name!r} must look like key=value")
            key = key.strip().replace("-", "_")
            if key in options:  # keeping the last would silently drop the first
                raise ConfigError(f"option {key!r} of pass {name!r} is given twice")
            options[key] = _parse_value(value.strip())
        cls = PASS_REGISTRY[name]
        parser = getattr(cls, "from_options", None)
        try:
            passes.append(parser(options) if parser else cls(**options))
        except TypeError as exc:
            raise ConfigError(f"bad options for pass {name!r}: {exc}") from exc
        pos = match.end()
    return passes


Hook = Callable[[Any, fx.GraphModule, Any], None]


def _nonfinite_parameter(gm: fx.GraphModule) -> str | None:
    """The first parameter holding nan or inf, or buffer holding nan. A buffer may hold ±inf on purpose:
    clamp bounds (timm's Gemma 4 ``input_min = -inf``), additive attention masks."""
    for name, t in gm.named_parameters():
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            return name
    for name, t in gm.named_buffers():
        if t.is_floating_point() and t.device.type != "meta" and t.isnan().any():
            return name
    return None


@dataclasses.dataclass
class VerifyOutputs:
    """Hook: after a pass that must preserve outputs, check them against the previous pass's.

    Every output leaf (tuple, dict, dataclass, Hugging Face ``ModelOutput``) is
    compared on its own: ``max|a-b| <= rtol * max|a|`` per leaf (the error model
    of float reassociation) and element-wise against each element's own
    magnitude (see :mod:`fxcompress.verify`), so a large leaf cannot hide a
    wrong small one. Before the first pass it checks that a check is possible
    at all: finite weights and outputs, and a deterministic forward.

    Shrunk-against-masked follows from the rule table on both sides, so after
    ``propagate-channels`` two checks that do not: channels declared removed
    are filled with noise and must not move any output, and, given
    ``original`` (the user's module), the original run with the masked
    tensors must give the masked model's outputs (skipped when earlier passes
    folded or fused its tensors away). One extra forward each.
    """

    example_inputs: tuple
    rtol: float = 1e-4
    reference: Any = None
    #: the user's module, for the oracle; None skips it
    original: nn.Module | None = None
    #: pass name -> largest output error it caused, relative to the output's scale
    errors: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.example_inputs = normalize_example_inputs(self.example_inputs)

    def __call__(self, previous, gm: fx.GraphModule, next_pass) -> None:
        outputs = self.run(previous, gm)
        if previous is None:
            self.check_checkable(gm, outputs)
        if previous is not None and getattr(previous, "preserves_outputs", False) and self.reference is not None:
            self.check(previous, outputs)
        if getattr(previous, "name", None) == "propagate-channels":
            self.check_masked(gm, outputs)
        self.reference = outputs

    def check_masked(self, gm: fx.GraphModule, outputs) -> None:
        """The checks independent of the rule table, on the masked model (see the class docstring)."""
        leaf = nonfinite_leaf(outputs)
        if leaf is not None:
            raise VerificationError(
                f"masking made output {leaf} non-finite: a removed (zeroed) channel reaches an op that is "
                "infinite at zero; an op rule forgot to freeze it; please report this with the model"
            )
        moved = unreachable_error(gm, self.example_inputs, outputs, self.rtol)
        if moved is not None:
            raise VerificationError(
                f"channels declared removed reach output {moved.leaf} (at {moved.index}, moved by {moved.error:.2e} "
                "when they hold noise): an op rule couples too little; please report this with the model"
            )
        oracle = None if self.original is None else oracle_outputs(self.original, gm, self.example_inputs)
        if oracle is None:  # no original given, or earlier passes folded or fused its tensors
            return
        wrong = worst_leaf(oracle, outputs, self.rtol)
        if wrong is not None:
            raise VerificationError(
                f"the original model run with the masked weights disagrees with the masked graph on output "
                f"{wrong.leaf} at {wrong.index} ({wrong.expected:.6g} vs {wrong.got:.6g}, error {wrong.error:.2e}): "
                "an op rule treats channels wrongly; please report this with the model"
            )

    def run(self, previous, gm: fx.GraphModule):
        """The outputs on the example inputs; a pass after which the model no longer runs failed verification."""
        if previous is None:
            return forward(gm, self.example_inputs)
        try:
            return forward(gm, self.example_inputs)
        except (RuntimeError, IndexError, ValueError) as exc:
            where = "".join(f"\n{note}" for note in getattr(exc, "__notes__", ())[-1:])  # the failing graph line
            raise VerificationError(
                f"after pass '{previous.name}' the model fails on example_inputs: {type(exc).__name__}: {exc}{where}"
            ) from exc

    def check_checkable(self, gm: fx.GraphModule, outputs) -> None:
        """Name the cause when the model itself makes verification meaningless."""
        bad = _nonfinite_parameter(gm)
        if bad is not None:
            raise VerificationError(f"the model's {bad!r} holds nan or inf values; fix it before compressing")
        leaf = nonfinite_leaf(outputs)
        if leaf is not None:
            raise VerificationError(
                f"the model's output {leaf} holds nan or inf on example_inputs; verification needs finite outputs "
                "(check the inputs and weights, or pass verify=False)"
            )
        again = worst_leaf(outputs, forward(gm, self.example_inputs), self.rtol)
        if again is not None:
            raise VerificationError(
                f"the model gives different outputs on the same inputs (output {again.leaf} at {again.index}): "
                "it is stochastic, e.g. dropout captured in training mode; call model.eval() before compiling"
            )

    def check(self, previous, outputs) -> None:
        largest = largest_error(self.reference, outputs)
        self.errors[previous.name] = max(largest.error if largest else 0.0, self.errors.get(previous.name, 0.0))
        worst = largest if largest is not None and largest.error > self.rtol else None
        if worst is None:
            return
        if worst.kind == "shape":
            raise VerificationError(f"pass '{previous.name}' changed output {worst.leaf}'s shape or removed it")
        raise VerificationError(
            f"pass '{previous.name}' changed output {worst.leaf} by {worst.error:.2e} relative to its {worst.kind} "
            f"(tolerance {self.rtol:.0e}) at index {worst.index}: {worst.expected:.6g} became {worst.got:.6g}; "
            "please report this with the model"
        )


@dataclasses.dataclass
class TimePasses:
    """Hook: wall-clock seconds spent in each pass itself (other hooks excluded), in ``self.seconds``."""

    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def __call__(self, previous, gm: fx.GraphModule, next_pass) -> None:
        if previous is None:
            return
        name, seconds = gm.meta[meta.PASS_SECONDS][-1]
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def _graph_signature(gm: fx.GraphModule) -> tuple:
    """What the generated code depends on: every node with its op, target and arguments (fx keeps
    arguments immutable, so an edit replaces them and the signature differs)."""
    return tuple((node, node.op, node.target, node.args, node.kwargs) for node in gm.graph.nodes)


def run_pipeline(gm: fx.GraphModule, passes: Sequence[Pass], hooks: Sequence[Hook] = ()) -> fx.GraphModule:
    """Run ``passes`` in order, calling every hook before the first, between passes and after the last."""
    previous = None
    with deferred_values(gm):  # masked tensors are computed by forwards, and once at the end
        for next_pass in [*passes, None]:
            for hook in hooks:
                hook(previous, gm, next_pass)
            if next_pass is None:
                break
            start = time.perf_counter()
            gm = next_pass(gm).graph_module
            gm.meta.setdefault(meta.PASS_SECONDS, []).append((next_pass.name, time.perf_counter() - start))
            previous = next_pass
    return gm
