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

``pack=True`` packs each quantized layer into its int8/int4 kernel module
(what ``pack-weights`` does after the pass) as soon as the engine is done with
it, so the dense quantized weights never all exist at once: a 1.1B-parameter
model then compresses in about the memory of the model itself
(``tools/gptq_scale.py``). Layers no kernel takes stay in float, named in one
warning.

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
from fxcompress.passes.pack_weights import LayerPacker

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
    pack: bool = False

    name: ClassVar[str] = "one-shot"
    preserves_outputs: ClassVar[bool] = False

    @property
    def keeps_analysis(self) -> bool:
        """Masks and new values keep the channel analysis; swapping layers for packed modules does not."""
        return not self.pack

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
        pack = options.pop("pack", False)
        if name is None:
            raise ConfigError("one-shot needs an algorithm option, e.g. one-shot{algorithm=wanda,sparsity=0.5}")
        return cls(make_algorithm(str(name), **options), progress=progress, pack=pack)

    def text_options(self) -> dict:
        """``algorithm=<key>`` and the algorithm's changed options; calibration data has no text form."""
        if len(self.data):
            raise ConfigError(f"pass 'one-shot': its calibration data ({len(self.data)} batches) has no text form; "
                              "build this pass in Python")
        key = getattr(type(self.algorithm), "key", None)
        if ALGORITHMS.get(key) is not type(self.algorithm):
            raise ConfigError(f"pass 'one-shot': the algorithm {type(self.algorithm).__name__} has no text name")
        flags = ({} if self.progress else {"progress": False}) | ({"pack": True} if self.pack else {})
        return {"algorithm": key, **changed_fields(self.algorithm), **flags}

    def run(self, gm: fx.GraphModule) -> bool:
        data = self.data
        if not len(data):
            warnings.warn("one-shot: no calibration data given; calibrating on the example inputs only "
                          "(pass data=[...] with a few hundred real sequences)", stacklevel=4)
            data = (gm.meta[meta.EXAMPLE_INPUTS],)
        if not self.pack:
            return compress_layers(gm, data, self.algorithm, progress=self.progress)
        packer = LayerPacker(gm)
        changed = compress_layers(gm, data, self.algorithm, progress=self.progress, after=packer)
        return packer.finish(stacklevel=5) or changed
