"""Write a shrunk graph back into the user's own module: its class, methods and config, the new widths.

``compile`` returns a ``GraphModule``: small and verified, but without the
user's methods (``generate`` and its key/value cache, ``save_pretrained``,
timm's ``forward_features``/``reset_classifier``) and, when exported, for the
captured input shapes only. :func:`write_back` puts the shrunk tensors into a
copy of the user's module instead, matched by fully qualified name (both
frontends keep the original paths), and updates every attribute the model's
Python code reads to run at the new widths: layer sizes (``in_features``,
``out_channels``, ``normalized_shape``...), attention head counts (Hugging Face
``num_key_value_groups``, ``all_head_size``, GPT-2's ``split_size``, timm's
``num_heads``) and the Hugging Face config. The copy is then run against the
graph on the compile's example inputs: a model that computes anything else is
refused (:class:`~fxcompress.errors.VerificationError`), never returned.

Widths the config cannot say (per-layer head counts or FFN sizes, BERT heads at
an unchanged hidden size) are recorded under ``config.fxcompress_layer_widths``
(``{module path: {attribute: value}}``, JSON), and :func:`from_pretrained`
rebuilds such a model from a ``save_pretrained`` directory. When the config can
say them, it does, and ``AutoModelForCausalLM.from_pretrained`` loads the model.
Biases that ``compensate-bias`` gave bias-less layers are added to the copy, and
the config fields that make the class build them (``attention_bias``,
``mlp_bias``) are turned on, with zero biases for the other layers they cover;
a bias no config field covers is a :class:`~fxcompress.errors.ConfigError`.

>>> from fxcompress.passes import standard_pruning
>>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
>>> small = fxcompress.compile(model, torch.randn(2, 8), standard_pruning(fxcompress.prune.L1Norm(0.5)))
>>> mine = write_back(model, small)
>>> type(mine).__name__, mine[0].out_features, mine[2].in_features, model[0].out_features
('Sequential', 8, 8, 16)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import fx, nn

from fxcompress.errors import ConfigError, VerificationError
from fxcompress.meta import EXAMPLE_INPUTS
from fxcompress.trace import copy_model
from fxcompress.verify import forward, graph_state, leaf_error, output_leaves

__all__ = [
    "write_back", "verify_write_back", "from_pretrained", "assign_tensors", "update_attributes", "update_config",
    "apply_widths", "update_bias_config", "AttributeChange", "WIDTHS_KEY", "OUTPUTS", "BIAS_FIELDS",
]

#: The config entry that records per-module widths a Hugging Face config cannot express.
WIDTHS_KEY = "fxcompress_layer_widths"

#: What ``fxcompress.compile(..., output=...)`` may return.
OUTPUTS = ("graph", "module")

#: Module attributes that hold a width read off one module's own tensors, compared with a fresh build from the config to decide whether
#: the config alone rebuilds the model (see :func:`_record_widths`).
SHAPE_ATTRIBUTES = (
    "in_features", "out_features", "in_channels", "out_channels", "groups", "num_embeddings", "embedding_dim",
    "normalized_shape", "num_features", "num_channels", "num_groups", "nf", "nx",
)
#: ... and attributes derived from several tensors (head counts, split points, model-level widths).
DERIVED_ATTRIBUTES = (
    "num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups", "head_dim",
    "attention_head_size", "all_head_size", "split_size", "embed_dim", "hidden_size", "intermediate_size",
    "head_hidden_size", "scaling",
)
TRACKED = SHAPE_ATTRIBUTES + DERIVED_ATTRIBUTES
#: Config fields an attention ``forward`` reads through ``self.config`` (Phi-3's ``query_pos``): a module whose
#: width differs from the shared config gets a private copy of it, recorded as ``"config.<field>"``.
CONFIG_READS = ("num_attention_heads",)


@dataclasses.dataclass(frozen=True)
class AttributeChange:
    """One attribute :func:`write_back` changed: ``path.name`` from ``old`` to ``new``."""

    path: str
    name: str
    old: object
    new: object

    def __str__(self) -> str:
        return f"{self.path or '<model>'}.{self.name} ({self.old!r} -> {self.new!r})"


# ---------------------------------------------------------------------------- tensors


def _names_by_tensor(module: nn.Module) -> dict[int, list[str]]:
    """Every parameter and buffer name of ``module``, grouped by the tensor they name (tied weights share one)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(tensor), []).append(name)
    return groups


