"""Where activation quantizers go: the op table and the planner that reads it.

ONNX Runtime runs a block in int8 only when every input of an int8 op comes
from a DequantizeLinear and its output goes straight into a QuantizeLinear.
So every float tensor that enters a quantized op is quantized, and so is every
quantized op's output — after the activation functions that follow it
(``conv -> relu -> Q`` is one fused int8 kernel). GELU follows linear layers
only: ONNX Runtime's QGemm hands it a float output and Inductor's qlinear
takes it as a post-op, but ONNX Runtime's int8 conv must end in a quantize.
Hardswish follows its producer only in Inductor's placement
(``QConfig(functional=False)``), where oneDNN's int8 conv takes it as a post-op.
Ops that only move values (max-pool, reshape, flatten) reuse their input's
grid, which costs nothing: their outputs already lie on it.

Keys of :data:`OP_ROLES` are spelled as every op table's are
(:mod:`fxcompress.ops`): ``nn.Module`` types, Python callables, or
``".method"`` strings for tensor methods.
"""

from __future__ import annotations

import dataclasses
import enum
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.parametrize import type_before_parametrizations

from fxcompress import meta
from fxcompress.oneshot.engine import LINEAR_OPS
from fxcompress.ops import lookup, runs_one_of
from fxcompress.quant.config import WEIGHTED_TYPES, QConfig
from fxcompress.quant.quantizers import Quantizer

__all__ = ["OpRole", "OP_ROLES", "QuantPlan", "plan_activations", "op_role", "is_quantizer_call"]


class OpRole(enum.Enum):
    QUANTIZED = "quantized"  # inputs and output on an int8 grid (conv, linear, add, matmul, avg-pool, cat)
    FOLLOWER = "follower"  # fused into the producer: the producer's output is quantized after it (relu, bn)
    # fused into a linear producer only (gelu): ONNX Runtime's QGemm can hand a float output to it and
    # Inductor's qlinear takes it as a post-op, while ONNX Runtime's int8 conv needs its output quantized
    LINEAR_FOLLOWER = "linear-follower"
    # fused into the producer in Inductor's placement only (QConfig(functional=False), hardswish): oneDNN's int8
    # conv and linear take it as a post-op; ONNX Runtime's int8 conv must end in a quantize
    POST_OP = "post-op"
    SHARE = "share"  # moves values only: output reuses the input's grid (max-pool, reshape, flatten)


OP_ROLES: dict[object, OpRole] = {
    **{t: OpRole.QUANTIZED for t in WEIGHTED_TYPES},
    operator.add: OpRole.QUANTIZED, operator.iadd: OpRole.QUANTIZED, torch.add: OpRole.QUANTIZED,
    ".add": OpRole.QUANTIZED,
    operator.matmul: OpRole.QUANTIZED, torch.matmul: OpRole.QUANTIZED, ".matmul": OpRole.QUANTIZED,
    torch.bmm: OpRole.QUANTIZED, torch.cat: OpRole.QUANTIZED,
    nn.AdaptiveAvgPool2d: OpRole.QUANTIZED, nn.AvgPool2d: OpRole.QUANTIZED,
    F.adaptive_avg_pool2d: OpRole.QUANTIZED, F.avg_pool2d: OpRole.QUANTIZED,
    nn.ReLU: OpRole.FOLLOWER, torch.relu: OpRole.FOLLOWER, F.relu: OpRole.FOLLOWER, ".relu": OpRole.FOLLOWER,
    nn.ReLU6: OpRole.FOLLOWER, F.relu6: OpRole.FOLLOWER,
    nn.BatchNorm1d: OpRole.FOLLOWER, nn.BatchNorm2d: OpRole.FOLLOWER, nn.BatchNorm3d: OpRole.FOLLOWER,
    nn.GELU: OpRole.LINEAR_FOLLOWER, F.gelu: OpRole.LINEAR_FOLLOWER, torch.ops.aten.gelu.default: OpRole.LINEAR_FOLLOWER,
    nn.Hardswish: OpRole.POST_OP, F.hardswish: OpRole.POST_OP, torch.ops.aten.hardswish.default: OpRole.POST_OP,
    nn.MaxPool1d: OpRole.SHARE, nn.MaxPool2d: OpRole.SHARE, F.max_pool2d: OpRole.SHARE,
    torch.flatten: OpRole.SHARE, ".flatten": OpRole.SHARE, nn.Flatten: OpRole.SHARE,
    torch.reshape: OpRole.SHARE, ".reshape": OpRole.SHARE, ".view": OpRole.SHARE,
    ".permute": OpRole.SHARE, torch.permute: OpRole.SHARE, ".transpose": OpRole.SHARE,
    torch.transpose: OpRole.SHARE, ".contiguous": OpRole.SHARE,
    nn.Identity: OpRole.SHARE, nn.Dropout: OpRole.SHARE,
}


