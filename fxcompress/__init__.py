"""fxcompress: a model-compression compiler for PyTorch.

>>> import torch, torchvision, fxcompress
>>> from fxcompress.passes import standard_pruning
>>> model = torchvision.models.resnet18()
>>> small = fxcompress.compile(model, torch.randn(1, 3, 64, 64), passes=standard_pruning(fxcompress.prune.L1Norm(0.5)))
>>> fxcompress.report.count_params(model), fxcompress.report.count_params(small)
(11689512, 3055880)
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Sequence

from torch import fx, nn

from fxcompress import prune, quant, report
from fxcompress.analysis import LowCoverageWarning, OpaqueOpWarning, collect_coverage
from fxcompress.errors import (
    ConfigError, FxCompressError, LowCoverageError, PipelineError, TraceError, VerificationError,
)
from fxcompress.pipeline import Hook, Pass, VerifyOutputs, parse_pipeline, run_pipeline
from fxcompress.export import to_onnx
from fxcompress.meta import EXAMPLE_INPUTS
from fxcompress.serialize import load, save
from fxcompress.trace import trace

__all__ = [
    "compile",
    "shrink",
    "trace",
    "prune",
    "quant",
    "report",
    "to_onnx",
    "save",
    "load",
    "FxCompressError",
    "TraceError",
    "ConfigError",
    "PipelineError",
    "VerificationError",
    "LowCoverageError",
    "LowCoverageWarning",
    "OpaqueOpWarning",
]


def compile(
    model: nn.Module,
    example_inputs,
    passes: Sequence[Pass] | str = (),
    *,
    verify: bool = True,
    rtol: float = 1e-4,
    hooks: Sequence[Hook] = (),
    frontend: str = "auto",
    trace_passes: str | os.PathLike | None = None,
    strict: bool = False,
    output: str = "graph",
) -> fx.GraphModule | nn.Module:
    """Trace ``model`` and run ``passes`` on it; return a new ``GraphModule``.

    ``model`` is never modified. ``passes`` is a list of pass objects or a
    textual pipeline (``"insert-masks{pruner=l1,sparsity=0.5},propagate-channels,
    shrink"``). With ``verify=True`` every pass that must
    preserve the model's outputs (``shrink``, ``analyze-groups``) is checked on
    ``example_inputs`` to within ``rtol`` of the output's largest magnitude.
    ``frontend`` picks how the model is captured (see :func:`fxcompress.trace`).
    ``trace_passes=dir`` writes the graph (text and picture) after every pass
    and a table of per-pass timings into ``dir``.

    A compile that prunes (almost) nothing says so in one warning: when the
    pruner removed less than half of the share it asked for (more than half
    of the channels it may prune are frozen), a :class:`LowCoverageWarning`
    gives the removed and requested shares and names the ops that froze the
    most channels; ops without a channel rule are named in the same warning
    (or, when coverage is fine, in one :class:`OpaqueOpWarning`).
    ``strict=True`` makes low coverage a :class:`LowCoverageError`.
    ``output="module"`` returns a copy of ``model`` itself (its class, methods and config) at the new
    widths instead of the graph, checked against the graph (:func:`fxcompress.writeback.write_back`).
    """
    import fxcompress.passes  # noqa: F401  (registers the passes by name)
    from fxcompress.writeback import OUTPUTS, write_back

    if output not in OUTPUTS:
        raise ConfigError(f"unknown output {output!r}; choose one of {', '.join(map(repr, OUTPUTS))}")
    if isinstance(passes, str):
        passes = parse_pipeline(passes)
    for p in passes:
        if not callable(p) or not hasattr(p, "name"):
            raise ConfigError(f"passes must be fxcompress passes, got {p!r}")
    _refuse_parametrized(model)
    with _cyclic_collector_paused():
        gm = trace(model, example_inputs, frontend=frontend)
        all_hooks = list(hooks)
        if trace_passes is not None:
            from fxcompress.viz import DumpPasses

            all_hooks.append(DumpPasses(trace_passes))
        if verify:
            all_hooks.insert(0, VerifyOutputs(gm.meta[EXAMPLE_INPUTS], rtol=rtol, original=model))
        with collect_coverage(strict=strict) as log:
            result = run_pipeline(gm, list(passes), all_hooks)
    log.warn(stacklevel=2)
    return result if output == "graph" else write_back(model, result, rtol=rtol, verify=verify)


@contextlib.contextmanager
def _cyclic_collector_paused():
    """Python's cyclic garbage collector off for the block (restored after, as it was).

    A compile allocates tens of thousands of short-lived objects (graph
    nodes, proxies, metadata); every 700 allocations start a collection, and
    now and then one of them walks every object the process holds (with
    torch and torchvision imported, ~400,000: 0.17 s on a 2-core machine,
    against a MobileNetV3 compile of 0.15 s). Paused, the objects the
    compile leaves are swept once, by the next young-generation collection
    (a MobileNetV3 compile plus that collection takes 15 % less CPU time).
    Memory held in cycles is freed explicitly where it matters (the
    frontends collect after a failed capture).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def shrink(gm: fx.GraphModule, verify: bool = True, rtol: float = 1e-4) -> fx.GraphModule:
    """Propagate the masks on ``gm`` to whole channels and slice them out, checking outputs when ``verify``.

    The last step after pruning outside :func:`compile` (a schedule, a
    training-aware method, masks of your own). Works in place on ``gm``
    (``fxcompress.trace`` already made it a copy of the user's model).
    Fine-grained masks stay on as masks; shapes shrink only where whole
    channels died.

    With ``model``, its example input ``x`` and an :class:`~fxcompress.prune.Evaluator` ``evaluator``:

    >>> from fxcompress.prune import AGPSchedule, L1Norm, ScheduledPruning
    >>> gm = fxcompress.trace(model, x)
    >>> gm = ScheduledPruning(L1Norm(0.8), AGPSchedule(end_step=4)).run(gm, evaluator, epochs=3)
    >>> small = fxcompress.shrink(gm)
    >>> small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features
    (7, 13, 26)
    """
    from fxcompress.passes import PropagateChannels, Shrink

    hooks = [VerifyOutputs(gm.meta[EXAMPLE_INPUTS], rtol=rtol)] if verify else []
    return run_pipeline(gm, [PropagateChannels(), Shrink()], hooks)


def _refuse_parametrized(model: nn.Module) -> None:
    """Weight norm and other re-parametrisations compute ``weight`` from other tensors in every forward,
    so there is no weight to mask or slice: name the first such module and how to fold it."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.weight_norm import WeightNorm

    if not isinstance(model, nn.Module):
        return  # trace() names that error
    for path, module in model.named_modules():
        hooked = any(isinstance(h, WeightNorm) for h in module._forward_pre_hooks.values())
        foreign = parametrize.is_parametrized(module) and any(
            not type(p).__module__.startswith("fxcompress.") for ps in module.parametrizations.values() for p in ps
        )  # fxcompress's own fake quantizers (a QAT model being folded) are understood
        if hooked or foreign:
            kind = "torch.nn.utils.weight_norm" if hooked else "a torch.nn.utils.parametrize parametrization"
            fix = ("torch.nn.utils.remove_weight_norm(module)" if hooked else
                   "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')")
            raise ConfigError(
                f"module {path or type(model).__name__!r} ({type(module).__name__}) is re-parametrised by {kind}: "
                f"its weight is recomputed every forward and cannot be pruned; fold it first with {fix} "
                "on a copy of the model"
            )
