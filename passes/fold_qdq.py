"""FoldQDQ: turn a fake-quantized graph into the standard QDQ form of a real integer model.

- weights become stored integer tensors (int8, or int32 for biases) read
  through one ``dequantize`` node, and the layer becomes its functional call;
- every activation quantizer becomes a ``quantize -> dequantize`` pair whose
  scale and zero point are buffers (shared call sites share the buffers);
- identity-like ops disappear and back-to-back pairs with the same
  parameters collapse into one.

This is the form ONNX Runtime recognises (DequantizeLinear on every input of
an op, QuantizeLinear on its output) and fuses into int8 kernels. Biases are
stored as int32 on the grid ``input_scale * weight_scale``, as ONNX Runtime's
int8 kernels require, which moves outputs by at most half that step per
layer; this pass therefore does not claim to preserve outputs exactly.

Besides the quantizers of ``insert-observers``, the pass folds W8A8 as the
one-shot passes leave it (:func:`fxcompress.passes.w8a8_passes`, SmoothQuant or
plain): linear weights on a recorded signed 8-bit grid with one scale per row
(:data:`fxcompress.meta.WEIGHT_GRIDS`; the grid's entry goes, its integers are
stored) and the static activation rounding of ``quantize-activations``, whose
signed grid is written as ``uint8`` with zero point 128 (the same values, in
the u8 x s8 form int8 kernels take). Other grids (int4 groups, AWQ) stay in
float for ``pack-weights`` and ``MatMulNBits``; per-token dynamic rounding has
no QDQ form and is refused by name.

The rewrites are the table :data:`REWRITES`, applied in order, each to every
node it matches.

``FoldQDQ(form="pt2e")`` (text ``fold-qdq{form=pt2e}``) applies
:data:`PT2E_REWRITES` instead: the form PT2E's ``convert_pt2e`` produces and
Inductor's x86 lowering turns into oneDNN int8 kernels under ``torch.compile``
(:mod:`fxcompress.quant.inductor`): ``quantized_decomposed`` quantize and
dequantize ops with literal scale and zero point on activations,
``dequantize_per_channel`` on int8 weights (per-tensor weight scales are
repeated per channel), float biases, so outputs match the fake-quantized
simulation up to one activation step where rounding ties fall differently.
Layers whose int8 form Inductor does not lower, or lowers wrongly
(:func:`fxcompress.quant.inductor.why_not_lowered`), read their weights
through ``fxcompress``'s own ``dequantize`` instead, which no Inductor pattern
matches: they run in float (freezing folds the dequantized weight), and a
warning names each.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from fxcompress import meta
from fxcompress.errors import ConfigError
from fxcompress.masks import forward_value, mask_of, split_target
from fxcompress.oneshot.engine import LinearSite, current_value, linear_site
from fxcompress.oneshot.grid import WeightGrid
from fxcompress.oneshot.smoothquant import FakeQuantActivation
from fxcompress.pipeline import Pass, Requires, Rewrite, apply_rewrites, register_pass
from fxcompress.quant import inductor
from fxcompress.quant.ops import DEQUANTIZE, QUANTIZE
from fxcompress.quant.quantizers import Quantizer, all_frozen
from fxcompress.quant.scheme import QScheme
from fxcompress.trace import describe_node, propagate_shapes

__all__ = ["FoldQDQ", "REWRITES", "PT2E_REWRITES", "FORMS", "LAYER_FUNCTIONS"]

#: Layer type -> (functional op, the module attributes passed after input, weight, bias).
LAYER_FUNCTIONS: dict[type[nn.Module], tuple[Callable, tuple[str, ...]]] = {
    nn.Conv1d: (F.conv1d, ("stride", "padding", "dilation", "groups")),
    nn.Conv2d: (F.conv2d, ("stride", "padding", "dilation", "groups")),
    nn.Conv3d: (F.conv3d, ("stride", "padding", "dilation", "groups")),
    nn.Linear: (F.linear, ()),
}

_IDENTITY_MODULES = (nn.Identity, nn.Dropout)


class QParams(nn.Module):
    """The stored scale and zero point of one activation grid (what a frozen quantizer leaves behind)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(()))
        self.register_buffer("zero_point", zero_point.reshape(()))


