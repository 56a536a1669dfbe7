"""Read NNI-style ``config_list`` dictionaries into typed fxcompress pruners.

Users migrating from NNI can paste their configs; the typed pruners remain
the core representation (this is only an adapter on top of them).

>>> from_config_list([{"op_types": ["Conv2d"], "sparse_ratio": 0.5},
...                   {"op_names": ["fc2"], "exclude": True}], criterion="l1")
L1Norm(sparsity=0.5, op_types=(<class 'torch.nn.modules.conv.Conv2d'>,), op_names=(), exclude=('fc2',), ...)

Keys understood, per entry: ``op_types`` (class names of ``torch.nn``
modules such as ``"Conv2d"``), ``op_names``, ``exclude_op_names``,
``sparse_ratio`` / ``sparsity_per_layer`` / ``sparsity`` (per layer),
``total_sparsity`` (global allocation), ``max_sparse_ratio`` /
``max_sparsity_per_layer``, ``granularity`` (``"out_channel"`` /
``"channel"`` for structured pruning with ``criterion``, ``"default"`` /
``"fine-grained"`` for level pruning, ``"N:M"`` such as ``"2:4"``), and
``exclude: True`` to exclude the named layers from every other entry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from fxcompress.errors import ConfigError
from fxcompress.prune.base import PRUNERS, ChannelPruner, Combined, Pruner
from fxcompress.prune.unstructured import LevelPruner, NMPruner

__all__ = ["from_config_list", "KNOWN_KEYS"]

_RATIO_KEYS = ("sparse_ratio", "sparsity_per_layer", "sparsity")
_MAX_KEYS = ("max_sparse_ratio", "max_sparsity_per_layer")
KNOWN_KEYS = frozenset(
    {"op_types", "op_names", "exclude_op_names", "total_sparsity", "granularity", "exclude", *_RATIO_KEYS, *_MAX_KEYS}
)
_STRUCTURED = {"out_channel", "channel", "structured"}
_FINE = {"default", "fine-grained", "fine_grained", "element"}


def _op_types(names: Sequence[str], index: int) -> tuple[type[nn.Module], ...]:
    types = []
    for name in names:
        cls = getattr(nn, name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"config_list[{index}]: op_types entry {name!r} is not a torch.nn module class")
        types.append(cls)
    return tuple(types)


def _first(entry: Mapping, keys: Sequence[str]):
    found = [k for k in keys if k in entry]
    if len(found) > 1:
        raise ConfigError(f"config_list entry sets {' and '.join(found)}: give only one of them")
    return entry[found[0]] if found else None


def _selection(entry: Mapping, index: int, excluded: tuple[str, ...]) -> dict:
    selection = {"exclude": tuple(entry.get("exclude_op_names", ())) + excluded}
    if "op_types" in entry:
        selection["op_types"] = _op_types(entry["op_types"], index)
    if "op_names" in entry:
        selection["op_names"] = tuple(entry["op_names"])
    return selection


def _sparsity(entry: Mapping, index: int) -> tuple[float, bool]:
    """(sparsity, whether it is a global total) of one entry."""
    per_layer, total = _first(entry, _RATIO_KEYS), entry.get("total_sparsity")
    if (per_layer is None) == (total is None):
        raise ConfigError(f"config_list[{index}] needs exactly one of sparse_ratio (per layer) or total_sparsity")
    return (float(total), True) if total is not None else (float(per_layer), False)


def _entry_pruner(entry: Mapping, index: int, criterion: type, extra: dict, excluded: tuple[str, ...]) -> Pruner:
    unknown = sorted(set(entry) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"config_list[{index}] has unknown keys {unknown}; known keys: {sorted(KNOWN_KEYS)}")
    sparsity, is_total = _sparsity(entry, index)
    options = {"sparsity": sparsity, **_selection(entry, index, excluded)}
    limit = _first(entry, _MAX_KEYS)
    granularity = str(entry.get("granularity", "out_channel" if issubclass(criterion, ChannelPruner) else "default"))
    nm = re.fullmatch(r"(\d+):(\d+)", granularity)
    if nm:
        options.pop("sparsity")
        return NMPruner(n=int(nm.group(1)), m=int(nm.group(2)), **options)
    if granularity not in _STRUCTURED | _FINE:
        raise ConfigError(f"config_list[{index}]: granularity {granularity!r} is not one of "
                          f"{sorted(_STRUCTURED | _FINE)} or 'N:M'")
    options["allocation"] = "global" if is_total else "local"
    if limit is not None:
        options["max_sparsity_per_layer"] = float(limit)
    if granularity in _FINE:
        return LevelPruner(**options)
    return criterion(**options, **extra)


def from_config_list(config_list: Sequence[Mapping], criterion: str | type = "l1", **criterion_options) -> Pruner:
    """Build the pruner an NNI ``config_list`` describes (see the module docstring for the keys).

    ``criterion`` names the structured criterion (``"l1"``, ``"fpgm"``,
    ``"taylor"``...) or is its class; ``criterion_options`` (e.g. an
    ``evaluator``) go to every structured pruner built.
    """
    if isinstance(config_list, Mapping) or not isinstance(config_list, Sequence):
        raise ConfigError("config_list must be a list of dictionaries")
    cls = PRUNERS.get(criterion) if isinstance(criterion, str) else criterion
    if cls is None:
        raise ConfigError(f"unknown criterion {criterion!r}; known: {', '.join(sorted(PRUNERS))}")
    excluded = tuple(n for e in config_list if e.get("exclude") for n in e.get("op_names", ()))
    entries = [(i, e) for i, e in enumerate(config_list) if not e.get("exclude")]
    if not entries:
        raise ConfigError("config_list has no entry that prunes anything (every entry has exclude: True)")
    pruners = tuple(_entry_pruner(e, i, cls, criterion_options, excluded) for i, e in entries)
    return pruners[0] if len(pruners) == 1 else Combined(pruners)

