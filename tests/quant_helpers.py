"""Shared helpers of the quantization tests: a small conv net compiled through the PTQ passes."""

import copy
import functools

import torch

import fxcompress
from fxcompress.examples import SmallCNN
from fxcompress.passes.calibrate import Calibrate
from fxcompress.passes.fake_quantize import FakeQuantize
from fxcompress.passes.fold_batch_norm import FoldBatchNorm
from fxcompress.passes.insert_observers import InsertObservers
from fxcompress.quant.config import QConfig
from fxcompress.quant.observers import MinMaxObserver


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return SmallCNN(c1=8, c2=16, hidden=32).eval()


def inputs(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def config(**kwargs) -> QConfig:
    return QConfig.int8(activation_observer=MinMaxObserver(), **kwargs)


def ptq(model=None, *, fold=False, cfg=None, extra=()) -> fxcompress.fx.GraphModule:
    """The small model through PTQ (and fold-qdq); the default case is built once per session and copied."""
    if model is None and cfg is None and not extra:
        return copy.deepcopy(_default_ptq(fold))
    return _ptq(model, fold=fold, cfg=cfg, extra=extra)


@functools.cache
def _default_ptq(fold: bool):
    return _ptq(None, fold=fold, cfg=None, extra=())


def _ptq(model, *, fold, cfg, extra):
    passes = [FoldBatchNorm(), InsertObservers(cfg or config()), Calibrate((inputs(32, 2),), progress=False),
              FakeQuantize()]
    if fold:
        from fxcompress.passes.fold_qdq import FoldQDQ

        passes.append(FoldQDQ())
    return fxcompress.compile(model or small_model(), inputs(4), [*passes, *extra])
