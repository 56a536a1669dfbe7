"""The core pipelines on a CUDA device: compile + verify + shrink, unstructured masks, PTQ.

Marked ``cuda``: skipped where ``torch.cuda.is_available()`` is false (every
CPU-only machine, including CI); on a GPU machine run ``python -m pytest -m cuda``.
The model and inputs live on the GPU; masks, kept-channel indices, verification
noise and the buffers rules add must follow them there.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxcompress
from fxcompress.passes import standard_pruning, standard_ptq
from fxcompress.prune import L1Norm, LevelPruner, Taylor
from fxcompress.prune.evaluator import Evaluator
from fxcompress.quant import QConfig
from fxcompress.report import count_macs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval().cuda(), torch.randn(2, 3, 64, 64, device="cuda")


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_structured_pruning_verifies_and_shrinks_on_the_gpu(frontend):
    model, x = _resnet()
    small = fxcompress.compile(model, x, standard_pruning(L1Norm(0.5)), verify=True, frontend=frontend)
    assert all(p.is_cuda for p in small.parameters())
    assert count_macs(model, x) / count_macs(small, x) > 3


def test_norm_pruning_of_a_vision_transformer_on_the_gpu():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32).eval().cuda()
    x = torch.randn(1, 3, 32, 32, device="cuda")
    small = fxcompress.compile(model, x, standard_pruning(L1Norm(0.5)), verify=True)
    assert count_macs(model, x) / count_macs(small, x) > 3


def test_gradient_criterion_and_unstructured_masks_on_the_gpu():
    model, x = _resnet()
    batches = [(x, torch.tensor([1, 2], device="cuda"))]
    taylor = Taylor(evaluator=Evaluator(batches, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
                                        progress=False), num_batches=1)
    fxcompress.compile(model, x, standard_pruning(taylor), verify=True)
    masked = fxcompress.compile(model, x, [fxcompress.passes.InsertMasks(LevelPruner(0.7))], verify=True)
    assert masked(x).is_cuda


def test_post_training_quantization_on_the_gpu():
    model, x = _resnet()
    q = fxcompress.compile(model, x, standard_ptq(QConfig.int8(), [(x,)]), verify=True)
    assert q(x).is_cuda
