"""ONNX export of float, pruned and quantized ``GraphModule``s, checked against ONNX Runtime.

Quantized modules (after ``fold-qdq``) export as QuantizeLinear/DequantizeLinear
pairs with int8 weight initializers (opset >= 13, per-channel ``axis``), the
form ONNX Runtime fuses into int8 kernels. Linear layers that one-shot weight
quantization (RTN, GPTQ, AWQ) left on a 2-, 4- or 8-bit grid of column blocks
(:data:`fxcompress.meta.WEIGHT_GRIDS`) export as ONNX Runtime's
``com.microsoft`` ``MatMulNBits``, their integers packed (``low_bit=True``, the
default); fine-grained sparsity masks (unstructured, 2:4) export as dense
weights holding zeros, with a warning: ONNX Runtime has no CPU kernel that
skips them. Every export is validated with
``onnx.checker`` and, with ``check=True``, run in ONNX Runtime on the example
inputs and compared with the ``GraphModule``'s own output.

The ONNX model's inputs are the tensors among the graph's inputs (keyword
inputs bound to their positions as :func:`fxcompress.trace` bound them; ``None``
and Python numbers are baked in), its outputs the tensors of the graph's output
in pytree order. By default the batch dim of every input and the sequence dim
of token inputs (2-D integer tensors) are dynamic wherever the graph itself
runs at another size, and the ONNX Runtime check also runs at another batch
size (and sequence length).

The exporter is torch's TorchScript-based one (``dynamo=False``): it takes a
``GraphModule`` as is and maps our two custom ops one-to-one, while the
``torch.export``-based exporter needs ``onnxscript``.

With ``model`` and its example input ``x`` (a path, ``to_onnx(gm, x,
"model.onnx")``, also saves the file):

>>> gm = fxcompress.compile(model, x, "insert-masks{pruner=l1,sparsity=0.5},propagate-channels,shrink")
>>> result = to_onnx(gm, x)
>>> result.max_error <= result.tolerance
True
>>> result.dynamic_axes
{'input_0': {0: 'batch'}, 'output_0': {0: 'batch'}}
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import operator
import os
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils import _pytree as pytree

from fxcompress import meta
from fxcompress.errors import ConfigError, VerificationError
from fxcompress.masks import forward_value, own_masks, split_target
from fxcompress.oneshot.engine import current_value, linear_site
from fxcompress.quant.ops import DEQUANTIZE, QUANTIZE, register_onnx_symbolics
from fxcompress.quant.stepwise import StepwiseCheck, stepwise_check
from fxcompress.trace import BATCH, SEQUENCE, dynamic_dims, inference_mode, normalize_example_inputs, resized_inputs

__all__ = ["to_onnx", "ExportResult", "is_quantized", "onnx_session", "DEFAULT_OPSET", "NBitsWeight", "nbits_weight",
           "unpack_nbits", "matmul_nbits", "NBITS_WIDTHS"]

DEFAULT_OPSET = 17

#: Tolerance of the ONNX Runtime check, relative to the output's largest magnitude. Float graphs differ
#: by reassociation only; int8 kernels requantize with their own rounding, which may move an output by
#: a step or two of its grid (1/255 of its range each).
FLOAT_RTOL = 1e-4
QUANTIZED_RTOL = 3e-2

aten = torch.ops.aten

#: ``{input or output name: {axis: label}}``, torch.onnx's ``dynamic_axes`` with named axes.
Axes = dict[str, dict[int, str]]


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where the model went and how closely ONNX Runtime reproduced it (``nan`` when unchecked).

    ``max_error`` is the worst over the example inputs and, when some axes are
    dynamic, the same inputs resized along them (``checked_shapes`` lists the
    input shapes ONNX Runtime ran).
    """

    path: str | None
    model: onnx.ModelProto
    quantized: bool
    max_error: float
    tolerance: float
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    dynamic_axes: Axes = dataclasses.field(default_factory=dict)
    checked_shapes: tuple[tuple[tuple[int, ...], ...], ...] = ()
    low_bit_layers: tuple[str, ...] = ()  #: the layers written as ``MatMulNBits``
    #: int8 graphs whose outputs differ beyond ``tolerance`` (amplified one-step flips): the quantizer-by-quantizer
    #: check that accepted them (:mod:`fxcompress.quant.stepwise`); None when the end-to-end check sufficed
    stepwise: StepwiseCheck | None = None
    exporter: str = "torchscript"  #: the exporter that wrote ``model`` (see ``to_onnx``'s ``exporter``)


def is_quantized(gm: fx.GraphModule) -> bool:
    """Whether the graph holds QDQ nodes (it went through ``fold-qdq``)."""
    return any(n.op == "call_function" and n.target in (QUANTIZE, DEQUANTIZE) for n in gm.graph.nodes)


