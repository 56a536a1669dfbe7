"""The compiler passes, one per file. Each is also reachable by its kebab-case name in text pipelines."""

from fxcompress.passes.analyze_groups import AnalyzeGroups
from fxcompress.passes.calibrate import Calibrate
from fxcompress.passes.compensate_bias import CompensateBias
from fxcompress.passes.channels_last import ChannelsLast
from fxcompress.passes.fake_quantize import FakeQuantize
from fxcompress.passes.fold_batch_norm import FoldBatchNorm
from fxcompress.passes.fold_qdq import FoldQDQ
from fxcompress.passes.fuse_conv_activation import FuseConvActivation
from fxcompress.passes.insert_masks import InsertMasks
from fxcompress.passes.insert_observers import InsertObservers
from fxcompress.passes.one_shot import OneShot
from fxcompress.passes.pack_weights import PackWeights
from fxcompress.passes.quantize_activations import QuantizeActivations, w8a8_passes
from fxcompress.passes.smooth_activations import SmoothActivations
from fxcompress.passes.propagate_channels import PropagateChannels
from fxcompress.passes.shrink import Shrink

__all__ = [
    "InsertMasks",
    "AnalyzeGroups",
    "PropagateChannels",
    "CompensateBias",
    "Shrink",
    "FoldBatchNorm",
    "FuseConvActivation",
    "ChannelsLast",
    "InsertObservers",
    "Calibrate",
    "FakeQuantize",
    "FoldQDQ",
    "OneShot",
    "PackWeights",
    "SmoothActivations",
    "QuantizeActivations",
    "w8a8_passes",
    "standard_pruning",
    "standard_ptq",
    "inference_passes",
]


def standard_pruning(pruner, target=None, compensate: bool = False) -> list:
    """The standard structured-pruning pipeline: mask (analysing the graph), propagate, shrink.

    ``compensate=True`` adds :class:`CompensateBias` after the masks: removed
    channels' mean contributions go into the biases of the layers that read
    them (FLAP), from the statistics a data-aware criterion measured
    (``Fluctuation``, ``ActivationNorm``).

    ``target="macs=2"`` (or ``"params=2"``, or a :class:`fxcompress.prune.Budget`)
    replaces the channel criterion's sparsity by a search that makes the
    model that many times smaller (see :class:`fxcompress.prune.Targeted`):

    >>> import torch, fxcompress
    >>> from fxcompress.examples import SmallCNN
    >>> from fxcompress.prune import L1Norm
    >>> from fxcompress.report import count_params
    >>> model = SmallCNN()
    >>> small = fxcompress.compile(model, torch.randn(1, 1, 28, 28), standard_pruning(L1Norm(), target="params=3"))
    >>> round(count_params(model) / count_params(small), 2)
    3.0
    """
    from fxcompress.prune import Targeted

    masks = InsertMasks(pruner if target is None else Targeted(pruner, target))
    return [masks, *([CompensateBias()] if compensate else []), PropagateChannels(), Shrink()]


def standard_ptq(config, calibration_data) -> list:
    """Post-training int8: fold batch norm, observe, calibrate, fake-quantize, fold into QDQ form."""
    return [FoldBatchNorm(), InsertObservers(config), Calibrate(calibration_data), FakeQuantize(), FoldQDQ()]


def inference_passes(fuse: bool = False) -> list:
    """Output-preserving CPU inference passes to run after pruning: fold batch norm, channels-last weights.

    ``fuse=True`` adds ``FuseConvActivation`` (conv + activation as one oneDNN
    op, through a private torch op); it measured within noise on a shrunk
    ResNet-50, so it is opt-in.
    """
    return [FoldBatchNorm(), ChannelsLast(), *([FuseConvActivation()] if fuse else [])]
