"""InsertObservers: attach quantizers (observing, not yet rounding) to weights and activations.

Weights of the selected layers get a quantizer as a ``torch.nn.utils.parametrize``
parametrization (``layer.weight`` reads through it, so QAT trains the float
weight behind it). Activations get a quantizer module called right after the
node that produces them, at the places :mod:`fxcompress.quant.placement`
chooses. Quantizers start disabled and not observing, so the model's outputs
are unchanged; ``calibrate`` then feeds them data and ``fake-quantize`` turns
rounding on.

Graphs captured by ``torch.export`` call linear layers as functions on
parameters (``aten.linear(x, layer.weight, layer.bias)``). Where such a call
reads the two parameters of a holder module that holds nothing else, the
holder becomes the ``nn.Linear`` it was (same parameters, same path) and the
call a call of it, so that its weight is selected and quantized like any
other (``transformers.BertModel`` through ``torch.export`` gets int8 linear
layers).

>>> import torch, fxcompress
>>> from fxcompress.examples import SmallCNN
>>> from fxcompress.passes import FoldBatchNorm, InsertObservers
>>> from fxcompress.quant import QConfig
>>> x = torch.randn(1, 1, 28, 28)
>>> gm = fxcompress.compile(SmallCNN().eval(), x, [FoldBatchNorm(), InsertObservers(QConfig.int8())])
>>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
['x_aq', 'conv1', 'relu_aq', 'pool', 'relu_aq', 'conv2', ...]
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import fx, nn
from torch.nn.utils import parametrize

from fxcompress import meta
from fxcompress.errors import ConfigError
from fxcompress.masks import is_masked
from fxcompress.oneshot.engine import linear_site
from fxcompress.pipeline import Pass, register_pass
from fxcompress.quant.config import WEIGHTED_TYPES, QConfig
from fxcompress.quant.placement import plan_activations
from fxcompress.trace import propagate_shapes

__all__ = ["InsertObservers"]


def _linear_holder(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The path of the module whose ``weight`` (and ``bias``) the function-form linear ``node`` alone reads,
    when that module holds nothing else; else None."""
    if node.op != "call_function" or node.kwargs or linear_site(gm, node) is None:
        return None
    reads = [a for a in node.args[1:3] if a is not None]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" and len(a.users) == 1 for a in reads):
        return None
    path, _, name = reads[0].target.rpartition(".")
    if name != "weight" or [a.target for a in reads] != [f"{path}.weight", f"{path}.bias"][:len(reads)] or not path:
        return None
    holder = gm.get_submodule(path)
    names = {a.target.rpartition(".")[2] for a in reads}
    if type(holder) is not nn.Module or holder._modules or holder._buffers or set(holder._parameters) != names:
        return None
    return path if holder.weight.dim() == 2 else None


def _as_linear_modules(gm: fx.GraphModule, config: QConfig) -> bool:
    """Respell the function-form linears that ``config`` selects as calls of ``nn.Linear`` modules (see the
    module docstring); whether any was."""
    if nn.Linear not in config.op_types:
        return False
    changed = False
    for node in list(gm.graph.nodes):
        path = _linear_holder(gm, node)
        if path is None:
            continue
        holder = gm.get_submodule(path)
        linear = nn.Linear(holder.weight.shape[1], holder.weight.shape[0], bias="bias" in holder._parameters,
                           device="meta")
        linear.weight, linear.bias = holder.weight, holder._parameters.get("bias")
        if not config.selects(path, linear.train(holder.training)):
            continue
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent), name, linear)
        reads = [a for a in node.args[1:3] if a is not None]
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[0],))
        call.meta = node.meta
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for read in reads:
            gm.graph.erase_node(read)
        changed = True
    return changed


def _weighted_layers(gm: fx.GraphModule, config: QConfig) -> list[tuple[str, nn.Module]]:
    """Selected layers called by the graph whose weight has no quantizer yet."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if parametrize.type_before_parametrizations(module) in WEIGHTED_TYPES and config.selects(node.target, module):
            found[node.target] = module
    return [(path, m) for path, m in found.items() if not parametrize.is_parametrized(m, "weight")]


def _quantize_weight(path: str, module: nn.Module, config: QConfig) -> None:
    if is_masked(module):
        raise ConfigError(
            f"layer '{path}' still carries a pruning mask; run shrink (or fxcompress.masks.remove_masks) "
            "before insert-observers"
        )
    axis = WEIGHTED_TYPES[parametrize.type_before_parametrizations(module)]
    quantizer = config.weight.build(axis).train(module.training)  # see _quantize_activations
    parametrize.register_parametrization(module, "weight", quantizer, unsafe=True)


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    return name


def _insert_after(gm: fx.GraphModule, node: fx.Node, target: str, shared: bool) -> None:
    """Route every user of ``node`` through a call of the quantizer at ``target``."""
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(target, (node,), {"observe": False} if shared else {})
    node.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)


def _quantize_activations(gm: fx.GraphModule, config: QConfig) -> bool:
    plan = plan_activations(gm, config)
    targets: dict[fx.Node, str] = {}
    for node in plan.quantized:
        owner = plan.shares.get(node)
        if owner is not None and owner in targets:
            _insert_after(gm, node, targets[owner], shared=True)
            continue
        target = targets[node] = _free_name(gm, f"{node.name}_aq")
        # in the graph's mode: a quantizer in training mode moves its grid with every forward (QAT), so one
        # added to an eval-mode model would silently recalibrate on whatever the user runs through it
        gm.add_submodule(target, config.activation.build().train(gm.training))
        _insert_after(gm, node, target, shared=False)
    return bool(plan.quantized)


@register_pass
@dataclasses.dataclass(frozen=True)
class InsertObservers(Pass):
    """Attach the quantizers ``config`` asks for; outputs stay unchanged until ``fake-quantize``.

    A second run finds every selected tensor already quantized and changes nothing.
    """

    config: QConfig = dataclasses.field(default_factory=QConfig.int8)

    name: ClassVar[str] = "insert-observers"
    preserves_outputs: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.config, QConfig):
            raise ConfigError(f"InsertObservers needs a fxcompress.quant.QConfig, got {type(self.config).__name__}")

    def run(self, gm: fx.GraphModule) -> bool:
        gm.meta[meta.QCONFIG] = self.config
        modified = self.config.weight is not None and _as_linear_modules(gm, self.config)
        layers = _weighted_layers(gm, self.config) if self.config.weight is not None else []
        for path, module in layers:
            _quantize_weight(path, module, self.config)
        modified |= bool(layers)
        if self.config.activation is not None:
            modified |= _quantize_activations(gm, self.config)
        if modified:
            gm.recompile()
            propagate_shapes(gm, gm.meta[meta.EXAMPLE_INPUTS])
        return modified