def onnx_session(model: onnx.ModelProto | str, threads: int = 2, quiet: bool = False):
    """An ONNX Runtime CPU session with all graph optimisations (which fuse QDQ groups into int8 kernels);
    ``quiet`` keeps ONNX Runtime's own error log off stderr (for callers that report failures themselves)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if quiet:
        options.log_severity_level = 4
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------- a graph the tracer keeps symbolic

#: aten ops that take sizes -> the spelling in which TorchScript's tracer records sizes read from inputs as
#: values instead of freezing them (it records ``torch.ops.aten`` calls with constants). Size reads, and the
#: nodes that receive a size computed in the graph (``sym_size``, arithmetic on it), are respelled.
TRACEABLE: dict = {
    aten.sym_size.int: ("call_method", "size"),  # x.size(d)
    aten.view.default: ("call_method", "view"),
    aten.reshape.default: ("call_method", "reshape"),
    aten._unsafe_view.default: ("call_method", "reshape"),
    aten.expand.default: ("call_method", "expand"),
    aten.repeat.default: ("call_method", "repeat"),
    aten.narrow.default: ("call_method", "narrow"),
    aten.select.int: ("call_method", "select"),
    aten.new_ones.default: ("call_method", "new_ones"),
    aten.new_zeros.default: ("call_method", "new_zeros"),
    aten.new_full.default: ("call_method", "new_full"),
    aten.new_empty.default: ("call_method", "new_empty"),
    aten.arange.default: ("call_function", torch.arange),
    aten.arange.start: ("call_function", torch.arange),
    aten.arange.start_step: ("call_function", torch.arange),
    aten.full.default: ("call_function", torch.full),
    aten.zeros.default: ("call_function", torch.zeros),
    aten.ones.default: ("call_function", torch.ones),
    aten.empty.memory_format: ("call_function", torch.empty),
}


def _diff(x: torch.Tensor, n: int = 1, dim: int = -1, prepend=None, append=None) -> torch.Tensor:
    """``torch.diff`` from slices and a subtraction, which ONNX has (it has no ``diff``)."""
    if prepend is not None or append is not None:
        x = torch.cat([t for t in (prepend, x, append) if t is not None], dim)
    dim = dim % x.dim()
    head = (slice(None),) * dim
    for _ in range(n):
        x = x[head + (slice(1, None),)] - x[head + (slice(None, -1),)]
    return x


def _cumsum(x: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:
    """``torch.cumsum`` with its promotion of integers and booleans to int64 spelled out (ONNX's CumSum
    refuses booleans)."""
    if dtype is None and not (x.is_floating_point() or x.is_complex()):
        x = x.long()
    return torch.cumsum(x, dim, dtype=dtype)


#: aten ops the TorchScript exporter has no (or a wrong) ONNX symbolic for -> functions of ops it has.
DECOMPOSITIONS: dict = {
    aten.diff.default: _diff,  # Hugging Face masks look for packed sequences with diff and cumsum
    aten.cumsum.default: _cumsum,
}


def _gemm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 like: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` as one 2-D product: ONNX Runtime fuses a ``Gemm`` with int8 inputs and an int32 bias into
    ``QGemm``, where ``MatMul`` + ``Add`` on a 3-D input of dynamic shape become ``MatMulIntegerToFloat``, a
    float ``Add`` and a ``QuantizeLinear`` (its ``Gemm`` fusion needs static shapes). The leading sizes are read
    from ``like``, a tensor of ``x``'s shape that exists anyway (the float input of ``x``'s quantizer), so that
    no dequantized copy of ``x`` is computed just to read its shape."""
    if x.dim() <= 2:
        return F.linear(x, weight, bias)
    like = x if like is None else like
    return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*like.shape[:-1], weight.shape[0])


def _int8_linear(node: fx.Node) -> bool:
    """A functional linear whose input and weight are dequantized int8 (the fold-qdq form)."""
    if node.op != "call_function" or node.target not in (F.linear, torch._C._nn.linear) or node.kwargs:
        return False
    return all(isinstance(a, fx.Node) and a.target is DEQUANTIZE for a in node.args[:2])


def _as_gemm(node: fx.Node) -> None:
    """Respell an int8 linear as :func:`_gemm_linear`, its shape read before the input's quantizer."""
    x, weight, bias = (*node.args, None)[:3]
    quantized = x.args[0]
    like = quantized.args[0] if isinstance(quantized, fx.Node) and quantized.target is QUANTIZE else None
    node.target, node.args = _gemm_linear, (x, weight, bias, like)


def _is_size(value) -> bool:
    """A node computing a Python number from the graph (a size read from an input, arithmetic on it):
    ``torch.export`` records those as symbolic values (kept through passes), shape propagation as numbers."""
    if not isinstance(value, fx.Node):
        return False
    if value.target is aten.sym_size.int or isinstance(value.meta.get("val"), (torch.SymInt, torch.SymFloat)):
        return True
    return meta.VALUE in value.meta and meta.TENSOR_META not in value.meta


def _reads_sizes(node: fx.Node) -> bool:
    found = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(_is_size(a)))
    return any(found)


def _respell(node: fx.Node) -> None:
    """Rewrite one size-taking aten node in its :data:`TRACEABLE` spelling (``slice`` becomes indexing)."""
    if node.target is aten.slice.Tensor:
        source, dim, start, end, step = (*node.args, *[None] * 5)[:5]
        dim = node.kwargs.get("dim", 0 if dim is None else dim)
        start, end = node.kwargs.get("start", start), node.kwargs.get("end", end)
        step = node.kwargs.get("step", 1 if step is None else step)
        index = slice(start, end, step)
        item = (slice(None),) * dim + (index,) if dim >= 0 else (Ellipsis, index) + (slice(None),) * (-dim - 1)
        node.op, node.target, node.args, node.kwargs = "call_function", operator.getitem, (source, item), {}
        return
    if node.target in TRACEABLE:
        node.op, node.target = TRACEABLE[node.target]


