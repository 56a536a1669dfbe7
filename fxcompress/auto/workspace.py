"""One traced, analysed model that every trial of a search starts from.

Tracing and the dependency-group analysis run once per process; a trial is a
copy of that graph with per-group masks inserted (and, usually, shrunk). That
is the DESIGN invariant "no per-trial retracing", and it makes a trial cost a
copy plus the mask/shrink passes.

>>> from fxcompress.examples import SmallCNN
>>> ws = Workspace.trace(SmallCNN(), torch.randn(1, 1, 28, 28))
>>> ws.sizes
{'conv1.weight[0]': 32, 'conv2.weight[0]': 64, 'fc1.weight[0]': 128}
>>> ws.compile({"conv2.weight[0]": 0.5}).conv2.out_channels
32
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from torch import fx, nn

from fxcompress import meta
from fxcompress.analysis import ChannelAnalysis, Group, get_analysis
from fxcompress.auto.pergroup import PerGroupSparsity, searchable_groups
from fxcompress.errors import ConfigError
from fxcompress.pipeline import VerifyOutputs, run_pipeline
from fxcompress.prune.base import ChannelPruner
from fxcompress.prune.magnitude import L1Norm
from fxcompress.trace import copy_model, trace

__all__ = ["Workspace"]


@dataclasses.dataclass
class Workspace:
    """A traced copy of the user's model, its analysis and its searchable groups (by stable key)."""

    gm: fx.GraphModule
    criterion: ChannelPruner
    groups: dict[str, Group]

    @classmethod
    def trace(cls, model: nn.Module, example_inputs, criterion: ChannelPruner | None = None) -> Workspace:
        """Trace ``model`` (never touching it) and analyse it once."""
        criterion = criterion if criterion is not None else L1Norm()
        gm = trace(model, example_inputs)
        groups = searchable_groups(gm, get_analysis(gm), criterion)
        if not groups:
            raise ConfigError(
                f"{type(model).__name__} has no prunable group that {type(criterion).__name__}'s layer selection "
                "picks; `python -m fxcompress viz MODEL` shows why each group is frozen"
            )
        return cls(gm, criterion, groups)

    @property
    def analysis(self) -> ChannelAnalysis:
        return get_analysis(self.gm)

    @property
    def example_inputs(self) -> tuple:
        return self.gm.meta[meta.EXAMPLE_INPUTS]

    @property
    def keys(self) -> list[str]:
        return list(self.groups)

    @property
    def sizes(self) -> dict[str, int]:
        return {k: len(g) for k, g in self.groups.items()}

    def pruner(self, sparsities: Mapping[str, float]) -> PerGroupSparsity:
        """The pruner of ``sparsities``, to apply to any trace of the same model (it scores channels itself)."""
        return PerGroupSparsity(self.criterion, sparsities)

    @functools.cached_property
    def scores(self) -> dict[str, np.ndarray]:
        """The criterion's channel scores of every searchable group, computed once: every trial starts from
        this same unpruned graph, so its ranking is the same in each (and a data-aware criterion's forward
        passes over the calibration data would otherwise dominate a trial)."""
        scores = self.criterion.ranked_scores(self.gm, self.analysis, list(self.groups.values()))
        return dict(zip(self.groups, scores))

    def kept_fractions(self, sparsities: Mapping[str, float]) -> dict[str, float]:
        """Per group, the fraction of channels kept at ``sparsities`` (missing groups keep all)."""
        pruner = self.pruner({})
        return {k: pruner.kept(n, sparsities.get(k, 0.0)) / n for k, n in self.sizes.items()}

    def compile(self, sparsities: Mapping[str, float], shrink: bool = True, verify: bool = False,
                rtol: float = 1e-4) -> fx.GraphModule:
        """A new module with ``sparsities`` applied: shrunk, or only masked when ``shrink=False``.

        The copy shares nothing with the workspace, so a trial may fine-tune
        or re-estimate batch-norm statistics on it freely.
        """
        from fxcompress.passes import standard_pruning

        gm = copy_model(self.gm)
        passes = standard_pruning(PerGroupSparsity(self.criterion, sparsities, self.scores))
        passes = passes if shrink else passes[:-1]
        hooks = [VerifyOutputs(gm.meta[meta.EXAMPLE_INPUTS], rtol=rtol)] if verify else []
        return run_pipeline(gm, passes, hooks).eval()

    def fingerprint(self) -> str:
        """A hash of the graph, the weights and the criterion: results cached under it stay valid."""
        digest = hashlib.sha256(self.gm.code.encode())
        digest.update(repr(self.criterion).encode())
        for name, tensor in self.gm.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]
