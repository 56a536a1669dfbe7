"""Output comparison for verification: every output leaf on its own scale, element-wise where it matters.

Comparing a whole output against ``rtol * max|output|`` lets a large leaf hide a
wrong small one (a tuple of logits and a tiny auxiliary loss), so each leaf of
the output tree is compared alone, and each element also against its own
magnitude (floored at ``ELEMENT_FLOOR`` of the leaf scale, below which float
reassociation noise dominates).

>>> ref = {"big": torch.tensor([1000.0]), "small": torch.tensor([1.0, 2.0])}
>>> worst_leaf(ref, {"big": torch.tensor([1000.0]), "small": torch.tensor([1.0, 2.5])}, rtol=1e-4).leaf
"['small']"
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from fxcompress.analysis import get_analysis
from fxcompress.channels import Role
from fxcompress.masks import (
    current_masks, kept_components, mask_of, masked, replace_mask, split_target, storage_names, trainable,
)
from fxcompress.modules import has_masked_statistics
from fxcompress.trace import fx_errors_as_notes, inference_mode

__all__ = [
    "LeafError", "output_leaves", "leaf_error", "worst_leaf", "clone_inputs", "nonfinite_leaf", "ELEMENT_FLOOR",
    "forward", "masked_tensors", "graph_state", "original_names", "oracle_outputs", "perturbed_removed_channels", "unreachable_error",
]

#: elements smaller than this fraction of their leaf's largest magnitude are compared against that floor
ELEMENT_FLOOR = 1e-3
#: element-wise errors may be this many times ``rtol`` (their denominators are smaller than the leaf scale)
ELEMENT_SLACK = 100.0


@dataclasses.dataclass(frozen=True)
class LeafError:
    """How far one output leaf moved: ``error`` relative to its scale, at ``index``, and why it failed."""

    leaf: str
    error: float
    index: tuple[int, ...]
    expected: float
    got: float
    kind: str  #: "scale" (relative to the leaf's largest magnitude) or "element" (relative to the element)


def output_leaves(out) -> dict[str, torch.Tensor]:
    """The tensor leaves of a model output by key path (``"[0]"``, ``"['logits']"``; a bare tensor is ``"0"``)."""
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # Hugging Face ModelOutput
        out = {k: out[k] for k in out.keys()}
    leaves, _ = pytree.tree_flatten_with_path(out)
    return {pytree.keystr(path) or "0": t for path, t in leaves if isinstance(t, torch.Tensor)}


def clone_inputs(example_inputs: tuple) -> tuple:
    """Fresh copies of every tensor in the inputs, so a forward that writes into its input changes nothing of the user's."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, example_inputs)


def _at(flat_index: int, shape) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), shape)) if len(shape) else ()


def leaf_error(name: str, a: torch.Tensor, b: torch.Tensor) -> LeafError:
    """The worse of ``b``'s error relative to ``a``'s scale and its element-wise error (divided by ``ELEMENT_SLACK``)."""
    a64, b64 = a.detach().double(), b.detach().double()
    if not a64.numel():
        return LeafError(name, 0.0, (), 0.0, 0.0, "scale")
    diff = (a64 - b64).abs()
    diff = torch.where(torch.isnan(diff) & ~(torch.isnan(a64) & torch.isnan(b64)), torch.inf, diff.nan_to_num(0.0))
    scale = a64.abs().nan_to_num(0.0, 0.0, 0.0).max().item() or 1.0
    by_scale = diff / scale
    by_element = diff / torch.clamp(a64.abs(), min=ELEMENT_FLOOR * scale) / ELEMENT_SLACK
    candidates = [("scale", by_scale), ("element", by_element)]
    kind, rel = max(candidates, key=lambda c: c[1].max().item())
    flat = int(rel.argmax())
    index = _at(flat, a.shape)
    return LeafError(name, rel.max().item(), index, a64.flatten()[flat].item(), b64.flatten()[flat].item(), kind)


def largest_error(reference, outputs) -> LeafError | None:
    """The leaf with the largest error (None when there are no leaves).

    Leaves are matched by key path; a leaf missing on one side or with another
    shape is an error of ``inf``. ``rtol`` plays no part: this is the measure
    a report prints, :func:`worst_leaf` the verdict.
    """
    ref, got = output_leaves(reference), output_leaves(outputs)
    largest = None
    for name in ref.keys() | got.keys():
        a, b = ref.get(name), got.get(name)
        if a is None or b is None or a.shape != b.shape:
            return LeafError(name, float("inf"), (), float("nan"), float("nan"), "shape")
        err = leaf_error(name, a, b)
        if largest is None or err.error > largest.error:
            largest = err
    return largest


def worst_leaf(reference, outputs, rtol: float) -> LeafError | None:
    """The leaf whose error exceeds ``rtol`` the most, or None when every leaf agrees (see :func:`largest_error`)."""
    largest = largest_error(reference, outputs)
    return largest if largest is not None and largest.error > rtol else None


def nonfinite_leaf(outputs) -> str | None:
    """The key path of the first output leaf holding a nan or inf, or None."""
    for name, t in output_leaves(outputs).items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


# ---------------------------------------------------------------------------- oracles independent of the rule table


def masked_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every masked tensor of ``gm`` as the forward sees it (``orig * mask``), by fully qualified name."""
    found = {}
    for target, mask in current_masks(gm).items():
        owner, name = split_target(target)
        found[target] = masked(trainable(gm.get_submodule(owner), name), mask).detach()
    return found


def graph_state(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``gm`` as its forward sees it: masked tensors as ``orig * mask`` under
    their own name, the dense values and masks that implement them left out."""
    masked = masked_tensors(gm)
    hidden = {stored for t in masked for stored in storage_names(t)}
    state = {n: t.detach() for n, t in gm.named_parameters(remove_duplicate=False) if n not in hidden}
    state |= {n: t for n, t in gm.named_buffers(remove_duplicate=False) if n not in hidden}
    return state | masked