def _tensor_outputs(graph: fx.Graph, output) -> list:
    """The tensor-valued leaves of a graph's output structure, a node returning several tensors split up."""
    leaves = []
    for leaf in pytree.tree_leaves(output):
        if not isinstance(leaf, fx.Node):
            continue
        value = leaf.meta.get(meta.TENSOR_META)
        if isinstance(value, TensorMetadata):
            leaves.append(leaf)
        elif isinstance(value, (tuple, list)):  # the graph has no output node yet: these go last
            leaves.extend(graph.call_function(operator.getitem, (leaf, i)) for i in range(len(value)))
    return leaves


def _placeholder_values(gm: fx.GraphModule, inputs: tuple) -> list:
    """What each placeholder of ``gm`` receives for ``gm(*inputs)``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None:  # torch.export graphs flatten (args, kwargs) into their placeholders
        from torch.fx import _pytree as fx_pytree

        return list(fx_pytree.tree_flatten_spec((list(inputs), {}), in_spec))
    values = list(inputs)
    for node in placeholders[len(values):]:
        values.append(node.args[0] if node.args else None)  # a placeholder's default
    return values


def _flat_module(gm: fx.GraphModule, inputs: tuple) -> tuple[fx.GraphModule, list[torch.Tensor], int]:
    """A module sharing ``gm``'s tensors whose inputs are the tensors among ``inputs`` and whose output is the
    flat tuple of output tensors, in the spellings the TorchScript tracer keeps symbolic; and those tensors.

    Non-tensor inputs (``None``, numbers) are baked in; ``torch.export``'s guard module is dropped (the
    graph's own shape arithmetic does the work). ``gm`` itself is unchanged.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, env)
    tensors = []
    for node, value in zip([n for n in graph.nodes if n.op == "placeholder"], _placeholder_values(gm, inputs)):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            continue
        if any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value)):
            raise ConfigError(
                f"to_onnx takes tensors (or None and numbers) as the graph's inputs; its input {node.target!r} "
                "is a container of tensors: wrap the model so that forward() takes each tensor as an argument"
            )
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a, n=node, v=value: v if a is n else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a, n=node, v=value: v if a is n else a)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in DECOMPOSITIONS:
            node.target = DECOMPOSITIONS[node.target]
        elif _int8_linear(node):
            _as_gemm(node)
        elif node.op == "call_function" and (node.target in TRACEABLE or node.target is aten.slice.Tensor):
            if node.target is aten.sym_size.int or _reads_sizes(node):
                _respell(node)
    leaves = _tensor_outputs(graph, output)
    graph.output(tuple(leaves))
    return fx.GraphModule(gm, graph), tensors, len(leaves)


# ---------------------------------------------------------------------------- dynamic axes


def _io_names(names: Sequence[str] | None, count: int, kind: str, what: str) -> list[str]:
    """``names`` checked to be one per tensor ``kind`` (``input``/``output``), or ``input_0, ...`` by default."""
    if names is None:
        return [f"{kind}_{i}" for i in range(count)]
    names = list(names)
    if len(names) != count:
        raise ConfigError(f"{kind}_names has {len(names)} names but {what}; give one name per tensor {kind}")
    return names