class QuantizedWeights(nn.Module):
    """Integer weight and bias of one layer with their dequantization parameters, as buffers."""


# ---------------------------------------------------------------------------- identity ops


def _is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and type(gm.get_submodule(node.target)) in _IDENTITY_MODULES


def _drop(gm: fx.GraphModule, node: fx.Node) -> None:
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


# ---------------------------------------------------------------------------- activations


def _is_activation_quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                   (Quantizer, QParams, FakeQuantActivation))


def _w8a8_qparams(gm: fx.GraphModule, node: fx.Node, module: FakeQuantActivation) -> QParams:
    """The grid of W8A8's static activation rounding (``quantize-activations``), written as ``uint8`` with zero
    point 128: the same values and the same ties as its signed ``[-128, 127]`` grid, in the u8 x s8 form that
    ONNX Runtime's and oneDNN's int8 kernels take."""
    if module.scale is None or module.bits != 8:
        why = "rounds each token on the fly (dynamic)" if module.scale is None else f"has {module.bits} bits"
        raise ConfigError(f"cannot fold the activation quantizer of {describe_node(gm, node)}: it {why}; QDQ needs "
                          "one static 8-bit scale: use ActivationQuant('tensor') (quantize-activations' default)")
    return QParams(module.scale, torch.tensor(128, dtype=torch.uint8))


def _qparams_module(gm: fx.GraphModule, node: fx.Node) -> QParams:
    """The stored grid of the quantizer ``node`` calls (replacing the quantizer on its first call site)."""
    module = gm.get_submodule(node.target)
    if isinstance(module, QParams):
        return module
    if isinstance(module, FakeQuantActivation):
        stored = _w8a8_qparams(gm, node, module)
        gm.delete_submodule(node.target)
        gm.add_submodule(node.target, stored)
        return stored
    scheme = module.scheme
    if not module.enabled or not module.exportable or scheme.bits != 8:
        why = "is not enabled (run fake-quantize)" if not module.enabled else "is not an 8-bit affine rounding"
        raise ConfigError(f"cannot fold the activation quantizer of {describe_node(gm, node)}: it {why}")
    scale, zero_point = module.qparams()
    stored = QParams(scale, zero_point.to(scheme.dtype))
    gm.delete_submodule(node.target)
    gm.add_submodule(node.target, stored)
    return stored


def _to_qdq(gm: fx.GraphModule, node: fx.Node) -> None:
    _qparams_module(gm, node)
    graph = gm.graph
    with graph.inserting_before(node):
        scale, zero_point = graph.get_attr(f"{node.target}.scale"), graph.get_attr(f"{node.target}.zero_point")
        q = graph.call_function(QUANTIZE, (node.args[0], scale, zero_point))
        dq = graph.call_function(DEQUANTIZE, (q, scale, zero_point, 0))
    node.replace_all_uses_with(dq)
    graph.erase_node(node)


