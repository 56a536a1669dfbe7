"""CompensateBias: put removed input columns' mean contribution into their linear layer's bias (FLAP)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fxcompress import meta
from fxcompress.analysis import ChannelAnalysis, get_analysis
from fxcompress.channels import Role
from fxcompress.decision import current_decision
from fxcompress.errors import ConfigError
from fxcompress.masks import apply_masks, current_masks, mask_of, set_masked, split_target, trainable
from fxcompress.oneshot.engine import LinearSite, selected_linear_sites
from fxcompress.pipeline import Pass, Requires, register_pass
from fxcompress.selection import normalize_selection

__all__ = ["CompensateBias"]


def _has_masks(gm: fx.GraphModule) -> bool:
    return bool(current_masks(gm))


def _removed_positions(analysis: ChannelAnalysis, removed: np.ndarray) -> dict[tuple[str, Role, int], np.ndarray]:
    """``{(tensor, role, dim): positions along dim whose channels are removed}`` for every slice that loses some."""
    found: dict[tuple[str, Role, int], list[np.ndarray]] = {}
    for piece in analysis.slices:
        dead = np.flatnonzero(removed[analysis.labels[piece.ids]])
        if len(dead):
            found.setdefault((piece.target, piece.role, piece.dim), []).append(dead)
    return {key: np.unique(np.concatenate(parts)) for key, parts in found.items()}


@register_pass
@dataclasses.dataclass(frozen=True)
class CompensateBias(Pass):
    """Add ``W[:, removed] @ mean(X[removed])`` to the bias of every linear layer that loses input columns.

    A removed channel stops feeding the layers that read it; on average they
    lose ``W[:, c] · mean(X_c)`` per removed column ``c``, which a bias can
    carry: with it, the pruned layer's mean output over the calibration
    data is the dense layer's (FLAP's bias compensation, An et al., 2024).
    The means are the ones the channel criterion measured before masking
    (``ActivationNorm`` and ``Fluctuation`` record them on the graph,
    :data:`fxcompress.meta.INPUT_STATISTICS`); a layer without a bias gets
    one. Rows of the layer's output that are removed themselves get a masked
    bias entry, so the masked model still computes what ``shrink`` will.

    Run it between ``insert-masks`` and ``propagate-channels``: it reads the
    keep decision and changes the masked model's outputs, which
    ``propagate-channels`` and ``shrink`` then carry (verification checks
    shrunk against this masked model). A new bias tensor is new to the
    channel analysis, so the analysis is redone and the decision read back
    from the masks. ``op_names``/``exclude`` select the linear layers by
    module path (all by default); e.g. exclude ``lm_head`` when the model's
    config cannot give it a bias. Columns already compensated are
    remembered (:data:`fxcompress.meta.COMPENSATED`): a second run does nothing.
    """

    op_names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    op_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Module,)  #: linear layers of any class (selection by name)
    name: ClassVar[str] = "compensate-bias"
    requires: ClassVar[tuple[Requires, ...]] = (Requires("insert-masks", _has_masks),)
    preserves_outputs: ClassVar[bool] = False
    keeps_analysis: ClassVar[bool] = False

    def __post_init__(self) -> None:
        normalize_selection(self)

    def run(self, gm: fx.GraphModule) -> bool:
        analysis = get_analysis(gm)
        removed = ~current_decision(gm, analysis)
        if not removed.any():
            return False
        dead = _removed_positions(analysis, removed)
        nothing = np.zeros(0, dtype=np.int64)
        done = gm.meta.setdefault(meta.COMPENSATED, {})
        changed = False
        for site in self._sites(gm):
            columns = dead.get((site.target, Role.CONSUMER, 1), nothing)
            seen = done.get(site.target)
            columns = columns if seen is None else columns[~seen[columns]]
            if not len(columns):
                continue
            rows = dead.get((site.target, Role.PRODUCER, 0), nothing)
            _add_to_bias(gm, site, self._contribution(gm, site.target, columns), rows)
            width = trainable(*_owner_and_name(gm, site.target)).shape[1]
            done.setdefault(site.target, np.zeros(width, dtype=bool))[columns] = True
            changed = True
        return changed

    def _sites(self, gm: fx.GraphModule) -> list[LinearSite]:
        return selected_linear_sites(gm, self.op_types, self.op_names, self.exclude)

    @staticmethod
    def _contribution(gm: fx.GraphModule, target: str, columns: np.ndarray) -> torch.Tensor:
        """``W[:, columns] @ mean(X[columns])`` with the dense weight (the masked one reads zero there)."""
        inputs = gm.meta.get(meta.INPUT_STATISTICS, {}).get(target)
        weight = trainable(*_owner_and_name(gm, target)).detach()
        if inputs is None or inputs.mean.shape[0] != weight.shape[1]:
            raise ConfigError(
                f"compensate-bias: no calibration means of {target}'s input columns; prune with a criterion that "
                "measures them (Fluctuation, ActivationNorm) in the insert-masks pass before it, or exclude "
                f"{split_target(target)[0]!r} from compensate-bias"
            )
        index = torch.from_numpy(columns)
        return weight.double().cpu()[:, index] @ inputs.mean[index]


def _owner_and_name(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    owner, name = split_target(target)
    return gm.get_submodule(owner), name


def _bias_node(site: LinearSite) -> fx.Node | None:
    node = site.node
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return bias if isinstance(bias, fx.Node) else None


def _add_to_bias(gm: fx.GraphModule, site: LinearSite, delta: torch.Tensor, removed_rows: np.ndarray) -> None:
    """Add ``delta`` to the layer's bias (dense values; a mask stays as it is), creating one where there is none."""
    if site.node.op == "call_module":
        module, name = gm.get_submodule(site.node.target), "bias"
        if getattr(module, "bias", None) is None:
            return _new_bias(gm, site, delta, removed_rows, f"{site.node.target}.bias")
    else:
        bias = _bias_node(site)
        if bias is None:
            return _new_bias_argument(gm, site, delta, removed_rows)
        if bias.op != "get_attr":
            raise ConfigError(f"compensate-bias: {site.node.name}'s bias is computed in the graph; exclude the layer")
        module, name = _owner_and_name(gm, bias.target)
    dense = trainable(module, name)
    values = dense.detach() + delta.to(device=dense.device, dtype=dense.dtype)
    mask = mask_of(module, name)
    if mask is None:
        module._parameters[name] = nn.Parameter(values, requires_grad=dense.requires_grad)
    else:
        set_masked(module, name, values, mask)