def _checked_axes(dynamic_axes, known: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> Axes:
    """torch.onnx's ``dynamic_axes`` (lists or dicts of axes) as named axes, unknown names refused."""
    axes: Axes = {}
    for name, spec in dynamic_axes.items():
        if name not in known:
            raise ConfigError(f"dynamic_axes names {name!r}, which is no input or output; they are {', '.join(known)}")
        spec = spec if isinstance(spec, Mapping) else {a: f"{name}_dim{a}" for a in spec}
        ndim = tensors[name].dim() if name in tensors else None
        for axis in spec:
            if not isinstance(axis, int) or (ndim is not None and not -ndim <= axis < ndim):
                raise ConfigError(f"dynamic_axes[{name!r}] names axis {axis!r}, which {name} (of {ndim} dims) lacks")
        axes[name] = {a % ndim if ndim else a: str(label) for a, label in spec.items()}
    return axes


def _new_size(size: int) -> int:
    """Another size to check a dynamic axis at: one smaller (staying within position tables), 2 for 1."""
    return size - 1 if size > 2 else size + 1


def _outputs(module, inputs) -> list[torch.Tensor]:
    with inference_mode(module):
        out = module(*inputs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _auto_axes(gm, inputs: tuple, names: list[str], output_names: list[str]) -> Axes:
    """The batch and sequence axes (:func:`fxcompress.trace.dynamic_dims`) along which ``gm`` runs at another size,
    and the output axes that follow them; a warning names each that stays fixed, and why."""
    dims = dynamic_dims(inputs)
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    base = [tuple(t.shape) for t in _outputs(gm, inputs)]
    axes: Axes = {}
    for kind in (BATCH, SEQUENCE):
        sizes = {tensors[i].shape[d] for i, found in enumerate(dims) for d, k in found.items() if k == kind}
        if not sizes:
            continue
        new = {kind: _new_size(min(sizes))}
        try:
            moved = [tuple(t.shape) for t in _outputs(gm, resized_inputs(inputs, new, dims))]
        except Exception as exc:  # noqa: BLE001 - the graph itself is fixed along this axis: so is the ONNX model
            warnings.warn(
                f"to_onnx: the graph does not run at {kind} size {new[kind]} ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}), so the ONNX model's "
                f"{kind} dim stays fixed at its example size",
                stacklevel=3,
            )
            continue
        for name, found in zip(names, dims):
            axes.setdefault(name, {}).update({d: k for d, k in found.items() if k == kind})
        for name, before, after in zip(output_names, base, moved):
            for d, (a, b) in enumerate(zip(before, after)):
                if a != b:
                    current = axes.setdefault(name, {}).get(d)
                    axes[name][d] = kind if current in (None, kind) else f"{current}_{kind}"
    return {name: found for name, found in axes.items() if found}


def _check_inputs(tensors: list[torch.Tensor], names: list[str], axes: Axes) -> list[torch.Tensor] | None:
    """The inputs resized along every dynamic axis (one new size per label), or None when there is none."""
    dims = [axes.get(name, {}) for name in names]
    sizes: dict[str, int] = {}
    for t, found in zip(tensors, dims):
        for d, label in found.items():
            sizes.setdefault(label, _new_size(t.shape[d]))
    return list(resized_inputs(tuple(tensors), sizes, dims)) if sizes else None


# ---------------------------------------------------------------------------- low-bit weights: MatMulNBits

#: Weight widths that ONNX Runtime's ``com.microsoft`` ``MatMulNBits`` runs on CPU (checked with 1.32).
NBITS_WIDTHS = (2, 4, 8)
#: The op's blocks are a power of two of at least this many input columns.
NBITS_MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class NBitsWeight:
    """One linear weight in ``MatMulNBits``' layout (``Y = A @ Wᵀ``, ``W`` of ``n`` rows by ``k`` columns).

    ``packed`` is ``uint8`` ``(n, k_blocks, block_size * bits / 8)``: the codes
    ``q - qmin`` of each block, ``8 / bits`` per byte, the lowest bits first
    (last block padded); ``scales`` is ``(n, k_blocks)`` float32;
    ``zero_points`` are the codes of the grid's zero points packed the same
    way along the blocks, ``(n, ceil(k_blocks * bits / 8))``, or None when
    every one is ``2^(bits-1)`` (the op's default, a symmetric grid).
    ``input_divisor`` is AWQ's per-input scale (the input is divided by it
    first), or None.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    input_divisor: torch.Tensor | None
    k: int
    n: int
    bits: int
    block_size: int


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``uint8`` codes (``..., L``, ``L`` a multiple of ``8 / bits``) packed ``8 / bits`` to a byte, lowest bits first."""
    per_byte = 8 // bits
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    packed = torch.zeros(grouped.shape[:-1], dtype=torch.uint8)
    for j in range(per_byte):
        packed |= grouped[..., j] << (j * bits)
    return packed


def _unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    codes = torch.stack([(packed >> (j * bits)) & mask for j in range(per_byte)], dim=-1)
    return codes.reshape(*packed.shape[:-1], -1)


def nbits_weight(weight: torch.Tensor, grid) -> NBitsWeight | str:
    """``weight`` (lying on the :class:`~fxcompress.oneshot.WeightGrid` ``grid``) in ``MatMulNBits``' layout, or
    why the op cannot hold it.

    >>> from fxcompress.oneshot import RTN
    >>> from fxcompress.oneshot.engine import Layer
    >>> out = RTN(bits=4, group_size=16).compress(Layer("w", torch.randn(8, 32)), None)
    >>> low = nbits_weight(out.weight, out.grid)
    >>> tuple(low.packed.shape), tuple(low.scales.shape), torch.equal(unpack_nbits(low), out.weight)
    ((8, 2, 8), (8, 2), True)
    """
    rows, columns = weight.shape
    bits, block = grid.bits, grid.group_size
    if bits not in NBITS_WIDTHS:
        return f"{bits}-bit weights (MatMulNBits takes {', '.join(map(str, NBITS_WIDTHS))} bits)"
    if block < NBITS_MIN_BLOCK or block & (block - 1):
        return f"groups of {block} columns (MatMulNBits' blocks are a power of two, at least {NBITS_MIN_BLOCK})"
    if not torch.equal(grid.group_index.cpu(), torch.arange(columns) // block):
        return "groups that are not contiguous columns (GPTQ act-order with static_groups=False)"
    if not grid.holds(weight):
        return "its weight no longer lies on its recorded grid (changed after quantization)"
    blocks = -(-columns // block)
    qmin = grid.scheme.qmin
    codes = (grid.integers(weight) - qmin).cpu()
    codes = F.pad(codes, (0, blocks * block - columns)).reshape(rows, blocks, block)
    zero_points = (grid.zero_point - qmin).cpu()
    default = 1 << (bits - 1)
    packed_zeros = None
    if not bool((zero_points == default).all()):
        per_byte = 8 // bits
        packed_zeros = _pack_codes(F.pad(zero_points, (0, -blocks % per_byte)), bits)
    divisor = None if grid.input_scale is None else grid.input_scale.detach().float().cpu()
    return NBitsWeight(_pack_codes(codes, bits), grid.scale.detach().float().cpu().contiguous(), packed_zeros, divisor,
                       columns, rows, bits, block)


def unpack_nbits(weight: NBitsWeight) -> torch.Tensor:
    """The float32 ``n x k`` weight an :class:`NBitsWeight` stands for (``MatMulNBits``' dequantization)."""
    return _dequantized(weight.packed, weight.scales, weight.zero_points, weight.input_divisor, weight.k, weight.bits,
                        weight.block_size)


def _dequantized(packed, scales, zero_points, input_divisor, k: int, bits: int, block_size: int) -> torch.Tensor:
    rows, blocks = scales.shape
    codes = _unpack_codes(packed, bits).float()  # (n, k_blocks, block_size)
    if zero_points is None:
        zeros = torch.full((rows, blocks), float(1 << (bits - 1)))
    else:
        zeros = _unpack_codes(zero_points, bits)[:, :blocks].float()
    weight = ((codes - zeros[..., None]) * scales[..., None]).reshape(rows, -1)[:, :k]
    return weight if input_divisor is None else weight / input_divisor


@torch.library.custom_op("fxcompress::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 bias: torch.Tensor | None, input_divisor: torch.Tensor | None, k: int, n: int, bits: int,
                 block_size: int) -> torch.Tensor:
    """``linear(x, W, bias)`` with ``W`` given in ``MatMulNBits``' layout: the graph op that exports as one
    ``com.microsoft`` ``MatMulNBits`` node (plus ``Div`` for AWQ's input scale and ``Add`` for the bias)."""
    weight = _dequantized(packed, scales, zero_points, input_divisor, k, bits, block_size)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


@matmul_nbits.register_fake
def _(x, packed, scales, zero_points, bias, input_divisor, k, n, bits, block_size):
    return x.new_empty((*x.shape[:-1], n))


#: The graph target (``call_function``) of :func:`matmul_nbits`.
MATMUL_NBITS = torch.ops.fxcompress.matmul_nbits.default


def _matmul_nbits_symbolic(g, x, packed, scales, zero_points, bias, input_divisor, k, n, bits, block_size):
    from torch.onnx import symbolic_helper

    def const(value, name):
        return symbolic_helper._get_const(value, "i", name)

    if not symbolic_helper._is_none(input_divisor):
        x = g.op("Div", x, input_divisor)
    inputs = [x, packed, scales] + ([] if symbolic_helper._is_none(zero_points) else [zero_points])
    y = g.op("com.microsoft::MatMulNBits", *inputs, K_i=const(k, "k"), N_i=const(n, "n"), bits_i=const(bits, "bits"),
             block_size_i=const(block_size, "block_size"))
    sizes = x.type().varyingSizes()  # the output's type, which ONNX's shape inference cannot give a contrib op
    if sizes is not None:
        y.setType(x.type().with_sizes([*sizes[:-1], const(n, "n")]))
    return y if symbolic_helper._is_none(bias) else g.op("Add", y, bias)


@functools.cache
def _register_matmul_nbits(opset: int) -> None:
    from torch.onnx import register_custom_op_symbolic

    register_custom_op_symbolic("fxcompress::matmul_nbits", _matmul_nbits_symbolic, opset)


def _fine_grained_masks(gm: fx.GraphModule) -> list[str]:
    """The masked tensors of ``gm`` (unstructured or N:M sparsity still held as masks)."""
    return [f"{path}.{name}" if path else name for path, module in gm.named_modules() for name in own_masks(module)]


def _low_bit_module(flat: fx.GraphModule, gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """``flat`` with every linear layer that lies on a grid ``MatMulNBits`` takes computed by :func:`matmul_nbits`
    (a new module sharing ``flat``'s other tensors), and the layers it wrote so; one warning names the
    quantized layers left in float, and why."""
    grids = gm.meta.get(meta.WEIGHT_GRIDS) or {}
    if not grids:
        return flat, []
    graph = fx.Graph()
    graph.output(graph.graph_copy(flat.graph, {}))
    module = fx.GraphModule(flat, graph)
    written, dense = [], []
    for node in list(module.graph.nodes):
        site = linear_site(module, node)
        if site is None or site.target not in grids:
            continue
        where = split_target(site.target)[0] or site.target
        low = nbits_weight(current_value(module, site.target).detach().float(), grids[site.target])
        if isinstance(low, str):
            dense.append(f"{where} ({low})")
            continue
        _call_matmul_nbits(module, node, site, low, len(written))
        written.append(where)
    for node in [n for n in module.graph.nodes if n.op in ("get_attr", "call_module") and not n.users]:
        if node.op == "get_attr":
            module.graph.erase_node(node)
    module.delete_all_unused_submodules()
    module.recompile()
    if dense:
        warnings.warn(f"to_onnx: {len(dense)} quantized linear layer(s) exported with float weights (no MatMulNBits): "
                      f"{'; '.join(dense)}", stacklevel=3)
    return module, written


def _call_matmul_nbits(module: fx.GraphModule, node: fx.Node, site, low: NBitsWeight, index: int) -> None:
    """Replace the linear ``node`` by a :func:`matmul_nbits` call reading ``low``'s tensors (new buffers of ``module``)."""
    graph = module.graph
    if node.op == "call_module":
        bias = forward_value(module.get_submodule(node.target), "bias")
    else:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    tensors = {"packed": low.packed, "scales": low.scales, "zero_points": low.zero_points,
               "input_divisor": low.input_divisor, "bias": bias if isinstance(bias, torch.Tensor) else None}
    reads = {}
    with graph.inserting_before(node):
        for name, tensor in tensors.items():
            if tensor is None:
                reads[name] = None
                continue
            attr = f"_matmul_nbits_{index}_{name}"
            module.register_buffer(attr, tensor.detach())
            reads[name] = graph.get_attr(attr)
        if isinstance(bias, fx.Node):
            reads["bias"] = bias
        call = graph.call_function(MATMUL_NBITS, (
            site.source if node.op == "call_module" else node.args[0], reads["packed"], reads["scales"],
            reads["zero_points"], reads["bias"], reads["input_divisor"], low.k, low.n, low.bits, low.block_size))
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)


# ---------------------------------------------------------------------------- export and check


#: ``to_onnx``'s exporters: PyTorch's ``torch.export``-based one (onnxscript) and the TorchScript one it replaces.
EXPORTERS = ("dynamo", "torchscript")
#: The lowest opset the ``torch.export``-based exporter writes.
DYNAMO_MIN_OPSET = 18
#: The environment variable naming ``to_onnx``'s exporter when a call names none.
EXPORTER_VARIABLE = "FXCOMPRESS_ONNX_EXPORTER"


def _export(flat: fx.GraphModule, tensors: list, opset: int, input_names, output_names, axes: Axes,
            exporter: str = "torchscript") -> onnx.ModelProto:
    if exporter == "dynamo":
        from fxcompress.export_dynamo import export_dynamo

        return export_dynamo(flat, tensors, opset, input_names, output_names, axes)
    register_onnx_symbolics()
    _register_matmul_nbits(opset)
    buffer = io.BytesIO()
    with inference_mode(flat), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            flat, tuple(tensors), buffer, dynamo=False, opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE,  # inference_mode set eval; torch.export graphs refuse .train()
            input_names=list(input_names), output_names=list(output_names), dynamic_axes=axes or None,
            custom_opsets={"com.microsoft": 1} if any(n.target is MATMUL_NBITS for n in flat.graph.nodes) else None,
        )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model, full_check=True)
    return model


def _ort_error(session, flat: fx.GraphModule, tensors: list, tolerance: float,
               confirm: Callable[[list], str | None] | None = None) -> tuple[float, str | None]:
    """ONNX Runtime's error on ``tensors`` relative to each output's scale, and what is wrong when it is too large
    (or ONNX Runtime fails). ``confirm(tensors)`` gets the last word on an error beyond ``tolerance``: what is
    wrong, or None when a finer check explains the difference (int8 graphs, :mod:`fxcompress.quant.stepwise`)."""
    try:
        error = _max_error(session, flat, tensors)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own failure, reported in words
        lines = str(exc).strip().splitlines()
        return float("inf"), f"ONNX Runtime fails: {type(exc).__name__}: {lines[0][:300] if lines else ''}"
    if not error <= tolerance:
        failure = f"the outputs differ by {error:.2e} of their scale (tolerance {tolerance:.0e})"
        if confirm is None or not np.isfinite(error):
            return error, failure
        finer = confirm(tensors)
        return error, None if finer is None else f"{failure}, and {finer}"
    return error, None


def _max_error(session, flat: fx.GraphModule, tensors: list[torch.Tensor]) -> float:
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), tensors)}
    return _relative_error(_outputs(flat, tensors), session.run(None, feeds))