def _match(names: set[str], target: str) -> str | None:
    """``target``'s name in ``names``: the same, or the one an exported graph spelt with ``_`` for ``.``."""
    if target in names:
        return target
    flat = target.replace(".", "_")
    found = [n for n in names if n.replace(".", "_") == flat]
    return found[0] if len(found) == 1 else None


def _shrunk_values(model: nn.Module, shrunk: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The graph's tensors as its forward sees them (masks applied), under the model's names.

    A graph tensor with no place in the model means a pass added it (an
    inserted smoothing scale, a quantizer): such a graph is not a pruned copy
    of the model and cannot be written back.
    """
    names = {n for group in _names_by_tensor(model).values() for n in group}
    values = {}
    for target, value in graph_state(shrunk).items():
        match = _match(names, target)
        if match is None:
            raise ConfigError(
                f"the compiled graph holds {target!r}, which {type(model).__name__} has no parameter or buffer for "
                "(a pass added it: smoothing, quantization, fusion); output='module' writes back pruning "
                "pipelines only. Use output='graph' for this pipeline."
            )
        values[match] = value
    return values


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` under ``name`` (``a.b.weight``), as a parameter where a parameter was (same ``requires_grad``)."""
    owner, _, attr = name.rpartition(".")
    holder = module.get_submodule(owner)
    if attr in holder._parameters:
        holder._parameters[attr] = value
    else:
        holder._buffers[attr] = value


def _as_stored(old: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    value = value.detach().to(device=old.device, dtype=old.dtype).clone()
    return nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value


def assign_tensors(model: nn.Module, values: dict[str, torch.Tensor]) -> list[str]:
    """Put ``values`` into ``model`` by name, keeping tied names tied; returns the names nothing gave a value.

    Names that share one tensor in ``model`` (tied embeddings and LM head)
    share the new one, even when ``values`` holds only one of them (a saved
    checkpoint drops the tied copy). Where ``values`` gives tied names
    different tensors, the tie is broken as the values say.
    """
    unset = []
    for names in _names_by_tensor(model).values():
        given = [n for n in names if n in values]
        if not given:
            unset.extend(names)
            continue
        old = model.get_parameter(names[0]) if _is_parameter(model, names[0]) else model.get_buffer(names[0])
        first = values[given[0]]
        same = all(values[n] is first or _same(values[n], first) for n in given)
        shared = _as_stored(old, first) if same else None
        for name in names:
            _set_tensor(model, name, shared if same else _as_stored(old, values.get(name, first)))
    return unset


def _is_parameter(model: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return attr in model.get_submodule(owner)._parameters


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


# ---------------------------------------------------------------------------- biases a pass added

#: Hugging Face config fields that give a family's linear layers biases (Llama-like: ``attention_bias`` for
#: q/k/v/o, ``mlp_bias`` for gate/up/down); which layers each covers is read off a fresh build.
BIAS_FIELDS = ("attention_bias", "mlp_bias")


def _add_biases(model: nn.Module, shrunk: fx.GraphModule) -> list[str]:
    """Give each bias-less ``nn.Linear`` of ``model`` a bias where the graph holds one (``compensate-bias`` put
    the removed channels' mean contribution there); returns their module paths. The values come with the
    graph's other tensors."""
    names = {n for group in _names_by_tensor(model).values() for n in group}
    added = []
    for target, value in graph_state(shrunk).items():
        owner, _, attr = target.rpartition(".")
        weight = _match(names, f"{owner}.weight")
        if attr != "bias" or _match(names, target) is not None or weight is None:
            continue
        path = weight.rpartition(".")[0]
        layer = model.get_submodule(path)
        if isinstance(layer, nn.Linear) and layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(value, device=layer.weight.device, dtype=layer.weight.dtype),
                                      requires_grad=layer.weight.requires_grad)
            added.append(path)
    return added


def _biased_layers(model: nn.Module, **fields) -> set[str] | None:
    """Paths of the linear layers that have a bias in a fresh build from ``model``'s config with ``fields``
    set; None when the class does not build from its config."""
    config = _without_widths(model.config)
    for field, value in fields.items():
        setattr(config, field, value)
    fresh = _fresh_build(model, config)
    if fresh is None:
        return None
    return {path for path, m in fresh.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}


def update_bias_config(model: nn.Module, added: list[str]) -> list[AttributeChange]:
    """Turn on the config fields (:data:`BIAS_FIELDS`) that give the ``added`` layers biases, and give every
    other layer those fields cover a zero bias, so that the class builds the same model from the config
    (``from_pretrained`` loads it exactly). A layer no field covers cannot be saved and reloaded:
    :class:`~fxcompress.errors.ConfigError` naming it and the architecture."""
    config = getattr(model, "config", None)
    if not added or config is None or not hasattr(config, "to_dict"):
        return []
    changes = []
    for field in BIAS_FIELDS:
        if getattr(config, field, None) is False and set(added) & (_biased_layers(model, **{field: True}) or set()):
            setattr(config, field, True)
            changes.append(AttributeChange("config", field, False, True))
    expected = _biased_layers(model)
    missing = [p for p in added if expected is not None and p not in expected]
    if missing:
        raise ConfigError(
            f"{type(model).__name__}: bias compensation gave {', '.join(missing[:3])} a bias, which its config "
            f"({type(config).__name__}) cannot express (fields tried: {', '.join(BIAS_FIELDS)}); exclude those "
            "layers from compensate-bias (CompensateBias(exclude=...)) or use output='graph'"
        )
    for path in sorted(expected or ()):
        layer = model.get_submodule(path)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=layer.weight.device,
                                                  dtype=layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    return changes


# ---------------------------------------------------------------------------- attributes


def _shape(module: nn.Module, name: str) -> tuple[int, ...] | None:
    tensor = getattr(module, name, None)
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None


def _linear(m: nn.Linear) -> dict:
    return {"out_features": m.weight.shape[0], "in_features": m.weight.shape[1]}


def _conv(m: nn.modules.conv._ConvNd) -> dict:
    """Channels and groups: a depthwise-like conv (one input channel per group) keeps one group per input
    channel, any other keeps its group count (the analysis prunes every group alike)."""
    per_group_out = m.out_channels // m.groups
    depthwise = m.groups > 1 and m.in_channels == m.groups
    if m.transposed:
        out = m.weight.shape[1] * m.groups
        return {"in_channels": m.weight.shape[0], "out_channels": out}
    groups = m.weight.shape[0] // per_group_out if depthwise else m.groups
    return {"out_channels": m.weight.shape[0], "groups": groups, "in_channels": m.weight.shape[1] * groups}


def _embedding(m: nn.Embedding) -> dict:
    return {"num_embeddings": m.weight.shape[0], "embedding_dim": m.weight.shape[1]}


def _norm(m: nn.Module) -> dict:
    shape = _shape(m, "weight") or _shape(m, "bias")
    return {} if shape is None else {"normalized_shape": shape}


def _batch_norm(m: nn.modules.batchnorm._NormBase) -> dict:
    shape = _shape(m, "running_mean") or _shape(m, "weight")
    return {} if shape is None else {"num_features": shape[0]}


def _group_norm(m: nn.GroupNorm) -> dict:
    if m.weight is None:
        return {}
    per_group = m.num_channels // m.num_groups
    return {"num_channels": m.weight.shape[0], "num_groups": m.weight.shape[0] // per_group}


def _hf_conv1d(m: nn.Module) -> dict:
    """transformers' ``Conv1D`` (GPT-2): ``weight`` is ``[nx, nf]`` and ``forward`` reads ``nf``."""
    return {"nx": m.weight.shape[0], "nf": m.weight.shape[1]}


def _heads(width: int, head_dim: int, where: str) -> int:
    if head_dim <= 0 or width % head_dim:
        raise ConfigError(
            f"{where}: width {width} is not a whole number of heads of {head_dim}; the shrink removed part of a head, "
            "which the model's code cannot express. Use output='graph'."
        )
    return width // head_dim


def _q_k_v_attention(m: nn.Module, path: str) -> dict:
    """Llama, Mistral, Qwen2, Gemma, ViT: ``view(..., -1, head_dim)`` reads ``head_dim`` (kept: whole heads go),
    eager and SDPA attention read ``num_key_value_groups`` to repeat the KV heads."""
    heads = _heads(m.q_proj.weight.shape[0], m.head_dim, f"{path}.q_proj")
    kv = _heads(m.k_proj.weight.shape[0], m.head_dim, f"{path}.k_proj")
    return {"num_heads": heads, "num_attention_heads": heads, "num_key_value_heads": kv,
            "num_key_value_groups": heads // kv}


def _qkv_attention(m: nn.Module, path: str) -> dict:
    """Phi-3: one ``qkv_proj``, split at ``self.config.num_attention_heads * head_dim`` and
    ``self.num_key_value_heads * head_dim``."""
    heads = _heads(m.o_proj.weight.shape[1], m.head_dim, f"{path}.o_proj")
    kv = _heads((m.qkv_proj.weight.shape[0] - heads * m.head_dim) // 2, m.head_dim, f"{path}.qkv_proj")
    return {"num_key_value_heads": kv, "num_key_value_groups": heads // kv, "config.num_attention_heads": heads}


def _bert_attention(m: nn.Module, path: str) -> dict:
    """BERT: ``view(..., -1, attention_head_size)``; ``all_head_size`` is the projections' width."""
    width = m.query.weight.shape[0]
    return {"num_attention_heads": _heads(width, m.attention_head_size, f"{path}.query"), "all_head_size": width}


def _gpt2_attention(m: nn.Module, path: str) -> dict:
    """GPT-2: ``c_attn(x).split(split_size)`` into q, k and v, each ``num_heads * head_dim`` wide."""
    width = m.c_attn.weight.shape[1] // (2 if getattr(m, "is_cross_attention", False) else 3)
    return {"split_size": width, "num_heads": _heads(width, m.head_dim, f"{path}.c_attn"),
            "embed_dim": m.c_proj.weight.shape[1]}


def _timm_attention(m: nn.Module, path: str) -> dict:
    """timm: ``qkv(x).reshape(B, N, 3, num_heads, head_dim)``."""
    return {"num_heads": _heads(m.qkv.weight.shape[0] // 3, m.head_dim, f"{path}.qkv")}


def _gated_mlp(m: nn.Module, path: str) -> dict:
    """Llama-style MLPs keep ``intermediate_size`` and ``hidden_size`` (read by nothing in ``forward``, kept true)."""
    return {"intermediate_size": m.down_proj.weight.shape[1], "hidden_size": m.down_proj.weight.shape[0]}


def _timm_head(m: nn.Module, path: str) -> dict:
    """timm models build their classifier from ``num_features`` (``reset_classifier``)."""
    classifier = m.get_classifier()
    if not isinstance(classifier, nn.Linear):
        return {}
    width = classifier.weight.shape[1]
    return {"num_features": width, "head_hidden_size": width}


def _has(*children: str, attr: str | None = None) -> Callable[[nn.Module], bool]:
    def test(m: nn.Module) -> bool:
        return all(isinstance(getattr(m, c, None), nn.Module) for c in children) and (attr is None or hasattr(m, attr))
    return test


def _is_hf_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


#: ``(which modules, what their widths are)``: leaf layers from their own tensors, composite ones (attention,
#: MLPs, heads) from their children's, each written for code read in transformers/timm (see the functions).
LEAF_RULES: tuple[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], dict]], ...] = (
    (lambda m: isinstance(m, nn.Linear), _linear),
    (lambda m: isinstance(m, nn.modules.conv._ConvNd), _conv),
    (lambda m: isinstance(m, nn.Embedding), _embedding),
    (lambda m: isinstance(m, (nn.LayerNorm, nn.RMSNorm)), _norm),
    (lambda m: isinstance(m, nn.modules.batchnorm._NormBase), _batch_norm),
    (lambda m: isinstance(m, nn.GroupNorm), _group_norm),
    (_is_hf_conv1d, _hf_conv1d),
)
COMPOSITE_RULES: tuple[tuple[Callable[[nn.Module], bool], Callable[[nn.Module, str], dict]], ...] = (
    (_has("q_proj", "k_proj", attr="head_dim"), _q_k_v_attention),
    (_has("qkv_proj", "o_proj", attr="head_dim"), _qkv_attention),
    (_has("query", "key", attr="attention_head_size"), _bert_attention),
    (_has("c_attn", "c_proj", attr="split_size"), _gpt2_attention),
    (_has("qkv", attr="num_heads"), _timm_attention),
    (_has("down_proj", attr="intermediate_size"), _gated_mlp),
    (lambda m: hasattr(m, "get_classifier") and hasattr(m, "num_features"), _timm_head),
)


def _set_attribute(module: nn.Module, path: str, name: str, value, root_config) -> AttributeChange | None:
    """Set one attribute the module already has (never invent one); ``config.X`` gets a private config copy
    when the module's value differs from the shared config's."""
    if name.startswith("config."):
        field = name.partition(".")[2]
        config = getattr(module, "config", None)
        if config is None or getattr(config, field, None) == value:
            return None
        old = getattr(config, field)
        if config is root_config:
            module.config = config = _private_config(config)
        setattr(config, field, value)
        return AttributeChange(path, name, old, value)
    if not hasattr(module, name) or name in module._parameters or name in module._buffers:
        return None
    old = getattr(module, name)
    value = tuple(value) if isinstance(old, (tuple, list)) else value
    if old == value:
        return None
    setattr(module, name, value)
    return AttributeChange(path, name, old, value)


def _private_config(config):
    return copy.copy(config)


def _module_widths(module: nn.Module, path: str) -> dict:
    for test, rule in LEAF_RULES:
        if test(module):
            return rule(module)
    for test, rule in COMPOSITE_RULES:
        if test(module):
            return rule(module, path)
    return {}


def update_attributes(model: nn.Module, old_hidden: int | None = None) -> list[AttributeChange]:
    """Set every width attribute of ``model``'s modules from its (already shrunk) tensors; children first,
    so composite modules read their children's new sizes. Runs after :func:`update_config`, so a module
    that reads the shared config gets a private one only where its width differs from the config's.
    ``old_hidden``: the residual width before pruning. Returns what changed."""
    root_config = getattr(model, "config", None)
    changes = _update_hidden(model, old_hidden)
    for path, module in reversed(list(model.named_modules())):
        for name, value in _module_widths(module, path).items():
            change = _set_attribute(module, path, name, value, root_config)
            if change is not None:
                changes.append(change)
    return changes[::-1]  # forward order: outer modules and earlier layers first


# ---------------------------------------------------------------------------- Hugging Face config


def _update_hidden(model: nn.Module, old: int | None) -> list[AttributeChange]:
    """A pruned residual stream: every ``hidden_size``/``embed_dim`` attribute that held the old hidden size
    (decoder layers, GPT-2's model) holds the embeddings' new width."""
    config, new = getattr(model, "config", None), _hidden_size(model)
    if new is None or old is None or old == new:
        return []
    changes = []
    for path, module in model.named_modules():
        for name in ("hidden_size", "embed_dim"):
            if getattr(module, name, None) == old and isinstance(old, int):
                changes.append(_set_attribute(module, path, name, new, config))
    return [c for c in changes if c is not None]


def _hidden_size(model: nn.Module) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _per_layer_facts(model: nn.Module) -> Iterator[tuple[str, int]]:
    """``(config field, value)`` for every layer: head counts, FFN widths, ``head_dim``."""
    for path, m in model.named_modules():
        if _has("q_proj", "k_proj", attr="head_dim")(m) or _has("qkv_proj", "o_proj", attr="head_dim")(m):
            facts = (_q_k_v_attention if hasattr(m, "q_proj") else _qkv_attention)(m, path)
            yield "num_attention_heads", facts.get("num_heads", facts.get("config.num_attention_heads"))
            yield "num_key_value_heads", facts["num_key_value_heads"]
            yield "head_dim", m.head_dim
        elif _has("query", "key", attr="attention_head_size")(m):
            yield "num_attention_heads", _bert_attention(m, path)["num_attention_heads"]
        elif _has("c_attn", "c_proj", attr="split_size")(m):
            yield "num_attention_heads", _gpt2_attention(m, path)["num_heads"]
        yield from _ffn_facts(m)


def _ffn_facts(m: nn.Module) -> Iterator[tuple[str, int]]:
    """FFN widths from the tensors (attributes are updated after the config)."""
    if _has("down_proj")(m) and isinstance(m.down_proj, nn.Linear):
        yield "intermediate_size", m.down_proj.weight.shape[1]
    elif type(m).__name__.endswith("Intermediate") and isinstance(getattr(m, "dense", None), nn.Linear):
        yield "intermediate_size", m.dense.weight.shape[0]  # BERT
    elif _has("fc1", "fc2")(m) and isinstance(m.fc2, nn.Linear) and type(m).__module__.startswith("transformers"):
        yield "intermediate_size", m.fc2.weight.shape[1]  # ViT
    elif _has("c_fc", "c_proj")(m) and _is_hf_conv1d(m.c_fc):
        yield "n_inner", m.c_fc.weight.shape[1]  # GPT-2


def update_config(model: nn.Module) -> list[AttributeChange]:
    """Set the config fields whose value is the same in every layer (and ``hidden_size``); per-layer values
    leave the field as it was (:func:`_record_widths` records them)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    values: dict[str, set[int]] = {}
    for field, value in _per_layer_facts(model):
        values.setdefault(field, set()).add(int(value))
    hidden = _hidden_size(model)
    if hidden is not None:
        values["hidden_size"] = {hidden}
    changes = []
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "n_inner",
                  "head_dim"):
        found = values.get(field, set())
        if len(found) != 1 or not (field == "head_dim" or hasattr(config, field)):
            continue
        old, (new,) = getattr(config, field, None), found
        if old != new and (field != "head_dim" or _head_dim_needed(config, new)):
            setattr(config, field, new)
            changes.append(AttributeChange("config", field, old, new))
    return changes


def _head_dim_needed(config, head_dim: int) -> bool:
    """Llama-style configs derive ``head_dim`` as ``hidden_size // num_attention_heads`` unless told; tell them
    whenever pruning made that wrong."""
    if getattr(config, "head_dim", None) is not None:
        return True
    return config.hidden_size // config.num_attention_heads != head_dim


# ---------------------------------------------------------------------------- widths the config cannot say


def _tracked(module: nn.Module, root_config) -> dict:
    """The module's width attributes, and the fields of a private config it was given (see ``CONFIG_READS``)."""
    found = {name: getattr(module, name) for name in TRACKED
             if hasattr(module, name) and name not in module._parameters and name not in module._buffers}
    config = getattr(module, "config", None)
    if config is not None and config is not root_config and hasattr(config, "to_dict"):
        found |= {f"config.{f}": getattr(config, f) for f in CONFIG_READS if hasattr(config, f)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in found.items() if isinstance(v, (int, float, tuple))}


def _fresh_build(model: nn.Module, config=None) -> nn.Module | None:
    """``type(model)(config)`` (``model``'s own config, recorded widths left out, by default) on the meta
    device (no memory, no init cost); None if the class will not."""
    config = _without_widths(model.config) if config is None else config
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return type(model)(config)
    except Exception:  # noqa: BLE001 - a class that does not build from its config alone: record everything
        return None


def _without_widths(config):
    config = copy.deepcopy(config)
    config.__dict__.pop(WIDTHS_KEY, None)
    return config


def _shapes(module: nn.Module) -> dict[str, tuple]:
    return {n: tuple(t.shape) for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]}


def _record_widths(model: nn.Module) -> dict[str, dict]:
    """``{path: tracked attributes}`` of every module a fresh build from the config gets wrong; stored in the
    config (:data:`WIDTHS_KEY`) when not empty, so that :func:`from_pretrained` can rebuild the model."""
    fresh = _fresh_build(model)
    fresh_modules = dict(fresh.named_modules()) if fresh is not None else {}
    widths = {}
    for path, module in model.named_modules():
        other = fresh_modules.get(path)
        mine = _tracked(module, model.config)
        same = other is not None and mine == _tracked(other, fresh.config) and _shapes(module) == _shapes(other)
        if mine and not same:
            widths[path] = mine
    return widths


def _store_widths(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    config.__dict__.pop(WIDTHS_KEY, None)
    widths = _record_widths(model)
    if widths:
        setattr(config, WIDTHS_KEY, json.loads(json.dumps(widths)))


def apply_widths(model: nn.Module, widths: dict[str, dict]) -> None:
    """Set recorded attributes (see :data:`WIDTHS_KEY`) on ``model``'s modules; a path the model lacks is an error."""
    root_config = getattr(model, "config", None)
    for path, attributes in widths.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ConfigError(
                f"{WIDTHS_KEY} names module {path!r}, which {type(model).__name__} does not have: the config "
                "belongs to another model class; pass model_class= the class that was saved"
            ) from None
        for name, value in attributes.items():
            _set_attribute(module, path, name, value, root_config)


# ---------------------------------------------------------------------------- verification


def _first_mismatch(reference, outputs, rtol: float) -> str | None:
    """The first output leaf of the graph (in output order) that the module does not reproduce, in words.
    Extra module outputs (a key/value cache the graph was captured without) are not compared."""
    got = output_leaves(outputs)
    for name, expected in output_leaves(reference).items():
        actual = got.get(name)
        if actual is None or actual.shape != expected.shape:
            shape = None if actual is None else tuple(actual.shape)
            return f"output {name}: shape {shape} where the graph gives {tuple(expected.shape)}"
        error = leaf_error(name, expected, actual)
        if error.error > rtol:
            return (f"output {name} at {error.index}: {error.got:.6g} where the graph gives {error.expected:.6g} "
                    f"(error {error.error:.3g} > rtol {rtol:g})")
    return None


def _likely(changes: list[AttributeChange]) -> str:
    derived = [c for c in changes if c.name not in SHAPE_ATTRIBUTES]
    shown = derived or changes
    if not shown:
        return "no attribute was changed: a width the model's code computes itself (a constant in forward)"
    more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
    return ", ".join(str(c) for c in shown[:3]) + more


def verify_write_back(module: nn.Module, shrunk: fx.GraphModule, example_inputs: tuple | None = None,
                      rtol: float = 1e-4, changes: list[AttributeChange] = ()) -> None:
    """Run ``module`` and ``shrunk`` on the compile's example inputs; every output leaf of the graph must agree
    within ``rtol`` (``fxcompress.verify``'s measure). :class:`VerificationError` names the first differing
    output and the attributes most likely at fault.

    A Hugging Face model is run under its own attention implementation and under ``"eager"`` too: SDPA
    with grouped-query support never reads ``num_key_value_groups`` on a prompt, while eager attention
    (and SDPA at one token per step, during ``generate``) repeats the KV heads by it.
    """
    inputs = example_inputs if example_inputs is not None else shrunk.meta.get(EXAMPLE_INPUTS)
    if inputs is None:
        raise ConfigError("write_back needs the example inputs: pass example_inputs= (the graph holds none)")
    reference = forward(shrunk, inputs)
    for implementation in _implementations(module):
        with _attention(module, implementation):
            _check_once(module, reference, inputs, rtol, list(changes), implementation)


def _check_once(module, reference, inputs, rtol, changes, implementation) -> None:
    kind = type(module).__name__ + (f" (attention {implementation!r})" if implementation else "")
    try:
        outputs = forward(module, inputs)
    except Exception as exc:  # any failure of the written-back model is a failed verification
        raise VerificationError(
            f"the written-back {kind} fails on the example inputs ({type(exc).__name__}: {str(exc)[:300]}); "
            f"likely attribute: {_likely(changes)}"
        ) from exc
    mismatch = _first_mismatch(reference, outputs, rtol)
    if mismatch is not None:
        raise VerificationError(
            f"the written-back {kind} does not compute what the shrunk graph does: {mismatch}; "
            f"likely attribute: {_likely(changes)}. Use output='graph' and report the model."
        )


def _implementations(module: nn.Module) -> list[str | None]:
    config = getattr(module, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current is None or not hasattr(module, "set_attn_implementation") or current == "eager":
        return [None]
    return [None, "eager"]


@contextlib.contextmanager
def _attention(module: nn.Module, implementation: str | None):
    """The model's attention implementation switched for the duration (``None``: as it is)."""
    if implementation is None:
        yield
        return
    before = module.config._attn_implementation
    module.set_attn_implementation(implementation)
    try:
        yield
    finally:
        module.set_attn_implementation(before)


# ---------------------------------------------------------------------------- the driver


def write_back(model: nn.Module, shrunk: fx.GraphModule, *, example_inputs: tuple | None = None,
               rtol: float = 1e-4, verify: bool = True) -> nn.Module:
    """A copy of ``model`` (its class, methods, config) holding ``shrunk``'s tensors at their new widths.

    ``shrunk`` is what ``fxcompress.compile(model, ...)`` returned. Tensors
    are matched by fully qualified name; tied ones stay tied; ones the graph
    never read keep their values. Layer attributes, attention head counts and
    the Hugging Face config are updated (see the module docstring), per-layer
    widths recorded under ``config.fxcompress_layer_widths``. With ``verify``
    the copy must reproduce ``shrunk`` on the example inputs (the compile's,
    or ``example_inputs``) to within ``rtol``, else
    :class:`~fxcompress.errors.VerificationError`. ``model`` is not modified.
    """
    if not isinstance(shrunk, fx.GraphModule):
        raise ConfigError(f"write_back takes the GraphModule compile returned, got {type(shrunk).__name__}")
    mine = copy_model(model)
    biased = _add_biases(mine, shrunk)
    unread = assign_tensors(mine, _shrunk_values(mine, shrunk))
    old_hidden = getattr(getattr(mine, "config", None), "hidden_size", None)
    config_changes = update_config(mine)
    changes = update_attributes(mine, old_hidden) + config_changes + update_bias_config(mine, biased)
    _store_widths(mine)
    _warn_unread(mine, unread, changes)
    _warn_invalid_config(mine)
    if verify:
        verify_write_back(mine, shrunk, example_inputs, rtol, changes)
    return mine


def _warn_invalid_config(model: nn.Module) -> None:
    """A config its own class's checks refuse (transformers validates on ``save_pretrained`` and
    ``from_pretrained``, e.g. a hidden size the attention heads do not divide even where ``head_dim`` is
    explicit): the model runs, but will not save; say so now, and how to prune instead."""
    config = getattr(model, "config", None)
    if not callable(getattr(config, "validate", None)):
        return
    try:
        config.validate()
    except Exception as error:  # noqa: BLE001 - the config class's own check, reported in words
        cause = error.__cause__ or error
        heads = getattr(config, "num_attention_heads", None)
        steps = f" (round_to={heads} on the pruner)" if isinstance(heads, int) else ""
        warnings.warn(
            f"{type(model).__name__}: the written-back {type(config).__name__} fails its own checks, so "
            f"save_pretrained will refuse it: {cause}. Prune in steps it accepts{steps}, or exclude that width "
            "from pruning", stacklevel=3,
        )


def _warn_unread(model: nn.Module, unread: list[str], changes: list[AttributeChange]) -> None:
    """Tensors the graph never read keep their widths; say so when their module's widths changed."""
    changed = {c.path for c in changes}
    unread = [n for n in unread if n.rpartition(".")[0] in changed]
    if unread:
        warnings.warn(
            f"{type(model).__name__}: {len(unread)} tensor(s) the compiled graph never read keep their original "
            f"widths ({', '.join(unread[:4])}{'...' if len(unread) > 4 else ''}); code paths that use them "
            "(other inputs, training mode) may fail on the written-back model",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------- loading


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        raise ConfigError(f"{path}: no model.safetensors(.index.json); save with save_pretrained(safe_serialization)")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
        state |= load_file(os.path.join(path, shard))
    return state


def from_pretrained(path: str | os.PathLike, model_class: type | None = None, **kwargs) -> nn.Module:
    """Load a written-back Hugging Face model saved with ``save_pretrained``, per-layer widths included.

    Without :data:`WIDTHS_KEY` in the config this is ``model_class.from_pretrained(path, **kwargs)``. With it,
    the model is built from the config, each recorded module gets its widths, and the checkpoint's tensors
    (at their saved shapes) are loaded; ``dtype=`` and ``device=`` are the options then. ``model_class``
    defaults to the config's first ``architectures`` entry.

    >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
    >>> small = fxcompress.compile(model, {"input_ids": ids}, passes, output="module")  # doctest: +SKIP
    >>> small.save_pretrained("out"); again = from_pretrained("out")  # doctest: +SKIP
    """
    import transformers

    path = os.fspath(path)
    config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise ConfigError(f"{path}: config.architectures names no transformers class; pass model_class=")
    widths = getattr(config, WIDTHS_KEY, None)
    if not widths:
        return model_class.from_pretrained(path, **kwargs)
    unknown = set(kwargs) - {"dtype", "device"}
    if unknown:
        raise ConfigError(f"from_pretrained with {WIDTHS_KEY} takes dtype= and device= only, not {sorted(unknown)}")
    return _rebuild(model_class, config, widths, _read_checkpoint(path), **kwargs)


def _rebuild(model_class: type, config, widths: dict, state: dict, dtype=None, device=None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class(config)
    missing = assign_tensors(model, state)
    persistent = set(model.state_dict())
    lost = [n for n in missing if n in persistent]
    if lost:
        raise ConfigError(f"the checkpoint has no value for {lost[:4]}: it was not saved from this model class")
    apply_widths(model, widths)
    model.to(device=device, dtype=dtype)
    return model.eval()
