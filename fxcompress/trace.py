"""The frontend: turn a user's ``nn.Module`` into a shape-annotated ``GraphModule``.

``torch.fx.symbolic_trace`` keeps ``nn.Module`` leaves (Conv2d, Linear, norms) as
``call_module`` nodes, so the result stays readable and trainable. Shapes come
from one pass of meta tensors over the graph (an interpreter in the spirit of
``ShapeProp`` with every tensor on the meta device), or a real forward where an
op needs values.

Example inputs are read once, by :class:`ExampleInputs`: a tensor, a tuple of
``forward()`` arguments, a dict of keyword arguments (a tokenizer's output) or an
``(args, kwargs)`` pair. Keyword arguments are bound to ``forward()``'s
parameters, so the captured graph and everything after it (verification,
reports, ONNX) see one tuple of positional arguments in ``forward()``'s order:

>>> class Masked(nn.Module):
...     def forward(self, input_ids, attention_mask=None, scale=1.0):
...         return input_ids * attention_mask * scale
>>> ids, mask = torch.ones(2, 3), torch.zeros(2, 3)
>>> [tuple(t.shape) for t in normalize_example_inputs({"attention_mask": mask, "input_ids": ids}, Masked())]
[(2, 3), (2, 3)]
>>> normalize_example_inputs(((ids,), {"scale": 2.0}), Masked())[1:]
(None, 2.0)
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import gc
import inspect
import io
import itertools
import logging
import os
import sys
import warnings
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.utils import _pytree as pytree

from fxcompress import meta
from fxcompress.errors import TraceError

__all__ = [
    "trace", "ExampleInputs", "normalize_example_inputs", "dynamic_dims", "resized_inputs", "BATCH", "SEQUENCE",
    "export_program", "accept_keywords",
    "propagate_shapes", "describe_node", "FRONTENDS", "inference_mode", "module_type", "copy_model", "module_uses",
    "fetch_attr",
]

logger = logging.getLogger(__name__)

_FORMS = (
    "a tensor or a tuple of forward() arguments, a dict of keyword arguments (a tokenizer's output) "
    "or an (args, kwargs) pair"
)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclasses.dataclass(frozen=True)
class ExampleInputs:
    """One ``forward()`` call's arguments: ``model(*args, **kwargs)``. The one reader of every form users pass.

    :meth:`of` accepts a tensor, a tuple (or list) of positional arguments, a
    mapping of keyword arguments (a tokenizer's ``BatchEncoding`` is one) and an
    ``(args, kwargs)`` pair (a 2-tuple of a tuple and a mapping; write a
    ``forward(tuple, dict)`` call as ``((tup, dct), {})``). :meth:`positional`
    binds the keywords to ``forward()``'s parameters, filling skipped ones with
    their defaults, which is the form fxcompress stores and calls graphs with.

    >>> ExampleInputs.of({"x": torch.zeros(1)}).kwargs.keys()
    dict_keys(['x'])
    """

    args: tuple
    kwargs: dict

    @classmethod
    def of(cls, example_inputs) -> ExampleInputs:
        """Read any accepted form; a clear :class:`TraceError` for anything else."""
        if isinstance(example_inputs, ExampleInputs):
            return example_inputs
        if isinstance(example_inputs, torch.Tensor):
            return cls((example_inputs,), {})
        if isinstance(example_inputs, Mapping):
            return cls((), _keywords(example_inputs))
        if not isinstance(example_inputs, Sequence) or isinstance(example_inputs, (str, bytes)):
            raise TraceError(f"example_inputs must be {_FORMS}, got {type(example_inputs).__name__}")
        if not example_inputs:
            raise TraceError("example_inputs is empty: pass a tuple with one example per forward() argument")
        if _is_args_kwargs_pair(example_inputs):
            return cls(tuple(example_inputs[0]), _keywords(example_inputs[1], allow_empty=True))
        return cls(tuple(example_inputs), {})

    def positional(self, forward, count: int | None = None) -> tuple:
        """The arguments as one positional tuple for ``forward`` (a callable or an ``inspect.Signature``).

        Keywords go to their parameter's position; parameters skipped before the
        last one given take their defaults; ``count`` pads with defaults to that
        many. Keywords that have no position (keyword-only parameters, names
        only ``**kwargs`` would take) are refused with what to do instead.
        """
        if forward is None and not self.kwargs:
            return self.args
        if forward is None:
            raise TraceError(
                f"example_inputs pass keyword arguments ({', '.join(self.kwargs)}), which only the model can place: "
                "give the model too (normalize_example_inputs(inputs, model)) or pass a tuple of positional arguments"
            )
        signature = forward if isinstance(forward, inspect.Signature) else _signature(forward)
        if signature is None and not self.kwargs:
            return self.args
        if signature is None:
            raise TraceError(
                f"example_inputs pass keyword arguments ({', '.join(self.kwargs)}) but forward()'s signature "
                "cannot be read to place them; pass a tuple of positional arguments instead"
            )
        try:
            bound = signature.bind_partial(*self.args, **self.kwargs)
        except TypeError as exc:
            raise TraceError(
                f"example_inputs do not match forward{_plain(signature)}: {exc}. "
                "Pass one example per forward() argument, by position or by name."
            ) from None
        params = list(signature.parameters.values())
        unplaced = [name for name in bound.arguments if signature.parameters[name].kind not in _POSITIONAL]
        if unplaced and any(signature.parameters[n].kind != inspect.Parameter.VAR_POSITIONAL for n in unplaced):
            keys = [k for n in unplaced for k in _unplaced_keys(signature.parameters[n], bound.arguments[n])]
            raise TraceError(
                f"example_inputs pass {', '.join(map(repr, keys))} as keyword-only or extra (**kwargs) arguments "
                f"of forward{_plain(signature)}; fxcompress captures forward()'s positional parameters only. "
                "Wrap the model in a module whose forward() takes them as ordinary parameters."
            )
        named = [p for p in params if p.kind in _POSITIONAL]
        given = [i for i, p in enumerate(named) if p.name in bound.arguments]
        length = max([i + 1 for i in given] + [count or 0])
        missing = [p.name for p in named if p.name not in bound.arguments and p.default is inspect.Parameter.empty]
        if missing:
            raise TraceError(
                f"example_inputs leave out forward()'s required argument {missing[0]!r}; "
                f"forward{_plain(signature)} needs it"
            )
        values = [bound.arguments.get(p.name, p.default) for p in named[:length]]
        extra = next((bound.arguments[n] for n in unplaced), ())
        return tuple(values) + tuple(extra)

    def call(self, fn):
        """``fn(*args, **kwargs)``."""
        return fn(*self.args, **self.kwargs)


def _keywords(mapping, allow_empty: bool = False) -> dict:
    if not isinstance(mapping, Mapping):
        raise TraceError(f"the kwargs of an (args, kwargs) pair must be a dict, got {type(mapping).__name__}")
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise TraceError(f"example_inputs keys must be forward()'s argument names (strings), got {bad[0]!r}")
    if not mapping and not allow_empty:
        raise TraceError(
            "example_inputs is an empty dict: pass forward()'s arguments by name, e.g. a tokenizer's output"
        )
    return dict(mapping)


def _is_args_kwargs_pair(value: Sequence) -> bool:
    return (
        len(value) == 2 and isinstance(value[0], (tuple, list)) and isinstance(value[1], Mapping)
        and all(isinstance(k, str) for k in value[1])
    )


def _unplaced_keys(param: inspect.Parameter, value) -> list[str]:
    return list(value) if param.kind == inspect.Parameter.VAR_KEYWORD else [param.name]


def _signature(forward) -> inspect.Signature | None:
    if isinstance(forward, nn.Module):
        forward = forward.forward
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None


def _plain(signature: inspect.Signature) -> inspect.Signature:
    """The signature without annotations, for messages and for keeping on a module."""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return signature.replace(parameters=params, return_annotation=inspect.Signature.empty)


def normalize_example_inputs(example_inputs, model=None) -> tuple:
    """Return ``example_inputs`` as a tuple of ``model``'s positional ``forward()`` arguments.

    Every accepted form (see :class:`ExampleInputs`) works; keyword arguments
    need ``model`` (or its ``forward``) to be placed, and are refused with a
    clear error without it.

    >>> normalize_example_inputs(torch.zeros(1, 3))[0].shape
    torch.Size([1, 3])
    """
    return ExampleInputs.of(example_inputs).positional(model)


# ---------------------------------------------------------------------------- dynamic dimensions

#: Names of the input dimensions captured as dynamic by default.
BATCH, SEQUENCE = "batch", "sequence"


def dynamic_dims(args) -> list[dict[int, str]]:
    """For every tensor among ``args`` (pytree order), the dims that may change size between calls.

    Dim 0 of every tensor is the batch; dim 1 of a 2-D integer or boolean
    tensor (token ids, attention masks, token type ids) is the sequence.

    >>> dynamic_dims((torch.zeros(1, 3, 8, 8), torch.ones(1, 16, dtype=torch.long)))
    [{0: 'batch'}, {0: 'batch', 1: 'sequence'}]
    """
    found = []
    for leaf in pytree.tree_leaves(args):
        if not isinstance(leaf, torch.Tensor):
            continue
        dims = {0: BATCH} if leaf.dim() >= 1 else {}
        if leaf.dim() == 2 and not (leaf.is_floating_point() or leaf.is_complex()):
            dims[1] = SEQUENCE
        found.append(dims)
    return found


def resized_inputs(args, sizes: Mapping[str, int], dims: Sequence[Mapping[int, str]] | None = None):
    """``args`` with each named dim (see :func:`dynamic_dims`) tiled or cut to ``sizes[name]``.

    Tiling repeats real entries (valid token ids, masks), so a model runs on the
    result as on its example.

    >>> resized_inputs((torch.tensor([[1, 2, 3]]),), {"batch": 2, "sequence": 4})[0]
    tensor([[1, 2, 3, 1],
            [1, 2, 3, 1]])
    """
    dims = dynamic_dims(args) if dims is None else list(dims)
    leaves, spec = pytree.tree_flatten(args)
    tensor_dims = iter(dims)
    resized = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            for dim, name in next(tensor_dims).items():
                if name in sizes and leaf.shape[dim] not in (0, sizes[name]):
                    index = torch.arange(sizes[name], device=leaf.device) % leaf.shape[dim]
                    leaf = leaf.index_select(dim, index)
        resized.append(leaf)
    return pytree.tree_unflatten(resized, spec)


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


class _ShapeProp(fx.Interpreter):
    """Runs the graph and records each node's output shape and dtype (``meta["tensor_meta"]``, as torch's
    ``ShapeProp`` does) and Python values (``meta[VALUE]``); a failing node is reported in words a user can
    act on. Unlike ``ShapeProp`` it prints nothing: a failure on meta tensors is expected and retried."""

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except TraceError:
            raise
        except Exception as exc:
            raise TraceError(
                f"running the model on example_inputs failed at {describe_node(self.module, n)}: "
                f"{type(exc).__name__}: {exc}. Check that example_inputs match what forward() expects."
            ) from exc
        found = False

        def tensor_meta(value):
            nonlocal found
            if isinstance(value, torch.Tensor):
                found = True
                return self.metadata(value)
            return value

        recorded = fx.node.map_aggregate(result, tensor_meta)
        if found:
            n.meta[meta.TENSOR_META] = recorded
        n.meta["type"] = type(result)
        if _is_python_scalar(result):
            n.meta[meta.VALUE] = result
        return result

    def propagate(self, *args):
        return self.run(*args)

    def metadata(self, value: torch.Tensor) -> TensorMetadata:
        return _extract_tensor_metadata(value)


@contextlib.contextmanager
def inference_mode(gm: nn.Module):
    """Eval mode and no grad for the duration, then every module's mode restored.

    Sets the ``training`` flags directly. An exported graph keeps the mode it
    was captured in whatever the flags say, and says nothing about it here
    (see :class:`_CapturedMode`).
    """
    was_training = [(weakref.ref(m), m.training) for m in gm.modules()]  # weakly: a module replaced
    for m in gm.modules():                                               # meanwhile (packed) can be freed
        m.training = False
    token = _MEASURING.set(True)
    try:
        with torch.no_grad():
            yield
    finally:
        _MEASURING.reset(token)
        for ref, flag in was_training:
            if (m := ref()) is not None:
                m.training = flag


@contextlib.contextmanager
def fx_errors_as_notes():
    """Run graphs without torch.fx printing a traceback to stderr when one fails.

    ``GraphModule.__call__`` prints the failing line of its generated code to
    stderr before re-raising; fxcompress catches such failures and reports them
    in its own errors, so here the print is held back: on failure it becomes a
    note on the exception (``exc.__notes__``), on success anything else written
    to stderr is passed on.
    """
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except Exception as exc:
        text = held.getvalue()
        start = text.rfind(_FX_CALL_CONTEXT)  # torch's own traceback above it says what the exception says
        if text.strip():
            exc.add_note(text[max(start, 0):].strip())
        raise
    else:
        if held.getvalue():
            sys.stderr.write(held.getvalue())


_FX_CALL_CONTEXT = "Call using an FX-traced Module"

#: Set while fxcompress itself runs a model under :func:`inference_mode` (measuring or verifying it).
_MEASURING = contextvars.ContextVar("fxcompress_measuring", default=False)


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

    def metadata(self, value: torch.Tensor) -> TensorMetadata:
        """Shape, dtype and strides without the memory format: meta kernels do not choose layouts as real
        ones do (passes that read it ask for ``exact_layout``), and probing every format costs a sixth of
        this propagation's time."""
        return TensorMetadata(value.shape, value.dtype, value.requires_grad, value.stride(), None, False, {})

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
    _check_arity(gm, example_inputs)
    with inference_mode(gm):
        if not exact_layout:
            try:
                _propagate_on_meta(gm, example_inputs)
                return
            except Exception:  # noqa: BLE001 - any op meta tensors cannot run: do the real thing
                pass
        _ShapeProp(gm).propagate(*example_inputs)


