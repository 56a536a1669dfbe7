"""Save and load compressed models as data: no pickle, no code, checksummed.

``torch.save`` of a ``GraphModule`` pickles it, and unpickling runs whatever
code the file names, so it needs ``torch.load(weights_only=False)``; it also
cannot pickle modules captured by ``torch.export``. :func:`save` instead
re-exports the model with ``torch.export`` and writes one zip file holding

- ``program.json``: the graph as ``torch.export``'s serialised program (a JSON
  schema of aten and ``fxcompress`` ops, shapes and dtypes; no Python code),
- ``weights.safetensors``: parameters, buffers and constants in their own dtypes
  (a quantized model keeps its int8 weights), plus the example inputs,
- ``fxcompress.json``: a manifest with the SHA-256 of both members.

:func:`load` never unpickles anything (it works where ``torch.load`` allows only
``weights_only=True``), refuses a file whose members do not match the
manifest's checksums, and refuses a program that calls anything but
``torch.ops`` operators and ``_operator``/``math`` functions, so an edited file
cannot make loading or running the model execute other code. It returns the
``torch.export`` module: it computes bit-for-bit what the saved model computes
on inputs of the example inputs' shapes, in the mode the model was saved in
(``.train()``/``.eval()`` raise, as on every ``torch.export`` module). The one
exception: int8 weight-only layers that run oneDNN's kernel are saved on
PyTorch's portable ``_weight_int8pack_mm`` (same weights and scales; outputs
agree to float32 rounding, see :func:`fxcompress.kernels.portable_kernels`).

With ``model`` and its example input ``x``:

>>> import tempfile, os
>>> small = fxcompress.compile(model, x, "insert-masks{pruner=l1,sparsity=0.5},propagate-channels,shrink")
>>> path = os.path.join(tempfile.mkdtemp(), "small.fxc")
>>> save(small, path)
>>> torch.equal(load(path)(x), small(x))
True
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from fxcompress import meta
from fxcompress.errors import ConfigError
from fxcompress.kernels import portable_kernels
from fxcompress.trace import accept_keywords, export_program, normalize_example_inputs

__all__ = ["save", "load", "SavedModelError", "FORMAT", "VERSION"]

FORMAT = "fxcompress.saved-model"
VERSION = 1
MANIFEST, PROGRAM, WEIGHTS = "fxcompress.json", "program.json", "weights.safetensors"
#: Prefixes of the tensor names in ``weights.safetensors``: what each tensor is to the program.
STATE, CONSTANT, INPUT = "state_dict/", "constants/", "inputs/"
#: Serialised call targets that resolve to plain functions (everything else must be a ``torch.ops`` operator).
PLAIN_FUNCTION_MODULES = ("_operator.", "math.")


class SavedModelError(ConfigError):
    """A file is not one :func:`save` wrote, was changed after saving, or a model cannot be saved."""


# ---------------------------------------------------------------------------- save


def _example_inputs(model: nn.Module, example_inputs) -> tuple:
    """The inputs to export with: given, or those the model was compiled (or loaded) with."""
    if example_inputs is None:
        example_inputs = getattr(model, "meta", {}).get(meta.EXAMPLE_INPUTS)
    if example_inputs is None:
        raise SavedModelError("save needs example_inputs for a module that fxcompress did not compile or load")
    inputs = normalize_example_inputs(example_inputs, model)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise SavedModelError("save takes tensor example inputs only (the program is exported for their shapes)")
    return inputs


def _export(model: nn.Module, inputs: tuple) -> torch.export.ExportedProgram:
    if isinstance(model, torch.export.ExportedProgram):
        return model
    try:
        return export_program(model, inputs)
    except Exception as exc:
        raise SavedModelError(f"torch.export could not capture the model to save it: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _unique_tensors(named: Mapping[str, object]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store once each, and ``alias -> stored name`` for tied ones (safetensors refuses shared memory).

    A tensor is tied to an earlier one when it is the same view of the same
    storage; it is then stored once and given back as one tensor on load.
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise SavedModelError(f"cannot save {name!r}: it is a {type(tensor).__name__}, not a tensor")
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride(), tensor.dtype)
        if view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        stored[name] = tensor.detach().cpu().contiguous().clone()  # own memory: no sharing between entries
    return stored, aliases


def _tensors(ep: torch.export.ExportedProgram, inputs: tuple) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    named = {STATE + k: v for k, v in ep.state_dict.items()}
    named.update({CONSTANT + k: v for k, v in ep.constants.items()})
    named.update({f"{INPUT}{i}": t for i, t in enumerate(inputs)})
    return _unique_tensors(named)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(model: nn.Module, path: str | os.PathLike, example_inputs=None) -> None:
    """Write ``model`` to ``path`` as one zip of data (see the module docstring); ``load(path)`` reads it.

    ``example_inputs`` default to those ``fxcompress.compile`` (or :func:`load`)
    recorded; the program is exported for their shapes. The model is captured in
    its current mode: save in eval mode for inference.
    """
    from safetensors.torch import save as safetensors_bytes
    from torch._export.serde.serialize import serialize

    inputs = _example_inputs(model, example_inputs)
    with portable_kernels(model):  # oneDNN's prepacked int8 weights cannot be serialized
        ep = _export(model, inputs)
    program = serialize(ep, serialize_state_dict=False, serialize_constants=False,
                        serialize_example_inputs=False).exported_program
    tensors, aliases = _tensors(ep, inputs)
    weights = safetensors_bytes(tensors)
    parameters = {name: ep.state_dict[name].requires_grad for name in ep.graph_signature.parameters}
    manifest = {"format": FORMAT, "version": VERSION, "torch": torch.__version__,
                "sha256": {PROGRAM: _digest(program), WEIGHTS: _digest(weights)},
                "parameters": parameters, "aliases": aliases, "inputs": len(inputs)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        archive.writestr(PROGRAM, program)
        archive.writestr(WEIGHTS, weights)


# ---------------------------------------------------------------------------- load


def _read_members(path: str | os.PathLike) -> tuple[dict, bytes, bytes]:
    """The manifest, program and weights, after checking the members and their checksums."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if names != {MANIFEST, PROGRAM, WEIGHTS}:
                raise SavedModelError(f"{path} holds {sorted(names)}, not the members fxcompress.save writes "
                                      f"({MANIFEST}, {PROGRAM}, {WEIGHTS}): refusing to load it")
            manifest_bytes, program, weights = (archive.read(n) for n in (MANIFEST, PROGRAM, WEIGHTS))
    except (zipfile.BadZipFile, OSError) as exc:
        raise SavedModelError(f"{path} is not a file fxcompress.save wrote: {exc}") from exc
    manifest = _manifest(path, manifest_bytes)
    for name, data in ((PROGRAM, program), (WEIGHTS, weights)):
        if _digest(data) != manifest["sha256"].get(name):
            raise SavedModelError(f"{path}: {name} does not match the checksum fxcompress.save recorded "
                                  "(the file was changed or damaged after saving): refusing to load it")
    return manifest, program, weights


