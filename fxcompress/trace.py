"""The frontend: turn a user's ``nn.Module`` into a shape-annotated ``GraphModule``.

``torch.fx.symbolic_trace`` keeps ``nn.Module`` leaves (Conv2d, Linear, norms) as
``call_module`` nodes, so the result stays readable and trainable. Shapes come
from one real forward pass on the example inputs (``ShapeProp``), which is
cheaper than fake tensors for the models we target and exercises the graph.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxcompress import meta
from fxcompress.errors import TraceError

__all__ = ["trace", "normalize_example_inputs", "propagate_shapes", "describe_node"]


def normalize_example_inputs(example_inputs) -> tuple:
    """Return ``example_inputs`` as a tuple, rejecting what cannot be a model input.

    >>> normalize_example_inputs(torch.zeros(1, 3))[0].shape
    torch.Size([1, 3])
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        if not example_inputs:
            raise TraceError("example_inputs is empty: pass a tuple with one example per forward() argument")
        return tuple(example_inputs)
    raise TraceError(
        f"example_inputs must be a tensor or a tuple of forward() arguments, got {type(example_inputs).__name__}"
    )


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """A one-line human description of a node: its name, op and, for modules, path and type."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return f"node '{node.name}' (module '{node.target}' of type {type(module).__name__})"
    if node.op in ("call_function", "call_method"):
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return f"node '{node.name}' ({node.op} {target})"
    return f"node '{node.name}' ({node.op} {node.target})"


class _ShapeProp(ShapeProp):
    """``ShapeProp`` that reports which node failed, in words a user can act on."""

    def run_node(self, n: fx.Node):
        try:
            return super().run_node(n)
        except TraceError:
            raise
        except Exception as exc:
            raise TraceError(
                f"running the model on example_inputs failed at {describe_node(self.module, n)}: "
                f"{type(exc).__name__}: {exc}. Check that example_inputs match what forward() expects."
            ) from exc


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Annotate every node with ``meta[TENSOR_META]`` by running ``gm`` once in eval mode, without grad."""
    was_training = {name: m.training for name, m in gm.named_modules()}
    gm.eval()
    try:
        with torch.no_grad():
            _ShapeProp(gm).propagate(*example_inputs)
    finally:
        for name, m in gm.named_modules():
            m.training = was_training[name]


def trace(model: nn.Module, example_inputs) -> fx.GraphModule:
    """Trace a deep copy of ``model`` with ``symbolic_trace`` and annotate shapes.

    The user's model is never touched. Returns a ``GraphModule`` whose nodes carry
    ``meta["tensor_meta"]`` and whose ``meta[EXAMPLE_INPUTS]`` holds the inputs.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"compile() takes an nn.Module, got {type(model).__name__}")
    example_inputs = normalize_example_inputs(example_inputs)
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
    else:
        try:
            gm = fx.symbolic_trace(copy.deepcopy(model))
        except Exception as exc:
            raise TraceError(
                f"torch.fx.symbolic_trace could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
                "This usually means forward() has Python control flow that depends on tensor values "
                "(an `if` on a tensor, a loop over its size). Move that code into a submodule and mark it as a "
                "leaf, or rewrite it without data-dependent branches."
            ) from exc
    gm.meta[meta.EXAMPLE_INPUTS] = example_inputs
    propagate_shapes(gm, example_inputs)
    return gm