def _relative_error(expected: list[torch.Tensor], got: list[np.ndarray]) -> float:
    """The largest difference of ``got`` from ``expected``, relative to each output's largest magnitude."""
    worst = 0.0
    for a, b in zip(expected, got):
        a = a.detach().cpu().numpy()
        if a.shape != b.shape:
            return float("inf")
        scale = float(np.abs(a).max()) if a.size else 1.0
        worst = max(worst, float(np.abs(a - b).max()) / (scale or 1.0) if a.size else 0.0)
    return worst


def _checked_axes_model(export, flat, tensors, names, axes: Axes, tolerance: float, automatic: bool, confirm=None):
    """The exported model, its dynamic axes, an ONNX Runtime session of it and the inputs to check it on: the
    example and, with dynamic axes, the example resized along them. Automatic axes that ONNX Runtime gets
    wrong (the exporter froze a size the graph computes) give way to fixed shapes, with a warning; axes the
    user chose are an error."""
    model = export(axes)
    session = onnx_session(model, quiet=True)
    resized = _check_inputs(tensors, names, axes)
    if resized is None:
        return model, axes, session, [tensors]
    _, failure = _ort_error(session, flat, resized, tolerance, confirm)
    if failure is None:
        return model, axes, session, [tensors, resized]
    shapes = [tuple(t.shape) for t in resized]
    if not automatic:
        raise VerificationError(
            f"with dynamic_axes {axes}, the ONNX model is wrong at input shapes {shapes}: {failure}"
        )
    warnings.warn(
        f"to_onnx: with dynamic axes {axes} the ONNX model is wrong at input shapes {shapes} ({failure}); "
        "it keeps the example's shapes instead",
        stacklevel=3,
    )
    model = export({})
    return model, {}, onnx_session(model, quiet=True), [tensors]