def _new_bias(gm: fx.GraphModule, site: LinearSite, delta: torch.Tensor, removed_rows: np.ndarray, target: str) -> None:
    """Register ``delta`` as ``target`` (a parameter like the weight), masked where the layer's rows are removed."""
    weight = trainable(*_owner_and_name(gm, site.target))
    value = delta.to(device=weight.device, dtype=weight.dtype)
    owner, name = _owner_and_name(gm, target)
    owner.register_parameter(name, nn.Parameter(value, requires_grad=weight.requires_grad))
    if len(removed_rows):
        keep = torch.ones(len(value), dtype=torch.bool, device=value.device)
        keep[torch.from_numpy(removed_rows).to(value.device)] = False
        apply_masks(gm, {target: keep})


def _new_bias_argument(gm: fx.GraphModule, site: LinearSite, delta: torch.Tensor, removed_rows: np.ndarray) -> None:
    """``linear(x, w)`` -> ``linear(x, w, b)``, ``b`` a new parameter beside ``w`` read by a ``get_attr`` node."""
    owner, weight_name = split_target(site.target)
    module = gm.get_submodule(owner)
    name = "bias" if not hasattr(module, "bias") else f"{weight_name}_bias"
    target = f"{owner}.{name}" if owner else name
    _new_bias(gm, site, delta, removed_rows, target)
    with gm.graph.inserting_before(site.node):
        attr = gm.graph.get_attr(target)
    attr.meta[meta.TENSOR_META] = _extract_tensor_metadata(trainable(module, name).detach())
    args = list(site.node.args) + [None] * (3 - len(site.node.args))
    args[2] = attr
    site.node.args = tuple(args)