def _is_requantize(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.target is not QUANTIZE:
        return False
    dq = node.args[0]
    if not (isinstance(dq, fx.Node) and dq.target is DEQUANTIZE and dq.args[0].target is QUANTIZE):
        return False
    return [a.target for a in dq.args[1:3]] == [a.target for a in node.args[1:3]]


def _collapse(gm: fx.GraphModule, node: fx.Node) -> None:
    node.replace_all_uses_with(node.args[0].args[0])
    gm.graph.erase_node(node)


# ---------------------------------------------------------------------------- weights


@dataclasses.dataclass
class _Folding:
    """One weighted layer about to become its functional op on stored integers.

    Its weight lies on ``(q - zero_point) * scale`` per output channel (or per
    tensor) of ``scheme``: a weight quantizer's grid, or a one-shot weight grid
    (:data:`fxcompress.meta.WEIGHT_GRIDS`). The :class:`QuantizedWeights` go to
    ``path``; ``released`` are the float parameters no node reads afterwards.
    """

    node: fx.Node
    function: Callable
    settings: tuple
    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    scheme: QScheme
    bias: torch.Tensor | None
    path: str
    released: tuple[str, ...] = ()


def _is_quantized_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A conv/linear module whose weight reads through a quantizer (``insert-observers``)."""
    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    kind = parametrize.type_before_parametrizations(module)
    return kind in LAYER_FUNCTIONS and parametrize.is_parametrized(module, "weight")


def _int8_grid(gm: fx.GraphModule, node: fx.Node) -> tuple[LinearSite, WeightGrid] | None:
    """The linear ``node``'s one-shot weight grid when it is int8 storage as ONNX and oneDNN take it: signed
    8-bit, one scale per output row, no AWQ input scale. Other grids (int4 groups, ...) stay for
    ``pack-weights`` and ``MatMulNBits``."""
    site = linear_site(gm, node)
    grid = None if site is None else (gm.meta.get(meta.WEIGHT_GRIDS) or {}).get(site.target)
    if grid is None or grid.bits != 8 or not grid.scheme.signed or grid.scale.shape[1] != 1 or \
            grid.input_scale is not None:
        return None
    if node.op == "call_module" and parametrize.is_parametrized(gm.get_submodule(node.target)):
        return None
    return site, grid


def _is_weighted_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _is_quantized_layer(gm, node) or _int8_grid(gm, node) is not None


def _folding(gm: fx.GraphModule, node: fx.Node) -> _Folding:
    if _is_quantized_layer(gm, node):
        module = gm.get_submodule(node.target)
        quantizer = _weight_quantizer(module)
        if not quantizer.enabled:
            raise ConfigError(f"cannot fold {describe_node(gm, node)}: its weight quantizer is not enabled "
                              "(run fake-quantize)")
        function, settings = _layer_function(gm, node)
        scale, zero_point = (t.detach() for t in quantizer.qparams())
        bias = None if module.bias is None else module.bias.detach()
        return _Folding(node, function, settings, module.weight.detach(), scale, zero_point, quantizer.scheme, bias,
                        node.target)
    site, grid = _int8_grid(gm, node)
    gm.meta[meta.WEIGHT_GRIDS].pop(site.target)  # the integers are stored now; no packing step reads the grid
    weight = current_value(gm, site.target).detach()
    scale, zero_point = grid.scale[:, 0], grid.zero_point[:, 0]
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        bias = None if module.bias is None else forward_value(module, "bias").detach()
        return _Folding(node, F.linear, (), weight, scale, zero_point, grid.scheme, bias, node.target)
    bias_read = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if isinstance(bias_read, fx.Node) and bias_read.op != "get_attr":
        raise ConfigError(f"cannot fold {describe_node(gm, node)}: its bias is computed by the graph")
    reads = [site.target] + ([bias_read.target] if isinstance(bias_read, fx.Node) else [])
    bias = current_value(gm, reads[1]).detach() if len(reads) > 1 else None
    owner = split_target(site.target)[0]
    path = _free_path(gm, f"{owner}_int8" if owner else f"{site.target}_int8")
    return _Folding(node, F.linear, (), weight, scale, zero_point, grid.scheme, bias, path, tuple(reads))


def _free_path(gm: fx.GraphModule, base: str) -> str:
    path, k = base, 1
    while True:
        try:
            gm.get_submodule(path)
        except AttributeError:
            return path
        path, k = f"{base}_{k}", k + 1


def _integers(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, dtype, where: str):
    """The integers whose dequantization gives ``values``, checked to be exact and in ``dtype``'s range."""
    shape = [1] * values.dim()
    if scale.numel() > 1:
        shape[axis] = -1
    q = torch.round(values / scale.reshape(shape)) + zero_point.reshape(shape)
    info = torch.iinfo(dtype)
    if q.min() < info.min or q.max() > info.max:
        raise ConfigError(f"{where}: the quantized weight does not fit {dtype}")
    back = (q - zero_point.reshape(shape)) * scale.reshape(shape)
    if not torch.allclose(back, values, rtol=1e-5, atol=1e-6 * float(values.abs().max() or 1.0)):
        raise ConfigError(f"{where}: the weight is not on the grid its quantizer (or recorded one-shot grid) "
                          "describes; was it trained after quantizing? Quantize again before fold-qdq")
    return q.to(dtype)


def _input_scale(node: fx.Node) -> torch.Tensor | None:
    """The per-tensor scale of the layer's input when it comes straight from a ``dequantize``."""
    source = node.args[0]
    if not (isinstance(source, fx.Node) and source.target is DEQUANTIZE):
        return None
    return source.args[1]


def _weight_quantizer(module: nn.Module) -> Quantizer:
    return next(q for q in module.parametrizations.weight if isinstance(q, Quantizer))


def _install(gm: fx.GraphModule, folding: _Folding) -> QuantizedWeights:
    """Store ``folding``'s integer weight (and float bias) as a :class:`QuantizedWeights` at its path, in place of
    the layer module or beside the parameters it releases."""
    with torch.no_grad():
        packed = QuantizedWeights()
        where = f"layer '{folding.path}'"
        packed.register_buffer("weight", _integers(folding.weight, folding.scale, folding.zero_point,
                                                   folding.scheme.ch_axis, torch.int8, where))
        packed.register_buffer("weight_scale", folding.scale.float().clone())
        packed.register_buffer("weight_zero_point", folding.zero_point.to(torch.int8).clone())
        if folding.bias is not None:
            packed.register_buffer("bias_float", folding.bias.clone())
    if folding.node.op == "call_module":
        gm.delete_submodule(folding.path)
    gm.add_submodule(folding.path, packed)
    return packed


def _release(gm: fx.GraphModule, folding: _Folding) -> None:
    """Drop the float parameters of a folded function-form linear that no node reads any more (unmasked ones:
    a masked parameter's mask belongs to its owner and goes with it)."""
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users}
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in folding.released and not n.users]:
        gm.graph.erase_node(node)
    for target in folding.released:
        owner, name = split_target(target)
        module = gm.get_submodule(owner)
        if target not in reads and name in module._parameters and mask_of(module, name) is None:
            delattr(module, name)