def _checked_error(session, flat, runs, tolerance: float, confirm=None) -> float:
    """The worst error of ONNX Runtime over ``runs``; :class:`VerificationError` beyond ``tolerance`` unless
    ``confirm`` explains it (see :func:`_ort_error`)."""
    worst = 0.0
    for run in runs:
        error, failure = _ort_error(session, flat, run, tolerance, confirm)
        worst = max(worst, error)
        if failure is not None:
            raise VerificationError(
                f"ONNX Runtime's output differs from the GraphModule's at input shapes "
                f"{[tuple(t.shape) for t in run]}: {failure}; please report this with the model"
            )
    return worst


def to_onnx(
    gm: fx.GraphModule,
    example_inputs=None,
    path: str | os.PathLike | None = None,
    *,
    opset: int | None = None,
    check: bool = True,
    rtol: float | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None | str = "auto",
    low_bit: bool = True,
    exporter: str | None = None,
) -> ExportResult:
    """Export ``gm`` to ONNX (to ``path`` when given) and check it.

    ``example_inputs`` defaults to the inputs ``gm`` was compiled with; any
    form :func:`fxcompress.trace` takes works (a tokenizer's dict too).
    ``input_names`` (one per tensor input, default ``input_0, input_1, ...``)
    and ``output_names`` (one per output tensor, default ``output_0, ...``)
    name the ONNX graph's inputs and outputs. ``dynamic_axes="auto"`` (the
    default) makes the batch dim of every input and the sequence dim of 2-D
    integer inputs dynamic, each wherever ``gm`` itself runs at another size
    (a warning names any that stays fixed), and the output axes that follow
    them; pass torch.onnx's ``{name: {axis: label}}`` (or ``{name: [axes]}``)
    to choose, or ``None`` for fixed shapes.

    With ``check=True`` ONNX Runtime's output must match ``gm``'s within ``rtol``
    of the output's largest magnitude (default :data:`FLOAT_RTOL`, or
    :data:`QUANTIZED_RTOL` for QDQ graphs) on the example inputs and, when an
    axis is dynamic, on them resized along every dynamic axis (another batch
    size and sequence length), else :class:`VerificationError`.

    ``low_bit=True`` (the default) writes every linear layer that one-shot
    quantization left on a 2-, 4- or 8-bit grid of contiguous column blocks
    (RTN, GPTQ, AWQ with ``group_size`` a power of two >= 16; AWQ's input scale
    becomes a ``Div`` before it) as one ``com.microsoft`` ``MatMulNBits`` node
    holding the packed integers, scales and zero points (``low_bit_layers``
    lists them; a warning names quantized layers it cannot take);
    ``low_bit=False`` exports their dequantized float weights. Weights under
    fine-grained masks (unstructured or 2:4 sparsity) export dense, zeros in
    place, with a warning: ONNX Runtime has no CPU kernel for them.

    ``exporter="dynamo"`` writes the model with PyTorch's ``torch.export``-based
    exporter (onnxscript; opset >= 18), ``"torchscript"`` with the TorchScript
    exporter it replaces (opset 17 by default). ``"auto"`` (the default) takes
    the first where onnxscript is installed and ``opset`` allows, and falls back
    to the second, with a warning naming the failure, on a graph ``torch.export``
    cannot take; ``ExportResult.exporter`` says which wrote the model.
    ``exporter=None`` reads the environment variable ``FXCOMPRESS_ONNX_EXPORTER``
    (a process-wide default, e.g. ``torchscript`` where export time matters
    more than the exporter), else ``"auto"``.
    """
    if exporter is None:
        exporter = os.environ.get(EXPORTER_VARIABLE) or "auto"
    chosen = _resolved_exporter(exporter, opset)
    opset = opset if opset is not None else DYNAMO_MIN_OPSET if chosen == "dynamo" else DEFAULT_OPSET
    if opset < 13:
        raise ConfigError(f"to_onnx needs opset >= 13 (per-channel DequantizeLinear), got {opset}")
    if example_inputs is None:
        example_inputs = gm.meta.get(meta.EXAMPLE_INPUTS)
        if example_inputs is None:
            raise ConfigError("to_onnx needs example_inputs for a module that fxcompress did not compile")
    inputs = normalize_example_inputs(example_inputs, gm)
    quantized = is_quantized(gm)
    flat, tensors, outputs = _flat_module(gm, inputs)
    masked = _fine_grained_masks(gm)
    if masked:
        warnings.warn(f"to_onnx: {len(masked)} weight(s) carry sparsity masks (unstructured or N:M such as 2:4), e.g. "
                      f"{masked[0]}: they export as dense weights with their zeros in place (ONNX Runtime has no "
                      "CPU kernel that skips them; channel masks go away with shrink)", stacklevel=2)
    exported, low_bit_layers = _low_bit_module(flat, gm) if low_bit else (flat, [])
    names = _io_names(input_names, len(tensors), "input", f"the model takes {len(tensors)} tensor inputs "
                      f"({', '.join(_tensor_input_names(gm, inputs))})")
    out_names = _io_names(output_names, outputs, "output", f"the model returns {outputs} tensors")
    if isinstance(dynamic_axes, str):
        if dynamic_axes != "auto":
            raise ConfigError(f"dynamic_axes must be 'auto', None or a dict of axes per name, got {dynamic_axes!r}")
        axes = _auto_axes(gm, inputs, names, out_names)
    else:
        axes = _checked_axes(dynamic_axes or {}, [*names, *out_names], dict(zip(names, tensors)))
    tolerance = rtol if rtol is not None else (QUANTIZED_RTOL if quantized else FLOAT_RTOL)
    export = _Exporter(exported, tensors, opset, names, out_names, chosen, fallback=exporter == "auto")
    stepwise: list[StepwiseCheck] = []
    confirm = _stepwise_confirmation(export, tolerance, stepwise) if quantized else None
    if check:
        model, axes, session, runs = _checked_axes_model(export, flat, tensors, names, axes, tolerance,
                                                         automatic=isinstance(dynamic_axes, str), confirm=confirm)
        error = _checked_error(session, flat, runs, tolerance, confirm)
    else:
        model, runs, error = export(axes), [], float("nan")
    if path is not None:
        onnx.save(model, os.fspath(path))
    return ExportResult(
        None if path is None else os.fspath(path), model, quantized, error, tolerance, tuple(names),
        tuple(out_names), axes, tuple(tuple(tuple(t.shape) for t in run) for run in runs), tuple(low_bit_layers),
        max((c for c in stepwise if c.failure() is None), key=lambda c: c.output_error, default=None), export.used,
    )


