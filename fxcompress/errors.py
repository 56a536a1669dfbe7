"""Errors fxcompress raises. Each message names the construct at fault and what to do."""

__all__ = [
    "FxCompressError", "TraceError", "ConfigError", "PipelineError", "VerificationError", "LowCoverageError",
    "coerce_enum", "build_registered",
]


class FxCompressError(Exception):
    """Base class of every error fxcompress raises on purpose."""


class TraceError(FxCompressError):
    """The model could not be turned into a graph (tracing or shape propagation failed)."""


class ConfigError(FxCompressError, ValueError):
    """A pruner, quantizer or pass was given an option it does not accept."""


class PipelineError(FxCompressError):
    """Passes were given in an order that breaks one of their requirements."""


class VerificationError(FxCompressError):
    """A pass that must preserve the model's outputs did not."""


class LowCoverageError(FxCompressError):
    """``compile(..., strict=True)``: the pruning removed less than half of what its pruner asked for.

    The message names the ops that froze the channels (see
    :class:`fxcompress.analysis.LowCoverageWarning`, the non-strict form).
    """


def coerce_enum(owner: object, field: str, enum_cls: type, what: str | None = None) -> None:
    """Let a frozen config dataclass accept its enum option as a string (``allocation="global"``).

    An unknown string becomes a ``ConfigError`` that lists the choices.
    """
    value = getattr(owner, field)
    if not isinstance(value, str):
        return
    try:
        object.__setattr__(owner, field, enum_cls(value))
    except ValueError:
        known = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"{type(owner).__name__}: unknown {what or field} {value!r}; choose one of {known}") from None


def build_registered(registry: dict, key: str, what: str, options: dict):
    """Build the config dataclass ``registry`` lists under ``key`` (a pruner, a one-shot algorithm) from
    text options, naming an unknown key or option and the known ones."""
    import dataclasses

    cls = registry.get(key)
    if cls is None:
        raise ConfigError(f"unknown {what} {key!r}; known: {', '.join(sorted(registry))}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"{what} {key!r} has no option {', '.join(unknown)}; options: {', '.join(sorted(fields))}")
    return cls(**options)
