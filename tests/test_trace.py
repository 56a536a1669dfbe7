"""The frontend's shape propagation: real forward for small models, fake tensors for large ones."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import meta

trace_module = importlib.import_module("fxcompress.trace")  # `fxcompress.trace` itself is the function


def _shapes(gm) -> dict[str, tuple]:
    return {n.name: tuple(n.meta[meta.TENSOR_META].shape) for n in gm.graph.nodes
            if hasattr(n.meta.get(meta.TENSOR_META), "shape")}


def test_fake_tensor_shapes_equal_real_ones(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.shufflenet_v2_x0_5().eval(), torch.randn(1, 3, 64, 64)
    real = _shapes(fxcompress.trace(model, x))
    monkeypatch.setattr(trace_module, "FAKE_SHAPES_ABOVE", 0)  # every model counts as large
    assert _shapes(fxcompress.trace(model, x)) == real


class DataDependent(nn.Module):
    def forward(self, x):
        return x[x > 0].sum() + x  # boolean indexing: the shape depends on the values


def test_ops_fake_tensors_cannot_run_fall_back_to_a_real_forward(monkeypatch):
    monkeypatch.setattr(trace_module, "FAKE_SHAPES_ABOVE", -1)
    gm = fxcompress.trace(DataDependent(), torch.randn(4, 3))
    assert _shapes(gm)["add"] == (4, 3)