def _resolved_exporter(exporter: str, opset: int | None) -> str:
    """``exporter`` with ``"auto"`` decided: ``"dynamo"`` where onnxscript is installed and ``opset`` allows."""
    from fxcompress import export_dynamo

    if exporter not in ("auto", *EXPORTERS):
        raise ConfigError(f"to_onnx: exporter must be 'auto' or one of {EXPORTERS}, got {exporter!r}")
    allowed = opset is None or opset >= DYNAMO_MIN_OPSET
    if exporter == "dynamo" and not export_dynamo.available():
        raise ConfigError("to_onnx(exporter='dynamo') needs onnxscript: pip install onnxscript")
    if exporter == "dynamo" and not allowed:
        raise ConfigError(f"to_onnx(exporter='dynamo') writes opset >= {DYNAMO_MIN_OPSET}, got opset={opset}")
    if exporter == "auto":
        return "dynamo" if export_dynamo.available() and allowed else "torchscript"
    return exporter


class _Exporter:
    """Writes the flat module (or a probe of it) to ONNX with the chosen exporter. Chosen by ``"auto"``, the
    ``torch.export``-based exporter gives way to the TorchScript one, with a warning naming why, when it
    fails on the graph; ``used`` is the one that wrote the model."""

    def __init__(self, module: fx.GraphModule, tensors: list, opset: int, names: list[str], out_names: list[str],
                 exporter: str, fallback: bool) -> None:
        self.module, self.tensors, self.opset, self.names, self.out_names = module, tensors, opset, names, out_names
        self.used, self.fallback = exporter, fallback

    def __call__(self, axes: Axes, module: fx.GraphModule | None = None, out_names=None, tensors=None):
        module, tensors, out_names = module or self.module, tensors or self.tensors, out_names or self.out_names
        if self.used == "dynamo":
            try:
                return _export(module, tensors, self.opset, self.names, out_names, axes, exporter="dynamo")
            except Exception as error:  # noqa: BLE001 - the exporter's own failure, named in the warning
                if not self.fallback:
                    raise
                first = (str(error).strip().splitlines() or [""])[0][:300]
                warnings.warn(f"to_onnx: torch.export's ONNX exporter fails on this graph ({type(error).__name__}: "
                              f"{first}); the TorchScript exporter writes it instead", stacklevel=4)
                self.used, self.opset = "torchscript", min(self.opset, DEFAULT_OPSET)
        return _export(module, tensors, self.opset, self.names, out_names, axes, exporter=self.used)


def _stepwise_confirmation(export: _Exporter, tolerance: float,
                           checks: list[StepwiseCheck]) -> Callable[[list], str | None]:
    """The ``confirm`` of an int8 export: :func:`~fxcompress.quant.stepwise.stepwise_check` on the inputs whose
    end-to-end error is too large, each check appended to ``checks``."""
    def confirm(tensors: list) -> str | None:
        def export_probe(probe: fx.GraphModule, n_outputs: int) -> onnx.ModelProto:
            codes = [f"quantized_{i}" for i in range(n_outputs - len(export.out_names))]
            return export({}, probe, [*export.out_names, *codes], tensors)

        check = stepwise_check(export.module, tensors, tolerance, export_probe,
                               functools.partial(onnx_session, quiet=True), _relative_error)
        checks.append(check)
        return check.failure()

    return confirm


def _tensor_input_names(gm: fx.GraphModule, inputs: tuple) -> list[str]:
    """The graph's parameter names of its tensor inputs, for messages."""
    params = list(inspect.signature(gm.forward).parameters)
    return [params[i] if i < len(params) else f"args[{i}]" for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