def _pack_bias(gm: fx.GraphModule, packed: QuantizedWeights, input_scale: fx.Node) -> None:
    """Store the bias as int32 on the grid ``input_scale * weight_scale`` (what int8 kernels accumulate in)."""
    scale = (gm.get_submodule(input_scale.target.rpartition(".")[0]).scale * packed.weight_scale).reshape(-1)
    bias = packed.bias_float
    scale = scale.expand_as(bias).clone()
    packed.register_buffer("bias", torch.round(bias / scale).clamp(-(2**31), 2**31 - 1).to(torch.int32))
    packed.register_buffer("bias_scale", scale)
    packed.register_buffer("bias_zero_point", torch.zeros_like(packed.bias))
    del packed.bias_float


def _layer_function(gm: fx.GraphModule, node: fx.Node) -> tuple[Callable, tuple]:
    """The functional op of a quantized layer and its settings (stride, padding, ...), checked to be foldable."""
    module = gm.get_submodule(node.target)
    function, attributes = LAYER_FUNCTIONS[parametrize.type_before_parametrizations(module)]
    if getattr(module, "padding_mode", "zeros") != "zeros":
        raise ConfigError(f"cannot fold {describe_node(gm, node)}: padding_mode {module.padding_mode!r} is not supported")
    return function, tuple(getattr(module, a) for a in attributes)


def _functional_layer(gm: fx.GraphModule, node: fx.Node) -> None:
    folding = _folding(gm, node)
    packed = _install(gm, folding)
    input_scale = _input_scale(node)
    graph = gm.graph
    with graph.inserting_before(node):
        attr = lambda name: graph.get_attr(f"{folding.path}.{name}")  # noqa: E731
        axis = 0
        weight = graph.call_function(DEQUANTIZE, (attr("weight"), attr("weight_scale"), attr("weight_zero_point"), axis))
        bias = None
        if hasattr(packed, "bias_float") and input_scale is not None:
            _pack_bias(gm, packed, input_scale)
            bias = graph.call_function(DEQUANTIZE, (attr("bias"), attr("bias_scale"), attr("bias_zero_point"), 0))
        elif hasattr(packed, "bias_float"):
            bias = attr("bias_float")
        call = graph.call_function(folding.function, (node.args[0], weight, bias, *folding.settings))
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    _release(gm, folding)


# ---------------------------------------------------------------------------- the PT2E form


