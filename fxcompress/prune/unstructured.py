"""Fine-grained pruning: level (magnitude) pruning of single weights, and N:M semi-structured masks.

These pruners mask individual weights. ``PropagateChannels`` only removes a
channel whose producer slices are entirely masked (biases are never masked
here), so their masks stay simulated and ``Shrink`` keeps every shape: the
saving comes from sparse kernels (N:M on sparse tensor cores) or compression.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

import torch
from torch import fx, nn

from fxcompress.analysis import ChannelAnalysis
from fxcompress.errors import ConfigError, coerce_enum
from fxcompress.masks import forward_value
from fxcompress.prune.base import (
    DEFAULT_OP_TYPES,
    Allocation,
    check_fraction,
    register_pruner,
    removed_count,
)
from fxcompress.selection import layer_selected, normalize_selection
from fxcompress.trace import module_type

__all__ = ["WeightPruner", "LevelPruner", "NMPruner", "selected_weights"]


def selected_weights(gm: fx.GraphModule, pruner) -> dict[str, torch.Tensor]:
    """``weight`` tensors (as the forward sees them) of the layers ``pruner``'s selection picks, by name.

    Layers are selected by the type they had in the user's model (an exported
    graph keeps only plain containers); a selection that matches no layer
    says so rather than pruning nothing in silence.
    """
    found = {}
    for path, module in gm.named_modules():
        weight = forward_value(module, "weight")
        if not isinstance(weight, torch.Tensor):
            continue
        if layer_selected(path, module_type(gm, path), pruner.op_types, pruner.op_names, pruner.exclude):
            found[f"{path}.weight" if path else "weight"] = weight.detach()
    if not found:
        types = ", ".join(t.__name__ for t in pruner.op_types)
        warnings.warn(f"{type(pruner).__name__} selects no layer with a weight (op_types: {types}; op_names: "
                      f"{list(pruner.op_names)}; exclude: {list(pruner.exclude)}), so it prunes nothing", stacklevel=2)
    return found


@dataclasses.dataclass(frozen=True)
class WeightPruner:
    """Shared configuration of fine-grained pruners: which layers' ``weight`` tensors to mask."""

    sparsity: float = 0.5
    op_types: tuple[type[nn.Module], ...] = DEFAULT_OP_TYPES
    op_names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fraction(self, "sparsity", self.sparsity)
        normalize_selection(self)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_pruner(cls)

    def compute_masks(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _keep_top(scores: torch.Tensor, n_drop: int) -> torch.Tensor:
    """A 0/1 mask of ``scores``'s shape that drops the ``n_drop`` lowest entries (ties: lowest index first)."""
    mask = torch.ones(scores.numel())
    if n_drop > 0:
        mask[torch.argsort(scores.flatten(), stable=True)[:n_drop]] = 0.0
    return mask.reshape(scores.shape)


@dataclasses.dataclass(frozen=True)
class LevelPruner(WeightPruner):
    """Magnitude (level) pruning of single weights (Han et al., 2015).

    ``Allocation.LOCAL`` zeroes the ``sparsity`` fraction of smallest weights in
    every selected layer; ``Allocation.GLOBAL`` ranks all selected weights
    together, capped per layer by ``max_sparsity_per_layer``.

    With ``model`` and its example input ``x``:

    >>> from fxcompress.analysis import analyze
    >>> gm = fxcompress.trace(model, x)
    >>> masks = LevelPruner(0.9, allocation="global").compute_masks(gm, analyze(gm))
    >>> {name: round(float(mask.mean()), 2) for name, mask in masks.items()}   # fraction kept per layer
    {'conv1.weight': 0.93, 'conv2.weight': 0.71, 'fc1.weight': 0.07, 'fc2.weight': 0.81}
    """

    allocation: Allocation = Allocation.LOCAL
    max_sparsity_per_layer: float = 1.0

    key = "level"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self, "max_sparsity_per_layer", self.max_sparsity_per_layer, upper_inclusive=True)
        coerce_enum(self, "allocation", Allocation)

    def weight_scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Importance of each weight (higher is kept); subclasses may override (e.g. movement scores)."""
        return weight.abs()

    def compute_masks(self, gm, analysis):
        weights = selected_weights(gm, self)
        scores = {name: self.weight_scores(name, w).float() for name, w in weights.items()}
        if self.allocation is Allocation.LOCAL:
            return {n: _keep_top(s, removed_count(s.numel(), self.sparsity)) for n, s in scores.items()}
        return self._global_masks(scores)

    def _global_masks(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One threshold over all layers; entries beyond a layer's cap are protected (score +inf)."""
        capped = {}
        for name, s in scores.items():
            protect = s.numel() - int(s.numel() * self.max_sparsity_per_layer)
            flat = s.flatten().clone()
            if protect > 0:
                flat[torch.argsort(flat, descending=True, stable=True)[:protect]] = float("inf")
            capped[name] = flat
        if not capped:
            return {}
        everything = torch.cat(list(capped.values()))
        n_drop = removed_count(everything.numel(), self.sparsity)
        drop = torch.zeros(everything.numel(), dtype=torch.bool)
        drop[torch.argsort(everything, stable=True)[:n_drop]] = True
        masks, start = {}, 0
        for name, s in scores.items():
            piece = drop[start : start + s.numel()]
            masks[name] = (~piece).float().reshape(s.shape)
            start += s.numel()
        return masks


def _nm_layout(weight: torch.Tensor) -> torch.Tensor:
    """The weight with its input dimension last (``out, *kernel, in``), where N:M groups run."""
    return weight.movedim(1, -1) if weight.dim() > 2 else weight


def _nm_unlayout(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.movedim(-1, 1) if like.dim() > 2 else mask


@dataclasses.dataclass(frozen=True)
class NMPruner(WeightPruner):
    """N:M semi-structured sparsity: in every run of ``m`` consecutive input weights keep the ``n`` largest.

    2:4 is what sparse tensor cores (Ampere and later) accelerate. Runs go along
    the input-channel dimension (for convolutions, at each kernel position). A
    layer whose input size is not a multiple of ``m`` is left dense, with a
    warning naming it. ``sparsity`` is implied (``1 - n/m``) and ignored.

    >>> NMPruner(n=2, m=4).sparsity
    0.5
    """

    n: int = 2
    m: int = 4

    key = "nm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n <= self.m):
            raise ConfigError(f"NMPruner: need integers 0 < n <= m, got n={self.n!r}, m={self.m!r}")

    def compute_masks(self, gm, analysis):
        masks = {}
        for name, weight in selected_weights(gm, self).items():
            if weight.dim() < 2 or weight.shape[1] % self.m:
                warnings.warn(f"NMPruner: {name} has {weight.shape[1] if weight.dim() > 1 else 1} inputs, "
                              f"not a multiple of {self.m}; left dense", stacklevel=2)
                continue
            masks[name] = self.layer_mask(weight)
        return masks

    def layer_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """Keep the ``n`` largest magnitudes of each run of ``m`` inputs.

        >>> NMPruner(n=2, m=4).layer_mask(torch.tensor([[1., -4., 3., 2.]]))
        tensor([[0., 1., 1., 0.]])
        """
        laid = _nm_layout(weight.abs())
        runs = laid.reshape(-1, self.m)
        top = runs.topk(self.n, dim=1).indices
        mask = torch.zeros_like(runs).scatter_(1, top, 1.0)
        return _nm_unlayout(mask.reshape(laid.shape), weight).contiguous()
