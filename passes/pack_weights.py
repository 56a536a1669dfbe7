"""PackWeights: run quantized linear layers on packed int8 / int4 CPU kernels instead of float weights.

One-shot quantization (``one-shot{algorithm=gptq,...}``, RTN, AWQ) leaves each
weight in float on its integer grid and records the grid under
:data:`fxcompress.meta.WEIGHT_GRIDS`. This pass turns every such layer into a
:class:`fxcompress.kernels.Int8WeightLinear` or
:class:`~fxcompress.kernels.Int4WeightLinear` holding the grid integers (1 or
½ byte per weight), so decoding reads 4 or 8 times fewer weight bytes. An
``nn.Linear`` module is swapped in place; an exported ``aten.linear`` call
becomes a call of the packed module, put where its weight's owner was. The
outputs are those of the dequantized weights, to float rounding.

With ``bits=8`` or ``bits=4`` the selected layers that have no grid are
quantized on the fly (round to nearest: int8 symmetric per row, int4
asymmetric in groups of ``group_size``); outputs then change. A layer whose
grid no kernel takes (int4 groups of 16, dynamic act-order groups, grouped
8-bit, a weight moved off its grid) stays in float, and one warning names
them all.

>>> import torch, fxcompress
>>> from torch import nn
>>> from fxcompress.oneshot import GPTQ
>>> from fxcompress.passes import OneShot
>>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
>>> data = [torch.randn(8, 64) for _ in range(2)]
>>> q = fxcompress.compile(model, data[0], [OneShot(GPTQ(bits=4, group_size=32), data, progress=False), PackWeights()])
>>> type(q.get_submodule("0")).__name__, type(q.get_submodule("2")).__name__
('Int4WeightLinear', 'Int4WeightLinear')
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from typing import ClassVar

import torch
from torch import fx, nn

from fxcompress import meta
from fxcompress.errors import ConfigError
from fxcompress.kernels import INT4_KERNELS, INT8_KERNELS, packing_of, pack_linear, rtn_grid
from fxcompress.masks import forward_value, public_name, split_target
from fxcompress.oneshot import LinearSite, linear_sites
from fxcompress.oneshot.engine import current_value
from fxcompress.pipeline import Pass, register_pass
from fxcompress.selection import normalize_selection

__all__ = ["PackWeights", "LayerPacker"]


@register_pass
@dataclasses.dataclass(frozen=True)
class PackWeights(Pass):
    """Replace each selected linear layer that lies on a recorded weight grid by a packed-kernel module.

    ``bits`` 0 (default) packs only layers with a grid; 8 or 4 also quantizes
    the other selected layers (round to nearest, ``group_size`` columns per
    int4 scale). ``op_types``/``op_names``/``exclude`` select layers as
    one-shot algorithms do. ``int8_kernel`` and ``int4_kernel`` force the
    layers' kernels (one of :data:`fxcompress.kernels.INT8_KERNELS` /
    :data:`~fxcompress.kernels.INT4_KERNELS`; None: the first that runs here).
    """

    bits: int = 0
    group_size: int = 128
    int8_kernel: str | None = None
    int4_kernel: str | None = None
    op_types: tuple[type[nn.Module], ...] = (nn.Linear,)
    op_names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    name: ClassVar[str] = "pack-weights"

    def __post_init__(self) -> None:
        if self.bits not in (0, 4, 8):
            raise ConfigError(f"pack-weights: bits must be 0 (only layers already quantized), 4 or 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"pack-weights: group_size must be a positive integer, got {self.group_size!r}")
        for option, kernels in (("int8_kernel", INT8_KERNELS), ("int4_kernel", INT4_KERNELS)):
            if getattr(self, option) is not None and getattr(self, option) not in kernels:
                raise ConfigError(f"pack-weights: {option} must be one of {', '.join(kernels)} or None, got "
                                  f"{getattr(self, option)!r}")
        normalize_selection(self)

    @property
    def preserves_outputs(self) -> bool:
        """Packing recorded grids keeps the outputs (verification checks them); quantizing on the fly does not."""
        return self.bits == 0

    def run(self, gm: fx.GraphModule) -> bool:
        packer = LayerPacker(gm, self.bits, self.group_size, self.int8_kernel, self.int4_kernel)
        for site in linear_sites(gm, self):  # a weight the graph reads twice is left alone, with its own warning
            packer(site)
        return packer.finish(stacklevel=5)


@dataclasses.dataclass
class LayerPacker:
    """Packs linear layers one at a time and says, at the end, which stayed in float and why.

    :class:`PackWeights` runs it over every selected layer; ``OneShot(...,
    pack=True)`` calls it on each layer as soon as the one-shot engine is done
    with it, so the dense quantized weights never all exist at once (a
    1.1B-parameter model's would be a second fp32 model). ``bits``,
    ``group_size``, ``int8_kernel`` and ``int4_kernel`` are :class:`PackWeights`' options.
    """

    gm: fx.GraphModule
    bits: int = 0
    group_size: int = 128
    int8_kernel: str | None = None
    int4_kernel: str | None = None
    left: list[str] = dataclasses.field(default_factory=list)
    changed: bool = False

    def __post_init__(self) -> None:
        self.reads = Counter(n.target for n in self.gm.graph.nodes if n.op == "get_attr")

    def __call__(self, site: LinearSite) -> fx.Node | None:
        """Pack ``site``'s layer if it lies on a grid a kernel takes; return the node that replaced the site's
        node (an exported ``linear`` call becomes a ``call_module``), else None."""
        grids = self.gm.meta.get(meta.WEIGHT_GRIDS, {})  # read now: a one-shot run records them as it goes
        why, node = _pack_site(self.gm, site, grids.get(site.target), self)
        if why is None:
            grids.pop(site.target, None)  # the float parameter it described is gone
            self.changed = True
        elif why:
            self.left.append(f"{split_target(site.target)[0] or site.target} ({why})")
        return node

    def finish(self, stacklevel: int = 2) -> bool:
        """Warn once about the layers left in float, recompile if anything changed; return whether it did."""
        if self.left:
            warnings.warn(f"pack-weights: {len(self.left)} linear layer(s) left in float: {'; '.join(self.left)}",
                          stacklevel=stacklevel)
        if self.changed:
            self.gm.graph.lint()
            self.gm.recompile()
        return self.changed


def _pack_site(gm: fx.GraphModule, site: LinearSite, grid, packer: LayerPacker) -> tuple[str | None, fx.Node | None]:
    """Pack one layer with ``packer``'s options: ``(None, new node or None)`` when done, ``("", None)`` when there
    is nothing to pack, else ``(why it stays in float, None)``."""
    owner = split_target(site.target)[0]
    weight = current_value(gm, site.target).detach()
    if grid is None:
        if not packer.bits:
            return "", None
        if weight.dim() != 2:
            return f"a {weight.dim()}-d weight", None
        grid = rtn_grid(weight, packer.bits, min(packer.group_size, weight.shape[1]))
        weight = grid.dequantize(grid.integers(weight)).to(weight.dtype)
    elif not grid.holds(weight):
        return "its weight no longer lies on its recorded grid (changed after quantization): quantize it again", None
    packing = packing_of(grid, tuple(weight.shape))
    if not packing.fits:
        return packing.reason, None
    if site.node.op == "call_module":
        module = gm.get_submodule(site.node.target)
        _replace_module(gm, site.node.target, pack_linear(weight, forward_value(module, "bias"), grid, owner,
                                                          int8_kernel=packer.int8_kernel,
                                                          int4_kernel=packer.int4_kernel))
        return None, None
    return _pack_call(gm, site, weight, grid, packer)


def _pack_call(gm: fx.GraphModule, site: LinearSite, weight: torch.Tensor, grid,
               packer: LayerPacker) -> tuple[str | None, fx.Node | None]:
    """``linear(x, get_attr W, get_attr b)`` -> ``call_module(packed)(x)``, the packed module replacing W's owner."""
    node = site.node
    weight_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias_node is not None and (not isinstance(bias_node, fx.Node) or bias_node.op != "get_attr"):
        return "a bias computed by the graph", None
    owner, _ = split_target(site.target)
    attrs = [weight_node] + ([bias_node] if bias_node is not None else [])
    if not owner or any(split_target(n.target)[0] != owner or len(n.users) > 1 or packer.reads[n.target] > 1
                        for n in attrs):
        return "its weight or bias is not held by a module of its own", None
    state = {public_name(name) for name, _ in gm.get_submodule(owner).named_parameters(recurse=False)}
    state |= {public_name(name) for name, _ in gm.get_submodule(owner).named_buffers(recurse=False)}
    state.discard(None)
    if state - {split_target(n.target)[1] for n in attrs} or any(True for _ in gm.get_submodule(owner).children()):
        return f"its owner {owner} holds other state", None
    bias = None if bias_node is None else current_value(gm, bias_node.target).detach()
    packed = pack_linear(weight, bias, grid, owner, int8_kernel=packer.int8_kernel, int4_kernel=packer.int4_kernel)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(owner, (node.args[0] if node.args else node.kwargs["input"],))
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    for attr in attrs:
        gm.graph.erase_node(attr)
    _replace_module(gm, owner, packed)
    return None, call


def _replace_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)
    types = gm.meta.get(meta.MODULE_TYPES)
    if isinstance(types, dict) and path in types:
        types[path] = type(module)
