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

import dataclasses

import torch
from torch.utils import _pytree as pytree

__all__ = ["LeafError", "output_leaves", "leaf_error", "worst_leaf", "clone_inputs", "nonfinite_leaf", "ELEMENT_FLOOR"]

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


def leaf_error(name: str, a: torch.Tensor, b: torch.Tensor, rtol: float) -> LeafError:
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


def worst_leaf(reference, outputs, rtol: float) -> LeafError | None:
    """The leaf whose error exceeds ``rtol`` the most, or None when every leaf agrees.

    Leaves are matched by key path; a leaf missing on one side or with another
    shape is a failure with ``error = inf``.
    """
    ref, got = output_leaves(reference), output_leaves(outputs)
    worst = None
    for name in ref.keys() | got.keys():
        a, b = ref.get(name), got.get(name)
        if a is None or b is None or a.shape != b.shape:
            return LeafError(name, float("inf"), (), float("nan"), float("nan"), "shape")
        err = leaf_error(name, a, b, rtol)
        if err.error > rtol and (worst is None or err.error > worst.error):
            worst = err
    return worst


def nonfinite_leaf(outputs) -> str | None:
    """The key path of the first output leaf holding a nan or inf, or None."""
    for name, t in output_leaves(outputs).items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None
