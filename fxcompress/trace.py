"""The frontend: turn a user's ``nn.Module`` into a shape-annotated ``GraphModule``.

``torch.fx.symbolic_trace`` keeps ``nn.Module`` leaves (Conv2d, Linear, norms) as
``call_module`` nodes, so the result stays readable and trainable. Shapes come
from one pass of meta tensors over the graph (``ShapeProp`` with every tensor
on the meta device), or a real forward where an op needs values.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxcompress import meta
from fxcompress.errors import TraceError

__all__ = ["trace", "normalize_example_inputs", "propagate_shapes", "describe_node", "FRONTENDS", "inference_mode", "module_type", "copy_model", "module_uses"]


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


def module_uses(gm: fx.GraphModule) -> Counter:
    """How often each module path is called or has an attribute read by the graph.

    Rewrites that replace a module (BN folding, fusion) must leave alone one
    that is used more than once.
    """
    uses: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses[node.target] += 1
        elif node.op == "get_attr":
            uses[node.target.rpartition(".")[0]] += 1
    return uses


class _ShapeProp(ShapeProp):
    """``ShapeProp`` that reports which node failed, in words a user can act on."""

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
            if _is_python_scalar(result):
                n.meta[meta.VALUE] = result
            return result
        except TraceError:
            raise
        except Exception as exc:
            cause = exc.__cause__ or exc  # ShapeProp wraps torch's own message
            raise TraceError(
                f"running the model on example_inputs failed at {describe_node(self.module, n)}: "
                f"{type(cause).__name__}: {cause}. Check that example_inputs match what forward() expects."
            ) from exc

    def propagate(self, *args):
        try:
            return super().propagate(*args)
        except TypeError as exc:  # binding the inputs to forward()'s arguments
            raise TraceError(
                f"example_inputs do not match forward(): {exc}. Pass one example per forward() argument."
            ) from exc


@contextlib.contextmanager
def inference_mode(gm: nn.Module):
    """Eval mode and no grad for the duration, then every module's mode restored.

    Sets the ``training`` flags directly: exported modules refuse ``.eval()``
    (their mode was fixed at export time, so the flags change nothing there).
    """
    modules = list(gm.modules())
    was_training = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(modules, was_training):
            m.training = flag


def _is_python_scalar(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_python_scalar(v) for v in value)
    return isinstance(value, (int, float, bool)) and not isinstance(value, torch.Tensor)


def _on_meta(value):
    """A tensor's meta-device twin (shape, dtype and strides, no storage); anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")


#: Leaf modules whose output has their input's shape, dtype and layout in eval mode.
#: Meta propagation passes their input through instead of running them: batch
#: norm's meta kernel is a Python decomposition, 2/3 of ResNet-50's propagation time.
SHAPE_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.GELU, nn.Dropout, nn.Identity,
)


class _MetaShapeProp(_ShapeProp):
    """``_ShapeProp`` on meta tensors: attribute reads come back on the meta device, and
    :data:`SHAPE_PRESERVING_MODULES` pass their input through."""

    def fetch_attr(self, target: str):
        return _on_meta(super().fetch_attr(target))

    def call_module(self, target, args, kwargs):
        if len(args) == 1 and not kwargs and isinstance(self.fetch_attr(target), SHAPE_PRESERVING_MODULES):
            return args[0]
        return super().call_module(target, args, kwargs)


class _MetaRun(nn.Module):
    """Runs a meta shape propagation of ``gm``; ``torch.func.functional_call`` swaps in meta parameters."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *inputs):
        return _MetaShapeProp(self.gm).propagate(*inputs)


def _propagate_on_meta(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Shapes from meta tensors: every op's shape function, none of its arithmetic.

    The parameters and buffers are swapped for meta twins for the duration
    (``functional_call``), so nothing is copied and the model is unchanged.
    """
    state = {
        f"gm.{name}": _on_meta(tensor)
        for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    }
    torch.func.functional_call(_MetaRun(gm), state, tuple(_on_meta(x) for x in example_inputs), tie_weights=False)


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple, exact_layout: bool = False) -> None:
    """Annotate every node with ``meta[TENSOR_META]``, in eval mode, without grad.

    Shapes come from meta tensors: a graph costs per node, not per FLOP
    (ResNet-50: 10 ms instead of a 100 ms forward; regnet_y_128gf: 0.1 s
    instead of 3 s). A graph with an op that meta tensors cannot run (a
    value-dependent shape, ``.item()``, a tensor created on the CPU inside
    ``forward``) gets a real forward pass instead, as does ``exact_layout=True``
    (passes that read the memory format real kernels choose).
    """
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) > len(placeholders):
        raise TraceError(
            f"example_inputs has {len(example_inputs)} items but forward() takes {len(placeholders)} "
            f"({', '.join(placeholders)}). Pass one example per forward() argument."
        )
    with inference_mode(gm):
        if not exact_layout:
            try:
                _propagate_on_meta(gm, example_inputs)
                return
            except Exception:  # noqa: BLE001 - any op meta tensors cannot run: do the real thing
                pass
        _ShapeProp(gm).propagate(*example_inputs)


