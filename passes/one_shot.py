"""OneShot: compress every selected linear layer from calibration data, one layer after another.

The pass runs a one-shot algorithm of :mod:`fxcompress.oneshot` (``Wanda``,
``SparseGPT``, ``MagnitudeSparsity``, ``GPTQ``, ``AWQ``, ``RTN``) through the
layer-sequential engine: each layer is compressed from the inputs that the
already-compressed layers before it produce on ``data``. ``data`` is a
sequence of batches, as :class:`~fxcompress.passes.Calibrate` takes it: one
tensor (for a one-input model) or a tuple of ``forward`` arguments per batch,
or a dict of keyword arguments (a tokenizer's output).
Sparsity installs masks; quantization writes dequantized weights and records
their grids under :data:`fxcompress.meta.WEIGHT_GRIDS`. The graph itself does
not change, and a second run finds nothing left to do.

>>> import torch, fxcompress
>>> from torch import nn
>>> from fxcompress.oneshot import Wanda
>>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
>>> data = [torch.randn(4, 8) for _ in range(2)]
>>> sparse = fxcompress.compile(model, data[0], [OneShot(Wanda(n=2, m=4), data, progress=False)])
>>> (sparse.get_submodule("2").weight.reshape(-1, 4) != 0).sum(1).tolist() == [2] * 16
True
>>> OneShot(Wanda(n=2, m=4)).to_text()
'one-shot{algorithm=wanda,n=2,m=4}'
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import fx

from fxcompress import meta
from fxcompress.errors import ConfigError
from fxcompress.oneshot import ALGORITHMS, OneShotAlgorithm, compress_layers, make_algorithm
from fxcompress.pipeline import Pass, changed_fields, register_pass

__all__ = ["OneShot"]


@register_pass
@dataclasses.dataclass(frozen=True)
class OneShot(Pass):
    """Compress the layers ``algorithm`` selects, in graph order, each from its input on ``data``.

    Without ``data`` (a pipeline written as text) it calibrates on the compile's
    example inputs, with a warning: a few hundred real sequences serve far better.
    """

    algorithm: OneShotAlgorithm
    data: Sequence = ()
    progress: bool = True

    name: ClassVar[str] = "one-shot"
    preserves_outputs: ClassVar[bool] = False
    keeps_analysis: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.algorithm, OneShotAlgorithm):
            raise ConfigError(f"OneShot needs a one-shot algorithm (fxcompress.oneshot: {', '.join(sorted(ALGORITHMS))}"
                              f"), got {type(self.algorithm).__name__}")
        if isinstance(self.data, (torch.Tensor, dict, str)):
            raise ConfigError("OneShot takes data as a sequence of batches, e.g. tuple(tokens.split(8))")

    @classmethod
    def from_options(cls, options: dict) -> OneShot:
        """``one-shot{algorithm=sparsegpt,sparsity=0.5}`` in a textual pipeline."""
        options = dict(options)
        name = options.pop("algorithm", None)
        progress = options.pop("progress", True)
        if name is None:
            raise ConfigError("one-shot needs an algorithm option, e.g. one-shot{algorithm=wanda,sparsity=0.5}")
        return cls(make_algorithm(str(name), **options), progress=progress)

    def text_options(self) -> dict:
        """``algorithm=<key>`` and the algorithm's changed options; calibration data has no text form."""
        if len(self.data):
            raise ConfigError(f"pass 'one-shot': its calibration data ({len(self.data)} batches) has no text form; "
                              "build this pass in Python")
        key = getattr(type(self.algorithm), "key", None)
        if ALGORITHMS.get(key) is not type(self.algorithm):
            raise ConfigError(f"pass 'one-shot': the algorithm {type(self.algorithm).__name__} has no text name")
        progress = {} if self.progress else {"progress": False}
        return {"algorithm": key, **changed_fields(self.algorithm), **progress}

    def run(self, gm: fx.GraphModule) -> bool:
        data = self.data
        if not len(data):
            warnings.warn("one-shot: no calibration data given; calibrating on the example inputs only "
                          "(pass data=[...] with a few hundred real sequences)", stacklevel=4)
            data = (gm.meta[meta.EXAMPLE_INPUTS],)
        return compress_layers(gm, data, self.algorithm, progress=self.progress)