def _manifest(path, data: bytes) -> dict:
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise SavedModelError(f"{path}: its manifest {MANIFEST} is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SavedModelError(f"{path} is not a file fxcompress.save wrote (no {FORMAT!r} manifest)")
    if manifest.get("version") != VERSION:
        raise SavedModelError(f"{path} has format version {manifest.get('version')!r}; this fxcompress reads "
                              f"version {VERSION}")
    return manifest


def _call_targets(tree) -> Iterator[str]:
    """Every node target of a serialised program, nested graphs included (a node has "target" and "inputs")."""
    if isinstance(tree, dict):
        if isinstance(tree.get("target"), str) and "inputs" in tree:
            yield tree["target"]
        for value in tree.values():
            yield from _call_targets(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _call_targets(value)


def _check_targets(path, program: bytes) -> None:
    """Refuse a program that would call anything but operators and pure ``_operator``/``math`` functions.

    The deserialiser resolves any ``torch.<attribute>`` path; a program that
    names ``torch.load`` or ``torch.hub.load`` would run it. ``save`` only
    ever writes ``torch.ops`` operators and ``_operator`` functions.
    """
    for target in _call_targets(json.loads(program)):
        if target.startswith("torch.ops.") or target.startswith(PLAIN_FUNCTION_MODULES):
            continue
        raise SavedModelError(f"{path}: the program calls {target!r}, which fxcompress.save never writes: "
                              "refusing to load it")


def _split_tensors(manifest: dict, tensors: dict[str, torch.Tensor]):
    """``state_dict``, ``constants`` and example inputs, with tied tensors shared and parameters as ``Parameter``."""
    for name, requires_grad in manifest["parameters"].items():
        if STATE + name not in manifest["aliases"]:
            tensors[STATE + name] = nn.Parameter(tensors[STATE + name], requires_grad=requires_grad)
    for alias, name in manifest["aliases"].items():
        tensors[alias] = tensors[name]
    state = {k[len(STATE):]: v for k, v in tensors.items() if k.startswith(STATE)}
    constants = {k[len(CONSTANT):]: v for k, v in tensors.items() if k.startswith(CONSTANT)}
    inputs = tuple(tensors[f"{INPUT}{i}"] for i in range(manifest["inputs"]))
    return state, constants, inputs


def load(path: str | os.PathLike) -> torch.fx.GraphModule:
    """Read a model :func:`save` wrote; refuse (``SavedModelError``) a file that was changed after saving."""
    import fxcompress.quant.ops  # noqa: F401  (registers torch.ops.fxcompress before the program names them)
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load
    from torch._export.serde.serialize import ExportedProgram, ExportedProgramDeserializer, _bytes_to_dataclass

    manifest, program, weights = _read_members(path)
    _check_targets(path, program)
    try:
        state, constants, inputs = _split_tensors(manifest, safetensors_load(weights))
        ep = ExportedProgramDeserializer().deserialize(_bytes_to_dataclass(ExportedProgram, program), state,
                                                       constants, None)
    except (SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise SavedModelError(f"{path} could not be read back: {type(exc).__name__}: {exc}") from exc
    module = accept_keywords(ep.module(), count=len(inputs))
    module.meta[meta.EXAMPLE_INPUTS] = inputs
    return module