FRONTENDS = ("auto", "fx", "export")


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on a masked model right after a training step.

    ``torch.nn.utils.prune`` caches ``weight = weight_orig * weight_mask`` as a
    plain attribute; after a forward with grad it is a non-leaf tensor, which
    ``deepcopy`` refuses. The copy gets a detached value (recomputed before
    every forward anyway); the original is not touched.
    """
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:
        raise TraceError(
            f"torch.fx.symbolic_trace could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            "This usually means forward() has Python control flow that depends on tensor values "
            "(an `if` on a tensor, a loop over its size). Try frontend='export', or move that code into a "
            "submodule and mark it as a leaf."
        ) from exc


def _export(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """``torch.export`` (non-strict) and its unlifted ``GraphModule``: parameters become ``get_attr`` nodes.

    The exported graph is captured in the mode the model is in: dropout and
    batch norm keep that train/eval behaviour whatever ``.train()``/``.eval()``
    says later, so export in eval mode for inference and in train mode for
    fine-tuning.
    """
    try:
        return torch.export.export(model, example_inputs, strict=False).module()
    except Exception as exc:
        raise TraceError(
            f"torch.export could not export {type(model).__name__}: {type(exc).__name__}: {str(exc)[:2000]}"
        ) from exc


def _trace_graph(model: nn.Module, example_inputs: tuple, frontend: str) -> fx.GraphModule:
    """Run the chosen frontend; ``auto`` tries ``symbolic_trace`` first and falls back to ``torch.export``."""
    if frontend == "fx":
        gm = _symbolic_trace(copy_model(model))
        propagate_shapes(gm, example_inputs)
        return gm
    if frontend == "export":
        gm = _export(copy_model(model), example_inputs)
        propagate_shapes(gm, example_inputs)
        return gm
    try:
        return _trace_graph(model, example_inputs, "fx")
    except TraceError as fx_error:
        try:
            return _trace_graph(model, example_inputs, "export")
        except TraceError as export_error:
            raise TraceError(
                f"neither frontend could capture {type(model).__name__}.\n"
                f"symbolic_trace: {fx_error}\n"
                f"torch.export: {export_error}"
            ) from export_error


def trace(model: nn.Module, example_inputs, frontend: str = "auto") -> fx.GraphModule:
    """Capture a deep copy of ``model`` as a shape-annotated ``GraphModule``.

    ``frontend`` is ``"fx"`` (``symbolic_trace``: keeps ``nn.Module`` leaves,
    readable and trainable), ``"export"`` (``torch.export``, non-strict: for
    models with Python control flow, such as Hugging Face transformers) or
    ``"auto"`` (the first, falling back to the second). The user's model is
    never touched. Nodes carry ``meta["tensor_meta"]``; ``meta[EXAMPLE_INPUTS]``
    holds the inputs.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"compile() takes an nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}; choose one of {', '.join(FRONTENDS)}")
    example_inputs = normalize_example_inputs(example_inputs)
    if isinstance(model, fx.GraphModule):
        gm = copy_model(model)
        propagate_shapes(gm, example_inputs)
    else:
        gm = _trace_graph(model, example_inputs, frontend)
    gm.meta[meta.EXAMPLE_INPUTS] = example_inputs
    if meta.MODULE_TYPES not in gm.meta:  # a GraphModule we traced before keeps the types it had
        gm.meta[meta.MODULE_TYPES] = {path: type(m) for path, m in model.named_modules()}
    return gm


def module_type(gm: fx.GraphModule, path: str) -> type:
    """The type the module at ``path`` had in the user's model (exported graphs keep only plain modules)."""
    original = gm.meta.get(meta.MODULE_TYPES, {}).get(path)
    return original if original is not None else type(gm.get_submodule(path))
