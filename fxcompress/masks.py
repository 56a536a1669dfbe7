"""Parameter masks: how a masked (simulated) model is stored, and how masks become channel decisions.

Masks use ``torch.nn.utils.prune``'s re-parametrisation (``weight_orig`` times
the ``weight_mask`` buffer, recomputed before every forward), so a masked
``GraphModule`` can be fine-tuned with masked weights held at zero and saved
with ``torch.save``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.utils.prune as torch_prune
from torch import fx, nn

from fxcompress.analysis import ChannelAnalysis
from fxcompress.channels import Role

__all__ = ["current_masks", "apply_masks", "channel_masks", "kept_components", "split_target"]


def split_target(target: str) -> tuple[str, str]:
    owner, _, name = target.rpartition(".")
    return owner, name


def current_masks(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every mask installed on ``gm``, by the fully qualified name of the masked tensor."""
    found = {}
    for path, module in gm.named_modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer_name.endswith("_mask") and hasattr(module, buffer_name[: -len("_mask")] + "_orig"):
                name = buffer_name[: -len("_mask")]
                found[f"{path}.{name}" if path else name] = buffer
    return found


def apply_masks(gm: fx.GraphModule, masks: dict[str, torch.Tensor]) -> bool:
    """Multiply ``masks`` into the masks already on ``gm``; return whether any mask changed."""
    changed = False
    for target, mask in masks.items():
        owner, name = split_target(target)
        module = gm.get_submodule(owner)
        existing = getattr(module, name + "_mask", None)
        if existing is None:
            if bool(mask.all()):
                continue
            torch_prune.custom_from_mask(module, name, mask.to(torch.float32))
            changed = True
            continue
        combined = existing * mask.to(existing.dtype)
        if torch.equal(combined, existing):
            continue
        existing.copy_(combined)
        setattr(module, name, getattr(module, name + "_orig") * existing)
        changed = True
    return changed


def _alive_positions(mask: torch.Tensor, dim: int) -> np.ndarray:
    """Per index along ``dim``: whether any mask entry in that slice is nonzero."""
    other = [d for d in range(mask.dim()) if d != dim]
    peak = mask.amax(dim=other) if other else mask  # prune masks are 0/1: one pass, no bool copy
    return (peak != 0).numpy()


def kept_components(analysis: ChannelAnalysis, masks: dict[str, torch.Tensor]) -> np.ndarray:
    """Which components survive, given parameter masks.

    A channel of a prunable group is removed when every one of its producer
    slices is entirely masked; channels of frozen groups are always kept.
    """
    keep = np.ones(analysis.solution.num_components, dtype=bool)
    for group in analysis.prunable_groups():
        dead = np.ones(len(group), dtype=bool)
        for k in analysis.slices_of(group, Role.PRODUCER):
            piece = analysis.slices[k]
            mask = masks.get(piece.target)
            if mask is None:
                dead[:] = False
                break
            positions, local = analysis.positions(k, group)
            alive = _alive_positions(mask, piece.dim)[positions]
            dead &= np.bincount(local, weights=alive, minlength=len(group)) == 0
        keep[group.components[dead]] = False
    return keep


def channel_masks(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: np.ndarray) -> dict[str, torch.Tensor]:
    """Masks that zero every maskable slice of the removed components (producers, consumers, affine)."""
    masks: dict[str, torch.Tensor] = {}
    removed = ~keep
    for piece in analysis.slices:
        if not piece.maskable or piece.role is Role.BUFFER:
            continue
        dead = np.flatnonzero(removed[analysis.labels[piece.ids]])
        if len(dead) == 0:
            continue
        owner, name = split_target(piece.target)
        tensor = getattr(gm.get_submodule(owner), name)
        mask = masks.get(piece.target)
        if mask is None:
            mask = masks[piece.target] = torch.ones_like(tensor, dtype=torch.float32)
        mask.index_fill_(piece.dim, torch.from_numpy(dead), 0.0)
    return masks


def remove_masks(module: nn.Module) -> None:
    """Make every mask on ``module`` permanent (weights become ``orig * mask``) and drop the masks."""
    for sub in module.modules():
        for buffer_name in [b for b, _ in sub.named_buffers(recurse=False) if b.endswith("_mask")]:
            name = buffer_name[: -len("_mask")]
            if hasattr(sub, name + "_orig"):
                torch_prune.remove(sub, name)
