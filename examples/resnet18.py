"""ResNet-18 as an fxcompress model file.

A model file defines ``model()`` returning the ``nn.Module`` and
``example_inputs()`` returning a tuple of forward() arguments. Use it with
every subcommand of the command line::

    python -m fxcompress viz examples/resnet18.py --sparsity 0.5
    python -m fxcompress compress examples/resnet18.py --onnx out/resnet18.onnx
    python -m fxcompress report examples/resnet18.py

The weights are random (seeded), so no download is needed; a 64x64 input keeps
the example quick while exercising every layer (the network is fully
convolutional up to its global average pool, so any size from 32x32 works).
"""

import torch
import torchvision


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def example_inputs() -> tuple:
    return (torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),)
