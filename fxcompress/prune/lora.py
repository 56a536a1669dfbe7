"""Low-rank adapters (LoRA, Hu et al. 2021): fine-tune a model through a few small matrices, then fold them in.

Each selected ``nn.Linear`` computes ``W x + b + (alpha / rank) · B A x`` with
its weight ``W`` (and bias) frozen, ``A`` (``rank × in``) drawn at random and
``B`` (``out × rank``) zero, so the adapted model starts out computing exactly
what the base model does. Only ``A`` and ``B`` (plus, if asked, the norms'
parameters and the biases) train, which is LoRA's point: gradients and the
optimizer's state (AdamW keeps two tensors per trained tensor) exist for the
adapters only, a few percent of the weights, instead of three extra copies of
every weight in a full fine-tune.

:func:`add_adapters` wraps each selected layer in a :class:`LoRALinear` in
place and returns an :class:`Adapters` handle; :meth:`Adapters.merge` writes
``W + (alpha / rank) · B A`` into each layer's own weight, puts the layer back
where its wrapper was and unfreezes what :func:`add_adapters` froze. The merged
model is the user's module of the user's class with the same parameter names,
shapes and ``state_dict`` keys as before the adapters (``save_pretrained`` and
``from_pretrained`` work as ever), and it computes what the adapted model did,
to float rounding. A wrapper (rather than a ``torch.nn.utils.parametrize``
re-parametrisation of the weight) keeps the training forward low-rank:
``B (A x)`` costs ``rank · (in + out)`` per token and materialises no
weight-sized update (unless code reads the layer's ``weight`` instead of
calling it, as ``nn.MultiheadAttention`` does with ``out_proj``).

>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> adapters = add_adapters(model, LoRA(rank=2))
>>> adapters.layers, sum(p.numel() for p in adapters.trainable())
(('0', '2'), 52)
>>> type(adapters.merge()[0]).__name__, list(model.state_dict())
('Linear', ['0.weight', '0.bias', '2.weight', '2.bias'])
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress import masks
from fxcompress.errors import ConfigError
from fxcompress.selection import layer_selected, normalize_selection

__all__ = ["LoRA", "LoRALinear", "Adapters", "add_adapters"]

INITS = ("kaiming", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Which linear layers get adapters and how large they are.

    ``alpha`` defaults to ``rank`` (a scale of 1), as Hu et al. set it; raising
    ``rank`` at a fixed ``alpha`` shrinks each direction's step. ``A`` starts
    Kaiming-uniform like ``nn.Linear``'s own weights (``init="kaiming"``) or
    Gaussian with standard deviation ``1 / rank`` (``"gaussian"``). Layers are
    chosen as pruners choose them: every ``nn.Linear`` whose name matches one of
    the ``op_names`` globs (all when empty) and none of ``exclude``.
    ``train_norms`` also trains every normalisation layer's own parameters
    (modules whose class name contains ``Norm``: ``nn.LayerNorm``, ``nn.RMSNorm``,
    Hugging Face's ``LlamaRMSNorm``, batch norms); ``train_biases`` trains every
    parameter named ``bias``.
    """

    rank: int = 16
    alpha: float | None = None
    op_names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    train_norms: bool = False
    train_biases: bool = False
    init: str = "kaiming"
    op_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    def __post_init__(self) -> None:
        normalize_selection(self)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA.rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"LoRA.alpha must be > 0 (or None for alpha = rank), got {self.alpha}")
        if self.init not in INITS:
            raise ConfigError(f"LoRA.init must be one of {', '.join(INITS)}, got {self.init!r}")

    @property
    def scale(self) -> float:
        """``alpha / rank``: the factor on ``B A``."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank


class LoRALinear(nn.Module):
    """``base(x) + scale · B (A x)``: a frozen ``nn.Linear`` plus a trainable low-rank update.

    ``base`` is the user's own layer, kept whole, so :meth:`merged` can hand it
    back with the update folded into its weight.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, init: str = "kaiming") -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation
        else:
            nn.init.normal_(self.lora_A, std=1.0 / rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    @property
    def weight(self) -> torch.Tensor:
        """The adapted weight ``W + scale · B A``, for code that reads a layer's weight instead of calling it
        (``nn.MultiheadAttention`` reads ``out_proj.weight``); gradients reach ``A`` and ``B`` through it."""
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scale

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def merged(self) -> nn.Linear:
        """The base layer with ``scale · B A`` added to its weight (summed in float32, stored in its dtype)."""
        with torch.no_grad():
            update = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            self.base.weight.add_(update.to(self.base.weight.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scale={self.scale:g}"


@dataclasses.dataclass
class Adapters:
    """The adapters :func:`add_adapters` put into ``model``, and what it froze, so :meth:`merge` can undo both."""

    model: nn.Module
    layers: tuple[str, ...]  #: the adapted layers' names
    frozen: list[nn.Parameter]  #: parameters that trained before the adapters and were frozen for them
    merged: bool = False

    def trainable(self) -> list[nn.Parameter]:
        """What trains while adapted: the adapters and the chosen norm and bias parameters (the optimizer's list)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def merge(self) -> nn.Module:
        """Fold every adapter into its layer's weight, put the layers back and unfreeze; return the model.

        A second call does nothing.
        """
        if self.merged:
            return self.model
        for name in self.layers:
            parent, _, child = name.rpartition(".")
            owner = self.model.get_submodule(parent)
            setattr(owner, child, getattr(owner, child).merged())
        for p in self.frozen:
            p.requires_grad_(True)
        self.merged = True
        return self.model


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


def _selected_layers(model: nn.Module, lora: LoRA) -> list[str]:
    """The names of the linear layers ``lora`` selects, checked before anything changes: layers whose weight
    is shared with another module are left out with a warning (merging into a tied weight would change both);
    masked layers, ranks a layer cannot hold and models that already have adapters are refused."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError(f"LoRA: {type(model).__name__} already has adapters; merge them first (Adapters.merge)")
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    chosen, tied = [], []
    for name, module in model.named_modules():
        if not name or not layer_selected(name, module, lora.op_types, lora.op_names, lora.exclude):
            continue
        _check_adaptable(name, module, lora.rank)
        (tied if uses[id(module.weight)] > 1 else chosen).append(name)
    if tied:
        warnings.warn(f"LoRA leaves out {', '.join(tied)}: the weight is shared with another module (tied), and "
                      "merging an adapter into it would change both", stacklevel=3)
    if not chosen:
        raise ConfigError(f"LoRA selected no nn.Linear layer of {type(model).__name__} (op_names={lora.op_names}, "
                          f"exclude={lora.exclude}); a torch.export graph has no nn.Linear modules: adapt the module")
    return chosen


def _check_adaptable(name: str, layer: nn.Linear, rank: int) -> None:
    if masks.is_masked(layer):
        raise ConfigError(f"LoRA: layer {name!r} carries pruning masks, which a dense update would fill; shrink "
                          "the model first (output='module' or the shrink pass), or exclude the layer")
    if rank > min(layer.in_features, layer.out_features):
        raise ConfigError(f"LoRA: rank {rank} exceeds the smaller side of {name!r} ({layer.out_features}x"
                          f"{layer.in_features}); choose a lower rank, or exclude the layer")


def _stays_trainable(model: nn.Module, lora: LoRA) -> set[int]:
    """The ids of the parameters that keep training beside the adapters (norms and biases, if asked)."""
    keep = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if lora.train_norms and _is_norm(module) or lora.train_biases and name == "bias":
                keep.add(id(p))
    return keep


def add_adapters(model: nn.Module, lora: LoRA) -> Adapters:
    """Wrap ``lora``'s layers of ``model`` in :class:`LoRALinear` in place and freeze everything else (except
    the norms and biases ``lora`` keeps training); :meth:`Adapters.merge` undoes it with the update folded in.

    ``A`` is drawn from the global random generator, as ``nn.Linear``'s weights are.
    """
    names = _selected_layers(model, lora)
    keep = _stays_trainable(model, lora)
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), lora.rank, lora.scale, lora.init))
    return Adapters(model, tuple(names), frozen)
