"""Which layers a pruner or a quantizer applies to: one rule for both.

Pruners (``L1Norm(op_types=..., op_names=..., exclude=...)``) and
:class:`~fxcompress.quant.config.QConfig` take the same three selection
fields, normalised by :func:`normalize_selection` and matched by
:func:`layer_selected`: a layer is chosen when its class (before any
parametrization) is one of ``op_types`` or a subclass, its fully qualified
name matches one of the ``op_names`` globs (all names when empty) and none of
the ``exclude`` globs.
"""

from __future__ import annotations

import fnmatch

from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from fxcompress.errors import ConfigError

__all__ = ["layer_selected", "normalize_selection"]


def layer_selected(
    owner: str,
    module: nn.Module | type[nn.Module],
    op_types: tuple[type[nn.Module], ...],
    op_names: tuple[str, ...],
    exclude: tuple[str, ...],
) -> bool:
    """Whether layer ``owner`` passes a selection by type, name globs and exclusion globs.

    >>> layer_selected("fc", nn.Linear(2, 2), (nn.Linear,), (), ("fc*",))
    False
    """
    cls = module if isinstance(module, type) else type_before_parametrizations(module)
    if not issubclass(cls, op_types):
        return False
    if op_names and not any(fnmatch.fnmatchcase(owner, p) for p in op_names):
        return False
    return not any(fnmatch.fnmatchcase(owner, p) for p in exclude)


def normalize_selection(owner: object) -> None:
    """Accept a single string for ``op_names``/``exclude`` and check ``op_types`` (pruners and ``QConfig`` alike)."""
    for field in ("op_names", "exclude"):
        value = getattr(owner, field)
        if isinstance(value, str):
            object.__setattr__(owner, field, (value,))
        elif isinstance(value, list):
            object.__setattr__(owner, field, tuple(value))
    if isinstance(owner.op_types, type):  # L1Norm(op_types=nn.Conv2d)
        object.__setattr__(owner, "op_types", (owner.op_types,))
    if isinstance(owner.op_types, list):
        object.__setattr__(owner, "op_types", tuple(owner.op_types))
    bad = [t for t in owner.op_types if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad:
        raise ConfigError(f"{type(owner).__name__}: op_types must be nn.Module classes, got {bad}")