def _to_pt2e_qdq(gm: fx.GraphModule, node: fx.Node) -> None:
    stored = _qparams_module(gm, node)
    info = torch.iinfo(stored.zero_point.dtype)
    grid = (float(stored.scale), int(stored.zero_point), info.min, info.max, stored.zero_point.dtype)
    ops = inductor.decomposed_ops()
    graph = gm.graph
    with graph.inserting_before(node):
        q = graph.call_function(ops.quantize_per_tensor.default, (node.args[0], *grid))
        dq = graph.call_function(ops.dequantize_per_tensor.default, (q, *grid))
    node.replace_all_uses_with(dq)
    graph.erase_node(node)


def _is_pt2e_requantize(gm: fx.GraphModule, node: fx.Node) -> bool:
    ops = inductor.decomposed_ops()
    if node.target is not ops.quantize_per_tensor.default:
        return False
    dq = node.args[0]
    if not (isinstance(dq, fx.Node) and dq.target is ops.dequantize_per_tensor.default):
        return False
    source = dq.args[0]
    return isinstance(source, fx.Node) and source.target is node.target and tuple(dq.args[1:]) == tuple(node.args[1:])


def _pt2e_layer(gm: fx.GraphModule, node: fx.Node) -> None:
    folding = _folding(gm, node)
    scheme = folding.scheme
    packed = _install(gm, folding)
    axis = scheme.ch_axis if scheme.per_channel else 0  # a per-tensor scale is repeated along the output channels
    channels = packed.weight.shape[axis]
    packed.weight_scale = packed.weight_scale.reshape(-1).expand(channels).clone()
    packed.weight_zero_point = packed.weight_zero_point.reshape(-1).expand(channels).to(torch.int64).clone()
    if hasattr(packed, "bias_float"):
        packed.register_buffer("bias", packed.bias_float)
        del packed.bias_float
    ops = inductor.decomposed_ops()
    graph = gm.graph
    with graph.inserting_before(node):
        attr = lambda name: graph.get_attr(f"{folding.path}.{name}")  # noqa: E731
        weight = graph.call_function(
            ops.dequantize_per_channel.default,
            (attr("weight"), attr("weight_scale"), attr("weight_zero_point"), axis, scheme.qmin, scheme.qmax, torch.int8),
        )
        bias = attr("bias") if hasattr(packed, "bias") else None
        call = graph.call_function(folding.function, (node.args[0], weight, bias, *folding.settings))
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    _release(gm, folding)


def _is_unlowered_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in inductor.LAYERS or len(node.args) < 2:
        return False
    weight = node.args[1]
    per_channel = inductor.decomposed_ops().dequantize_per_channel.default
    return isinstance(weight, fx.Node) and weight.target is per_channel and inductor.why_not_lowered(node) is not None


def _float_weights(gm: fx.GraphModule, node: fx.Node) -> None:
    warnings.warn(f"fold-qdq{{form=pt2e}}: {describe_node(gm, node)} runs in float under torch.compile: "
                  f"{inductor.why_not_lowered(node)}", stacklevel=2)
    weight = node.args[1]
    with gm.graph.inserting_before(weight):
        plain = gm.graph.call_function(DEQUANTIZE, (*weight.args[:4],))
    weight.replace_all_uses_with(plain)
    gm.graph.erase_node(weight)


