"""Parameter masks: how a masked (simulated) model is stored, and how masks become channel decisions.

Masks use ``torch.nn.utils.prune``'s re-parametrisation (``weight_orig`` times
the ``weight_mask`` buffer, recomputed before every forward), so a masked
``GraphModule`` can be fine-tuned with masked weights held at zero and saved
with ``torch.save``.

Structured masks are bool outer products of one keep-vector per dim. The masks
built here remember those vectors (:func:`mask_factors`), so the questions the
passes ask of a mask (is it all ones, which channels are alive, is a slice
already zero) cost a look at the vectors instead of a pass over a tensor as
large as the weight. The record is dropped with the tensor and ignored once the
tensor has been modified in place, so any other mask takes the general path.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.utils.prune as torch_prune
from torch import fx, nn

from fxcompress.channels import Role
from fxcompress.ops import submodule

if TYPE_CHECKING:  # masks read an analysis; the analysis never needs masks
    from fxcompress.analysis import ChannelAnalysis

__all__ = [
    "current_masks", "apply_masks", "channel_masks", "kept_components", "split_target", "mask_factors",
    "ones_where_kept", "count_kept", "masked", "own_masks", "mask_of", "trainable", "refresh", "storage_names",
    "public_name", "remove_masks", "MaskStamp", "mask_stamp", "is_masked", "set_masked", "unmask", "replace_mask",
    "deferred_values", "forward_value",
]

#: id(mask) -> (mask._version when recorded, {dim: bool keep-vector}); entries leave with their tensor.
_FACTORS: dict[int, tuple[int, dict[int, np.ndarray]]] = {}


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _record_factors(mask: torch.Tensor, factors: dict[int, np.ndarray]) -> None:
    """Remember that ``mask`` is the outer product of ``factors`` (dims not named are all ones)."""
    version = _version(mask)
    if version is None:
        return
    key = id(mask)
    if key not in _FACTORS:
        weakref.finalize(mask, _FACTORS.pop, key, None)
    _FACTORS[key] = (version, factors)


def mask_factors(mask: torch.Tensor) -> dict[int, np.ndarray] | None:
    """The per-dim keep-vectors ``mask`` is the outer product of, if it was built so and not modified since."""
    record = _FACTORS.get(id(mask))
    if record is None or record[0] != _version(mask):
        return None
    return record[1]


def _all_ones(mask: torch.Tensor) -> bool:
    factors = mask_factors(mask)
    if factors is not None:
        return all(keep.all() for keep in factors.values())
    return bool(mask.all())


def count_kept(mask: torch.Tensor) -> int:
    """Nonzero entries of ``mask``: from its keep-vectors when it was built from them (no pass over the mask)."""
    factors = mask_factors(mask)
    if factors is None:
        return int(mask.count_nonzero())
    return math.prod(int(factors[d].sum()) if d in factors else n for d, n in enumerate(mask.shape))


def ones_where_kept(mask: torch.Tensor, kept_by_dim: dict[int, np.ndarray]) -> bool:
    """Whether the 0/1 ``mask``, zero outside the kept positions of each dim, is all ones on them.

    That is when shrinking can drop the mask instead of slicing it too.
    """
    factors = mask_factors(mask)
    if factors is not None:
        return all(keep[kept_by_dim[d]].all() if d in kept_by_dim else keep.all() for d, keep in factors.items())
    kept_size = math.prod(len(kept_by_dim[d]) if d in kept_by_dim else n for d, n in enumerate(mask.shape))
    return float(mask.sum(dtype=torch.float64)) == kept_size  # zero on removed channels: all ones on the rest


def split_target(target: str) -> tuple[str, str]:
    owner, _, name = target.rpartition(".")
    return owner, name


# ---------------------------------------------------------------------------- masked storage
# A masked tensor ``name`` is stored as the parameter ``name_orig`` and the buffer ``name_mask``
# (torch.nn.utils.prune's layout). These functions are the only code that knows it.

_ORIG, _MASK = "_orig", "_mask"


def own_masks(module: nn.Module) -> dict[str, torch.Tensor]:
    """The masks installed on ``module`` itself (not its children), by the masked tensor's local name."""
    found = {}
    for buffer_name, buffer in module._buffers.items():  # the dict itself: asked of every module, often
        if buffer is None or not buffer_name.endswith(_MASK):
            continue
        name = buffer_name[: -len(_MASK)]
        if name + _ORIG in module._parameters or hasattr(module, name + _ORIG):
            found[name] = buffer
    return found


