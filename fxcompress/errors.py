"""Errors fxcompress raises. Each message names the construct at fault and what to do."""

__all__ = ["FxCompressError", "TraceError", "ConfigError", "PipelineError", "VerificationError"]


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
