"""Typed configuration of what gets quantized and how.

A :class:`QuantSpec` says how one kind of tensor is quantized (grid,
observer, algorithm); a :class:`QConfig` says which tensors get which spec:
weights of the selected layers, and activations at the inputs and outputs of
the quantized ops (chosen by module type and module path glob).

>>> cfg = QConfig.int8()
>>> cfg.weight.scheme.per_channel, cfg.activation.scheme.dtype
(True, torch.uint8)
>>> QConfig.int8(weight_bits=4, algorithm=LSQ).weight.scheme.qmax
7
"""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from fxcompress.errors import ConfigError
from fxcompress.selection import layer_selected, normalize_selection
from fxcompress.quant.observers import HistogramMSEObserver, MinMaxObserver, Observer
from fxcompress.quant.quantizers import LSQ, BNN, DoReFa, STEQuantizer, LSQPlus, Quantizer
from fxcompress.quant.scheme import INT8_WEIGHT, UINT8_ACTIVATION, QScheme

__all__ = ["QuantSpec", "QConfig", "WEIGHTED_TYPES", "ALGORITHMS"]

#: Layers whose weight is quantized, with the weight's output-channel axis.
WEIGHTED_TYPES: dict[type[nn.Module], int] = {
    nn.Conv1d: 0,
    nn.Conv2d: 0,
    nn.Conv3d: 0,
    nn.Linear: 0,
}

#: Algorithms by short name (for text pipelines and benchmark tables).
ALGORITHMS: dict[str, type[Quantizer]] = {
    "fake": STEQuantizer,
    "lsq": LSQ,
    "lsq+": LSQPlus,
    "dorefa": DoReFa,
    "bnn": BNN,
}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: its grid, its observer (a prototype, copied per tensor) and its algorithm."""

    scheme: QScheme
    observer: Observer = dataclasses.field(default_factory=MinMaxObserver)
    algorithm: type[Quantizer] = STEQuantizer

    def __post_init__(self) -> None:
        if not (isinstance(self.algorithm, type) and issubclass(self.algorithm, Quantizer)):
            raise ConfigError(f"QuantSpec.algorithm must be a Quantizer subclass, got {self.algorithm!r}")

    def build(self, ch_axis: int | None = None) -> Quantizer:
        """A fresh quantizer for one tensor (per-channel schemes take the tensor's channel axis)."""
        scheme = self.scheme
        if scheme.per_channel and ch_axis is not None:
            scheme = dataclasses.replace(scheme, ch_axis=ch_axis)
        return self.algorithm(scheme, copy.deepcopy(self.observer))


@dataclasses.dataclass(frozen=True)
class QConfig:
    """Which tensors are quantized.

    ``weight``: spec of the weights of layers in :data:`WEIGHTED_TYPES` that
    pass the selection (``op_types``, ``op_names`` globs, ``exclude`` globs);
    ``None`` leaves weights in float. ``activation``: spec of the activations
    entering and leaving quantized ops; ``None`` quantizes weights only.
    ``functional``: also quantize the activations around ``+``, ``matmul``,
    pooling and ``cat`` (what ONNX Runtime needs to keep whole blocks in int8).
    ``functional=False`` quantizes only the weighted layers' inputs and
    outputs: the placement ``torch.compile`` runs fastest after
    ``FoldQDQ(form="pt2e")`` (Inductor's int8 convs and linears take float
    post-ops, and attention's matmuls stay in float, as torchao's
    ``X86InductorQuantizer`` leaves them; ``tools/bench_deploy.py``).
    """

    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    op_types: tuple[type[nn.Module], ...] = tuple(WEIGHTED_TYPES)
    op_names: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    functional: bool = True

    def __post_init__(self) -> None:
        normalize_selection(self)
        unsupported = [t.__name__ for t in self.op_types if t not in WEIGHTED_TYPES]
        if unsupported:
            raise ConfigError(
                f"QConfig.op_types: cannot quantize weights of {unsupported}; supported: "
                f"{[t.__name__ for t in WEIGHTED_TYPES]}"
            )

    def selects(self, path: str, module: nn.Module) -> bool:
        """Whether the layer at ``path`` passes the selection (:func:`fxcompress.selection.layer_selected`)."""
        return layer_selected(path, module, self.op_types, self.op_names, self.exclude)

    @classmethod
    def int8(
        cls,
        weight_bits: int = 8,
        algorithm: type[Quantizer] = STEQuantizer,
        activation_observer: Observer | None = None,
        **selection,
    ) -> QConfig:
        """The ONNX Runtime-friendly default: per-channel symmetric int weights, per-tensor affine uint8 activations.

        ``algorithm`` applies to weights and activations alike, except that
        DoReFa and BNN (weight algorithms) leave activations to ``STEQuantizer``.
        """
        weight_scheme = dataclasses.replace(INT8_WEIGHT, bits=weight_bits)
        act_algorithm = algorithm if algorithm in (STEQuantizer, LSQ, LSQPlus) else STEQuantizer
        return cls(
            weight=QuantSpec(weight_scheme, MinMaxObserver(), algorithm),
            activation=QuantSpec(UINT8_ACTIVATION, activation_observer or HistogramMSEObserver(), act_algorithm),
            **selection,
        )
