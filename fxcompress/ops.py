"""Which op a graph node runs, in the spellings every op table is keyed by.

fxcompress keeps its op knowledge in tables: the channel rules
(:data:`fxcompress.rules.RULES`), quantization roles
(:data:`fxcompress.quant.placement.OP_ROLES`), fusable activations, foldable
layer/norm pairs, the activations data-aware criteria measure. Every table is
keyed the same way and read through :func:`lookup`, so one decision says what
counts as the same op:

* ``call_module``: the module's class; then each base class whose ``forward``
  it inherits (a parametrized ``Linear`` is a ``Linear``; timm's
  ``BatchNormAct2d``, which overrides ``forward``, is not a ``BatchNorm2d``).
* ``call_method``: ``".name"``; an in-place spelling (``.add_``) falls back to
  its functional twin (``.add``), which treats channels, grids and
  activations alike.
* ``call_function``: the callable; then its ``"module.name"`` text (for ops
  that cannot be imported everywhere); an in-place aten overload
  (``aten.relu_.default``) falls back to the functional one.

>>> import torch
>>> from torch import fx, nn
>>> gm = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
>>> node = next(n for n in gm.graph.nodes if n.op == "call_module")
>>> lookup({nn.ReLU: "relu module", torch.relu: "relu function"}, gm, node)
'relu module'
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Mapping

import torch
from torch import fx, nn

__all__ = ["op_keys", "lookup", "runs_one_of", "out_of_place", "submodule"]


def out_of_place(name: str) -> str:
    """``add_`` -> ``add``; dunder names (``__and__``) are not in-place spellings."""
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _functional_overload(op: torch._ops.OpOverload):
    """``aten.relu_.default`` -> ``aten.relu.default`` (None when no such overload exists)."""
    packet = op.overloadpacket.__name__
    functional = out_of_place(packet)
    if functional == packet:
        return None
    return getattr(getattr(torch.ops.aten, functional, None), op._overloadname, None)


def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` by the module dicts alone: asked several times per node by every pass,
    where ``get_submodule``'s checks per path atom add up. A path that is not a chain of submodules gets
    ``get_submodule``'s own error."""
    module = root
    try:
        for atom in path.split(".") if path else ():
            module = module._modules[atom]
    except KeyError:
        return root.get_submodule(path)
    if module is None:
        return root.get_submodule(path)
    return module


def op_keys(gm: fx.GraphModule, node: fx.Node) -> Iterator:
    """The keys a table may list ``node``'s op under, most specific first (none for placeholders,
    ``get_attr`` and ``output``)."""
    if node.op == "call_module":
        cls = type(submodule(gm, node.target))
        for base in cls.__mro__:
            if base.forward is not cls.forward:
                return  # a base whose forward is overridden: the subclass may compute anything
            yield base
    elif node.op == "call_method":
        yield "." + node.target
        if out_of_place(node.target) != node.target:
            yield "." + out_of_place(node.target)
    elif node.op == "call_function":
        yield node.target
        yield f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}"
        if isinstance(node.target, torch._ops.OpOverload) and (functional := _functional_overload(node.target)):
            yield functional


def lookup(table: Mapping, gm: fx.GraphModule, node: fx.Node, default=None):
    """The entry ``table`` lists for the op ``node`` runs: the first of :func:`op_keys` it holds."""
    for key in op_keys(gm, node):
        if key in table:
            return table[key]
    return default


def runs_one_of(ops: Container, gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` runs one of ``ops`` (a set of keys spelled as :func:`op_keys` spells them)."""
    return any(key in ops for key in op_keys(gm, node))