def original_names(original: nn.Module, targets) -> dict[str, str] | None:
    """Map each tensor name of the graph to the original module's parameter or buffer name, or None.

    ``symbolic_trace`` keeps module paths and unlifted ``torch.export`` modules
    keep the original fully qualified names, so the names usually agree; an
    exported graph may spell a path with ``_`` where the module has ``.``, which
    is matched as a fallback. None when the two do not correspond one to one
    (a pass folded, fused or added tensors): the original then is no oracle.
    """
    names = {n for n, _ in original.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in original.named_buffers(remove_duplicate=False)}
    by_flat = {n.replace(".", "_"): n for n in names}
    mapping = {}
    for target in targets:
        match = target if target in names else by_flat.get(target.replace(".", "_"))
        if match is None:
            return None
        mapping[target] = match
    return mapping if set(mapping.values()) == names else None


def oracle_outputs(original: nn.Module, gm: fx.GraphModule, example_inputs: tuple):
    """The user's original module run with the masked graph's tensors (``torch.func.functional_call``), or
    None when the graph's tensors no longer correspond one to one with the original's.

    Nothing of the rule table is involved: if a rule let a masked model differ
    from the original architecture with the same zeros, this disagrees with it.
    Every tensor is swapped, not only the masked ones, so passes that trained
    or calibrated the graph before masking do not make the oracle stale. A
    graph whose norms compute statistics over kept channels only computes
    something the original cannot: None.
    """
    if has_masked_statistics(gm):
        return None
    state = graph_state(gm)
    mapping = original_names(original, state)
    if mapping is None:
        return None
    swapped = {mapping[t]: value for t, value in state.items()}
    if any(swapped[n].shape != t.shape for n, t in original.state_dict(keep_vars=True).items() if n in swapped):
        return None
    with inference_mode(original):  # every name is given its value, tied names (embedding and head) included
        return torch.func.functional_call(original, swapped, clone_inputs(example_inputs), strict=False,
                                          tie_weights=False)


def _removed_slices(gm: fx.GraphModule) -> list[tuple[str, int, np.ndarray]]:
    """``(target, dim, positions)`` of every masked producer or affine slice of a removed channel."""
    masks = current_masks(gm)
    if not masks:
        return []
    analysis = get_analysis(gm)
    removed = ~kept_components(analysis, masks)
    found = []
    for piece in analysis.slices:
        if piece.role not in (Role.PRODUCER, Role.AFFINE) or piece.target not in masks:
            continue
        if piece.consumed:  # noise there would be read by the tensor's own consumer use, not by other layers
            continue
        dead = np.flatnonzero(removed[analysis.labels[piece.ids]])
        if len(dead):
            found.append((piece.target, piece.dim, dead))
    return found


@contextlib.contextmanager
def perturbed_removed_channels(gm: fx.GraphModule, seed: int = 0):
    """Within the block, removed channels' producer and affine slices hold random non-zero values.

    A channel declared removed must not reach any output, whatever it holds;
    on leaving, masks, weights and the tensors the forward reads are restored.
    """
    generator = torch.Generator().manual_seed(seed)
    saved = []
    try:
        for target, dim, dead in _removed_slices(gm):
            owner, name = split_target(target)
            module = gm.get_submodule(owner)
            orig, original_mask = trainable(module, name), mask_of(module, name)
            mask = torch.clone(original_mask, memory_format=torch.contiguous_format)
            index = torch.from_numpy(dead).to(orig.device)
            # only the removed slices of the weights change: keep those, not copies of whole weights
            saved.append((module, name, dim, index, orig.detach().index_select(dim, index),
                          original_mask, getattr(module, name)))
            with torch.no_grad():
                shape = list(orig.shape)
                shape[dim] = len(dead)
                scale = orig.abs().max().item() or 1.0
                orig.index_copy_(dim, index, scale * (torch.rand(shape, generator=generator) + 0.5).to(orig.device, orig.dtype))
                # the removed rows read what the kept rows read: noise must not feed other removed channels
                # (a chain of them would compound it to inf) nor be cut off from the kept ones
                alive_elsewhere = mask.amax(dim=dim, keepdim=True) if mask.dim() > 1 else torch.ones(1, device=mask.device)
                mask.index_copy_(dim, index, alive_elsewhere.expand(shape).to(mask.dtype))
            replace_mask(module, name, mask)
            setattr(module, name, masked(orig, mask))
        yield
    finally:
        with torch.no_grad():
            for module, name, dim, index, orig, mask, tensor in reversed(saved):
                trainable(module, name).index_copy_(dim, index, orig)
                replace_mask(module, name, mask)
                setattr(module, name, tensor)


def forward(gm: nn.Module, example_inputs: tuple):
    """One forward on copies of the inputs (a forward may write into its input), in eval mode without grad."""
    with inference_mode(gm), fx_errors_as_notes():
        return gm(*clone_inputs(example_inputs))


def unreachable_error(gm: fx.GraphModule, example_inputs: tuple, reference, rtol: float, seed: int = 0) -> LeafError | None:
    """How far the outputs move when removed channels carry noise (None: not beyond ``rtol``)."""
    with perturbed_removed_channels(gm, seed):
        moved = forward(gm, example_inputs)
    return worst_leaf(reference, moved, rtol)