def _check_arity(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Refuse inputs ``gm.forward`` cannot take, naming its parameters."""
    signature = _signature(gm.forward)
    if signature is None:
        return
    try:
        signature.bind(*example_inputs)
    except TypeError as exc:
        names = ", ".join(signature.parameters)
        raise TraceError(
            f"example_inputs has {len(example_inputs)} items but forward() takes ({names}): {exc}. "
            "Pass one example per forward() argument."
        ) from None


FRONTENDS = ("auto", "fx", "export")


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on a masked model right after a training step.

    ``torch.nn.utils.prune`` caches the masked ``weight`` (dense values times mask) as a
    plain attribute; after a forward with grad it is a non-leaf tensor, which
    ``deepcopy`` refuses. The copy gets a detached value (recomputed before
    every forward anyway); the original is not touched.
    """
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
        for value in itertools.chain(module._parameters.values(), module._buffers.values()):
            if id(value) not in memo and _copies_lazily(value):
                memo[id(value)] = _lazy_copy(value)
    for module in model.modules():
        if id(module) not in memo and _copies_plainly(module):
            memo[id(module)] = _plain_copy(module, memo)
    return copy.deepcopy(model, memo)


def _copies_lazily(value) -> bool:
    """Whether ``value`` can be copied copy-on-write (:func:`_lazy_copy`): a plain dense tensor or parameter
    that owns its whole storage, so no other tensor's view of that storage needs preserving."""
    return (type(value) in (torch.Tensor, nn.Parameter) and value.layout == torch.strided and not value.is_quantized
            and value.device.type in ("cpu", "cuda") and value.is_contiguous() and value.storage_offset() == 0
            and value.untyped_storage().nbytes() == value.numel() * value.element_size())


def _lazy_copy(value: torch.Tensor) -> torch.Tensor:
    """A copy of ``value`` that shares its memory until either side is written (``torch._lazy_clone``,
    copy-on-write): most tensors a compile copies are only read and then replaced by their shrunk or
    quantized versions, so copying their bytes up front costs time and a second model's worth of memory
    for nothing. A write to the copy or to the user's tensor copies it then, so each stays independent.
    Memory that torch's allocator does not own (from numpy, a file, shared memory) cannot be shared that
    way and is copied at once."""
    try:
        copied = torch._lazy_clone(value.detach())
    except RuntimeError:
        copied = value.detach().clone()
    return nn.Parameter(copied, value.requires_grad) if type(value) is nn.Parameter else copied


#: the ``nn.Module`` state dicts a plain copy rebuilds itself (the rest are hook dicts, copied only when empty)
_STATE = frozenset({"_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"})
_IMMUTABLE = (int, float, complex, str, bool, type(None), torch.dtype, torch.device, torch.Size)


def _immutable(value) -> bool:
    return isinstance(value, _IMMUTABLE) or isinstance(value, tuple) and all(_immutable(v) for v in value)


def _copies_plainly(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.nn`` leaf whose state is its tensors plus immutable settings (a
    conv, a norm, an activation): copying it needs none of ``deepcopy``'s generality, which costs more
    than the tensors themselves on models of many small layers."""
    if not type(module).__module__.startswith("torch.nn.modules.") or module._modules:
        return False
    for key, value in vars(module).items():
        if key in _STATE:
            continue
        if isinstance(value, dict) and not value:
            continue  # a hook dict with no hooks
        if not _immutable(value):
            return False
    return all(type(p) is nn.Parameter for p in module._parameters.values() if p is not None) and all(
        type(b) is torch.Tensor for b in module._buffers.values() if b is not None)


def _plain_copy(module: nn.Module, memo: dict) -> nn.Module:
    """What ``deepcopy`` gives for a module :func:`_copies_plainly` accepts; tensors go through ``memo``
    so that tied ones stay tied."""
    def tensor(value):
        if value is None:
            return None
        if id(value) not in memo:
            memo[id(value)] = copy.deepcopy(value, memo)
        return memo[id(value)]

    state = {key: type(value)() if isinstance(value, dict) and key not in _STATE else value
             for key, value in vars(module).items()}
    state["_parameters"] = {name: tensor(p) for name, p in module._parameters.items()}
    state["_buffers"] = {name: tensor(b) for name, b in module._buffers.items()}
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {}
    copied = type(module).__new__(type(module))
    copied.__dict__.update(state)
    return copied


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


def _capture_copy(model: nn.Module) -> nn.Module:
    """The deep copy a frontend captures: the user's model is never touched.

    Hugging Face models get their key/value cache switched off in the copy
    (``config.use_cache = False``): a cache object in the output is neither a
    tensor nor something a graph can return, and a single forward gains
    nothing from it.
    """
    copied = copy_model(model)
    if _disable_caches(copied):
        logger.info("capturing %s with config.use_cache=False (a copy; the model itself is unchanged)",
                    type(model).__name__)
    return copied


def _disable_caches(model: nn.Module) -> bool:
    """Set ``use_cache = False`` on every Hugging Face config (and sub-config) the model holds; whether any was on."""
    changed, seen = False, set()
    for module in model.modules():
        config = getattr(module, "config", None)
        for candidate in [config, *(vars(config).values() if hasattr(config, "__dict__") else ())]:
            if id(candidate) in seen or not hasattr(candidate, "to_dict") or not hasattr(candidate, "use_cache"):
                continue
            seen.add(id(candidate))
            if candidate.use_cache:
                candidate.use_cache = False
                changed = True
    return changed


def _leaf_names(args: tuple, signature: inspect.Signature | None) -> list[str]:
    """A readable name for every tensor among ``args``: the ``forward()`` parameter, then the path inside it."""
    params = [p.name for p in signature.parameters.values() if p.kind in _POSITIONAL] if signature else []
    names = []
    for path, leaf in pytree.tree_flatten_with_path(args)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        index = path[0].idx
        head = params[index] if index < len(params) else f"args[{index}]"
        names.append(head + pytree.keystr(path[1:]))
    return names


def _dynamic_shapes(args: tuple, dims: list[dict[int, str]]):
    """``dynamic_shapes`` for ``torch.export``: ``Dim.AUTO`` for every dim :func:`dynamic_dims` names."""
    per_tensor = iter(dims)

    def spec(leaf):
        if not isinstance(leaf, torch.Tensor):
            return None
        return {dim: torch.export.Dim.AUTO for dim in next(per_tensor)} or None

    return pytree.tree_map(spec, args)


def _export_program(model: nn.Module, args: tuple, dims: list[dict[int, str]] | None):
    if dims is None or not any(dims):
        return torch.export.export(model, args, strict=False)
    import torch.fx.experimental._config as shape_config

    # size-oblivious sizes: a batch of 1 in the example is traced as any batch (else torch fixes sizes 0 and 1)
    with shape_config.patch(backed_size_oblivious=True):
        return torch.export.export(model, args, dynamic_shapes=_dynamic_shapes(args, dims), strict=False)


def _fixed_dims(program, args: tuple, dims: list[dict[int, str]], names: list[str]) -> list[str]:
    """The requested dynamic dims that the model's code fixed to their example size (``Dim.AUTO`` allows it)."""
    user_inputs = set(program.graph_signature.user_inputs)
    values = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if len(tensors) != len(dims):
        return []
    return [
        f"the {kind} dim of {name} (size {value.shape[dim]})"
        for value, wanted, name in zip(tensors, dims, names)
        for dim, kind in wanted.items()
        if not isinstance(value.shape[dim], torch.SymInt)
    ]


def _other_size(kind: str, size: int) -> int:
    """A size to probe a dynamic dim at: batch 1 against any other (models often branch on it), the sequence
    one shorter (staying within position tables)."""
    if kind == BATCH:
        return 2 if size == 1 else 1
    return size - 1 if size > 2 else size + 1


def _refused_sizes(gm: fx.GraphModule, args: tuple, dims: list[dict[int, str]], names: list[str]) -> list[str]:
    """Dynamic dims at which the exported guards refuse another size (the model's code branched on the size)."""
    guards = getattr(gm, "_guards_fn", None)
    in_spec = getattr(gm, "_in_spec", None)
    if guards is None or in_spec is None:
        return []
    from torch.fx import _pytree as fx_pytree

    sizes = {}
    for t, found in zip(_tensors(args), dims):
        for d, kind in found.items():
            sizes.setdefault(kind, t.shape[d])
    refused = []
    for kind, size in sizes.items():
        other = _other_size(kind, size)
        flat = fx_pytree.tree_flatten_spec((list(resized_inputs(args, {kind: other}, dims)), {}), in_spec)
        try:
            guards(*flat)
        except (AssertionError, RuntimeError) as exc:
            which = [n for n, found in zip(names, dims) if kind in found.values()]
            refused.append(f"{kind} size {other} ({', '.join(which)}; {_first_line(exc)})")
    return refused


def _warn(message: str) -> None:
    """``warnings.warn`` attributed to the first caller outside fxcompress (the user's ``compile``/``trace`` line)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _warn_shape_limits(kind: str, program, gm, args: tuple, dims: list[dict[int, str]], names: list[str]) -> None:
    """One warning when the model's code kept a batch or sequence dim from being fully dynamic."""
    fixed = _fixed_dims(program, args, dims, names)
    if fixed:
        _warn(f"{kind}'s code fixes {', '.join(fixed)}: the compiled model runs at that size only")
        return
    refused = _refused_sizes(gm, args, dims, names)
    if refused:
        _warn(
            f"{kind}'s code refuses {', '.join(refused)} in the captured graph (a constant size, or another code "
            "path at that size): the compiled model does not run there. Trace at the shapes you will run, or pass "
            "inputs that keep the model on one path (e.g. an attention_mask)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


@dataclasses.dataclass(frozen=True)
class _BindToPositions:
    """Forward pre-hook of an exported graph, which takes exactly the positional arguments it was captured with:
    calls by name, or leaving trailing defaults out, are bound to those positions first (as :func:`trace` bound
    the example inputs), so the compiled model is called as the user's model is."""

    signature: inspect.Signature
    count: int

    def __call__(self, module, args, kwargs):
        if not kwargs and len(args) == self.count:
            return None
        return ExampleInputs(tuple(args), dict(kwargs)).positional(self.signature, self.count), {}


def export_program(model: nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of ``model`` on ``example_inputs`` (positional, see
    :func:`normalize_example_inputs`), with the batch dim of every tensor input and the sequence dim of token
    inputs (see :func:`dynamic_dims`) dynamic.

    Those dims are ``Dim.AUTO``, with a batch of 1 traced as any batch, so the
    program runs at other batch sizes and sequence lengths. A model whose code
    fixes one of them or takes another path at another size (a warning names
    the dim and the guard), or that only exports at fixed shapes (a warning
    gives torch's reason), is captured at the example's shapes.
    :class:`TraceError` when it does not export at all.
    """
    kind = type(model).__name__
    dims = dynamic_dims(example_inputs)
    names = _leaf_names(example_inputs, _signature(model))
    try:
        program = _export_program(model, example_inputs, dims)
    except Exception as dynamic_error:  # noqa: BLE001 - retried at fixed shapes, and said so
        try:
            program = _export_program(model, example_inputs, None)
        except Exception as exc:
            raise TraceError(f"torch.export could not export {kind}: {type(exc).__name__}: {str(exc)[:2000]}") from exc
        if any(dims):
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, _tensors(example_inputs)))
            _warn(
                f"torch.export could not capture {kind} with dynamic batch and sequence dims "
                f"({_first_line(dynamic_error)}); it is captured at the example's shapes ({shapes}) "
                "and the compiled model runs at those shapes only"
            )
        return program
    if any(dims):
        _warn_shape_limits(kind, program, program.module(), example_inputs, dims, names)
    return program


def accept_keywords(gm: nn.Module, forward=None, count: int | None = None) -> nn.Module:
    """Let an exported module be called as the model it came from: by name, or leaving trailing defaults out.

    ``torch.export`` modules take exactly the positional arguments they were
    captured with; a forward pre-hook binds each call to ``forward``'s
    signature (default: ``gm``'s own) first, padded to ``count`` arguments.
    Returns ``gm``.
    """
    signature = _signature(forward if forward is not None else gm)
    if signature is None:
        return gm
    if count is None:
        count = sum(p.kind in _POSITIONAL for p in signature.parameters.values())
    gm.register_forward_pre_hook(_BindToPositions(_plain(signature), count), with_kwargs=True, prepend=True)
    return gm


@dataclasses.dataclass
class _CapturedMode:
    """Forward pre-hook of an exported graph: warns once when it runs in the other train/eval mode than the one
    it was captured in, since its dropout and batch norm ops keep the captured behaviour."""

    training: bool
    warned: bool = False

    def __call__(self, module, args):
        if module.training != self.training and not self.warned and not _MEASURING.get():
            self.warned = True
            captured, now = ("train", "eval") if self.training else ("eval", "train")
            _warn(f"this graph was captured by torch.export in {captured} mode and now runs in {now} mode: its "
                  f"dropout and batch norm keep {captured}-mode behaviour. Compile the model in {now} mode "
                  f"(model.{now}()) to get {now}-mode behaviour.")


def _export(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """The frontend's ``torch.export``: :func:`export_program`'s unlifted ``GraphModule`` (parameters become
    ``get_attr`` nodes), called as the model is (:func:`accept_keywords`).

    The exported graph is captured in the mode the model is in: dropout and
    batch norm keep that train/eval behaviour whatever ``.train()``/``.eval()``
    says later, so export in eval mode for inference and in train mode for
    fine-tuning. ``.train()``/``.eval()`` work as on any module (torch's
    unlifted module refuses them), and running in the other mode warns once.
    """
    program = export_program(model, example_inputs)
    gm = program.module()
    _drop_unread_state(gm)
    for refusing in ("train", "eval"):  # torch binds methods that raise NotImplementedError
        gm.__dict__.pop(refusing, None)
    gm.train(model.training)
    gm.register_forward_pre_hook(_CapturedMode(model.training))
    return accept_keywords(gm, model, len(example_inputs))


def _drop_unread_state(gm: fx.GraphModule) -> None:
    """Remove the parameters and buffers the graph never uses, as ``symbolic_trace`` never copies them.

    The unlifted module reads every parameter and buffer of the model with a
    ``get_attr`` node, whether the traced path uses it or not (GoogLeNet's
    auxiliary classifiers in eval mode): such a model would carry weights
    that nothing prunes, counted in its size, saved and exported. A tensor
    read under any of its names stays under all of them (tied embeddings),
    and so does every module that still holds a tensor or is called.
    """
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:
        gm.graph.erase_node(node)
    targets = [n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")]
    read = {id(value) for t in targets if isinstance(value := fetch_attr(gm, t), torch.Tensor)}
    for module in gm.modules():
        for store in (module._parameters, module._buffers):
            for key in [k for k, t in store.items() if t is not None and id(t) not in read]:
                del store[key]
    needed = {prefix for t in targets for prefix in _prefixes(t)}
    for path, module in reversed(list(gm.named_modules())):  # children before their parents
        holds = next(module.parameters(), None) is not None or next(module.buffers(), None) is not None
        if path and path not in needed and not holds:
            owner, _, name = path.rpartition(".")
            del gm.get_submodule(owner)._modules[name]
    gm.recompile()


def fetch_attr(gm: nn.Module, target: str):
    """The attribute a ``get_attr``/``call_module`` target names (``layer1.0.conv1.weight``)."""
    value = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def _prefixes(target: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``."""
    parts = target.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _tensors(args) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(args) if isinstance(leaf, torch.Tensor)]


def _trace_graph(model: nn.Module, example_inputs: tuple, frontend: str) -> fx.GraphModule:
    """Run the chosen frontend; ``auto`` tries ``symbolic_trace`` first and falls back to ``torch.export``."""
    if frontend == "fx":
        gm = _symbolic_trace(_capture_copy(model))
        propagate_shapes(gm, example_inputs)
        return gm
    if frontend == "export":
        gm = _export(_capture_copy(model), example_inputs)
        # the exported copy of the model lingers in reference cycles (export's tracing state), holding every
        # parameter the graph holds: shrinking could not free a replaced weight until the next collection
        gc.collect()
        propagate_shapes(gm, example_inputs)
        return gm
    try:
        return _trace_graph(model, example_inputs, "fx")
    except TraceError as error:
        fx_failure = str(error)  # the message only: the error's frames hold the failed attempt's copy of the model
    gc.collect()  # that copy sits in reference cycles (tracer, proxies): free it before export copies the model again
    try:
        return _trace_graph(model, example_inputs, "export")
    except TraceError as export_error:
        raise TraceError(
            f"neither frontend could capture {type(model).__name__}.\n"
            f"symbolic_trace: {fx_failure}\n"
            f"torch.export: {export_error}"
        ) from export_error


def trace(model: nn.Module, example_inputs, frontend: str = "auto") -> fx.GraphModule:
    """Capture a deep copy of ``model`` as a shape-annotated ``GraphModule``.

    ``frontend`` is ``"fx"`` (``symbolic_trace``: keeps ``nn.Module`` leaves,
    readable and trainable), ``"export"`` (``torch.export``, non-strict: for
    models with Python control flow, such as Hugging Face transformers) or
    ``"auto"`` (the first, falling back to the second). The user's model and
    inputs are never touched.

    ``example_inputs`` is a tensor, a tuple of ``forward()`` arguments, a dict
    of keyword arguments (a tokenizer's output) or an ``(args, kwargs)`` pair
    (see :class:`ExampleInputs`); keywords are bound to ``forward()``'s
    parameters, and the result can be called by name as the model can.
    ``torch.export`` captures the batch dim of every input and the sequence dim
    of token inputs as dynamic, so the result runs at other batch sizes and
    sequence lengths (a warning says when the model's code prevents it);
    ``symbolic_trace`` graphs replay the model's own shape arithmetic.
    Hugging Face models are captured with ``config.use_cache = False`` (on the
    copy): a cache object cannot be a graph output.

    Nodes carry ``meta["tensor_meta"]``; ``meta[EXAMPLE_INPUTS]`` holds the
    inputs as the tuple of positional arguments the graph takes.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"compile() takes an nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}; choose one of {', '.join(FRONTENDS)}")
    example_inputs = normalize_example_inputs(example_inputs, model)
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