def _is_shared_pt2e_dequantize(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.target is inductor.decomposed_ops().dequantize_per_tensor.default and len(node.users) > 1


def _dequantize_per_user(gm: fx.GraphModule, node: fx.Node) -> None:
    """One ``dequantize`` per user, as ``convert_pt2e`` leaves them: Inductor's int8 patterns match a
    ``dequantize`` feeding one op only, so query, key and value projections reading one shared ``dequantize``
    (a transformer's) would otherwise all run in float.

    Inductor's common-subexpression elimination merges identical copies back into one, and its
    "dequant promotion" pass splits them again only where the shared ``dequantize`` (or the one
    ``reshape`` of it that linear layers on 3-D input share) has no user outside the pattern. A
    transformer's residual ``add`` reads the same value as its query, key and value projections, so the
    copies that feed anything but a layer carry an explicit ``out_dtype=torch.float32`` (the same
    computation) that keeps them out of that merge. Without it, 36 of BertModel's 72 linear layers ran in
    float under ``torch.compile``.
    """
    for user in list(node.users)[1:]:
        with gm.graph.inserting_before(user):
            copy = gm.graph.call_function(node.target, node.args, node.kwargs)
        copy.meta = dict(node.meta)
        user.replace_input_with(node, copy)
    for dequantize in list(node.args[0].users):
        if dequantize.target is node.target and not any(_reads_as_layer_input(user, dequantize)
                                                        for user in dequantize.users):
            dequantize.kwargs = {**dequantize.kwargs, "out_dtype": torch.float32}


def _reads_as_layer_input(user: fx.Node, value: fx.Node) -> bool:
    """``user`` is a conv/linear layer whose input is ``value`` (the op Inductor's int8 patterns start from)."""
    return user.op == "call_function" and user.target in inductor.LAYERS and user.args[0] is value


#: The local rewrites, in the order they are applied.
REWRITES: tuple[Rewrite, ...] = (
    Rewrite("drop-identity", _is_identity, _drop),  # identity(x) / dropout(x) -> x
    Rewrite("quantizer-to-qdq", _is_activation_quantizer, _to_qdq),  # fq(x) -> dq(q(x))
    Rewrite("collapse-requantize", _is_requantize, _collapse),  # q(dq(q(x, s, z), s, z), s, z) -> q(x, s, z)
    Rewrite("layer-to-integer", _is_weighted_layer, _functional_layer),  # conv(x; fq(w), b) -> conv(x, dq(w_i8), dq(b_i32))
)

#: The rewrites of ``form="pt2e"``, in the order they are applied (dq/q: ``quantized_decomposed``'s per-tensor ops).
PT2E_REWRITES: tuple[Rewrite, ...] = (
    Rewrite("drop-identity", _is_identity, _drop),  # identity(x) / dropout(x) -> x
    Rewrite("quantizer-to-qdq", _is_activation_quantizer, _to_pt2e_qdq),  # fq(x) -> dq(q(x, s, z, lo, hi, t), s, z, ...)
    Rewrite("collapse-requantize", _is_pt2e_requantize, _collapse),  # q(dq(q(x, g), g), g) -> q(x, g)
    Rewrite("layer-to-integer", _is_weighted_layer, _pt2e_layer),  # conv(x; fq(w), b) -> conv(x, dq_per_channel(w_i8), b)
    # conv(x, dq_per_channel(w), b) -> conv(x, dequantize(w), b) where Inductor has no (correct) int8 kernel for it
    Rewrite("unlowered-to-float", _is_unlowered_layer, _float_weights),
    Rewrite("dequantize-per-user", _is_shared_pt2e_dequantize, _dequantize_per_user),  # dq(q(x)) -> one dq per user
)

#: Output form -> its rewrite table: ``onnx`` (what ONNX Runtime fuses), ``pt2e`` (what Inductor lowers).
FORMS: dict[str, tuple[Rewrite, ...]] = {"onnx": REWRITES, "pt2e": PT2E_REWRITES}


@register_pass
@dataclasses.dataclass(frozen=True)
class FoldQDQ(Pass):
    """Apply the ``form``'s table (:data:`FORMS`); a graph already folded matches none of it, so a second run is a no-op.

    ``form="onnx"`` (the default) is what :func:`fxcompress.export.to_onnx`
    exports; ``form="pt2e"`` is what :func:`fxcompress.quant.inductor.compile`
    runs in oneDNN int8 kernels.
    """

    name: ClassVar[str] = "fold-qdq"
    requires: ClassVar[tuple[Requires, ...]] = (Requires("fake-quantize", all_frozen),)
    preserves_outputs: ClassVar[bool] = False

    form: str = "onnx"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ConfigError(f"fold-qdq: form must be one of {', '.join(FORMS)}, got {self.form!r}")

    def run(self, gm: fx.GraphModule) -> bool:
        modified = apply_rewrites(gm, FORMS[self.form])
        if not modified:
            return False
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        propagate_shapes(gm, gm.meta[meta.EXAMPLE_INPUTS])
        return True