def is_quantizer_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), Quantizer)


def op_role(gm: fx.GraphModule, node: fx.Node, config: QConfig) -> OpRole | None:
    """The node's role, or ``None`` for ops that stay in float (and weighted layers the config leaves out)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type_before_parametrizations(module) in WEIGHTED_TYPES:
            return OpRole.QUANTIZED if config.selects(node.target, module) else None
    role = lookup(OP_ROLES, gm, node)
    if role is OpRole.QUANTIZED and not config.functional:
        return None
    return role


def _is_float_tensor(node) -> bool:
    tensor_meta = node.meta.get(meta.TENSOR_META) if isinstance(node, fx.Node) else None
    return hasattr(tensor_meta, "dtype") and tensor_meta.dtype.is_floating_point


@dataclasses.dataclass
class QuantPlan:
    """Nodes whose output gets an activation quantizer, and which of them reuse another's grid."""

    quantized: list[fx.Node]
    shares: dict[fx.Node, fx.Node]  # SHARE node -> the node whose quantizer it reuses


def _anchor(gm: fx.GraphModule, node: fx.Node, config: QConfig) -> fx.Node:
    """Follow single-user activation functions: their output is where the op's result is quantized."""
    followers = {OpRole.FOLLOWER}
    if runs_one_of(LINEAR_OPS, gm, node):
        followers.add(OpRole.LINEAR_FOLLOWER)
    if not config.functional:
        followers.add(OpRole.POST_OP)
    while len(node.users) == 1:
        user = next(iter(node.users))
        if op_role(gm, user, config) not in followers or user.args[:1] != (node,):
            break
        node = user
    return node


def _marked(gm: fx.GraphModule, config: QConfig) -> dict[fx.Node, None]:
    marked: dict[fx.Node, None] = {}
    for node in gm.graph.nodes:
        if op_role(gm, node, config) is not OpRole.QUANTIZED:
            continue
        for source in node.all_input_nodes:
            if _is_float_tensor(source) and source.op != "get_attr":
                marked[source] = None
        marked[_anchor(gm, node, config)] = None
    return marked


def _share_source(gm: fx.GraphModule, node: fx.Node, config: QConfig, marked, shares) -> tuple[list, fx.Node] | None:
    """For a quantized SHARE node: the chain of SHARE nodes back to a quantized tensor, and that tensor's grid owner."""
    chain = [node]
    source = node.args[0] if node.args else None
    while isinstance(source, fx.Node) and source not in marked and op_role(gm, source, config) is OpRole.SHARE:
        chain.append(source)
        source = source.args[0] if source.args else None
    if not isinstance(source, fx.Node) or source not in marked:
        return None
    return chain, shares.get(source, source)


def plan_activations(gm: fx.GraphModule, config: QConfig) -> QuantPlan:
    """Which node outputs to quantize (in graph order), skipping those already quantized."""
    marked = _marked(gm, config)
    shares: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node not in marked or op_role(gm, node, config) is not OpRole.SHARE:
            continue
        found = _share_source(gm, node, config, marked, shares)
        if found is None:
            continue
        chain, owner = found
        for link in chain:
            marked[link] = None
            shares[link] = owner
    done = lambda n: is_quantizer_call(gm, n) or any(is_quantizer_call(gm, u) for u in n.users)  # noqa: E731
    order = [n for n in gm.graph.nodes if n in marked and not done(n)]
    return QuantPlan(order, {n: o for n, o in shares.items() if n in order})
