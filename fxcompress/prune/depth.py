"""Depth pruning: remove whole decoder layers by the little they change the residual stream (ShortGPT).

Block Influence (Men et al. 2024, "ShortGPT: Layers in Large Language Models
are More Redundant Than You Expect") scores decoder layer ``i`` as
``1 − mean cos(x_i, x_{i+1})``: one minus the cosine similarity between the
hidden state entering the layer and the one leaving it, averaged over every
token of the calibration data. A layer whose output points where its input
did adds little; the layers with the lowest scores are removed.

:func:`block_influence` measures the scores in one forward pass per batch
(hooks on the layers, no re-tracing); :func:`remove_layers` returns a copy of
the user's model without some layers, keeping its class, methods and config
(``num_hidden_layers``, ``layer_types``, and each attention's ``layer_idx``,
by which the KV cache finds its slot), so it still ``generate()``s and
round-trips through ``save_pretrained`` / ``from_pretrained``;
:func:`depth_prune` does both.

The decoder's layers are found as the one ``nn.ModuleList`` holding
``config.num_hidden_layers`` modules (``model.layers`` in Llama, Mistral,
Qwen2, Phi-3, Gemma; ``transformer.h`` in GPT-2).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.errors import ConfigError

__all__ = ["decoder_layers", "block_influence", "lowest_influence", "remove_layers", "depth_prune", "DepthPruned"]


def _layer_count(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise ConfigError(f"{type(model).__name__} has no config.num_hidden_layers: depth pruning needs a Hugging "
                          "Face style decoder")
    return count


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ``nn.ModuleList`` of the decoder's layers: the only list with
    ``config.num_hidden_layers`` entries (the outermost, when lists nest)."""
    count = _layer_count(model)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    found = [(n, m) for n, m in found if not any(n.startswith(other + ".") for other, _ in found)]
    if len(found) != 1:
        names = ", ".join(n for n, _ in found) or "none"
        raise ConfigError(f"depth pruning needs one list of {count} decoder layers in {type(model).__name__}; "
                          f"found {names}")
    return found[0]


def _hidden(value) -> torch.Tensor:
    """The hidden states in a layer's input or output: the tensor, or a tuple's first element."""
    return value if isinstance(value, torch.Tensor) else value[0]


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Block Influence of every decoder layer, ``(num_hidden_layers,)`` float64: ``1 −`` the mean over all
    calibration tokens of the cosine similarity between the layer's input and output hidden states.

    ``model(batch)`` runs once per batch of ``input_ids``, in eval mode (the
    mode is restored). Padding is not masked: give full sequences.
    """
    _, layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def hook(index: int):
        def record(module, args, kwargs, output):
            x = _hidden(args[0] if args else kwargs["hidden_states"]).float()
            y = _hidden(output).float()
            cos = F.cosine_similarity(x, y, dim=-1)
            sums[index] += cos.double().sum()
            counts[index] += cos.numel()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    if not counts.all():
        raise ConfigError("block_influence: no calibration batch reached the decoder layers")
    return 1 - sums / counts


def lowest_influence(scores: torch.Tensor, n: int) -> tuple[int, ...]:
    """The indices of the ``n`` layers with the lowest scores, ascending (ties go to the earlier layer).

    >>> lowest_influence(torch.tensor([0.3, 0.1, 0.2, 0.1]), 2)
    (1, 3)
    """
    if not 0 <= n < len(scores):
        raise ConfigError(f"cannot remove {n} of {len(scores)} layers (at least one must stay)")
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return tuple(sorted(order[:n]))


def _renumber(layer: nn.Module, index: int) -> None:
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


def remove_layers(model: nn.Module, indices: Iterable[int]) -> nn.Module:
    """A copy of ``model`` without the decoder layers at ``indices``; ``model`` is not modified.

    The copy keeps its class and config: ``num_hidden_layers`` counts the
    layers left, ``config.layer_types`` (when the config has it) drops the
    removed layers' entries, and every ``layer_idx`` attribute inside layer
    ``j`` of the copy is ``j``, so the KV cache has one slot per layer left.
    Parameter names follow (``model.layers.3`` becomes ``model.layers.2`` when
    one layer before it went), so ``save_pretrained`` writes a checkpoint
    that plain ``from_pretrained`` loads.
    """
    _, layers = decoder_layers(model)
    drop = set(indices)
    if not drop <= set(range(len(layers))) or len(drop) >= len(layers):
        raise ConfigError(f"cannot remove layers {sorted(drop)} of {len(layers)} (indices in range, one layer left)")
    pruned = copy.deepcopy(model)
    path, copied = decoder_layers(pruned)
    kept = [layer for i, layer in enumerate(copied) if i not in drop]
    for index, layer in enumerate(kept):
        _renumber(layer, index)
    parent, _, name = path.rpartition(".")
    setattr(pruned.get_submodule(parent), name, nn.ModuleList(kept))
    configs = {id(m.config): m.config for m in pruned.modules() if hasattr(m, "config")}
    for config in configs.values():  # the model's and its base model's (shared in HF, copied in some)
        if getattr(config, "num_hidden_layers", None) != len(layers):
            continue
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == len(layers):
            config.layer_types = [t for i, t in enumerate(layer_types) if i not in drop]
        config.num_hidden_layers = len(kept)
    return pruned


@dataclasses.dataclass
class DepthPruned:
    model: nn.Module  #: the copy without the removed layers
    scores: torch.Tensor  #: Block Influence of every layer of the original model
    removed: tuple[int, ...]  #: indices (in the original model) of the removed layers


def depth_prune(model: nn.Module, batches: Sequence[torch.Tensor] | Iterable[torch.Tensor], remove: int) -> DepthPruned:
    """Remove the ``remove`` decoder layers of lowest :func:`block_influence` on ``batches`` (``input_ids``):
    a copy of ``model``, the scores and the removed indices."""
    scores = block_influence(model, batches)
    removed = lowest_influence(scores, remove)
    return DepthPruned(remove_layers(model, removed), scores, removed)
