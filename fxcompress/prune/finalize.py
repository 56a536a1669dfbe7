"""Turn a masked ``GraphModule`` (after a pruner, schedule or training-aware method) into a smaller one."""

from __future__ import annotations

from torch import fx

from fxcompress import meta
from fxcompress.pipeline import VerifyOutputs, run_pipeline

__all__ = ["shrink"]


def shrink(gm: fx.GraphModule, verify: bool = True, rtol: float = 1e-4) -> fx.GraphModule:
    """Propagate the masks on ``gm`` to whole channels and slice them out, checking outputs when ``verify``.

    Works in place on ``gm`` (``fxcompress.trace`` already made it a copy of
    the user's model). Fine-grained masks stay on as masks; shapes shrink only
    where whole channels died.

    With ``model``, its example input ``x`` and an :class:`~fxcompress.prune.Evaluator` ``evaluator``:

    >>> from fxcompress.prune import AGPSchedule, L1Norm, ScheduledPruning
    >>> gm = fxcompress.trace(model, x)
    >>> gm = ScheduledPruning(L1Norm(0.8), AGPSchedule(end_step=4)).run(gm, evaluator, epochs=3)
    >>> small = shrink(gm)
    >>> small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features
    (7, 13, 26)
    """
    from fxcompress.passes import AnalyzeGroups, PropagateChannels, Shrink

    hooks = [VerifyOutputs(gm.meta[meta.EXAMPLE_INPUTS], rtol=rtol)] if verify else []
    return run_pipeline(gm, [AnalyzeGroups(), PropagateChannels(), Shrink()], hooks)
