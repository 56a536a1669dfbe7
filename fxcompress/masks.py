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
            _install_mask(module, name, mask)
            changed = True
            continue
        combined = existing * mask.to(existing.dtype)
        if torch.equal(combined, existing):
            continue
        existing.copy_(combined)
        setattr(module, name, getattr(module, name + "_orig") * existing)
        changed = True
    return changed


def _install_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """What ``torch.nn.utils.prune.custom_from_mask`` does, without its all-ones copy and extra multiply.

    The parameter moves to ``name_orig``, the mask becomes the ``name_mask``
    buffer, ``name`` is recomputed as ``orig * mask`` before every forward by
    the same ``CustomFromMask`` hook, so ``prune.remove`` and friends keep working.
    """
    mask = mask.to(dtype=getattr(module, name).dtype).contiguous()
    method = torch_prune.CustomFromMask(mask)
    method._tensor_name = name
    orig = module._parameters.pop(name)
    module.register_parameter(name + "_orig", orig)
    module.register_buffer(name + "_mask", mask)
    setattr(module, name, method.apply_mask(module))
    module.register_forward_pre_hook(method)


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


def _removed_positions(analysis: ChannelAnalysis, removed: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """For each maskable tensor: the positions along each of its dims that belong to removed channels."""
    found: dict[str, dict[int, np.ndarray]] = {}
    for piece in analysis.slices:
        if not piece.maskable or piece.role is Role.BUFFER:
            continue
        dead = np.flatnonzero(removed[analysis.labels[piece.ids]])
        if len(dead):
            found.setdefault(piece.target, {})[piece.dim] = dead
    return found


def _outer_mask(shape: torch.Size, dead_by_dim: dict[int, np.ndarray]) -> torch.Tensor:
    """A 0/1 mask of ``shape`` that zeroes the given positions of each dim, built in one pass.

    It is the product of one keep-vector per dim, broadcast to the full shape.
    """
    mask = torch.ones((), dtype=torch.float32)
    for dim, dead in dead_by_dim.items():
        keep = torch.ones(shape[dim], dtype=torch.float32)
        keep[torch.from_numpy(dead)] = 0.0
        mask = mask * keep.view([-1 if d == dim else 1 for d in range(len(shape))])
    return mask.expand(shape).contiguous()


def channel_masks(
    gm: fx.GraphModule, analysis: ChannelAnalysis, keep: np.ndarray, skip_done: bool = False
) -> dict[str, torch.Tensor]:
    """Masks that zero every maskable slice of the removed components (producers, consumers, affine).

    With ``skip_done``, tensors whose current mask already zeroes all those
    positions are left out (reading only the removed slices), so re-propagating
    settled masks costs almost nothing.
    """
    masks: dict[str, torch.Tensor] = {}
    for target, dead_by_dim in _removed_positions(analysis, ~keep).items():
        owner, name = split_target(target)
        module = gm.get_submodule(owner)
        if skip_done and _already_zero(getattr(module, name + "_mask", None), dead_by_dim):
            continue
        masks[target] = _outer_mask(getattr(module, name).shape, dead_by_dim)
    return masks


def _already_zero(mask: torch.Tensor | None, dead_by_dim: dict[int, np.ndarray]) -> bool:
    if mask is None:
        return False
    return all(
        not bool(mask.index_select(dim, torch.from_numpy(dead)).any()) for dim, dead in dead_by_dim.items()
    )


def remove_masks(module: nn.Module) -> None:
    """Make every mask on ``module`` permanent (weights become ``orig * mask``) and drop the masks."""
    for sub in module.modules():
        for buffer_name in [b for b, _ in sub.named_buffers(recurse=False) if b.endswith("_mask")]:
            name = buffer_name[: -len("_mask")]
            if hasattr(sub, name + "_orig"):
                torch_prune.remove(sub, name)