def mask_of(module: nn.Module, name: str) -> torch.Tensor | None:
    """The mask on ``module.name``, or None when that tensor is not masked."""
    return own_masks(module).get(name)


def trainable(module: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor that holds ``module.name``'s values and gradient: ``name_orig`` when masked, else ``name``."""
    return getattr(module, name + _ORIG, None) if hasattr(module, name + _ORIG) else getattr(module, name, None)


def refresh(module: nn.Module, name: str) -> None:
    """Recompute ``module.name`` from its dense values and mask after either changed outside a forward.

    Inside :func:`deferred_values` the recomputation waits (see there).
    """
    pending = _PENDING.get()
    if pending is None:
        _settle(module, name)
        return
    setattr(module, name, torch.empty_like(trainable(module, name), device="meta"))
    pending.append((module, name))


def _settle(module: nn.Module, name: str) -> None:
    """Give masked ``module.name`` a mask of its own memory (writable in place by the user, unlike a
    broadcast view) and compute its forward value."""
    mask = mask_of(module, name)
    if not mask.is_contiguous():
        factors, view = mask_factors(mask), mask
        mask = module._buffers[name + _MASK] = view.contiguous()
        if factors is not None:
            _record_factors(mask, factors)
        _note_settled(view, mask)
    with torch.no_grad():  # a leaf, like the values forwards compute, so the model can be deep-copied
        setattr(module, name, masked(trainable(module, name), mask))


#: the masked tensors whose forward values wait for the end of :func:`deferred_values`; None outside it
_PENDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("fxcompress_pending_masks", default=None)


@contextlib.contextmanager
def deferred_values(root: nn.Module):
    """Within the block, installing or changing a mask does not recompute the masked tensor, and channel
    masks stay broadcast views; on leaving, every masked tensor still waiting is settled once.

    A pipeline changes masks several times (pruner, propagation) and usually
    ends by slicing them away (shrink); computing ``orig * mask`` and a
    weight-sized mask at every step cost time and memory for tensors that
    were about to go. Meanwhile ``module.name`` holds a ``meta`` tensor of
    the right shape: reading its values fails loudly instead of giving stale
    ones, code that needs the value outside a forward asks
    :func:`forward_value`, and a forward of ``root`` first computes every
    waiting value (the owners' pre-hooks do not run for tensors a graph reads
    with ``get_attr``). Nested blocks join the outermost.
    """
    if _PENDING.get() is not None:
        yield
        return
    pending: list[tuple[nn.Module, str]] = []
    token = _PENDING.set(pending)
    handle = root.register_forward_pre_hook(lambda *_: _compute_waiting(pending))
    try:
        yield
    finally:
        handle.remove()
        _PENDING.reset(token)
        for module, name in pending:
            if mask_of(module, name) is not None:
                _settle(module, name)


def _note_settled(view: torch.Tensor, mask: torch.Tensor) -> None:
    """Remember that ``mask`` replaced the broadcast ``view`` with the same values, for stamps of ``view``.

    The note lives while ``view`` does (a stamp holds it); it points to ``mask`` weakly.
    """
    ref, version = weakref.ref(mask), _version(mask)
    key = id(view)
    _SETTLED[key] = (view, lambda: (ref(), version))
    weakref.finalize(mask, _SETTLED.pop, key, None)


def _compute_waiting(pending: list[tuple[nn.Module, str]]) -> None:
    for module, name in pending:
        mask = mask_of(module, name)
        if mask is not None and getattr(module, name).is_meta:
            with torch.no_grad():
                setattr(module, name, masked(trainable(module, name), mask))


def forward_value(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.name`` as the forward reads it: ``orig * mask`` when masked (computed now), else the tensor."""
    mask = mask_of(module, name)
    return getattr(module, name, None) if mask is None else masked(trainable(module, name), mask)


def is_masked(module: nn.Module) -> bool:
    """Whether any tensor of ``module`` itself carries a mask."""
    return bool(own_masks(module))


def set_masked(module: nn.Module, name: str, orig: torch.Tensor, mask: torch.Tensor) -> None:
    """Give masked ``module.name`` new dense values and mask (shapes may change, e.g. when shrinking)."""
    requires_grad = module._parameters[name + _ORIG].requires_grad
    module._parameters[name + _ORIG] = nn.Parameter(orig, requires_grad=requires_grad)
    module._buffers[name + _MASK] = mask
    refresh(module, name)


def replace_mask(module: nn.Module, name: str, mask: torch.Tensor) -> torch.Tensor:
    """Make ``mask`` the mask of masked ``module.name``; return the mask it replaces (to restore it later).

    Masks are replaced, never written in place: channel masks are broadcast views (see :func:`_outer_mask`).
    """
    old = module._buffers[name + _MASK]
    module._buffers[name + _MASK] = mask
    refresh(module, name)
    return old


def unmask(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Drop the mask of ``module.name`` and make ``value`` its plain parameter (no multiply on forward)."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == name:
            del module._forward_pre_hooks[key]
    requires_grad = module._parameters[name + _ORIG].requires_grad
    del module._parameters[name + _ORIG]
    del module._buffers[name + _MASK]
    delattr(module, name)
    module.register_parameter(name, nn.Parameter(value, requires_grad=requires_grad))


def storage_names(target: str) -> tuple[str, str]:
    """The fully qualified names of the dense values and the mask that implement masked ``target``."""
    return target + _ORIG, target + _MASK


def public_name(state_name: str) -> str | None:
    """The tensor a ``state_dict`` entry stands for: ``conv.weight`` for ``conv.weight_orig``, None for a mask.

    (A name that merely ends like storage, on a model without masks, is taken as storage too.)
    """
    return None if state_name.endswith(_MASK) else state_name.removesuffix(_ORIG)


class MaskStamp:
    """Which masks a graph holds at one moment (each mask's name, tensor and write count), to tell later
    whether it still holds exactly those.

    fxcompress replaces masks and never rewrites them (settling a broadcast
    mask into memory of its own leaves a forwarding note, see
    :func:`_settle`), and an in-place edit by the user moves a tensor's
    write count, so a match means the same masks. A deep copy of the graph,
    which copies the stamp with the graph's meta, stamps the copied masks.
    """

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self._entries = {target: (mask, _version(mask)) for target, mask in masks.items()}

    def _now(self, target: str) -> torch.Tensor | None:
        """The stamped mask of ``target`` as it is now (its settled successor, if any), unless written since."""
        mask, version = self._entries[target]
        successor = _SETTLED.get(id(mask))
        if successor is not None and successor[0] is mask:
            mask, version = successor[1]()
        if mask is None or version is None or _version(mask) != version:
            return None
        return mask

    def matches(self, gm: fx.GraphModule) -> bool:
        masks = current_masks(gm)
        return masks.keys() == self._entries.keys() and all(masks[t] is self._now(t) for t in masks)

    def __deepcopy__(self, memo) -> MaskStamp:
        now = {target: self._now(target) for target in self._entries}
        if any(mask is None for mask in now.values()):
            stale = MaskStamp({})
            stale._entries = {"": (None, None)}  # matches no graph
            return stale
        return MaskStamp({target: copy.deepcopy(mask, memo) for target, mask in now.items()})


#: id(broadcast mask) -> (that mask, weakref to (its settled copy, the copy's write count)); see :func:`_settle`
_SETTLED: dict[int, tuple[torch.Tensor, Callable[[], tuple]]] = {}


def mask_stamp(gm: fx.GraphModule) -> MaskStamp:
    """A :class:`MaskStamp` of ``gm``'s masks now."""
    return MaskStamp(current_masks(gm))


def current_masks(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every mask installed on ``gm``, by the fully qualified name of the masked tensor."""
    return {
        f"{path}.{name}" if path else name: mask
        for path, module in gm.named_modules()
        for name, mask in own_masks(module).items()
    }


def apply_masks(gm: fx.GraphModule, masks: dict[str, torch.Tensor]) -> bool:
    """Multiply ``masks`` into the masks already on ``gm``; return whether any mask changed."""
    changed = False
    for target, mask in masks.items():
        owner, name = split_target(target)
        module = submodule(gm, owner)
        existing = mask_of(module, name)
        if existing is None:
            if _all_ones(mask):
                continue
            _install_mask(module, name, mask)
            _recompute_read_values(gm)
            changed = True
            continue
        changed |= _combine(module, name, existing, mask)
    return changed


class _ReadMaskedValues:
    """Forward pre- and post-hook of a graph: recomputes every masked tensor the graph reads with ``get_attr``.

    ``torch.nn.utils.prune``'s hook on a tensor's owner runs only when the
    owner is called; a ``torch.export`` graph (a Hugging Face model's) reads
    its parameters with ``get_attr`` and never calls their owners. Without
    this, its forward would read the value computed when the mask was
    installed: no gradient would reach the dense values (a fine-tune or a
    Taylor score would silently skip every masked tensor) and an optimizer
    step would leave the value stale. After the forward each value is
    detached again (the autograd graph keeps what it needs), so the model
    can still be deep-copied. Tensors swapped for meta twins (shape
    propagation) are left as they are.
    """

    def before(self, root: fx.GraphModule, args) -> None:
        for module, name, mask in self._read_masked(root):
            orig = trainable(module, name)
            if not orig.is_meta:
                setattr(module, name, masked(orig, mask))

    def after(self, root: fx.GraphModule, args, output) -> None:
        for module, name, _ in self._read_masked(root):
            value = getattr(module, name)
            if value.grad_fn is not None:
                setattr(module, name, value.detach())

    @staticmethod
    def _read_masked(root: fx.GraphModule):
        for node in root.graph.nodes:
            if node.op == "get_attr":
                owner, name = split_target(node.target)
                module = submodule(root, owner)
                mask = mask_of(module, name)
                if mask is not None:
                    yield module, name, mask


def _recompute_read_values(gm: nn.Module) -> None:
    """Give ``gm`` (once) the hooks of :class:`_ReadMaskedValues` if it is a graph."""
    if not isinstance(gm, fx.GraphModule):
        return
    if any(isinstance(getattr(hook, "__self__", None), _ReadMaskedValues) for hook in gm._forward_pre_hooks.values()):
        return
    hooks = _ReadMaskedValues()
    gm.register_forward_pre_hook(hooks.before)
    gm.register_forward_hook(hooks.after)


def _combine(module: nn.Module, name: str, existing: torch.Tensor, mask: torch.Tensor) -> bool:
    """Multiply ``mask`` into the installed ``existing`` mask; return whether it changed."""
    old, new = mask_factors(existing), mask_factors(mask)
    factors = None
    if old is not None and new is not None:
        if not all(keep.any() for keep in old.values()):
            return False  # all zero already: nothing can change it
        factors = {d: old.get(d, True) & new.get(d, True) for d in old.keys() | new.keys()}
        if factors.keys() == old.keys() and all(np.array_equal(factors[d], old[d]) for d in old):
            return False  # with every factor nonzero somewhere, the product changes iff a factor does
    if factors is not None:
        combined = _outer_mask(existing.shape, {d: np.flatnonzero(~keep) for d, keep in factors.items()})
    else:
        combined = existing * mask.to(existing.device)
        if torch.equal(combined, existing):
            return False
    replace_mask(module, name, combined.to(existing.device))
    return True


def masked(orig: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``orig * mask``, the masked tensor, in one allocation of ``orig``'s size.

    A bool mask goes through ``torch.where``: multiplying by it would first
    copy it to ``orig``'s dtype, a temporary as large as the weight.
    """
    return torch.where(mask, orig, 0) if mask.dtype == torch.bool else orig * mask


class _MaskedTensor(torch_prune.CustomFromMask):
    """``CustomFromMask``'s forward pre-hook, computing the masked tensor with :func:`masked` (torch's
    ``apply_mask`` copies the mask to the weight's dtype first)."""

    def apply_mask(self, module: nn.Module) -> torch.Tensor:
        name = self._tensor_name
        return masked(getattr(module, name + _ORIG), getattr(module, name + _MASK))


def _install_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """What ``torch.nn.utils.prune.custom_from_mask`` does, without its all-ones copy and extra multiply.

    The parameter moves to ``name_orig``, the mask becomes the ``name_mask``
    buffer, ``name`` is recomputed as ``orig * mask`` before every forward by
    the same ``CustomFromMask`` hook, so ``prune.remove`` and friends keep working.
    """
    factors = mask_factors(mask)
    if mask.dtype != torch.bool:  # a bool mask is a quarter of a float one; ``orig * mask`` reads either
        mask = mask.to(dtype=getattr(module, name).dtype)
    mask = mask.to(getattr(module, name).device)  # on the parameter's device
    if factors is not None:
        _record_factors(mask, factors)
    method = _MaskedTensor(mask)
    method._tensor_name = name
    orig = module._parameters.pop(name)
    module.register_parameter(name + _ORIG, orig)
    module.register_buffer(name + _MASK, mask)
    refresh(module, name)
    module.register_forward_pre_hook(method)


def _alive_positions(mask: torch.Tensor, dim: int) -> np.ndarray:
    """Per index along ``dim``: whether any mask entry in that slice is nonzero."""
    factors = mask_factors(mask)
    if factors is not None:
        alive = factors.get(dim, np.ones(mask.shape[dim], dtype=bool))
        return alive if all(keep.any() for d, keep in factors.items() if d != dim) else np.zeros_like(alive)
    other = [d for d in range(mask.dim()) if d != dim]
    peak = mask.amax(dim=other) if other else mask  # prune masks are 0/1: one pass, no bool copy
    return (peak != 0).cpu().numpy()


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
    """A bool mask of ``shape`` that zeroes the given positions of each dim.

    It is the product of one keep-vector per dim, expanded (not copied) to
    the full shape: a conv weight's output-channel mask holds one bool per
    channel, not one per weight. An expanded view cannot be written in
    place, so masks are replaced instead (:func:`replace_mask`).
    """
    mask = None
    factors = {}
    for dim, dead in dead_by_dim.items():
        factors[dim] = np.ones(shape[dim], dtype=bool)
        factors[dim][dead] = False
        keep = torch.from_numpy(factors[dim]).view([-1 if d == dim else 1 for d in range(len(shape))])
        mask = keep if mask is None else mask & keep
    mask = (torch.ones((), dtype=torch.bool) if mask is None else mask).expand(shape)
    _record_factors(mask, factors)
    return mask


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
        module = submodule(gm, owner)
        if skip_done and _already_zero(mask_of(module, name), dead_by_dim):
            continue
        masks[target] = _outer_mask(getattr(module, name).shape, dead_by_dim)
    return masks


def _already_zero(mask: torch.Tensor | None, dead_by_dim: dict[int, np.ndarray]) -> bool:
    if mask is None:
        return False
    factors = mask_factors(mask)
    if factors is not None:
        if not all(keep.any() for keep in factors.values()):
            return True  # the whole mask is zero
        return all(dim in factors and not factors[dim][dead].any() for dim, dead in dead_by_dim.items())
    return all(
        not bool(mask.index_select(dim, torch.from_numpy(dead).to(mask.device)).any())
        for dim, dead in dead_by_dim.items()
    )


def remove_masks(module: nn.Module) -> None:
    """Make every mask on ``module`` permanent (weights become ``orig * mask``) and drop the masks."""
    for sub in module.modules():
        for name in list(own_masks(sub)):
            torch_prune.remove(sub, name)
